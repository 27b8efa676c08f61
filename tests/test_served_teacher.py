"""Training against a served teacher (`teacher.url`): `distill serve` on 127.0.0.1 and a free port inside each
test. Every regime that uses a teacher, `distill cache` from the server, equality with the cache path, the
tokenizer check, a server that dies mid-run (bounded retries, then `--resume`), and the API key kept out of
every file."""
from __future__ import annotations

import copy
import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from conftest import serving, tiny_recipe_for

import distill

FAST_FAILURE = {"retries": 1, "backoff_s": 0.05, "timeout_s": 10}


def served(recipe: dict, base: str, **teacher) -> dict:
    out = copy.deepcopy(recipe)
    out["teacher"].update(url=f"{base}/v1", **teacher)
    return out


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float((first[key] - second[key]).abs().max()) for key in first)


@pytest.fixture
def recipe(tiny_lm_dir, tmp_path) -> dict:
    recipe = tiny_recipe_for(tiny_lm_dir, tmp_path)
    recipe["train"]["baseline"] = False
    return recipe


def test_a_served_teacher_trains_the_student_a_cache_of_the_same_k_does(recipe, tiny_lm_dir, tmp_path):
    """The same top-8 + tail from the server as from `distill cache` (float16 values): the students match to the
    cache's rounding (measured: max |difference| of any weight 6e-4 after 4 steps at lr 3e-4)."""
    from distill.lm.teacher.cache.build import build_cache

    with serving(tiny_lm_dir) as base:
        result = distill.run({**served(recipe, base, top_k=8), "output": str(tmp_path / "served")})
    cached = {**copy.deepcopy(recipe), "output": str(tmp_path / "cached"),
              "regime": {"kind": "cache", "path": str(tmp_path / "cache"), "k": 8, "values": "float16"}}
    build_cache(cached)
    from_cache = distill.run(cached)
    assert max_difference(weights(tmp_path / "served"), weights(tmp_path / "cached")) < 2e-3
    losses = [json.loads(line) for line in (tmp_path / "served" / "losses.jsonl").read_text().splitlines()]
    cached_losses = [json.loads(line) for line in (tmp_path / "cached" / "losses.jsonl").read_text().splitlines()]
    for mine, theirs in zip(losses, cached_losses, strict=True):
        assert mine["kd"] == pytest.approx(theirs["kd"], rel=2e-3)
        assert mine["teacher_seconds"] > 0  # the teacher's time per step is logged, as a live teacher's
    # the teacher row: the served nll equals the local teacher's (the cache build evaluated it)
    assert result.rows["teacher"]["nll"] == pytest.approx(from_cache.rows["teacher"]["nll"], rel=1e-5)
    assert result.rows["distilled"]["teacher_kl"] == pytest.approx(from_cache.rows["distilled"]["teacher_kl"],
                                                                   rel=1e-2)
    assert any("served at" in note for note in result.meta["notes"])
    wire = result.meta["served_teacher"]
    # each training step's micro-batch was asked for before its loss: the first as it was made, the others during
    # the step before (the trainer knows the data order); the eval batches are asked when needed
    assert wire["batches_prefetched"] == 4 and wire["batches"] > 4
    assert wire["bytes_per_position"] > 8 * 20 and wire["requests"] >= 8  # JSON: k entries of tens of bytes each


def test_opd_against_a_served_teacher_equals_the_local_teacher(recipe, tiny_lm_dir, tmp_path):
    """OPD reads only the sampled tokens' log-probabilities, which the server returns exactly (float32 in JSON):
    the same student as with the teacher in memory, to float noise."""
    recipe["regime"] = {"kind": "opd", "max_new_tokens": 8}
    distill.run({**copy.deepcopy(recipe), "output": str(tmp_path / "local")})
    with serving(tiny_lm_dir, max_batch_tokens=1) as base:
        distill.run({**served(recipe, base), "output": str(tmp_path / "served")})
    assert max_difference(weights(tmp_path / "served"), weights(tmp_path / "local")) < 1e-5


def test_sequence_kd_has_the_server_generate(recipe, tiny_lm_dir, tmp_path):
    """Greedy generations by the server are the local teacher's generations, token for token."""
    recipe["regime"] = {"kind": "sequence", "sample_temperature": 0, "max_new_tokens": 6}
    recipe["objective"] = {"loss": "forward_kl", "ce_weight": 1.0}
    recipe["data"]["train_size"] = 8
    with pytest.warns(UserWarning, match="distinct"):  # greedy from BOS: one prompt (the oracle's)
        distill.run({**copy.deepcopy(recipe), "output": str(tmp_path / "local")})
        with serving(tiny_lm_dir) as base:
            distill.run({**served(recipe, base), "output": str(tmp_path / "served")})

    def generations(run):
        return [json.loads(line) for line in
                (tmp_path / run / "teacher-generations" / "chunk-00000.jsonl").read_text().splitlines()]
    assert generations("served") == generations("local")
    assert all(len(row["completion_ids"]) == 6 for row in generations("served"))  # no EOS: max_new_tokens each


