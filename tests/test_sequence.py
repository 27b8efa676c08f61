"""Sequence-level KD: the teacher completes the prompts once (stored in the run directory,
resumable), the student trains on the teacher's completions."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import distill
from distill.lm.generate import sample


def _rows(path, count):
    rows = [{"prompt": " ".join(f"w{(i + j) % 64}" for j in range(3)),
             "completion": " ".join(f"w{(i * 7 + j) % 64}" for j in range(2 + i % 4))} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sequence(tiny_recipe, tmp_path, **regime):
    data = {"train": _rows(tmp_path / "train.jsonl", 24), "eval": _rows(tmp_path / "eval.jsonl", 8)}
    return {**tiny_recipe, "data": data, "regime": {"kind": "sequence", "max_new_tokens": 5, **regime},
            "objective": {"loss": "forward_kl", "kd_weight": 1.0, "ce_weight": 1.0},
            "train": {**tiny_recipe["train"], "baseline": False}}


def _generations(run_dir):
    rows = []
    for file in sorted((run_dir / "teacher-generations").glob("chunk-*.jsonl")):
        rows += [json.loads(line) for line in file.read_text().splitlines()]
    return rows


def test_student_trains_on_the_teachers_greedy_completions(tiny_recipe, tiny_lm_dir, write_recipe, run_cli, tmp_path):
    recipe = _sequence(tiny_recipe, tmp_path, sample_temperature=0.0)
    done = run_cli("run", write_recipe(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _generations(tmp_path / "run")
    assert [r["id"] for r in rows] == [str(i) for i in range(24)]
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    greedy = sample(teacher, [rows[0]["prompt_ids"], rows[5]["prompt_ids"]], max_new_tokens=5, pad_token_id=0,
                    eos_token_id=2, greedy=True)
    assert greedy.completions() == [rows[0]["completion_ids"], rows[5]["completion_ids"]]
    assert (tmp_path / "run" / "results.json").is_file()


def test_interrupted_generation_resumes_from_its_chunks(tiny_recipe, monkeypatch, tmp_path):
    import distill.lm.teacher.sequences as sequences

    monkeypatch.setattr(sequences, "CHUNK_EXAMPLES", 10)  # 24 examples: 3 chunks
    recipe = _sequence(tiny_recipe, tmp_path, sample_temperature=1.0)
    straight = distill.run({**recipe, "output": str(tmp_path / "straight")})
    monkeypatch.setenv(sequences.STOP_AFTER_CHUNKS_ENV, "2")
    with pytest.raises(SystemExit):
        distill.run({**recipe, "output": str(tmp_path / "resumed")})
    monkeypatch.delenv(sequences.STOP_AFTER_CHUNKS_ENV)
    first = sorted((tmp_path / "resumed" / "teacher-generations").glob("chunk-*.jsonl"))
    assert len(first) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in first}
    resumed = distill.run({**recipe, "output": str(tmp_path / "resumed")}, resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in first} == stamps  # reused, not regenerated
    assert _generations(straight.run_dir) == _generations(resumed.run_dir)  # seeded per chunk
    for key, value in load_file(str(straight.run_dir / "student" / "model.safetensors")).items():
        assert torch.equal(value, load_file(str(resumed.run_dir / "student" / "model.safetensors"))[key]), key


def test_student_aware_filtering_replaces_tokens_and_resumes(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = _sequence(tiny_recipe, tmp_path, sample_temperature=0.0, rsd_threshold=0.5)
    done = run_cli("run", write_recipe(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "run" / "teacher-generations" / "throughput.json").read_text())
    # An untrained student gives every token ~1/64 < 0.5: it vetoes (nearly) every teacher proposal.
    assert stats["rsd_threshold"] == 0.5 and stats["replaced_share"] > 0.9
    plain = _sequence(tiny_recipe, tmp_path, sample_temperature=0.0)
    done = run_cli("run", write_recipe({**plain, "output": str(tmp_path / "plain")}, "plain.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert ([r["completion_ids"] for r in _generations(tmp_path / "run")]
            != [r["completion_ids"] for r in _generations(tmp_path / "plain")])


def test_filtering_outside_sequence_and_greedy_on_one_prompt_are_flagged(tiny_recipe, write_recipe, run_cli,
                                                                         tmp_path):
    refused = run_cli("run", write_recipe({**tiny_recipe, "regime": {"kind": "on_policy", "rsd_threshold": 0.1}}))
    assert refused.returncode == 2 and "rsd_threshold" in refused.stderr and "kind: sequence" in refused.stderr
    assert not (tmp_path / "run").exists()
    # The built-in oracle's prompts are all just BOS: greedy decoding would give one completion 32 times.
    recipe = {**tiny_recipe, "regime": {"kind": "sequence", "sample_temperature": 0.0, "max_new_tokens": 4},
              "train": {**tiny_recipe["train"], "baseline": False, "steps": 1}}
    with pytest.warns(UserWarning, match="only 1 distinct prompt"):
        result = distill.run(recipe)
    assert len({tuple(r["completion_ids"]) for r in _generations(result.run_dir)}) == 1
