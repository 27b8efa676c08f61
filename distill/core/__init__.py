"""What every model family uses: errors, recipes, the family registry, the run skeleton and run
directory, the one report writer, checkpoints, atomic writes, forward hooks, shared metrics, and
`distill eval` / `distill compare`. Imports no family (docs/architecture.md)."""