def test_on_policy_samples_locally_and_the_server_scores(recipe, tiny_lm_dir, tmp_path):
    recipe["regime"] = {"kind": "on_policy", "lmbda": 1.0, "max_new_tokens": 8}
    with serving(tiny_lm_dir) as base:
        result = distill.run({**served(recipe, base, top_k=8), "output": str(tmp_path / "run")})
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert all(record["sampled_batches"] == 1 and record["teacher_seconds"] > 0 for record in losses)
    assert all(record["kd"] > 0 for record in losses)
    assert result.rows["distilled"]["teacher_kl"] > 0


def test_a_cache_built_from_a_served_teacher_holds_the_local_teachers_top_k(recipe, tiny_lm_dir, tmp_path, run_cli,
                                                                              write_recipe):
    from distill.lm.teacher.cache.store import TeacherCache

    local = {**copy.deepcopy(recipe), "regime": {"kind": "cache", "path": str(tmp_path / "local"), "k": 8,
                                                "values": "float16"}}
    assert run_cli("cache", str(write_recipe(local, "local.yaml"))).returncode == 0
    with serving(tiny_lm_dir) as base:
        remote = served(local, base, top_k=8)
        remote["regime"]["path"] = str(tmp_path / "remote")
        finished = run_cli("cache", str(write_recipe(remote, "remote.yaml")))
        assert finished.returncode == 0, finished.stderr
        trained = run_cli("run", str(write_recipe({**remote, "output": str(tmp_path / "run")}, "train.yaml")))
        assert trained.returncode == 0, trained.stderr  # training from it: no server request needed
    first, second = TeacherCache(tmp_path / "local"), TeacherCache(tmp_path / "remote")
    assert torch.equal(first.ids, second.ids)
    torch.testing.assert_close(first.logprobs, second.logprobs, atol=1e-3, rtol=0)
    torch.testing.assert_close(first.tail, second.tail, atol=2e-2, rtol=1e-2)  # float16 of log(1 - mass)
    teacher_eval = json.loads((tmp_path / "remote" / "manifest.json").read_text())["teacher_eval"]
    assert teacher_eval["nll"] == pytest.approx(first.manifest["teacher_eval"]["nll"], rel=1e-5)


def test_a_server_with_another_tokenizer_is_refused_before_anything_is_written(recipe, run_cli, write_recipe,
                                                                              tmp_path):
    with serving("builtin:arithmetic-teacher") as base:
        finished = run_cli("run", str(write_recipe(served(recipe, base))))
    assert finished.returncode == 2
    assert "teacher.url" in finished.stderr and "tokenizes" in finished.stderr
    assert not (tmp_path / "run").exists()


