"""`distill serve`: a teacher over HTTP in vLLM's form (completions with prompt_logprobs, /tokenize,
/v1/models), started on 127.0.0.1 and a free port inside each test."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import serving


def call(url, body=None, key=None):
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_prompt_logprobs_are_the_models_top_k_in_vllms_form(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    prompts = [[1, 5, 9, 12, 7, 30], [1, 44, 3]]
    with serving(tiny_lm_dir) as base:
        models = call(f"{base}/v1/models")
        answer = call(f"{base}/v1/completions", {"model": "teacher", "prompt": prompts, "max_tokens": 1,
                                                 "prompt_logprobs": 5, "temperature": 0, "return_token_ids": True})
        tokens = call(f"{base}/tokenize", {"model": "teacher", "prompt": "w1 w2"})
    assert models["data"][0]["id"] == "teacher" and models["object"] == "list"
    assert tokens["count"] == len(tokens["tokens"]) >= 2
    assert len(answer["choices"]) == 2
    for prompt, choice in zip(prompts, answer["choices"]):
        entries = choice["prompt_logprobs"]
        assert entries[0] is None and len(entries) == len(prompt)  # aligned to prompt positions
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), -1)
        for t, entry in enumerate(entries[1:]):
            top = logprobs[t].topk(5)
            ranked = {int(token): value for token, value in entry.items() if value["rank"] <= 5}
            assert sorted(ranked) == sorted(top.indices.tolist())
            for rank, (token, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
                assert ranked[token]["rank"] == rank
                assert ranked[token]["logprob"] == pytest.approx(value, abs=1e-5)
            # the prompt's own token is always there, first, with its rank (ties counted against it, as vLLM)
            assert next(iter(entry)) == str(prompt[t + 1])
            actual = entry[str(prompt[t + 1])]
            assert actual["logprob"] == pytest.approx(float(logprobs[t, prompt[t + 1]]), abs=1e-5)
            assert actual["rank"] == int((logprobs[t] >= logprobs[t, prompt[t + 1]]).sum())
            assert len(entry) in (5, 6)
        with torch.no_grad():
            greedy = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
        assert choice["token_ids"] == [greedy]  # max_tokens: 1 at temperature 0


def test_concurrent_requests_are_batched_and_answered_alike(tiny_lm_dir):
    """Requests in flight at once share forward passes; each gets what it gets alone (1e-5)."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (int(n),), generator=generator).tolist() for n in (4, 9, 6, 12, 5, 8, 7, 3)]
    with serving(tiny_lm_dir, max_batch_tokens=64) as base:
        def ask(prompt):
            return call(f"{base}/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True,
                                                   "prompt_logprobs": 3})
        alone = [ask(p) for p in prompts]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, prompts))
    for one, other in zip(alone, together):
        for a, b in zip(one["choices"][0]["prompt_logprobs"][1:], other["choices"][0]["prompt_logprobs"][1:]):
            assert a.keys() == b.keys()
            for token in a:
                assert a[token]["logprob"] == pytest.approx(b[token]["logprob"], abs=1e-5)


def test_an_api_key_is_required_when_set(tiny_lm_dir):
    with serving(tiny_lm_dir, api_key="s3cret") as base:
        with pytest.raises(urllib.error.HTTPError) as refused:
            call(f"{base}/v1/models")
        assert refused.value.code == 401
        assert call(f"{base}/v1/models", key="s3cret")["data"][0]["id"] == "teacher"


