"""`distill serve TEACHER`: a local (or `builtin:`) causal LM behind the subset of the OpenAI-compatible API
that vLLM implements for scoring and sampling, so that a run can use a served teacher without vLLM.

    GET  /v1/models          the one model: {"object": "list", "data": [{"id", "object": "model", "max_model_len", ...}]}
    POST /tokenize           {"prompt": str, "add_special_tokens": bool} -> {"tokens", "count", "max_model_len"}
    POST /v1/completions     token-id (or text) prompts; `prompt_logprobs: k` gives, for every prompt position but
                             the first, the top-k log-probabilities of the token there (plus the actual token when
                             it is not among them, with its rank), as vLLM returns them; `max_tokens` tokens are
                             generated (greedy at temperature 0, else sampled with `seed`)

Concurrent requests are scored together: a worker thread takes queued prompts up to `max_batch_tokens` (padded
tokens) into one forward pass. Bound to a non-loopback address the server requires an API key
(`Authorization: Bearer KEY`), read from an environment variable and never printed.
"""
from __future__ import annotations

import functools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOGPROB_FLOOR = -9999.0  # vLLM's JSON stand-in for a log-probability of -inf


@dataclass
class _Job:
    prompts: list[list[int]]
    k: int
    done: threading.Event = field(default_factory=threading.Event)
    result: list | None = None
    error: BaseException | None = None


def top_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, k: int, decode) -> list[dict[str, dict]]:
    """vLLM's prompt-logprob entries of one sequence: for each position t (predicting targets[t]), a dict
    token id (a string, as JSON keys are) -> {"logprob", "rank", "decoded_token"} over the top-k tokens and
    the target token, the target first (rank 1 is the most likely; the target's rank counts the tokens whose
    log-probability is at least its own, so a tie gets the worse rank, as vLLM's `batched_count_greater_than`)."""
    values, ids = logprobs.topk(k, dim=-1)
    target_logprobs = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    target_ranks = (logprobs >= target_logprobs[:, None]).sum(-1)
    entries = []  # (plain lists first: indexing tensors per position costs more than building the entries)
    for target, target_logprob, target_rank, row_ids, row_values in zip(
            targets.tolist(), target_logprobs.tolist(), target_ranks.tolist(), ids.tolist(), values.tolist()):
        entry = {str(target): {"logprob": _finite(target_logprob), "rank": target_rank, "decoded_token": decode(target)}}
        for rank, (token, value) in enumerate(zip(row_ids, row_values), 1):
            entry.setdefault(str(token), {"logprob": _finite(value), "rank": rank, "decoded_token": decode(token)})
        entries.append(entry)
    return entries


def _finite(value: float) -> float:
    """-inf (a token the model rules out) as vLLM writes it into JSON (`clamp_prompt_logprobs`)."""
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