def test_an_unreachable_server_is_an_error_before_anything_is_written(recipe, run_cli, write_recipe, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    finished = run_cli("run", str(write_recipe(served(recipe, f"http://127.0.0.1:{port}", **FAST_FAILURE))))
    assert finished.returncode == 2
    assert "did not answer" in finished.stderr and "Traceback" not in finished.stderr
    assert not (tmp_path / "run").exists()


def test_a_server_dying_mid_run_stops_it_resumably_and_the_resumed_run_is_identical(recipe, tiny_lm_dir, tmp_path,
                                                                                    run_cli, write_recipe):
    """Scoring requests (max_in_flight 2: two per batch): 1 at start-up, 2 for step 1 and 2 for step 2 (asked
    during step 1), 2 for step 3 (asked during step 2), 2 for the eval data at step 2. Then the server dies:
    step 4's requests (asked during step 3) fail after bounded retries, and the run stops with its step-2
    checkpoint; restarted on the same port, `--resume` ends with the uninterrupted run's student."""
    recipe["train"].update(steps=4, checkpoint_every=2)
    with serving(tiny_lm_dir, max_batch_tokens=1) as base:
        assert run_cli("run", str(write_recipe({**served(recipe, base, **FAST_FAILURE),
                                                "output": str(tmp_path / "straight")}, "straight.yaml"))).returncode == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    interrupted = write_recipe(served(recipe, f"http://127.0.0.1:{port}", **FAST_FAILURE), "interrupted.yaml")
    with serving(tiny_lm_dir, max_batch_tokens=1, port=port, exit_after_scoring=9):
        stopped = run_cli("run", str(interrupted))
    assert stopped.returncode == 2, stopped.stderr
    assert "did not answer" in stopped.stderr and "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert "step 2" in stopped.stderr and "retry 1 of 1" in stopped.stderr  # the retry is logged
    assert (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "student").exists()
    with serving(tiny_lm_dir, max_batch_tokens=1, port=port):
        resumed = run_cli("run", str(interrupted), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert max_difference(weights(tmp_path / "run"), weights(tmp_path / "straight")) == 0.0


def test_the_api_key_is_never_written(recipe, tiny_lm_dir, tmp_path, run_cli, write_recipe):
    key = "sk-distill-test-3b1f9c0e"
    with serving(tiny_lm_dir, api_key=key) as base:
        wrong = run_cli("run", str(write_recipe(served(recipe, base, api_key_env="DISTILL_TEST_KEY"), "wrong.yaml")),
                        env={"DISTILL_TEST_KEY": "not-the-key"})
        finished = run_cli("run", str(write_recipe(served(recipe, base, api_key_env="DISTILL_TEST_KEY"))),
                           env={"DISTILL_TEST_KEY": key})
    assert wrong.returncode == 2 and "401" in wrong.stderr
    assert finished.returncode == 0, finished.stderr
    assert key not in finished.stdout + finished.stderr
    written = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert written and not [path for path in written if key.encode() in path.read_bytes()]


def test_a_top_k_beyond_the_vocabulary_is_refused_before_any_request(recipe, run_cli, write_recipe, tmp_path):
    """(a real vLLM 0.32 engine dies on prompt_logprobs above the vocabulary size rather than refusing it)"""
    finished = run_cli("run", str(write_recipe(served(recipe, "http://127.0.0.1:9", top_k=100000))))
    assert finished.returncode == 2 and "teacher.top_k" in finished.stderr and "vocabulary" in finished.stderr
    assert not (tmp_path / "run").exists()


def test_distill_eval_of_a_served_run_asks_the_server_for_the_teacher_row(recipe, tiny_lm_dir, tmp_path, run_cli,
                                                                          write_recipe):
    with serving(tiny_lm_dir) as base:
        assert run_cli("run", str(write_recipe(served(recipe, base)))).returncode == 0
        again = run_cli("eval", str(tmp_path / "run"), "--output", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr
    first = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    second = json.loads((tmp_path / "again.json").read_text())["rows"]
    assert second["teacher"]["nll"] == pytest.approx(first["teacher"]["nll"], rel=1e-6)
    assert second["distilled"]["teacher_kl"] == pytest.approx(first["distilled"]["teacher_kl"], rel=1e-5)
    down = run_cli("eval", str(tmp_path / "run"))  # the server is gone
    assert down.returncode == 2 and "did not answer" in down.stderr and "start the server" in down.stderr


def test_sampled_sequences_from_a_server_differ_per_prompt_and_repeat_per_seed(recipe, tiny_lm_dir, tmp_path):
    """The oracle's prompts are all BOS: each needs its own seed, or every row would be the same sample."""
    recipe["regime"] = {"kind": "sequence", "sample_temperature": 1.0, "max_new_tokens": 6}
    recipe["data"]["train_size"] = 8
    with serving(tiny_lm_dir) as base:
        for run in ("first", "second"):
            distill.run({**served(recipe, base), "output": str(tmp_path / run)})

    def completions(run):
        return [json.loads(line)["completion_ids"] for line in
                (tmp_path / run / "teacher-generations" / "chunk-00000.jsonl").read_text().splitlines()]
    assert len({tuple(c) for c in completions("first")}) > 4
    assert completions("first") == completions("second")


def test_a_packed_batch_is_scored_document_by_document(tiny_lm_dir):
    from distill.lm.data import Example, collate, pack
    from distill.lm.teacher.served import ServedClient, ServedTeacher

    documents = [Example([1, 5, 9, 12, 7], [-100, 5, 9, 12, 7], "a"), Example([1, 44, 3, 8], [-100, 44, 3, 8], "b"),
                 Example([1, 20, 21], [-100, 20, 21], "c")]
    packed = pack(documents, 16)
    batch = collate(packed, 0)
    with serving(tiny_lm_dir) as base:
        teacher = ServedTeacher(ServedClient(f"{base}/v1", "teacher"), 4, vocab_size=1000)
        ids, logprobs, tail = teacher.topk(batch)
        alone = [teacher.topk(collate([d], 0)) for d in documents]
        teacher.close()
    mask = batch["labels"][:, 1:] != -100
    expected = [torch.cat([a[i][0][collate([d], 0)["labels"][0, 1:] != -100] for a, d in zip(alone, documents)])
                for i in range(3)]
    torch.testing.assert_close(ids[mask], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(logprobs[mask], expected[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(tail[mask], expected[2], atol=1e-4, rtol=0)
