"""Offline on-policy distillation (Lightning OPD, distill/lm/rollouts.py): `distill rollouts` samples the SFT
student once, `distill cache` scores the samples once, `distill run` trains OPD from them with no teacher in
memory; teacher consistency refused or warned; everything resumable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distill
from conftest import assert_same_student, run_interrupted_and_resumed
from distill.core.errors import DistillError

SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def _sft_recipe(output: Path, teacher: str = "builtin:arithmetic-teacher") -> dict:
    return {"name": "sft", "task": "lm", "teacher": {"path": teacher}, "student": {"config": SMALL},
            "data": {"builtin": "arithmetic", "train_size": 24, "eval_size": 8},
            "objective": {"loss": "forward_kl", "ce_weight": 0.5},
            "train": {"steps": 3, "batch_size": 8, "threads": 1, "baseline": True, "checkpoint_every": 3},
            "eval": {"every": 3, "batch_size": 8, "generate_size": 4, "throughput_tokens": 2},
            "output": str(output)}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A distill run of the arithmetic teacher: its `student/` was fine-tuned on that teacher, `alone/` on none."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sft") / "run"
    distill.run(_sft_recipe(out))
    return out


def _offline(sft_run: Path, tmp_path: Path, *, cache: bool = True, **opd) -> dict:
    recipe = _sft_recipe(tmp_path / "run")
    recipe.update(name="offline", student={"path": str(sft_run / "student")},
                  objective={"loss": "forward_kl"},
                  regime={"kind": "opd", "rollouts": str(tmp_path / "rollouts"),
                          **({"path": str(tmp_path / "cache")} if cache else {}),
                          "opd": {"ratio_clip": 0.2, **opd}, "max_new_tokens": 6})
    recipe["train"] = {**recipe["train"], "steps": 4, "baseline": False, "lr": 1e-3, "checkpoint_every": 2}
    return recipe


def _rows(directory: Path) -> list[dict]:
    return [json.loads(line) for file in sorted(directory.glob("chunk-*.jsonl"))
            for line in file.read_text().splitlines()]


def test_rollouts_cache_and_training_through_the_cli_with_no_teacher_in_memory(sft_run, write_recipe, run_cli,
                                                                                 tmp_path, monkeypatch):
    from distill.core.recipe import load_recipe
    from distill.lm import run as lm_run
    from distill.lm.models import load_causal_lm, load_tokenizer
    from distill.lm.regimes import prompt_of
    from distill.lm.data import load_data
    from distill.lm.tasks import get_task

    recipe = write_recipe(_offline(sft_run, tmp_path))
    made = run_cli("rollouts", recipe)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "24 samples" in made.stdout and "distill cache" in made.stdout
    rows = _rows(tmp_path / "rollouts")
    manifest = json.loads((tmp_path / "rollouts" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sft_teacher"]["source"].endswith("recipe.yaml")
    # one sample per training example, of its own prompt; the stored log-probs are the SFT student's
    tokenizer = load_tokenizer(str(sft_run / "student"), "student.path")
    _, _, examples, _ = load_data(load_recipe(recipe).data, tokenizer, get_task("arithmetic"))
    assert [r["id"] for r in rows] == [e.id for e in examples]
    assert all(r["prompt_ids"] == prompt_of(e) for r, e in zip(rows, examples))
    student = load_causal_lm(str(sft_run / "student"), "student.path").eval()
    for row in rows[:4]:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(student(input_ids=ids).logits[0, :-1].float(), -1)
        positions = range(len(row["prompt_ids"]) - 1, ids.shape[1] - 1)
        expected = [float(logprobs[t, ids[0, t + 1]]) for t in positions]
        assert row["behavior_logprobs"] == pytest.approx(expected, abs=1e-5)
        assert row["completion"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
    # the samples differ from the data's answers somewhere: they are the student's own
    assert any(r["completion_ids"] != e.input_ids[len(r["prompt_ids"]):] for r, e in zip(rows, examples))
    cached = run_cli("cache", recipe)
    assert cached.returncode == 0, cached.stderr[-3000:]

    loaded = []
    original = lm_run.load_causal_lm

    def watch(path, field, *args, **kwargs):
        loaded.append(field)
        return original(path, field, *args, **kwargs)

    monkeypatch.setattr(lm_run, "load_causal_lm", watch)
    trained = run_cli("run", recipe)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "teacher.path" not in loaded, loaded  # the teacher's scores come from the cache
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    first = next(r for r in losses if r["phase"] == "distilled")
    assert first["clipped"] == 0.0 and first["sampled_batches"] == 0  # step 1: the student is the sampler
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["rows"]) == {"teacher", "distilled"} and "exact_match" in results["rows"]["distilled"]


def test_the_teacher_scores_equal_a_live_teachers_and_training_resumes_bit_identically(sft_run, tmp_path,
                                                                                      monkeypatch):
    """From the cache or from the live teacher, offline OPD trains the same student (the cache keeps each
    token's log-prob at float32); a run killed after step 2 resumes to the same weights."""
    from distill.lm.rollouts import build_rollouts
    from distill.lm.teacher.cache.build import build_cache

    recipe = _offline(sft_run, tmp_path)
    build_rollouts(recipe)
    build_cache(recipe)
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch)
    assert_same_student(straight.run_dir, resumed.run_dir)
    live = distill.run({**_offline(sft_run, tmp_path, cache=False), "output": str(tmp_path / "live")})
    from safetensors.torch import load_file

    cached, direct = (load_file(str(d / "student" / "model.safetensors")) for d in (straight.run_dir, live.run_dir))
    for key, value in direct.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_killed_rollouts_command_resumes_to_the_same_samples(sft_run, tmp_path, monkeypatch):
    from distill.lm import rollouts

    monkeypatch.setattr(rollouts, "CHUNK_EXAMPLES", 10)  # 24 examples: 3 chunks
    recipe = _offline(sft_run, tmp_path)
    straight = rollouts.build_rollouts(recipe, out=str(tmp_path / "straight"))
    monkeypatch.setenv(rollouts.STOP_AFTER_CHUNKS_ENV, "1")
    with pytest.raises(SystemExit):
        rollouts.build_rollouts(recipe)
    monkeypatch.delenv(rollouts.STOP_AFTER_CHUNKS_ENV)
    partial = tmp_path / "rollouts"
    assert sorted(p.name for p in partial.glob("chunk-*")) == ["chunk-00000.jsonl"]
    with pytest.raises(DistillError, match="unfinished") as refused:  # training refuses half a set of rollouts
        distill.run({**_offline(sft_run, tmp_path, cache=False), "output": str(tmp_path / "early")})
    assert refused.value.field == "regime.rollouts" and not (tmp_path / "early").exists()
    rollouts.build_rollouts(recipe)
    for name in ("chunk-00000.jsonl", "chunk-00001.jsonl", "chunk-00002.jsonl"):
        assert (partial / name).read_bytes() == (straight / name).read_bytes(), name
    # the same directory for another student is refused, nothing changed
    before = {p.name: p.read_bytes() for p in partial.iterdir()}
    with pytest.raises(DistillError, match="another student") as other:
        rollouts.build_rollouts({**recipe, "student": {"path": str(sft_run / "alone")},
                                 "regime": {**recipe["regime"], "opd": {"teacher_consistency": "off",
                                                                        "ratio_clip": 0.2}}})
    assert other.value.field == "regime.rollouts"
    assert {p.name: p.read_bytes() for p in partial.iterdir()} == before