class TeacherEngine:
    """The model and a worker thread that scores queued prompts in batches."""

    def __init__(self, model, tokenizer, *, name: str, max_batch_tokens: int = 16384, max_logprobs: int = 64):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_batch_tokens, self.max_logprobs = max_batch_tokens, max_logprobs
        # log-probabilities over the model's whole output (its config.vocab_size rows, padding rows included), as
        # vLLM computes them; token ids are accepted up to that size
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_model_len = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.queue: queue.Queue[_Job] = queue.Queue()
        self.lock = threading.Lock()  # generation runs outside the worker, one request at a time
        self.worker = threading.Thread(target=self._work, daemon=True, name="distill-serve-scorer")
        self.worker.start()

    @functools.lru_cache(maxsize=None)  # noqa: B019 (one engine per server: it lives as long as the process)
    def decode(self, token: int) -> str:
        """A token's text (`decoded_token`): asked (k + 1) times per scored position, so remembered."""
        return self.tokenizer.decode([token])

    # ---- scoring -------------------------------------------------------------------------------

    def score(self, prompts: list[list[int]], k: int) -> tuple[list[list[dict | None]], list[int]]:
        """prompt_logprobs of each prompt (None first, as vLLM), scored with any other queued prompts, and each
        prompt's greedy next token (the same forward pass: a scoring request's max_tokens 1 costs nothing more)."""
        job = _Job(prompts, k)
        self.queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self) -> None:
        while True:
            jobs = [self.queue.get()]
            width = max(map(len, jobs[0].prompts))
            rows = len(jobs[0].prompts)
            while True:  # more queued requests, while the padded batch stays within max_batch_tokens
                try:
                    following = self.queue.queue[0]
                except IndexError:
                    break
                wider = max(width, max(map(len, following.prompts)))
                if wider * (rows + len(following.prompts)) > self.max_batch_tokens:
                    break
                jobs.append(self.queue.get())
                width, rows = wider, rows + len(following.prompts)
            try:
                results, following = self._score_batch([p for job in jobs for p in job.prompts],
                                                        max(job.k for job in jobs))
                start = 0
                for job in jobs:
                    job.result = ([[None] + [{key: value for key, value in entry.items()
                                              if value["rank"] <= job.k or key == str(prompt[t + 1])}
                                             for t, entry in enumerate(entries)]
                                   for prompt, entries in zip(job.prompts, results[start:start + len(job.prompts)])],
                                  following[start:start + len(job.prompts)])
                    start += len(job.prompts)
            except BaseException as error:  # the request fails, the server stays up
                for job in jobs:
                    job.error = error
            for job in jobs:
                job.done.set()

    @torch.no_grad()
    def _score_batch(self, prompts: list[list[int]], k: int) -> tuple[list[list[dict]], list[int]]:
        width = max(map(len, prompts))
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, :len(prompt)] = torch.tensor(prompt)
            attention_mask[row, :len(prompt)] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                            use_cache=False).logits.float()
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        following = logits[torch.arange(len(prompts)), lengths - 1].argmax(-1).tolist()
        logprobs = torch.log_softmax(logits[:, :-1], -1).cpu()
        return [top_logprobs(logprobs[row, :len(prompt) - 1], torch.tensor(prompt[1:]), k, self.decode)
                for row, prompt in enumerate(prompts)], following

    # ---- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: list[int], *, max_tokens: int, temperature: float, top_p: float,
                 seed: int | None, n: int, stop_token_ids: list[int], ignore_eos: bool = False) -> list[dict]:
        """`n` completions of one prompt: token ids, text and finish reason."""
        eos = [*stop_token_ids, *([self.tokenizer.eos_token_id]
                                  if self.tokenizer.eos_token_id is not None and not ignore_eos else [])]
        options: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": eos[0] if eos else 0,
                                   "eos_token_id": eos or None, "num_return_sequences": n}
        if not eos:  # nothing ends a completion: exactly max_tokens (not the model's generation_config EOS)
            options.update(min_new_tokens=max_tokens, eos_token_id=None)
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            options.update(do_sample=False)
        input_ids = torch.tensor([prompt], device=self.device)
        with self.lock, torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         synced_gpus=False, **options)
        choices = []
        for row in output[:, len(prompt):].tolist():
            stop = next((i for i, token in enumerate(row) if token in eos), None)
            tokens = row[:stop + 1] if stop is not None else row
            choices.append({"token_ids": tokens, "text": self.tokenizer.decode(tokens, skip_special_tokens=True),
                            "finish_reason": "stop" if stop is not None else "length"})
        return choices


class Completion(BaseModel):
    """A /v1/completions request (the fields vLLM reads for scoring and sampling)."""

    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use are accepted and ignored
    model: str | None = None
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int = 16
    prompt_logprobs: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    add_special_tokens: bool = True
    echo: bool = False
    return_token_ids: bool = False


