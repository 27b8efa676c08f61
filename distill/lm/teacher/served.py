"""A teacher behind an OpenAI-compatible server (vLLM, or `distill serve`): its top-k log-probabilities of every
token of a sequence, asked the way vLLM answers scoring requests (docs/served_teacher_protocol.md):

    POST {url}/completions  {"model", "prompt": [[ids], ...], "max_tokens": 1, "temperature": 0,
                             "prompt_logprobs": k}
    -> choices[i].prompt_logprobs = [null, {"id": {"logprob", "rank", "decoded_token"}, ...}, ...]

and turned into the signal the cache gives (`topk_tail`): the top-k ids and log-probabilities at each position
and the log of the mass outside them. Requests are split over `max_in_flight` concurrent calls; a server that
does not answer is retried with backoff a bounded number of times, then the error says what failed.
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from distill.core.errors import DistillError
from distill.lm.teacher.serve import LOGPROB_FLOOR as TAIL_FLOOR  # the log of a mass too small to write


class ServedClient:
    """HTTP calls to one model on one server (`url` ends in /v1)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5, max_in_flight: int = 2, field: str = "teacher.url"):
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_in_flight, self.field = max_in_flight, field

    @property
    def root(self) -> str:
        """The server's root (vLLM's /tokenize is not under /v1)."""
        return self.url[:-3] if self.url.endswith("/v1") else self.url

    def request(self, address: str, body: dict | None = None) -> dict:
        """JSON of a GET (no body) or POST; connection failures, timeouts and 5xx answers are retried
        `retries` times with doubling backoff, then raised as a DistillError naming the request."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"  # never logged
        what = f"{'POST' if data else 'GET'} {address}"
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(address, data=data, headers=headers),
                                            timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code < 500:  # the request is wrong: retrying cannot help
                    raise DistillError(f"the teacher server refused {what}: {error.code} {message}", field=self.field,
                                       fix="check teacher.model, teacher.top_k (the server's --max-logprobs) and "
                                           "the API key (teacher.api_key_env)") from None
                failure = f"{error.code} {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                failure = str(getattr(error, "reason", error))
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise DistillError(f"the teacher server did not answer {what} after {self.retries + 1} tries: {failure}",
                           field=self.field, fix="check that the server runs and is reachable from here; a run "
                                                 "stopped by this continues with --resume")

    def models(self) -> list[str]:
        return [entry["id"] for entry in self.request(f"{self.url}/models").get("data", [])]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.request(f"{self.root}/tokenize", {"model": self.model, "prompt": text,
                                                      "add_special_tokens": add_special_tokens})["tokens"]

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list[dict | None]]:
        """vLLM's prompt_logprobs of each sequence, `max_in_flight` requests at a time."""
        size = max(1, math.ceil(len(sequences) / self.max_in_flight))
        chunks = [sequences[i:i + size] for i in range(0, len(sequences), size)]

        def ask(chunk):
            answer = self.request(f"{self.url}/completions", {
                "model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k})
            choices = answer.get("choices")
            if not isinstance(choices, list) or len(choices) != len(chunk):
                raise DistillError(f"the teacher server answered {len(chunk)} prompts with "
                                   f"{len(choices) if isinstance(choices, list) else 'no'} choices", field=self.field,
                                   fix="point teacher.url at a vLLM-compatible server (vllm serve, distill serve)")
            return [choice.get("prompt_logprobs") for choice in sorted(choices, key=lambda c: c.get("index", 0))]
        with ThreadPoolExecutor(self.max_in_flight) as pool:
            return [entries for answered in pool.map(ask, chunks) for entries in answered]


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        detail = body.get("error") or body.get("detail") or body
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)
    except (ValueError, AttributeError):
        return error.reason or ""


def topk_tail(entries: list[dict | None], sequence: list[int], k: int, vocab_size: int, *, where: str = "",
              field: str = "teacher.url") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [n, k], log-probs [n, k] descending, log tail mass [n]) at positions 0..n-1 of `sequence` (position t
    predicts token t + 1, n = len(sequence) - 1) from vLLM's prompt_logprobs of it. The tail is
    log(1 - sum of the top-k probabilities), floored at TAIL_FLOOR. A malformed answer (wrong length, fewer than k
    entries, a NaN, an id outside the vocabulary) is an error naming `where`, never a silent zero."""
    n = len(sequence) - 1
    if not isinstance(entries, list) or len(entries) != len(sequence):
        raise DistillError(f"the teacher server's prompt_logprobs for {where} have "
                           f"{len(entries) if isinstance(entries, list) else 'no'} entries, not {len(sequence)}",
                           field=field, fix="use a server that returns vLLM's prompt_logprobs (vllm serve, distill serve)")
    ids = torch.zeros(n, k, dtype=torch.long)
    logprobs = torch.zeros(n, k, dtype=torch.float32)
    tail = torch.zeros(n, dtype=torch.float32)
    for t, entry in enumerate(entries[1:]):
        ranked = sorted(((value.get("rank"), int(token), value.get("logprob")) for token, value in (entry or {}).items()
                         if isinstance(value, dict) and isinstance(value.get("rank"), int) and value["rank"] <= k),
                        key=lambda item: item[0])
        values = [lp for _, _, lp in ranked]
        if len(ranked) < k or any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
            raise DistillError(f"the teacher server's answer for {where}, position {t + 1}: "
                               f"{len(ranked)} of the top-{k} entries, values {values[:k]}", field=field,
                               fix="the server must return prompt_logprobs with k entries of finite log-probabilities "
                                   "(vLLM: --max-logprobs >= teacher.top_k)")
        top = ranked[:k]
        if any(token >= vocab_size for _, token, _ in top):
            raise DistillError(f"the teacher server's top-{k} for {where} holds token ids beyond the tokenizer's "
                               f"{vocab_size}", field=field, fix="serve a teacher with the student's tokenizer")
        ids[t] = torch.tensor([token for _, token, _ in top])
        logprobs[t] = torch.tensor([value for _, _, value in top], dtype=torch.float32)
        mass = sum(math.exp(value) for _, _, value in top)
        tail[t] = max(math.log1p(-mass), TAIL_FLOOR) if mass < 1 else TAIL_FLOOR
    return ids, logprobs, tail


PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "  leading spaces, tabs\tand\nnew lines",
               "Zahlen 12345 und Ümlaute, 漢字, emoji 🙂", "def f(x):\n    return x ** 2  # code")


def check_same_tokenizer(client: ServedClient, tokenizer, field: str = "teacher.url") -> None:
    """Refuse a served teacher that tokenizes differently from `tokenizer` (the student's): the server's
    /tokenize of a few probe texts (with and without special tokens) must give the same ids. Different
    tokenizers need cross-tokenizer KD, not a served teacher."""
    for text in PROBE_TEXTS:
        for special in (True, False):
            served = client.tokenize(text, add_special_tokens=special)
            local = tokenizer(text, add_special_tokens=special).input_ids
            if served != local:
                first = next((i for i, (a, b) in enumerate(zip(served, local)) if a != b), min(len(served), len(local)))
                raise DistillError(f"the teacher server tokenizes {text!r} (add_special_tokens={special}) as "
                                   f"{served[:first + 3]}..., the student's tokenizer as {local[:first + 3]}... "
                                   f"(first difference at token {first})", field=field,
                                   fix="serve a teacher that uses the student's tokenizer (cross-tokenizer KD is "
                                       "not a served-teacher feature)")
