"""The kill -9 soak's short form (issue 18, item 4): 12 SIGKILLs at random moments across the three families
(lm with its alone phase, classifier, diffusion), each run resumed with --resume, each finished run equal to an
uninterrupted one. The long form (tests/soak.py --kills 200) adds the sequence regime and `distill cache`. The kill
moments are seeded: fixed under CI (the CI environment variable), random locally (the seed is in the
failure message; rerun with `python tests/soak.py --seed N`).

The soak runs as a process of its own (`python tests/soak.py`): it imports the CLI once and forks a child per
command, which a pytest worker (threads of its own) must not do. About 45 s on one core."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).with_name("soak.py")


def test_killed_runs_resume_to_the_uninterrupted_result_in_every_family(tmp_path):
    seed = 0 if os.environ.get("CI") else random.SystemRandom().randrange(2**31)
    # the three families, 4 kills each in one chain (the long form adds the sequence regime and distill cache)
    done = subprocess.run([sys.executable, str(SOAK), "--kills", "12", "--kills-per-chain", "4", "--seed", str(seed),
                           "--scenarios", "lm,classifier,diffusion", "--work", str(tmp_path / "soak"),
                           "--json", str(tmp_path / "soak.json")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert (tmp_path / "soak.json").exists(), f"seed {seed}: the soak stopped\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["kills"] >= 12, summary
    assert set(summary["scenarios"]) == {"lm", "classifier", "diffusion"}
    problems = {name: s["problems"] for name, s in summary["scenarios"].items() if s["problems"]}
    assert not problems, f"seed {seed}: {problems}"
    assert done.returncode == 0, done.stdout[-3000:]
