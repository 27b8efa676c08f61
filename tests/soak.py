"""Kill -9 soak: `distill run` (every family) and `distill cache`, killed with SIGKILL at random moments and
resumed with `--resume`, must end exactly where an uninterrupted run ends.

    python tests/soak.py --kills 12 --seed 0 --work /tmp/soak [--json soak.json] [--scenarios lm,cache]

Per scenario: one uninterrupted reference run, watched for the phases it goes through (teacher evaluation,
each training phase, checkpoint writing, evaluation between phases, generation, the cache build, final
files) and timed (S: its output directory appears, i.e. imports and loading are done; E: its results are
written). Then chains: start the command and SIGKILL it, start it again with --resume, ... and after the
chain's kills (`--kills-per-chain`) let the last --resume finish. A chain's first kill aims at the next of the
reference's phases in turn, from a random one on (killed as soon as the run is seen in it, polling every 5 ms:
a fresh run goes through every phase); the resumed processes' kills land at random moments drawn uniformly
from (S, E) minus the work the chain already got through (`--early 0` draws from (0, E)). A process that
finishes before its kill ends the chain. The finished run must
equal the reference: every weight file (bit for bit), metrics.jsonl and results.json's rows (timings left
out); a cache must equal the reference cache file by file. Kills are spread over the scenarios round-robin,
`--kills-per-chain` per chain. Where each kill landed is read from the run's output (the last progress line:
teacher evaluation, a training phase, the alone phase, generation, final evaluation, report) and from the run
directory (a checkpoint being staged). Exit status 1 if any scenario differs.

Each command runs in a child forked from this process, which has imported the CLI and the three families
once (`--spawn`: a fresh `python -m distill` per command, as a user starts it; kills during imports and loading,
`--early` < 1, need it). A forked child is a process of its own (its own session, SIGKILLed as a group, its
output in the scenario's log), started without the ~6 s of importing torch and transformers that a fresh
interpreter spends before any file is written: the soak's kills land in the work either way, the forked soak
just gets there sooner.

The short form runs in the suite (tests/test_soak.py); the long form (`--kills 200`) is documented with its
last result in docs/reliability.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

TIMING = ("second", "time", "latency", "throughput", "elapsed", "wall")  # keys left out of the comparison


def _tiny_lm(output: Path) -> dict:
    """The oracle teacher, a 1-layer student, both phases (distilled and alone), evaluations on the way."""
    return {"name": "soak-lm", "task": "lm", "teacher": {"path": "builtin:oracle-teacher"},
            "student": {"config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 32}},
            "data": {"builtin": "oracle", "train_size": 64, "eval_size": 16},
            "objective": {"loss": "jsd", "beta": 0.5},
            "train": {"steps": 8, "batch_size": 8, "threads": 1, "checkpoint_every": 2, "log_every": 1, "seed": 0},
            "eval": {"every": 4, "batch_size": 16, "generate_size": 4, "throughput_tokens": 4},
            "output": str(output)}


def _tiny_sequence(output: Path) -> dict:
    """Sequence KD on arithmetic: the teacher generates the completions first (greedy), then training."""
    return {"name": "soak-sequence", "task": "lm", "teacher": {"path": "builtin:arithmetic-teacher"},
            "student": {"config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 32}},
            "data": {"builtin": "arithmetic", "train_size": 48, "eval_size": 8},
            "objective": {"loss": "forward_kl", "ce_weight": 0.5},
            "regime": {"kind": "sequence", "sample_temperature": 0.0},
            "train": {"steps": 6, "batch_size": 8, "threads": 1, "checkpoint_every": 2, "log_every": 1,
                      "baseline": False, "seed": 0},
            "eval": {"every": 3, "batch_size": 8, "generate_size": 4, "throughput_tokens": 4},
            "output": str(output)}


def _tiny_cache(output: Path) -> dict:
    """`distill cache` of the oracle teacher, 8 shards (the unit of resume)."""
    recipe = _tiny_lm(output.with_name(output.name + "-run"))
    recipe["data"] = {"builtin": "oracle", "train_size": 256, "eval_size": 16}
    recipe["regime"] = {"kind": "cache", "path": str(output), "k": 8, "shard_examples": 32}
    return recipe


def _tiny_classifier(output: Path) -> dict:
    return {"name": "soak-classifier", "task": "classifier", "teacher": {"path": "builtin:digits-teacher"},
            "student": {"arch": "mlp", "options": {"hidden": [16]}},
            "data": {"builtin": "digits", "eval_size": 200, "seed": 0},
            "objective": {"terms": [{"loss": "ce"}, {"loss": "kd", "temperature": 4}]},
            "train": {"epochs": 1, "batch_size": 128, "lr": 0.003, "seed": 0, "threads": 1, "checkpoint_every": 3,
                      "log_every": 2},
            "eval": {"every_epochs": 0.5},
            "output": str(output)}


def _tiny_diffusion(output: Path) -> dict:
    return {"name": "soak-diffusion", "task": "diffusion", "teacher": {"path": "builtin:gmm2d-teacher"},
            "student": {"method": "dmd", "eval_steps": [1]},
            "data": {"builtin": "gmm2d", "modes": 8},
            "objective": {"divergence": "js", "fake_updates": 2},
            "train": {"steps": 16, "batch_size": 64, "checkpoint_every": 4, "log_every": 4, "threads": 1, "seed": 0},
            "eval": {"samples": 256, "teacher_steps": [1], "every": 8, "curve_samples": 128},
            "output": str(output)}


# name -> (recipe maker, is a cache build)
SCENARIOS = {"lm": (_tiny_lm, False), "sequence": (_tiny_sequence, False), "cache": (_tiny_cache, True),
             "classifier": (_tiny_classifier, False), "diffusion": (_tiny_diffusion, False)}


# ---- running and killing -------------------------------------------------------------------------------

def _command(recipe_file: Path, cache: bool, resume: bool) -> list[str]:
    if cache:  # a cache build resumes by itself: the shards already written are kept
        return [sys.executable, "-m", "distill", "cache", str(recipe_file)]
    return [sys.executable, "-m", "distill", "run", str(recipe_file), *(["--resume"] if resume else [])]


def _environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


FORK = {"on": False}  # main() turns it on unless --spawn: commands run in children forked from this process


def _start(command: list[str], log: Path):
    if FORK["on"]:
        return Forked(command, log)
    handle = open(log, "ab")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_environment(),
                            start_new_session=True)


def preload() -> None:
    """Import what `distill run` / `distill cache` of every family imports, in this process, before any fork
    (no torch operation runs here: the children start with torch's thread pools unstarted, as a fresh process)."""
    import transformers

    import distill.cli  # noqa: F401
    from distill.core.families import family_names, get_family

    for name in family_names():
        get_family(name)
    import distill.classifier.run  # noqa: F401
    import distill.diffusion.run  # noqa: F401
    import distill.lm.run  # noqa: F401
    import distill.lm.teacher.cache.build  # noqa: F401
    transformers.LlamaForCausalLM, transformers.AutoTokenizer  # resolve the lazy modules now


class Forked:
    """`distill ARGS` in a child forked from this process (after `preload`), with subprocess.Popen's surface
    that the soak uses: pid (the child leads its own session: os.killpg reaches it), poll(), wait(), args,
    returncode. The child writes to `log`, runs the CLI's main and leaves with its exit code."""

    def __init__(self, command: list[str], log: Path):
        self.args, self.returncode = command, None
        arguments = command[3:]  # [python, -m, distill, ARGS...]
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setsid()
                handle = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.dup2(handle, 1), os.dup2(handle, 2)
                os.close(handle)
                os.environ.update(_environment())
                sys.argv = ["distill", *arguments]
                from distill.cli import main
                try:
                    main()
                    code = 0
                except SystemExit as exit_:
                    code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # noqa: BLE001 - printed to the log, as an interpreter would
                import traceback
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush(), sys.stderr.flush()
                finally:
                    os._exit(code)
        self.pid = pid

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None):
        deadline = None if timeout is None else time.perf_counter() + timeout
        while self.poll() is None:
            if deadline is not None and time.perf_counter() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        return self.returncode

    def kill(self):
        os.killpg(self.pid, signal.SIGKILL)