def test_bad_requests_get_a_clear_answer(tiny_lm_dir):
    with serving(tiny_lm_dir) as base:
        for body, words in (({"prompt": [1, 99999], "max_tokens": 1}, "token ids"),
                            ({"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 1000}, "prompt_logprobs"),
                            ({"prompt": [1, 2], "max_tokens": 0}, "echo"),
                            ({"model": "other", "prompt": [1, 2]}, "does not exist")):
            with pytest.raises(urllib.error.HTTPError) as refused:
                call(f"{base}/v1/completions", body)
            assert words in json.loads(refused.value.read())["error"]["message"]  # OpenAI's error shape


def test_serving_beyond_loopback_needs_a_key(run_cli, tiny_lm_dir):
    result = run_cli("serve", str(tiny_lm_dir), "--host", "0.0.0.0")
    assert result.returncode == 2 and "--api-key-env" in result.stderr
    result = run_cli("serve", str(tiny_lm_dir), "--api-key-env", "DISTILL_TEST_UNSET_KEY")
    assert result.returncode == 2 and "DISTILL_TEST_UNSET_KEY" in result.stderr


# ---- the client ------------------------------------------------------------------------------------

def test_the_client_gets_the_caches_top_k_and_tail_from_a_served_teacher(tiny_lm_dir):
    """What a served teacher gives equals what `distill cache` stores from the same model (teacher_topk):
    ids equal, log-probabilities within 1e-5, tail within 1e-4 (the tail arrives as 1 - sum of the top-k,
    the cache takes a logsumexp outside it)."""
    from transformers import AutoModelForCausalLM

    from distill.lm.teacher.cache.build import teacher_topk
    from distill.lm.teacher.served import ServedClient, topk_tail

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, vocab, (int(n),), generator=generator).tolist() for n in (6, 11, 4, 9, 7)]
    with serving(tiny_lm_dir) as base:
        one = ServedClient(f"{base}/v1", "teacher", max_in_flight=1)
        answers = one.prompt_logprobs(sequences, 8)
        assert ServedClient(f"{base}/v1", "teacher", max_in_flight=3).prompt_logprobs(sequences, 8) == answers
        assert one.models() == ["teacher"] and one.tokenize("w1 w2")
    for sequence, entries in zip(sequences, answers):
        ids, logprobs, tail = topk_tail(entries, sequence, 8, vocab, where="a test sequence")
        with torch.no_grad():
            expected = teacher_topk(model(torch.tensor([sequence])).logits[0, :-1], 8)
        assert torch.equal(ids, expected[0])
        torch.testing.assert_close(logprobs, expected[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(tail, expected[2], atol=1e-4, rtol=0)


def test_an_unreachable_server_fails_after_bounded_retries():
    from distill.core.errors import DistillError
    from distill.lm.teacher.served import ServedClient

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ServedClient(f"http://127.0.0.1:{port}/v1", "teacher", retries=2, backoff_s=0.01, timeout_s=2)
    started = time.time()
    with pytest.raises(DistillError) as error:
        client.prompt_logprobs([[1, 2, 3]], 4)
    assert time.time() - started < 5
    assert "after 3 tries" in str(error.value) and "--resume" in error.value.fix


def test_a_refused_request_is_not_retried_and_names_the_cause(tiny_lm_dir):
    from distill.core.errors import DistillError
    from distill.lm.teacher.served import ServedClient

    with serving(tiny_lm_dir) as base:
        started = time.time()
        with pytest.raises(DistillError) as error:
            ServedClient(f"{base}/v1", "teacher", retries=5, backoff_s=10).prompt_logprobs([[1, 2, 3]], 1000)
        assert time.time() - started < 5  # a retry would have waited 10 s first
    assert "refused" in str(error.value) and "400" in str(error.value) and "prompt_logprobs" in str(error.value)


@pytest.mark.parametrize("entry, words", [
    ({"5": {"logprob": -0.5, "rank": 1}}, "1 of the top-2"),
    ({"5": {"logprob": float("nan"), "rank": 1}, "6": {"logprob": -2.0, "rank": 2}}, "nan"),
    ({"5": {"logprob": -0.5, "rank": 1}, "999": {"logprob": -2.0, "rank": 2}}, "beyond the tokenizer"),
])
def test_malformed_answers_are_errors_never_zeros(entry, words):
    from distill.core.errors import DistillError
    from distill.lm.teacher.served import topk_tail

    with pytest.raises(DistillError) as error:
        topk_tail([None, entry], [1, 5], 2, 100, where="example 7")
    assert words in str(error.value) and "example 7" in str(error.value)
    with pytest.raises(DistillError):
        topk_tail([None], [1, 5], 2, 100, where="example 7")  # one entry short


def test_a_server_that_tokenizes_differently_is_refused(tiny_lm_dir):
    from transformers import AutoTokenizer

    from distill.core.errors import DistillError
    from distill.lm.tasks.arithmetic import ArithmeticTask
    from distill.lm.teacher.served import ServedClient, check_same_tokenizer

    with serving(tiny_lm_dir) as base:
        client = ServedClient(f"{base}/v1", "teacher")
        check_same_tokenizer(client, AutoTokenizer.from_pretrained(tiny_lm_dir))  # the same: no error
        with pytest.raises(DistillError) as error:
            check_same_tokenizer(client, ArithmeticTask().tokenizer())
    assert error.value.field == "teacher.url" and "first difference" in str(error.value)
