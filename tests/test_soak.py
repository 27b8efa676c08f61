"""The kill -9 soak's short form (issue 18, item 4): 12 SIGKILLs at random moments across every family and
`distill cache`, each run resumed with --resume, each finished run equal to an uninterrupted one. The kill
moments are seeded: fixed under CI (the CI environment variable), random locally (the seed is in the
failure message; rerun with `python tests/soak.py --seed N`)."""
from __future__ import annotations

import os
import random

import soak


def test_killed_runs_resume_to_the_uninterrupted_result_in_every_family(tmp_path):
    seed = 0 if os.environ.get("CI") else random.SystemRandom().randrange(2**31)
    summary = soak.soak(12, seed, tmp_path / "soak", list(soak.SCENARIOS), kills_per_chain=3)
    assert summary["kills"] >= 12, summary
    assert set(summary["scenarios"]) == {"lm", "sequence", "cache", "classifier", "diffusion"}
    problems = {name: s["problems"] for name, s in summary["scenarios"].items() if s["problems"]}
    assert not problems, f"seed {seed}: {problems}"
