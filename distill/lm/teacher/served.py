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

import hashlib
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from distill.core.errors import DistillError, InterruptedRun
from distill.lm.data import IGNORE_INDEX, collate
from distill.lm.teacher.cache.store import TopkRows
from distill.lm.teacher.serve import LOGPROB_FLOOR as TAIL_FLOOR  # the log of a mass too small to write
from distill.losses.fused import TeacherSignal


class ServedClient:
    """HTTP calls to one model on one server (`url` ends in /v1)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5, max_in_flight: int = 2, field: str = "teacher.url"):
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_in_flight, self.field = max_in_flight, field
        self.requests = self.bytes_sent = self.bytes_received = 0  # answered requests and their bytes (the wire)

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
                    payload = response.read()
                self.requests += 1  # (+= from several threads: a statistic, not a lock-worthy count)
                self.bytes_sent += len(data or b"")
                self.bytes_received += len(payload)
                return json.loads(payload)
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
                wait = self.backoff_s * 2 ** attempt
                # on stderr, between progress-bar updates
                tqdm.write(f"teacher server: {what} failed ({failure}); retry {attempt + 1} of {self.retries} in "
                           f"{wait:.1f} s", file=sys.stderr)
                time.sleep(wait)
        raise InterruptedRun(f"the teacher server did not answer {what} after {self.retries + 1} tries: {failure}",
                             field=self.field, fix="check that the server runs and is reachable from here; a run "
                                                   "stopped by this continues with --resume")

    def models(self) -> list[str]:
        return [entry["id"] for entry in self.request(f"{self.url}/models").get("data", [])]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.request(f"{self.root}/tokenize", {"model": self.model, "prompt": text,
                                                      "add_special_tokens": add_special_tokens})["tokens"]

    def score(self, sequences: list[list[int]], k: int) -> list[list[dict | None]]:
        """vLLM's prompt_logprobs of each sequence, in one request."""
        answer = self.request(f"{self.url}/completions", {
            "model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k})
        return [choice.get("prompt_logprobs") for choice in self._choices(answer, len(sequences))]

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list[dict | None]]:
        """vLLM's prompt_logprobs of each sequence, split over `max_in_flight` concurrent requests."""
        size = max(1, math.ceil(len(sequences) / self.max_in_flight))
        chunks = [sequences[i:i + size] for i in range(0, len(sequences), size)]
        with ThreadPoolExecutor(self.max_in_flight) as pool:
            return [entries for answered in pool.map(lambda chunk: self.score(chunk, k), chunks)
                    for entries in answered]

    def complete(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | None = None) -> list[list[int]]:
        """The server's completion of each prompt (token ids), as vLLM samples: greedy at temperature 0. The token
        ids come from vLLM's `return_token_ids`; a server without it (e.g. older vLLM) has its text re-tokenized
        by its own /tokenize. A completion stopped by EOS ends with it (as a local teacher's); with no
        `eos_token_id` the server is asked to ignore EOS (vLLM's `ignore_eos`)."""
        if temperature > 0 and seed is not None and len(prompts) > 1:
            # A request's seed seeds each of its prompts alike (vLLM, distill serve): the same prompt twice would be
            # completed twice the same. One request per prompt, seeded seed + its index, max_in_flight at a time.
            with ThreadPoolExecutor(self.max_in_flight) as pool:
                return [completion for answered in pool.map(
                    lambda item: self.complete([item[1]], max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                               seed=seed + item[0], eos_token_id=eos_token_id), enumerate(prompts))
                        for completion in answered]
        body = {"model": self.model, "prompt": prompts, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "return_token_ids": True, "skip_special_tokens": False,
                "ignore_eos": eos_token_id is None}  # no end of sequence: exactly max_tokens, as a local sample
        if seed is not None:
            body["seed"] = seed
        completions = []
        for choice in self._choices(self.request(f"{self.url}/completions", body), len(prompts)):
            tokens = choice.get("token_ids")
            if not isinstance(tokens, list):
                tokens = self.tokenize(str(choice.get("text", "")), add_special_tokens=False)
            if (eos_token_id is not None and choice.get("finish_reason") == "stop"
                    and (not tokens or tokens[-1] != eos_token_id)):
                tokens = [*tokens, eos_token_id]
            completions.append([int(t) for t in tokens])
        return completions

    def _choices(self, answer: dict, count: int) -> list[dict]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != count:
            raise DistillError(f"the teacher server answered {count} prompts with "
                               f"{len(choices) if isinstance(choices, list) else 'no'} choices", field=self.field,
                               fix="point teacher.url at a vLLM-compatible server (vllm serve, distill serve)")
        return sorted(choices, key=lambda c: c.get("index", 0))


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
    ids, values = [], []
    for t, entry in enumerate(entries[1:]):
        # (vLLM lists the position's own token first, then the top-k by rank; sorted here, whatever the order)
        ranked = sorted(((value.get("rank"), int(token), value.get("logprob")) for token, value in (entry or {}).items()
                         if isinstance(value, dict) and isinstance(value.get("rank"), int) and value["rank"] <= k),
                        key=lambda item: item[0])[:k]
        row = [lp for _, _, lp in ranked]
        if len(ranked) < k or any(not isinstance(v, (int, float)) or math.isnan(v) for v in row):
            raise DistillError(f"the teacher server's answer for {where}, position {t + 1}: "
                               f"{len(ranked)} of the top-{k} entries, values {row[:k]}", field=field,
                               fix="the server must return prompt_logprobs with k entries of finite log-probabilities "
                                   "(vLLM: --max-logprobs >= teacher.top_k)")
        ids.append([token for _, token, _ in ranked])
        values.append(row)
    ids = torch.tensor(ids, dtype=torch.long).reshape(n, k)
    if n and int(ids.max()) >= vocab_size:
        raise DistillError(f"the teacher server's top-{k} for {where} holds token ids beyond the tokenizer's "
                           f"{vocab_size}", field=field, fix="serve a teacher with the student's tokenizer")
    logprobs = torch.tensor(values, dtype=torch.float64).reshape(n, k)
    mass = logprobs.exp().sum(-1)
    tail = torch.where(mass < 1, torch.log1p(-mass.clamp(max=1)), torch.tensor(TAIL_FLOOR, dtype=torch.float64))
    tail = tail.clamp(min=TAIL_FLOOR).float()
    logprobs = logprobs.float()
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


def token_logprobs(entries: list[dict | None], sequence: list[int], *, where: str = "",
                   field: str = "teacher.url") -> torch.Tensor:
    """log p(sequence[t + 1] | sequence[:t + 1]) at positions 0..n-1 (vLLM puts each prompt token's own
    log-probability in its entry, whatever its rank)."""
    values = []
    for t, entry in enumerate(entries[1:]):
        value = (entry or {}).get(str(sequence[t + 1]), {}).get("logprob")
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise DistillError(f"the teacher server's answer for {where}, position {t + 1}, has no log-probability "
                               f"of the token there ({sequence[t + 1]})", field=field,
                               fix="use a server that returns vLLM's prompt_logprobs (vllm serve, distill serve)")
        values.append(value)
    return torch.tensor(values, dtype=torch.float32)


def documents(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sequence of a collated batch that predicts something: the unpadded rows, or
    for packed rows each document (its position ids restart at 0)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    positions = batch.get("position_ids")
    spans = []
    for row, length in enumerate(lengths):
        starts = [0] if positions is None else ((positions[row, :length] == 0).nonzero().squeeze(-1).tolist() or [0])
        spans += [(row, start, end) for start, end in zip(starts, starts[1:] + [length]) if end - start >= 2]
    return spans


class ServedTeacher:
    """A served teacher as a teacher source (like `LiveTeacher` and `CachedTeacher`): the top-k + tail of every
    position of a micro-batch, asked of the server. `prefetch(batch)` sends a micro-batch's requests at once
    (`client.max_in_flight` at a time) so that the server works while the student trains; `signal(batch)` then
    waits for them (or asks now). The answers are checked (`topk_tail`): a malformed one is an error."""

    def __init__(self, client: ServedClient, k: int, vocab_size: int, sparse: str = "tail"):
        self.client, self.k, self.vocab_size, self.sparse = client, k, vocab_size, sparse
        self.pool = ThreadPoolExecutor(client.max_in_flight, thread_name_prefix="distill-teacher")
        self.pending: dict[str, list[tuple[list, Future]]] = {}
        self.tokens = self.batches = self.prefetched = 0  # positions scored, batches asked, of which prefetched

    @staticmethod
    def _key(batch: dict) -> str:
        ids = batch["input_ids"].cpu()
        return hashlib.sha256(str(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()

    def _submit(self, batch: dict) -> list[tuple[list, Future]]:
        ids = batch["input_ids"].cpu()
        spans = documents({k: v.cpu() for k, v in batch.items() if k in ("attention_mask", "position_ids")})
        size = max(1, math.ceil(len(spans) / self.client.max_in_flight))
        requests = []
        for start in range(0, len(spans), size):
            chunk = spans[start:start + size]
            sequences = [ids[row, begin:end].tolist() for row, begin, end in chunk]
            requests.append((list(zip(chunk, sequences)), self.pool.submit(self.client.score, sequences, self.k)))
        return requests

    def prefetch(self, batch: dict) -> None:
        """Start asking for this micro-batch's signal (a later `signal` of the same tokens collects it)."""
        key = self._key(batch)
        if key not in self.pending:
            self.pending[key] = self._submit(batch)

    def _answers(self, batch: dict):
        """((row, start, end), sequence, entries) of every document of the batch."""
        requests = self.pending.pop(self._key(batch), None)
        self.batches += 1
        self.prefetched += requests is not None
        requests = requests or self._submit(batch)
        return [(span, sequence, entries) for documents_, future in requests
                for (span, sequence), entries in zip(documents_, future.result())]

    def _where(self, batch: dict, row: int) -> str:
        index = batch.get("example_index")
        return f"training example {int(index[row])}" if index is not None else f"batch row {row}"

    @torch.no_grad()
    def answers(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round of requests for the batch: ids [B, T-1, k], log-probs [B, T-1, k], log tail mass [B, T-1] and
        the log-probability of the actual next token [B, T-1], at every position that predicts a token of its
        document (position t predicts token t + 1; zeros elsewhere)."""
        batch_size, length = batch["input_ids"].shape
        ids = torch.zeros(batch_size, length - 1, self.k, dtype=torch.long)
        logprobs = torch.zeros(batch_size, length - 1, self.k)
        tail, tokens = torch.zeros(batch_size, length - 1), torch.zeros(batch_size, length - 1)
        for (row, start, end), sequence, entries in self._answers(batch):
            where = self._where(batch, row)
            ids[row, start:end - 1], logprobs[row, start:end - 1], tail[row, start:end - 1] = topk_tail(
                entries, sequence, self.k, self.vocab_size, where=where, field=self.client.field)
            tokens[row, start:end - 1] = token_logprobs(entries, sequence, where=where, field=self.client.field)
            self.tokens += end - start - 1
        return ids, logprobs, tail, tokens

    def topk(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`answers`' ids, log-probs and tail."""
        return self.answers(batch)[:3]

    def statistics(self) -> dict:
        """What went over the wire so far (results.json meta.served_teacher; benchmarks/served.py)."""
        client = self.client
        return {"url": client.url, "model": client.model, "top_k": self.k, "requests": client.requests,
                "bytes_sent": client.bytes_sent, "bytes_received": client.bytes_received,
                "positions_scored": self.tokens,
                "bytes_per_position": (client.bytes_sent + client.bytes_received) / max(self.tokens, 1),
                "batches": self.batches, "batches_prefetched": self.prefetched}

    def signal(self, batch: dict, *, hidden: bool = False) -> TeacherSignal:
        device = batch["input_ids"].device
        ids, logprobs, tail = (t.to(device) for t in self.topk(batch))
        return TeacherSignal(topk_ids=ids, topk_logprobs=logprobs, tail_logmass=tail if self.sparse == "tail" else None)

    def token_logprobs(self, batch: dict) -> torch.Tensor:
        """[B, T-1]: the teacher's log-probability of each next token of the batch (0 where nothing is predicted)."""
        return self.answers(batch)[3].to(batch["input_ids"].device)

    def complete(self, prompts: list[list[int]], **sampling) -> list[list[int]]:
        return self.client.complete(prompts, **sampling)

    def table(self, examples: list, batch_size: int, pad_token_id: int) -> tuple["TopkRows", list[tuple[int, int]]]:
        """The top-k + tail of `examples`' loss tokens, held like a cache's rows (for evaluation), and their spans."""
        ids, logprobs, tails, spans, offset = [], [], [], [], 0
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_token_id)
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            top_ids, top_logprobs, tail = self.topk(batch)
            ids.append(top_ids[mask]), logprobs.append(top_logprobs[mask]), tails.append(tail[mask])
            for count in mask.sum(1).tolist():
                spans.append((offset, count))
                offset += count
        return TopkRows(torch.cat(ids), torch.cat(logprobs), torch.cat(tails)), spans

    def close(self) -> None:
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


def connect(spec, tokenizer, *, field: str = "teacher.url") -> ServedClient:
    """A client for the recipe's served teacher (`teacher.url`), checked before anything is written: the server
    answers, serves the model (default: its only one), tokenizes like `tokenizer`, and answers a scoring request
    with `top_k` log-probabilities per position."""
    if spec.top_k > len(tokenizer):  # (vLLM 0.32's engine dies on such a request instead of refusing it)
        raise DistillError(f"teacher.top_k={spec.top_k} is more than the vocabulary's {len(tokenizer)} tokens",
                           field="teacher.top_k", fix=f"set teacher.top_k <= {len(tokenizer)}")
    api_key = None
    if spec.api_key_env:
        api_key = os.environ.get(spec.api_key_env)
        if not api_key:
            raise DistillError(f"the environment variable {spec.api_key_env} (the server's API key) is not set",
                               field="teacher.api_key_env", fix=f"export {spec.api_key_env}=<the key> before the run")
    probe = ServedClient(spec.url, spec.model or "", api_key=api_key, timeout_s=min(spec.timeout_s, 30), retries=1,
                         backoff_s=min(spec.backoff_s, 0.5), field=field)
    try:
        names = probe.models()
    except InterruptedRun as error:  # nothing started yet: nothing to resume
        raise DistillError(error.message, field=field, fix="start the server (vllm serve, distill serve) or correct "
                                                           "teacher.url") from None
    if spec.model is None and len(names) != 1:
        raise DistillError(f"the server at {spec.url} serves {len(names)} models ({', '.join(names)})",
                           field="teacher.model", fix="name one of them in teacher.model")
    model = spec.model or names[0]
    if model not in names:
        raise DistillError(f"the server at {spec.url} does not serve `{model}`; it serves {', '.join(names) or 'none'}",
                           field="teacher.model", fix="set teacher.model to one of these")
    probe.model = model
    check_same_tokenizer(probe, tokenizer, field=field)
    sequence = tokenizer(PROBE_TEXTS[0]).input_ids
    topk_tail(probe.score([sequence], spec.top_k)[0], sequence, spec.top_k, len(tokenizer),
              where="a probe text at start-up", field="teacher.top_k")
    return ServedClient(spec.url, model, api_key=api_key, timeout_s=spec.timeout_s, retries=spec.retries,
                        backoff_s=spec.backoff_s, max_in_flight=spec.max_in_flight, field=field)


def served_row(teacher: ServedTeacher, *, scorer, records: list, examples: list, tokenizer, batch_size: int,
               generate_size: int, temperature: float, seed: int, per_token: dict | None = None
               ) -> tuple[dict, list[str]]:
    """The served teacher's row of the report: what the server measures. The NLL of the eval tokens (their
    log-probabilities as served), and, where the eval rows have reference answers, the exact match and ROUGE-L
    of the server's generated answers (greedy, or sampled at `temperature` with `seed`). Agreement and KL with
    itself are 1 and 0 by definition. Returns (metrics, the first answers). A built-in task's own metrics that need the model's full distribution
    (the oracle's exact KLs) are not measurable over the API and are left out."""
    from distill.lm.evaluate import exact_match, rouge_l
    from distill.lm.tasks.completions import CompletionsScorer

    pad = tokenizer.pad_token_id or 0
    values = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        values.append(-teacher.token_logprobs(batch)[mask])
    nll = torch.cat(values) if values else torch.zeros(0)
    metrics = {"nll": float(nll.mean()) if nll.numel() else 0.0, "teacher_top1_agreement": 1.0, "teacher_kl": 0.0}
    if per_token is not None:
        per_token["nll"] = nll
    generating = scorer if isinstance(scorer, CompletionsScorer) else (
        CompletionsScorer.for_records(records, tokenizer, metric="exact_match")
        if scorer is not None and getattr(scorer, "metric", None) == "exact_match" else None)
    answers = []
    if generating is not None and generate_size:
        prompts, references = generating.prompts[:generate_size], generating.references[:generate_size]
        for start in range(0, len(prompts), batch_size):
            completions = teacher.complete(prompts[start:start + batch_size], max_tokens=generating.max_new_tokens,
                                           temperature=temperature, seed=seed, eos_token_id=tokenizer.eos_token_id)
            answers += [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
        metrics["exact_match"] = exact_match(answers, references)
        if isinstance(scorer, CompletionsScorer):
            metrics["rouge_l"] = rouge_l(answers, references)
    return metrics, answers[:CompletionsScorer.EXAMPLES]
