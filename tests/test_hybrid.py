"""The hybrid sampler (diversity distillation): the teacher's first step, then the student (eval.hybrid)."""
from __future__ import annotations

import distill

from test_diffusion import diffusion_recipe


def test_hybrid_rows_for_one_step_and_multistep_students(tmp_path):
    dmd = distill.run(diffusion_recipe(tmp_path / "dmd", "dmd", train={"steps": 4, "batch_size": 32, "log_every": 2},
                                       eval={"samples": 200, "teacher_steps": [2], "every": 4, "curve_samples": 50,
                                             "hybrid": [2, 8]}))
    assert {"hybrid-2 dmd 1", "hybrid-8 dmd 1"} <= set(dmd.rows)
    assert dmd.rows["hybrid-8 dmd 1"]["function_evaluations"] == 2  # one teacher step + one student step
    assert dmd.rows["hybrid-2 dmd 1"]["mmd"] != dmd.rows["hybrid-8 dmd 1"]["mmd"]  # the teacher's step differs
    assert dmd.rows["hybrid-8 dmd 1"]["mmd"] != dmd.rows["student dmd 1"]["mmd"]
    assert any("hybrid-N" in note for note in dmd.meta["notes"])
    consistency = distill.run(diffusion_recipe(tmp_path / "cm", "consistency",
                                               train={"steps": 4, "batch_size": 32, "log_every": 2},
                                               eval={"samples": 200, "teacher_steps": [2], "every": 4,
                                                     "curve_samples": 50, "hybrid": [4]}))
    assert {"hybrid-4 consistency 1", "hybrid-4 consistency 2"} <= set(consistency.rows)
    assert consistency.rows["hybrid-4 consistency 2"]["function_evaluations"] == 3


def test_hybrid_needs_a_schedule_of_two_steps(tmp_path, write_recipe, run_cli):
    recipe = diffusion_recipe(tmp_path / "run", "dmd", eval={"hybrid": [1]})
    result = run_cli("run", write_recipe(recipe))
    assert result.returncode == 2 and "eval.hybrid" in result.stderr
