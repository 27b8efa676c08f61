"""The trainer through the public API: gradient accumulation, data parallelism, resume,
non-finite losses, schedules."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import distill
from conftest import launch_two_processes
from distill.lm.recipe import TrainSpec
from distill.lm.trainer import make_scheduler


def _weights(run_dir, name="student"):
    return load_file(str(run_dir / name / "model.safetensors"))


def _variable_length_rows(path, count=24):
    """prompt/completion rows whose completions differ in length, so that a per-micro-batch mean
    and a mean over the accumulated batch differ."""
    rows = [{"prompt": " ".join(f"w{(i + j) % 64}" for j in range(3)),
             "completion": " ".join(f"w{(i * 7 + j) % 64}" for j in range(1 + i % 9))} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _no_timing(rows):
    return {name: {k: v for k, v in row.items() if k != "generation_tokens_per_second"} for name, row in rows.items()}


def test_gradient_accumulation_averages_over_the_whole_accumulated_batch(tiny_recipe, tmp_path):
    data = _variable_length_rows(tmp_path / "rows.jsonl")
    base = {**tiny_recipe, "data": {"train": str(data), "eval_size": 4}, "objective": {"loss": "jsd", "ce_weight": 0.5},
            "train": {**tiny_recipe["train"], "baseline": False, "max_grad_norm": None, "lr": 1e-2}}
    one = distill.run({**base, "output": str(tmp_path / "one"), "train": {**base["train"], "batch_size": 8}})
    two = distill.run({**base, "output": str(tmp_path / "two"),
                       "train": {**base["train"], "batch_size": 4, "grad_accum": 2}})
    one_weights, two_weights = _weights(one.run_dir), _weights(two.run_dir)
    initial = distill.run({**base, "output": str(tmp_path / "zero"), "train": {**base["train"], "steps": 1, "lr": 1e-12}})
    moved = max((one_weights[k] - _weights(initial.run_dir)[k]).abs().max().item() for k in one_weights)
    assert moved > 1e-2, "training did not move the weights: the comparison below would be empty"
    for key in one_weights:
        torch.testing.assert_close(two_weights[key], one_weights[key], rtol=1e-4, atol=1e-5)


def test_interrupted_run_resumed_ends_with_the_same_metrics(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = write_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 6}, "output": str(tmp_path / "a")})
    straight = run_cli("run", str(recipe))
    assert straight.returncode == 0, straight.stderr
    interrupted_dir = tmp_path / "b"
    crashed = run_cli("run", str(recipe), "--set", f"output={interrupted_dir}", env={"DISTILL_CRASH_AFTER_STEP": "4"})
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    assert not (interrupted_dir / "results.json").exists()
    assert json.loads((interrupted_dir / "checkpoints" / "distilled" / "state.json").read_text())["step"] == 4
    refused = run_cli("run", str(recipe), "--set", f"output={interrupted_dir}")
    assert refused.returncode == 2 and "unfinished run" in refused.stderr and "--resume" in refused.stderr
    resumed = run_cli("run", str(recipe), "--set", f"output={interrupted_dir}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((interrupted_dir / "results.json").read_text())
    assert _no_timing(a["rows"]) == _no_timing(b["rows"])
    # The eval history is the same too: no duplicated or lost lines around the interruption.
    def history(d):
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert history(tmp_path / "a") == history(interrupted_dir)
    for key, value in _weights(tmp_path / "a").items():
        assert torch.equal(value, _weights(interrupted_dir)[key]), key


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = write_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 6, "lr": 1e30, "warmup_steps": 0,
                                                    "checkpoint_every": 1, "max_grad_norm": None}})
    result = run_cli("run", str(recipe))
    assert result.returncode == 2, result.stderr
    assert "non-finite at step" in result.stderr and "Traceback" not in result.stderr
    step = int(result.stderr.split("non-finite at step ")[1].split()[0])
    state = json.loads((tmp_path / "run" / "checkpoints" / "distilled" / "state.json").read_text())
    assert state["step"] == step - 1
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "distilled" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("schedule, expected", [("cosine", [0.5, 1.0, 1.0, 0.75, 0.25]),
                                                ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
                                                ("constant", [0.5, 1.0, 1.0, 1.0, 1.0])])
def test_warmup_then_schedule(schedule, expected):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, TrainSpec(steps=5, warmup_steps=2, schedule=schedule))
    seen = []
    for _ in range(5):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected)


def test_two_processes_train_one_model(tiny_recipe, write_recipe, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` with Accelerator(cpu=True): world size 2 (not two silent
    world-1 runs), identical weights on both ranks in both phases, and the same update as one process that sees
    both ranks' examples (float32, rtol 1e-4 / atol 1e-5). The student is a LoRA student (frozen base weights
    under DDP) trained with gradient checkpointing in the 2-process run, without it in the one-process run."""
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    recipe = {**tiny_recipe, "student": {**tiny_recipe["student"], "lora": {"r": 2, "alpha": 4}}}
    launched = launch_two_processes("run", write_recipe({
        **recipe, "output": str(ddp_dir), "train": {**recipe["train"], "gradient_checkpointing": True}}))
    assert launched.returncode == 0, launched.stderr[-3000:]
    results = json.loads((ddp_dir / "results.json").read_text())
    assert results["meta"]["world_size"] == 2
    for phase in ("distilled", "alone"):
        hashes = results["meta"]["weight_sha256_per_rank"][phase]
        assert len(hashes) == 2 and hashes[0] == hashes[1]
    single = distill.run({**recipe, "output": str(single_dir),
                          "train": {**recipe["train"], "batch_size": 2 * recipe["train"]["batch_size"]}})
    for name in ("student", "alone"):
        expected, got = _weights(single.run_dir, name), _weights(ddp_dir, name)
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def _save_lm(directory, tokenizer, extra_rows=0, seed=0):
    from transformers import AutoModelForCausalLM

    from distill.lm.models import tiny_llama_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer) + extra_rows, hidden_size=16,
                                                               num_hidden_layers=1, num_attention_heads=2))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_same_family_vocabulary_padding_is_compared_over_the_real_vocabulary(tiny_recipe, tmp_path):
    """A teacher with 5 padded embedding rows (like 152064 vs 151936) and a student without."""
    from distill.lm.tasks.oracle import OracleTask

    tokenizer = OracleTask().tokenizer()
    teacher = _save_lm(tmp_path / "teacher", tokenizer, extra_rows=5)
    student = _save_lm(tmp_path / "student", tokenizer, seed=1)
    result = distill.run({**tiny_recipe, "teacher": {"path": str(teacher)}, "student": {"path": str(student)}})
    assert result.rows["distilled"]["teacher_kl"] >= 0
    saved = json.loads((result.run_dir / "student" / "config.json").read_text())
    assert saved["vocab_size"] == len(tokenizer)


