"""FSDP2 sharding of teacher and student (distill/lm/sharding.py) in two real processes on CPU/gloo.

tests/sharding_worker.py runs under `torch.distributed.run --standalone --nproc_per_node 2` (a free
rendezvous port of its own) and compares, on a tiny Llama (hidden 32, 2 layers, vocabulary 64), the
2-process sharded run with the unsharded one-process reference on the same global batch (fp32, atol 1e-5):
half the rows of every parameter per process (student and teacher), the fused-path loss and gathered
student gradients (also with activation checkpointing and with tied embeddings), the clipped gradient
norm, a checkpoint round trip of model and optimizer through distill.core.checkpoint, save_pretrained
of the gathered weights, sampling and main-process evaluation inside `gathered`, and a bf16 mixed
precision step. About 12 s on the 2-core machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sharding_worker.py")
CHECKS = ["sampling and main-process evaluation before any training step", "shards, fused loss and gradients",
          "sampling", "checkpoint round trip", "gradient checkpointing", "tied embeddings",
          "tied checkpoint round trip", "bf16 mixed precision"]


def test_two_process_fsdp_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(WORKER), str(tmp_path)], cwd=WORKER.parents[1], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    lines = result.stdout.splitlines()
    missing = [check for check in CHECKS if f"ok {check}" not in lines]
    assert not missing, f"checks that did not report: {missing}\n{result.stdout[-3000:]}"


# ---- end to end: `distill run` with train.sharding: fsdp under two processes -------------------------

def _fsdp_recipe(tiny_recipe: dict, output, **train) -> dict:
    """The tiny recipe with a 2-layer student (two FSDP units + the root), no baseline."""
    return {**tiny_recipe, "output": str(output),
            "student": {"config": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "intermediate_size": 32}},
            "train": {**tiny_recipe["train"], "baseline": False, "sharding": "fsdp", **train}}


def _student(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "student" / "model.safetensors"))


def test_fsdp_run_from_a_saved_student_shards_equals_one_process_and_resumes_after_a_kill(
        tiny_recipe, tiny_lm_dir, write_recipe, tmp_path):
    """Two processes under `accelerate launch`, gradient checkpointing on, the student read from `student.path`
    row by row into shards (like the teacher): every rank holds half of the student's and the teacher's
    parameters; the saved student equals a one-process run over the same global batch (float32, rtol 1e-4 /
    atol 1e-5). The same recipe crashed after the step-2 checkpoint and relaunched with --resume ends with the
    same weights bit for bit. (A student built from a config is sharded the same way: tests/sharding_worker.py.)"""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill
    from conftest import launch_two_processes

    torch.manual_seed(7)  # a student of the teacher's shape with weights of its own
    config = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).config
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "student_start")
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(tmp_path / "student_start")
    recipe = _fsdp_recipe(tiny_recipe, tmp_path / "fsdp", gradient_checkpointing=True)
    recipe["student"] = {"path": str(tmp_path / "student_start")}
    launched = launch_two_processes("run", write_recipe(recipe))
    assert launched.returncode == 0, launched.stderr[-4000:]
    meta = json.loads((tmp_path / "fsdp" / "results.json").read_text())["meta"]
    assert meta["world_size"] == 2 and meta["sharding"] == "fsdp"
    shares = meta["parameter_share_per_rank"]
    assert shares["teacher"] == [0.5, 0.5] and shares["distilled"] == [0.5, 0.5], shares
    assert meta["teacher_loaded_sharded"]  # each process read its own rows of the teacher, never the whole
    single = distill.run({**recipe, "output": str(tmp_path / "single"),
                          "train": {**recipe["train"], "sharding": "ddp",
                                    "batch_size": 2 * recipe["train"]["batch_size"]}})
    expected, got = _student(single.run_dir), _student(tmp_path / "fsdp")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)

    path = write_recipe({**recipe, "output": str(tmp_path / "resumed")}, "resumed.yaml")
    os.environ["DISTILL_CRASH_AFTER_STEP"] = "2"
    try:
        crashed = launch_two_processes("run", path)
    finally:
        del os.environ["DISTILL_CRASH_AFTER_STEP"]
    assert crashed.returncode != 0 and not (tmp_path / "resumed" / "results.json").exists()
    finished = launch_two_processes("run", path, "--resume")
    assert finished.returncode == 0, finished.stderr[-4000:]
    straight, resumed = _student(tmp_path / "fsdp"), _student(tmp_path / "resumed")
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_fsdp_with_one_process_warns_and_runs_unsharded(tiny_recipe, tmp_path):
    import distill

    with pytest.warns(UserWarning, match="fsdp with one process"):
        result = distill.run(_fsdp_recipe(tiny_recipe, tmp_path / "one"))
    assert result.meta["sharding"] == "none"


def test_fsdp_refuses_fp16_and_lora_before_writing(tiny_recipe, tmp_path):
    import distill
    from distill.core.errors import DistillError

    for train, student, field in (({"precision": "fp16"}, {}, "train.precision"),
                                  ({}, {"lora": {"r": 2}}, "train.sharding")):
        recipe = _fsdp_recipe(tiny_recipe, tmp_path / "refused", **train)
        recipe["student"] = {**recipe["student"], **student}
        with pytest.raises(DistillError, match=field.replace(".", r"\.")):
            distill.run(recipe)
        assert not (tmp_path / "refused").exists()