def _where(log: Path, output: Path, cache: bool) -> str:
    """Which part of the run a kill landed in, from the run directory (a checkpoint or a final file being
    staged) and the last progress line of the run's output."""
    if not output.exists():
        return "start-up (imports, loading)"
    if (output / "results.json").exists() or (cache and (output / "manifest.json").exists()):
        return "exit (everything written)"
    if not cache and any(output.glob("checkpoints/*.tmp")):
        return "checkpoint writing"
    if not cache and (any(output.glob("*.tmp")) or any(output.glob("*/*.tmp"))):
        return "final files (student, report)"
    text = log.read_bytes()[-4000:].decode("utf-8", "replace").replace("\r", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip() and ":" in line]
    if not lines:
        return "cache: teacher loading" if cache else "teacher evaluation (before training)"
    last = lines[-1]
    label = last.split(":")[0].strip()
    if "100%" in last:
        return f"evaluation after {label}" if not cache else "cache: closing"
    if label.startswith("teacher generations"):
        return "generation (sequence regime)"
    if label.startswith("caching"):
        return "cache build"
    return f"training: {label}"


def _watch(process: subprocess.Popen, log: Path, output: Path, cache: bool, *, delay: float | None = None,
           target: str | None = None, timeout: float = 600, poll: float = 0.005) -> tuple[bool, str, float]:
    """Wait for `process`; SIGKILL it `delay` seconds after its start, or as soon as the run is in `target`
    (a `_where` label). (killed, where it was, seconds since its start)."""
    started = time.perf_counter()
    while process.poll() is None:
        elapsed = time.perf_counter() - started
        where = _where(log, output, cache) if target is not None or delay is not None and elapsed >= delay else ""
        if (delay is not None and elapsed >= delay) or (target is not None and where == target):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True, where, elapsed
        if elapsed > timeout:
            os.killpg(process.pid, signal.SIGKILL)
            raise RuntimeError(f"`{' '.join(process.args)}` ran over {timeout} s; see {log}")
        time.sleep(poll)
    return False, "", time.perf_counter() - started