def test_a_student_with_another_tokenizer_is_refused(tiny_recipe, write_recipe, run_cli, tmp_path):
    from distill.lm.tasks.arithmetic import ArithmeticTask

    student = _save_lm(tmp_path / "student", ArithmeticTask().tokenizer())
    recipe = write_recipe({**tiny_recipe, "student": {"path": str(student)}})
    result = run_cli("run", str(recipe))
    assert result.returncode == 2 and "different tokenizers" in result.stderr and "cross-tokenizer" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_fused_loss_trains_exactly_like_full_logits(tiny_recipe, tmp_path):
    """The default fused path (hidden states + head, chunked) and the plain path end with the
    same weights; tiny chunks force many chunks per micro-batch."""
    base = {**tiny_recipe, "objective": {"loss": "jsd", "beta": 0.3, "ce_weight": 0.4},
            "train": {**tiny_recipe["train"], "baseline": False, "lr": 1e-2}}
    fused = distill.run({**base, "output": str(tmp_path / "fused"),
                         "train": {**base["train"], "loss_memory_mb": 0.05}})  # ~19 tokens a chunk
    plain = distill.run({**base, "output": str(tmp_path / "plain"), "train": {**base["train"], "fused_loss": False}})
    for key, value in _weights(plain.run_dir).items():
        torch.testing.assert_close(_weights(fused.run_dir)[key], value, rtol=1e-4, atol=1e-5)
    records = [[json.loads(line) for line in (r.run_dir / "losses.jsonl").read_text().splitlines()]
               for r in (fused, plain)]
    assert all(r["fused_loss"] for r in records[0]) and not any(r["fused_loss"] for r in records[1])
    assert [r["loss"] for r in records[0]] == pytest.approx([r["loss"] for r in records[1]], rel=1e-5)


def test_taid_schedule_is_trainer_state_that_resumes_exactly(tiny_recipe, tmp_path, monkeypatch):
    recipe = {**tiny_recipe, "objective": {"loss": "taid", "taid": {"t_start": 0.3, "alpha": 0.05}},
              "train": {**tiny_recipe["train"], "steps": 6, "baseline": False, "lr": 1e-2}}
    straight = distill.run({**recipe, "output": str(tmp_path / "straight")})
    monkeypatch.setenv("DISTILL_CRASH_AFTER_STEP", "4")
    with pytest.raises(SystemExit):
        distill.run({**recipe, "output": str(tmp_path / "resumed")})
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "distilled" / "state.json").read_text())
    assert 0.3 < state["regime"]["taid"]["t"] <= 1.0  # t moved up from t_start and was checkpointed
    monkeypatch.delenv("DISTILL_CRASH_AFTER_STEP")
    resumed = distill.run({**recipe, "output": str(tmp_path / "resumed")}, resume=True)
    for key, value in _weights(straight.run_dir).items():
        assert torch.equal(value, _weights(resumed.run_dir)[key]), key
    final = json.loads((straight.run_dir / "checkpoints" / "distilled" / "state.json").read_text())["regime"]["taid"]["t"]
    assert final == json.loads((resumed.run_dir / "checkpoints" / "distilled" / "state.json").read_text())["regime"]["taid"]["t"]


def test_token_selection_and_entropy_terms_train_on_the_plain_path(tiny_recipe, tmp_path):
    result = distill.run({**tiny_recipe, "objective": {"loss": "adaptive_kl", "token_selection": 0.5,
                                                       "entropy_weight": -0.1},
                          "train": {**tiny_recipe["train"], "baseline": False}})
    records = [json.loads(line) for line in (result.run_dir / "losses.jsonl").read_text().splitlines()]
    assert not any(r["fused_loss"] for r in records)
    for r in records:  # the total is the divergence plus the weighted entropy
        assert r["loss"] == pytest.approx(r["kd"] - 0.1 * r["entropy"], rel=1e-5)
        assert r["entropy"] > 0
