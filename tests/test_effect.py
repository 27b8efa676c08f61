"""Distillation must help where soft targets carry what hard labels lose: on the oracle language,
with few sequences, the distilled student ends closer to the truth than the student alone,
over 3 seeds and by a margin (exact KL to the oracle, not an estimate)."""
from __future__ import annotations

import pytest

import distill


# One test per seed (each seed must clear the margin), so that the two test workers share them. At 80 steps
# the margins are 0.11-0.12 (0.05 asked); at 50 the top-1 agreement check fails on seed 0.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distilled_student_beats_student_alone_on_exact_kl_over_three_seeds(tmp_path, seed):
    result = distill.run("builtin:oracle-demo", [
        f"train.seed={seed}", f"data.seed={seed}", "data.train_size=300", "data.eval_size=64",
        "train.steps=80", "train.batch_size=16", "train.warmup_steps=10", "train.checkpoint_every=80",
        "eval.every=80", "eval.generate_size=0", "eval.throughput_tokens=2", f"output={tmp_path / str(seed)}"])
    alone = result.rows["alone"]["oracle_forward_kl"]
    distilled = result.rows["distilled"]["oracle_forward_kl"]
    assert alone - distilled > 0.05, f"seed {seed}: alone {alone:.4f} - distilled {distilled:.4f} exact KL"
    # The distilled student also agrees with the teacher more often.
    assert result.rows["distilled"]["teacher_top1_agreement"] > result.rows["alone"]["teacher_top1_agreement"]