def run_chain(scenario: str, recipe_file: Path, output: Path, aims: list[str | None], window: tuple[float, float],
              rng: random.Random, log: Path, timeout: float) -> list[dict]:
    """One chain: a SIGKILL per entry of `aims` (a phase of the reference run to kill in, or None: a random
    moment within what is left of the run, `window` being the reference's working time), each followed by a
    --resume, the last of which finishes. The chain stops killing when a process finishes first (its phase was
    not reached). The kill records."""
    cache = SCENARIOS[scenario][1]
    records = []
    resume = False
    begins, ends = window
    done = 0.0  # working time the killed processes got through (roughly: work since a checkpoint is redone)
    while True:
        process = _start(_command(recipe_file, cache, resume), log)
        if len(records) < len(aims):
            aim = aims[len(records)]
            delay = None if aim else rng.uniform(begins, max(begins + 0.5, ends - done))
            killed, where, elapsed = _watch(process, log, output, cache, delay=delay, target=aim, timeout=timeout)
            if killed:
                done += max(0.0, elapsed - begins)
                records.append({"scenario": scenario, "after_seconds": round(elapsed, 2), "where": where,
                                "aimed_at": aim or "a random moment"})
                resume = True
                continue
        else:
            process.wait(timeout=timeout)
        if process.returncode != 0:
            text = log.read_bytes()[-3000:].decode("utf-8", "replace").replace("\r", "\n")
            said = [line.strip() for line in text.splitlines() if line.strip().startswith("error")]
            raise ChainFailed(f"`{' '.join(_command(recipe_file, cache, resume)[2:])}` exited {process.returncode} "
                              f"after {len(records)} kill(s) ({said[-1] if said else 'see ' + str(log)})", records)
        return records


