"""Write recipes/data/arithmetic-{train,eval}.jsonl: prompt/completion rows from the built-in
arithmetic task, as an example of bringing your own data. Run from the repository root."""
import json
from pathlib import Path

from distill.lm.tasks.arithmetic import ArithmeticTask

task = ArithmeticTask()
for split, count in (("train", 1000), ("eval", 100)):
    rows = task.records(count, seed=7, split=split)
    Path(f"recipes/data/arithmetic-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