class Tokenize(BaseModel):
    """A /tokenize request."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


def build_app(engine: TeacherEngine, api_key: str | None = None):
    """The FastAPI application over `engine`."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="distill serve", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "missing or wrong API key (Authorization: Bearer KEY)",
                                           "type": "invalid_request_error", "code": 401}}, status_code=401)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def openai_error(request: Request, error: HTTPException):  # {"error": {...}} as OpenAI and vLLM answer
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    def refuse(message: str, status: int = 400):
        raise HTTPException(status, detail={"message": message, "type": "invalid_request_error", "code": status})

    def check_model(name):
        if name is not None and name != engine.name:
            refuse(f"The model `{name}` does not exist; this server has `{engine.name}`", 404)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "distill", "root": engine.name,
                                            "max_model_len": engine.max_model_len}]}

    @app.post("/tokenize")
    def tokenize(body: Tokenize):
        check_model(body.model)
        tokens = engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/v1/completions")
    def completions(body: Completion):
        check_model(body.model)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [engine.tokenizer(p, add_special_tokens=body.add_special_tokens).input_ids if isinstance(p, str)
                   else p for p in prompts]
        if not prompts or any(not p for p in prompts):
            refuse("every prompt needs at least one token")
        if any(t < 0 or t >= engine.vocab_size for p in prompts for t in p):
            refuse(f"token ids must lie in 0..{engine.vocab_size - 1}")
        if body.prompt_logprobs is not None and not 0 <= body.prompt_logprobs <= engine.max_logprobs:
            refuse(f"prompt_logprobs must lie in 0..{engine.max_logprobs} (--max-logprobs)")
        if body.max_tokens == 0 and not body.echo:
            refuse("max_tokens 0 needs echo: true (as vLLM: score the prompt, generate nothing)")
        if engine.max_model_len and any(len(p) > engine.max_model_len for p in prompts):
            refuse(f"a prompt is longer than the model's {engine.max_model_len} positions")
        scored, following = (engine.score(prompts, body.prompt_logprobs) if body.prompt_logprobs is not None
                             else (None, None))
        greedy_one = (following is not None and body.max_tokens == 1 and body.temperature == 0 and body.n == 1
                      and not body.stop_token_ids)
        choices, generated = [], 0
        for index, prompt in enumerate(prompts):
            room = body.max_tokens if not engine.max_model_len else min(body.max_tokens,
                                                                        engine.max_model_len - len(prompt))
            if greedy_one and room > 0:  # the scoring pass already chose it
                token = following[index]
                stop = token == engine.tokenizer.eos_token_id and not body.ignore_eos
                made = [{"token_ids": [token], "text": engine.tokenizer.decode([token], skip_special_tokens=True),
                         "finish_reason": "stop" if stop else "length"}]
            elif room > 0:
                made = engine.generate(prompt, max_tokens=room, temperature=body.temperature, top_p=body.top_p,
                                       seed=body.seed, n=body.n, stop_token_ids=body.stop_token_ids,
                                       ignore_eos=body.ignore_eos)
            else:
                made = [{"token_ids": [], "text": "", "finish_reason": "length"}] * body.n
            for sample in made:
                generated += len(sample["token_ids"])
                text = (engine.tokenizer.decode(prompt) if body.echo else "") + sample["text"]
                choice = {"index": len(choices), "text": text, "logprobs": None,
                          "finish_reason": sample["finish_reason"], "stop_reason": None,
                          "prompt_logprobs": scored[index] if scored is not None else None}
                if body.return_token_ids:  # as vLLM's return_token_ids
                    choice.update(prompt_token_ids=prompt, token_ids=sample["token_ids"])
                choices.append(choice)
        prompt_tokens = sum(map(len, prompts))
        completion_tokens = generated
        # Serialised here: FastAPI's default (jsonable_encoder over every nested dict) takes longer than the
        # teacher's forward pass for a batch of prompt_logprobs.
        return Response(json.dumps({
            "id": f"cmpl-distill-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
            "model": engine.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}), media_type="application/json")

    return app