class ChainFailed(RuntimeError):
    """A chain's process failed (a kill left something a resume cannot continue): what it said, the kills."""

    def __init__(self, message: str, records: list[dict]):
        super().__init__(message)
        self.records = records


# ---- comparing -----------------------------------------------------------------------------------------

def _no_timing(value):
    if isinstance(value, dict):
        return {k: _no_timing(v) for k, v in value.items() if not any(t in k.lower() for t in TIMING)}
    if isinstance(value, list):
        return [_no_timing(v) for v in value]
    return value


def _weight_files(directory: Path) -> dict[str, bytes]:
    skip = ("checkpoints", "trackers")
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.safetensors"))
            if p.relative_to(directory).parts[0] not in skip}


def differences(reference: Path, resumed: Path, cache: bool) -> list[str]:
    """What differs between the reference run (or cache) and the resumed one; [] when they are equal."""
    if cache:
        def files(d):
            return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
                    if p.is_file() and not p.name.startswith("progress") and p.name != "error.log"}
        ref, got = files(reference), files(resumed)
        problems = [f"{name}: missing" for name in ref if name not in got]
        problems += [f"{name}: extra" for name in got if name not in ref]
        problems += [f"{name}: differs" for name in ref if name in got and ref[name] != got[name]
                     and name != "manifest.json"]
        if "manifest.json" in ref and "manifest.json" in got:
            a, b = (_no_timing(json.loads(x["manifest.json"])) for x in (ref, got))
            a.pop("path", None), b.pop("path", None)
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                problems.append("manifest.json: differs")
        return problems
    problems = []
    ref_weights, got_weights = _weight_files(reference), _weight_files(resumed)
    if set(ref_weights) != set(got_weights):
        problems.append(f"weight files: {sorted(ref_weights)} vs {sorted(got_weights)}")
    problems += [f"{name}: weights differ" for name in ref_weights
                 if name in got_weights and ref_weights[name] != got_weights[name]]

    def metrics(d):
        return [_no_timing(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
    if metrics(reference) != metrics(resumed):
        problems.append("metrics.jsonl differs")
    rows = [_no_timing(json.loads((d / "results.json").read_text())["rows"]) for d in (reference, resumed)]
    if rows[0] != rows[1]:
        problems.append("results.json rows differ")
    return problems


# ---- the soak ------------------------------------------------------------------------------------------

def soak(kills: int, seed: int, work: Path, scenarios: list[str], kills_per_chain: int = 3,
         timeout: float = 600, early: float = 1.0) -> dict:
    """`early` < 1 lets kills land before the work starts (imports and loading: early * that time onwards);
    1 (default) draws every kill from the reference run's working time, where the files are written."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    plan = {name: 0 for name in scenarios}
    for index in range(kills):  # round-robin
        plan[scenarios[index % len(scenarios)]] += 1
    summary = {"seed": seed, "kills_asked": kills, "scenarios": {}}
    for name in scenarios:
        maker, cache = SCENARIOS[name]
        base = work / name
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        reference = base / "reference"
        reference_recipe = base / "reference.yaml"
        reference_recipe.write_text(yaml.safe_dump(maker(reference)))
        started = time.perf_counter()
        process = _start(_command(reference_recipe, cache, False), base / "reference.log")
        begins, finishes = None, None  # output directory there (imports, loading done); results written
        phases: list[str] = []  # the phases the run went through, in order: what targeted kills aim at
        while process.poll() is None:
            elapsed = time.perf_counter() - started
            where = _where(base / "reference.log", reference, cache)
            if begins is None and reference.exists():
                begins = elapsed
            if finishes is None and where.startswith("exit"):
                finishes = elapsed
            if not where.startswith(("start-up", "exit")) and where not in phases:
                phases.append(where)
            time.sleep(0.005)
            if elapsed > timeout:
                process.kill()
                raise RuntimeError(f"{name}: the reference run took over {timeout} s")
        seconds = time.perf_counter() - started
        begins = min(begins if begins is not None else 0.0, seconds)
        finishes = finishes if finishes is not None else seconds
        if process.returncode != 0:
            raise RuntimeError(f"{name}: the reference run failed; see {base / 'reference.log'}")
        records, problems, chain = [], [], 0
        offset = rng.randrange(max(1, len(phases)))
        while len(records) < plan[name]:
            output = base / f"chain{chain}"
            recipe_file = base / f"chain{chain}.yaml"
            recipe_file.write_text(yaml.safe_dump(maker(output)))
            window = (begins * early, finishes)
            # a chain's first kill aims at the reference's phases in turn (a fresh run goes through all of them);
            # the resumed processes' kills land at random moments
            first = phases[(offset + chain) % len(phases)] if phases else None
            aims = [first] + [None] * (min(kills_per_chain, plan[name] - len(records)) - 1)
            try:
                got = run_chain(name, recipe_file, output, aims, window, rng, base / f"chain{chain}.log", timeout)
            except ChainFailed as failure:  # a resume that did not finish: a finding, recorded; on to the next
                got = failure.records
                problems.append(f"chain{chain}: {failure}")
            else:
                problems += [f"chain{chain}: {p}" for p in differences(reference, output, cache)]
            records += got
            chain += 1
            if chain > 4 * plan[name] + 4:  # the runs keep finishing before the kill: stop trying
                break
        where = {}
        for record in records:
            where[record["where"]] = where.get(record["where"], 0) + 1
        summary["scenarios"][name] = {"kills": len(records), "chains": chain, "reference_seconds": round(seconds, 1),
                                      "work_starts_at": round(begins, 1), "phases": phases,
                                      "where": where, "equal": not problems, "problems": problems}
        print(f"{name}: {len(records)} kills in {chain} chains, reference {seconds:.1f} s through {phases}, "
              f"{'equal to the uninterrupted run' if not problems else 'DIFFERS: ' + '; '.join(problems)}; "
              f"kills landed in: {where}", flush=True)
    summary["kills"] = sum(s["kills"] for s in summary["scenarios"].values())
    summary["equal"] = all(s["equal"] for s in summary["scenarios"].values())
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs in all (spread round-robin).")
    parser.add_argument("--kills-per-chain", type=int, default=3, help="Kills of one run before it may finish.")
    parser.add_argument("--seed", type=int, default=None, help="Kill moments' seed (default: random, printed).")
    parser.add_argument("--work", type=Path, default=Path("soak-work"), help="Working directory (replaced).")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"Some of: {', '.join(SCENARIOS)}.")
    parser.add_argument("--early", type=float, default=1.0, help="Kill moments start at this fraction of the "
                        "reference's start-up time (0: kills during imports and loading too).")
    parser.add_argument("--spawn", action="store_true", help="A fresh `python -m distill` per command "
                        "(default: a child forked from this process, which imported the CLI once).")
    parser.add_argument("--json", type=Path, default=None, help="Write the summary as JSON here.")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.early < 1 and not args.spawn:
        parser.error("--early below 1 kills during imports and loading: add --spawn (a forked child has imported)")
    if not args.spawn:
        preload()
        FORK["on"] = True
    print(f"soak: {args.kills} kills, seed {seed}, scenarios {', '.join(names)}, "
          f"{'fresh interpreters' if args.spawn else 'forked children'}", flush=True)
    started = time.perf_counter()
    summary = soak(args.kills, seed, args.work, names, args.kills_per_chain, early=args.early)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{summary['kills']} kills; every resumed run equal to the uninterrupted one: {summary['equal']} "
          f"({summary['seconds']} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