def test_teacher_consistency_is_refused_warned_or_unknown(sft_run, tmp_path, run_cli, write_recipe):
    """Lightning OPD's condition: the scoring teacher is the one the student was fine-tuned on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.lm.models import resolve_model_path

    shipped = resolve_model_path("builtin:arithmetic-teacher", "teacher.path")
    other = AutoModelForCausalLM.from_pretrained(shipped)
    with torch.no_grad():
        other.lm_head.weight.mul_(0.5)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(shipped).save_pretrained(tmp_path / "other")

    recipe = _offline(sft_run, tmp_path)
    recipe["teacher"] = {"path": str(tmp_path / "other")}
    refused = run_cli("rollouts", write_recipe(recipe))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "error teacher.path" in refused.stderr and "teacher consistency" in refused.stderr
    assert "fine-tuned on another teacher" in refused.stderr and "teacher_consistency: warn" in refused.stderr
    assert not (tmp_path / "rollouts").exists()
    # the `alone` student had no teacher at all
    alone = run_cli("rollouts", write_recipe({**_offline(sft_run, tmp_path),
                                              "student": {"path": str(sft_run / "alone")}}, "alone.yaml"))
    assert alone.returncode == 2 and "trained without a teacher" in alone.stderr
    # warn: it goes on, saying why
    recipe["regime"]["opd"]["teacher_consistency"] = "warn"
    warned = run_cli("rollouts", write_recipe(recipe, "warn.yaml"))
    assert warned.returncode == 0 and "teacher consistency" in warned.stderr
    # sft_teacher names it: consistent again
    from distill.lm.rollouts import build_rollouts

    named = _offline(sft_run, tmp_path)
    named["teacher"] = {"path": str(tmp_path / "other")}
    named["regime"] = {**named["regime"], "rollouts": str(tmp_path / "named"),
                       "opd": {"ratio_clip": 0.2, "sft_teacher": str(tmp_path / "other")}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the teacher is the one named
        build_rollouts(named)
    # a student with no record (built from a config): a warning, not a refusal
    unknown = _offline(sft_run, tmp_path)
    unknown["student"] = {"config": SMALL}
    unknown["regime"] = {**unknown["regime"], "rollouts": str(tmp_path / "unknown")}
    with pytest.warns(UserWarning, match="cannot be checked"):
        build_rollouts(unknown)


def test_offline_options_are_checked_with_the_field_named():
    from distill.core.recipe import load_recipe

    base = {"task": "lm", "teacher": {"path": "builtin:arithmetic-teacher"}, "student": {"config": SMALL},
            "data": {"builtin": "arithmetic"}}
    cases = [({"kind": "off_policy", "rollouts": "r"}, "regime.rollouts"),
             ({"kind": "opd", "path": "c"}, "regime.path"),
             ({"kind": "opd", "rollouts": "r", "reward": "builtin"}, "regime.reward"),
             ({"kind": "opd", "rollouts": "r", "group_size": 2}, "regime.group_size"),
             ({"kind": "opd", "opd": {"ratio_clip": 0.2}}, "regime.opd.ratio_clip"),
             ({"kind": "opd", "rollouts": "r", "opd": {"ratio_clip": 1.5}}, "regime.opd.ratio_clip"),
             ({"kind": "opd", "rollouts": "r", "opd": {"teacher_consistency": "maybe"}},
              "regime.opd.teacher_consistency")]
    for regime, field in cases:
        with pytest.raises(DistillError) as error:
            load_recipe({**base, "regime": regime})
        assert f"{field}:" in str(error.value), (regime, str(error.value))
