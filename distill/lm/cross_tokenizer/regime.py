"""Training a student against a teacher with another tokenizer: the objective over aligned chunks and the
off-policy regime that feeds it (each micro-batch holds both sides' tokens of the same rows and their chunk ids,
distill/lm/cross_tokenizer/data.py).

    loss = kd_weight * D(student, teacher over the alignment) + ce_weight * CE(student, its own tokens)

with D one of the cross-tokenizer losses (distill/losses/cross_tokenizer.py):
- uld: completion positions paired in order (the k-th prediction of each side), sorted-probability L1;
- gold_hybrid: per aligned chunk, each side's chain-rule merged row; JSD on entries whose strings match (each
  token decoded alone: `Ġx` and `▁x` both read " x"), ULD on the rest;
- alm: per aligned chunk, both sides' chunk likelihoods through the binarised f-divergence.
Each is normalised over the micro-batch's own units (pairs or chunks) and weighted by the micro-batch's share of
the step's completion tokens, so that gradient accumulation averages micro-batches as the token losses do.
"""
from __future__ import annotations

import time

import torch

from distill.lm.cross_tokenizer.data import PairedExample, collate_pairs, pair_examples
from distill.lm.data import IGNORE_INDEX
from distill.lm.recipe import ObjectiveSpec
from distill.lm.regimes import MicroBatch, Sampling, StepLoss, StudentView, prompt_of, sampling_generator
from distill.losses import cross_entropy, get_spec
from distill.losses.cross_tokenizer import chunk_logprobs, chunk_rows, gold_hybrid


def matched_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the vocabulary entries that read the same: each token decoded alone, special
    tokens and pieces that are not whole characters (decoding to U+FFFD) left out."""
    def surfaces(tokenizer):
        special = set(tokenizer.all_special_ids)
        out = {}
        for token_id in range(len(tokenizer)):
            if token_id in special:
                continue
            text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            if text and "\ufffd" not in text:
                out.setdefault(text, token_id)
        return out

    student, teacher = surfaces(student_tokenizer), surfaces(teacher_tokenizer)
    shared = sorted(student.keys() & teacher.keys())
    return torch.tensor([student[k] for k in shared], dtype=torch.long), torch.tensor([teacher[k] for k in shared],
                                                                                    dtype=torch.long)


def boundary_mask(tokenizer) -> torch.Tensor:
    """[len(tokenizer)] bool: the tokens that start a new unit and the special tokens: what may follow the end of a
    word (ALM's debiasing and merging; tokenkit's space mask). A token starts a unit when its text begins with
    whitespace or a space marker (BPE, Unigram), when it is not a `##` continuation (WordPiece), always for a
    word-level vocabulary."""
    special = set(tokenizer.all_special_ids)
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    kind = type(backend).__name__ if backend is not None else ""
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token_id in range(len(tokenizer)):
        text = tokenizer.convert_ids_to_tokens(token_id)
        if token_id in special or kind == "WordLevel":  # whole words: every token starts one
            mask[token_id] = True
        elif kind == "WordPiece":  # continuation pieces are marked `##`
            mask[token_id] = not (isinstance(text, str) and text.startswith("##"))
        else:  # BPE, Unigram: a leading space (or its marker) starts a word
            decoded = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            mask[token_id] = decoded[:1].isspace() or (isinstance(text, str) and text[:1] in ("Ġ", "▁", "Ċ", "ĉ"))
    return mask


class CrossObjective:
    """The objective section of a cross-tokenizer run, callable on a paired micro-batch."""

    fusable = False  # needs both sides' full logits

    def __init__(self, spec: ObjectiveSpec, *, student_vocab: int, teacher_vocab: int,
                 matched: tuple[torch.Tensor, torch.Tensor] | None = None,
                 boundaries: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`matched`: (student ids, teacher ids) of the shared vocabulary (gold_hybrid); `boundaries`: each side's
        `boundary_mask` (alm with debias or merge_threshold)."""
        self.spec, self.student_vocab, self.teacher_vocab = spec, student_vocab, teacher_vocab
        self.loss_spec = get_spec(spec.loss, kind="cross_token")
        self.params = spec.loss_params()
        self.uses_teacher = spec.kd_weight > 0
        self.matched, self.boundaries = matched, boundaries
        self.needs_boundaries = bool(self.params.get("debias")) or self.params.get("merge_threshold", 0) > 0

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, batch: dict,
             num_valid_tokens: int, teacher_tokens: torch.Tensor | None = None,
             teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """student_logits [B, L_S, V_S], teacher_logits [B, L_T, V_T] (not shifted) of a `collate_pairs` batch; or,
        from a cache, `teacher_tokens` [B, L_T - 1] (the teacher's log-probability of each next token) and
        `teacher_topk` (ids, log-probs) [B, L_T - 1, k] at the teacher's completion positions."""
        spec, parts = self.spec, {}
        logits = student_logits[:, :-1, :self.student_vocab].float()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        share = int(mask.sum()) / max(num_valid_tokens, 1)  # this micro-batch's share of the step's tokens
        loss = logits.new_zeros(())
        if self.uses_teacher:
            teacher = teacher_logits[:, :-1, :self.teacher_vocab].float() if teacher_logits is not None else None
            teacher = self._teacher_from_topk(teacher, teacher_topk)
            view = None if self.loss_spec.name == "uld" and spec.overlap_loss is None else self._chunks(
                logits, teacher, batch, teacher_tokens, from_cache=teacher_topk is not None)
            kd = self._divergence(logits, teacher, batch, view) * share
            if spec.overlap_loss is not None and teacher is not None:
                overlap = self._overlap(view) * share
                kd, parts["overlap"] = kd + spec.overlap_weight * overlap, overlap.item()
            loss, parts["kd"] = loss + spec.kd_weight * kd, kd.item()
        if spec.ce_weight > 0:
            ce = cross_entropy(logits, labels, mask, num_valid_tokens=num_valid_tokens)
            loss, parts["ce"] = loss + spec.ce_weight * ce, ce.item()
        parts["loss"] = loss.item()
        return loss, parts

    def _teacher_from_topk(self, teacher, teacher_topk):
        """A cached or served teacher's top-k as its distribution: for ULD the top-k log-probs themselves
        (renormalised over k by the loss's softmax), for GOLD placed in the teacher's vocabulary, the rest zero;
        exact as k reaches the vocabulary. ALM needs none (the tokens' own log-probs)."""
        if teacher is not None or teacher_topk is None or self.loss_spec.name == "alm":
            return teacher
        ids, values = teacher_topk
        if self.loss_spec.name == "uld":
            return values.float()
        return torch.full((*ids.shape[:-1], self.teacher_vocab), float("-inf"), device=ids.device).scatter(
            -1, ids, values.float())

    def _chunks(self, logits, teacher, batch, teacher_tokens, *, from_cache: bool) -> dict:
        """Both sides' log-distributions, their tokens' log-probs and chunk ids, at the positions that predict
        (row t predicts token t + 1): what the chunk losses read, computed once per micro-batch."""
        student_chunk, teacher_chunk = batch["chunk"][:, 1:], batch["teacher_chunk"][:, 1:]
        student_logprobs = torch.log_softmax(logits / self.spec.temperature, -1)
        teacher_logprobs = None
        if teacher is not None:  # (from a cache or a server: already log-probabilities at temperature 1)
            teacher_logprobs = teacher if from_cache else torch.log_softmax(teacher / self.spec.temperature, -1)
        if teacher_tokens is None:
            teacher_tokens = teacher_logprobs.gather(-1, batch["teacher_input_ids"][:, 1:, None]).squeeze(-1)
        return {"student_logprobs": student_logprobs, "teacher_logprobs": teacher_logprobs,
                "student_tokens": student_logprobs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1),
                "teacher_tokens": teacher_tokens, "student_chunk": student_chunk, "teacher_chunk": teacher_chunk,
                "num_chunks": int(max(student_chunk.max(), teacher_chunk.max()).clamp(min=0)) + 1}

    def _divergence(self, logits, teacher, batch, view) -> torch.Tensor:
        name, spec = self.loss_spec.name, self.spec
        if name == "uld":
            return self.loss_spec.fn(logits, teacher, batch["labels"][:, 1:] != IGNORE_INDEX,
                                     batch["teacher_labels"][:, 1:] != IGNORE_INDEX, temperature=spec.temperature,
                                     **self.params)
        v, num_chunks = view, view["num_chunks"]
        if name == "alm":
            present = chunk_logprobs(torch.ones_like(v["student_tokens"]), v["student_chunk"], num_chunks) > 0
            extra = {}
            if self.needs_boundaries:  # the probability that a new unit follows each chunk, on each side
                extra = {"student_boundary": _chunk_boundary(v["student_logprobs"], self.boundaries[0],
                                                             v["student_chunk"], num_chunks),
                         "teacher_boundary": _chunk_boundary(v["teacher_logprobs"], self.boundaries[1],
                                                             v["teacher_chunk"], num_chunks)}
            return self.loss_spec.fn(chunk_logprobs(v["student_tokens"], v["student_chunk"], num_chunks),
                                     chunk_logprobs(v["teacher_tokens"], v["teacher_chunk"], num_chunks), present,
                                     **self.params, **extra)
        student_rows, teacher_rows, present = self._rows(view)
        total, _, _ = gold_hybrid(student_rows[present].exp(), teacher_rows[present].exp(), *self.matched,
                                  **self.params)
        return total

    @staticmethod
    def _rows(view) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each side's chain-rule merged row per chunk (log), and which chunks exist (kept in the view: GOLD and
        the overlap term read the same rows)."""
        if "rows" in view:
            return view["rows"]
        student_rows, present = chunk_rows(view["student_logprobs"], view["student_tokens"], view["student_chunk"],
                                           view["num_chunks"])
        teacher_rows, _ = chunk_rows(view["teacher_logprobs"], view["teacher_tokens"].clamp(min=-1e4),
                                     view["teacher_chunk"], view["num_chunks"])
        view["rows"] = student_rows, teacher_rows, present
        return view["rows"]

    def _overlap(self, view) -> torch.Tensor:
        """objective.overlap_loss between each aligned chunk's merged rows restricted to the shared vocabulary
        entries and renormalised there (both sides' distributions over the strings they share)."""
        student_rows, teacher_rows, present = self._rows(view)
        student_ids, teacher_ids = (ids.to(student_rows.device) for ids in self.matched)
        divergence = get_spec(self.spec.overlap_loss, kind="token").fn
        return divergence(student_rows[present][:, student_ids], teacher_rows[present][:, teacher_ids])

    def end_step(self, kd_total: float, progress: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _chunk_boundary(logprobs: torch.Tensor, boundary: torch.Tensor, chunk: torch.Tensor,
                    num_chunks: int) -> torch.Tensor:
    """[B, K]: log of the probability that the token after each chunk's last token is a boundary token. logprobs
    [B, L, V] row t predicts token t + 1, chunk [B, L] the chunk of the token each row predicts: the token after
    chunk c's last token is predicted by the row after c's last row (none past the end: 0, the text ends there)."""
    batch, length, _ = logprobs.shape
    boundary_logprob = logprobs[..., boundary.to(logprobs.device)].logsumexp(-1)  # [B, L]
    positions = torch.arange(length, device=chunk.device).expand(batch, length)
    valid = chunk >= 0
    flat = (torch.arange(batch, device=chunk.device)[:, None] * num_chunks + chunk.clamp(min=0))[valid]
    last = torch.full((batch * num_chunks,), -1, dtype=torch.long, device=chunk.device).scatter_reduce(
        0, flat, positions[valid], reduce="amax").reshape(batch, num_chunks)
    following = last + 1
    inside = (last >= 0) & (following < length)
    values = boundary_logprob.gather(1, following.clamp(max=length - 1).clamp(min=0))
    return torch.where(inside, values, torch.zeros_like(values))


class CachedTokenLogprobs:
    """The teacher as its cache (`distill cache` on the teacher's tokenization of the rows): the log-probability
    of each of its own completion tokens (all ALM needs) and its top-k there (ULD and GOLD, exact as k reaches
    the teacher's vocabulary)."""

    def __init__(self, cache, spans: list[tuple[int, int]]):
        self.cache, self.spans = cache, spans

    def topk(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, log-probs) [B, L_T - 1, k] at the teacher's completion positions (zeros elsewhere)."""
        mask = (batch["teacher_labels"][:, 1:] != IGNORE_INDEX).cpu()
        ids, logprobs, _ = self.cache.batch([self.spans[i] for i in batch["example_index"].tolist()], mask)
        return ids, logprobs

    def token_logprobs(self, batch: dict) -> torch.Tensor:
        """[B, L_T - 1]: log p_T of the token each teacher position predicts, at the teacher's completion tokens."""
        mask = (batch["teacher_labels"][:, 1:] != IGNORE_INDEX).cpu()
        spans = [self.spans[i] for i in batch["example_index"].tolist()]
        return self.cache.place(self.cache.token_logprobs.float(), spans, mask)


class CrossDistill:
    """Off-policy cross-tokenizer KD: the data's rows, each side on its own tokens, the teacher under no_grad."""

    kind = "off_policy"
    samples = False
    full_logits = True

    def __init__(self, objective: CrossObjective, teacher, pairs: list[PairedExample], *,
                 student_pad: int, teacher_pad: int):
        """`teacher`: a causal LM (under no_grad), `CachedTokenLogprobs`, or a served teacher
        (distill/lm/teacher/served.py), asked about the teacher's own tokens of each row."""
        if isinstance(teacher, torch.nn.Module):
            teacher = teacher.eval().requires_grad_(False)
        self.objective, self.teacher, self.pairs = objective, teacher, pairs
        self.student_pad, self.teacher_pad = student_pad, teacher_pad

    def micro_batch(self, examples, indices: list[int], student: StudentView, *, step: int, micro: int,
                    rank: int) -> MicroBatch:
        tensors = collate_pairs([self.pairs[i] for i in indices], self.student_pad, self.teacher_pad)
        tensors["example_index"] = torch.tensor(indices, dtype=torch.long)
        return MicroBatch(tensors)

    def ahead(self, examples, indices, student) -> None:
        pass

    def loss(self, batch: dict, student: StudentView, num_valid_tokens: int) -> StepLoss:
        logits = student.logits(batch["input_ids"], batch["attention_mask"])
        started = time.perf_counter()
        teacher_logits = teacher_tokens = None
        with torch.no_grad():
            teacher_topk = None
            if isinstance(self.teacher, CachedTokenLogprobs):
                teacher_tokens = self.teacher.token_logprobs(batch).to(logits.device)
                if self.objective.loss_spec.name != "alm":
                    teacher_topk = tuple(t.to(logits.device) for t in self.teacher.topk(batch))
            elif hasattr(self.teacher, "answers"):  # a served teacher, asked about its own tokens
                side = {"input_ids": batch["teacher_input_ids"].cpu(), "example_index": batch["example_index"].cpu(),
                        "attention_mask": batch["teacher_attention_mask"].cpu()}
                ids, values, _, tokens = self.teacher.answers(side)
                teacher_tokens = tokens.to(logits.device)
                teacher_topk = (ids.to(logits.device), values.to(logits.device))
            else:
                teacher_logits = self.teacher(input_ids=batch["teacher_input_ids"],
                                              attention_mask=batch["teacher_attention_mask"], use_cache=False).logits
        seconds = time.perf_counter() - started
        loss, parts = self.objective.loss(logits, teacher_logits, batch, num_valid_tokens, teacher_tokens,
                                          teacher_topk)
        return StepLoss(loss, parts, seconds)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def with_completion(record: dict, text: str) -> dict:
    """The row with its answer replaced by `text` (the completion, or the last message's content)."""
    if "messages" in record:
        messages = [dict(m) for m in record["messages"]]
        messages[-1]["content"] = text
        return {**record, "messages": messages}
    return {**record, "completion": text}


class CrossOnPolicy(CrossDistill):
    """On-policy cross-tokenizer KD (GKD with lmbda): with probability lmbda a micro-batch's completions are the
    student's samples. A sample is decoded to text and each side tokenizes the row with that answer, the teacher
    with its own tokenizer and template: the student's token ids never reach the teacher. (The student learns its
    sample as its tokenizer writes the text, which is the sampled ids unless it sampled a non-canonical split.)"""

    kind = "on_policy"
    samples = True

    def __init__(self, objective, teacher, pairs, *, records: list[dict], sampling: Sampling, student_tokenizer,
                 teacher_tokenizer, max_length: int, student_pad: int, teacher_pad: int):
        super().__init__(objective, teacher, pairs, student_pad=student_pad, teacher_pad=teacher_pad)
        self.records, self.sampling = records, sampling
        self.student_tokenizer, self.teacher_tokenizer, self.max_length = student_tokenizer, teacher_tokenizer, max_length

    def micro_batch(self, examples, indices, student: StudentView, *, step, micro, rank) -> MicroBatch:
        generator = sampling_generator(student.seed, step, micro, rank)
        if self.sampling.lmbda < 1.0 and float(torch.rand((), generator=generator)) >= self.sampling.lmbda:
            return super().micro_batch(examples, indices, student, step=step, micro=micro, rank=rank)
        generation = student.sample([prompt_of(self.pairs[i].student) for i in indices], self.sampling, generator)
        pairs = []
        for index, completion in zip(indices, generation.completions()):
            ended = bool(completion) and completion[-1] == self.sampling.eos_token_id
            text = self.student_tokenizer.decode(completion, skip_special_tokens=True)
            pairs += pair_examples([with_completion(self.records[index], text)], self.student_tokenizer,
                                   self.teacher_tokenizer, max_length=self.max_length, append_eos=ended,
                                   field="data.train")
        tensors = collate_pairs(pairs, self.student_pad, self.teacher_pad)
        tensors["example_index"] = torch.tensor(indices, dtype=torch.long)
        return MicroBatch(tensors, generate_seconds=generation.seconds, generated_tokens=generation.new_tokens,
                          sampled=True)


def teacher_text_pairs(pairs: list[PairedExample], records: list[dict], generated: list, teacher_tokenizer,
                       student_tokenizer, *, max_length: int, eos_token_id: int | None) -> list[PairedExample]:
    """Sequence-level cross-tokenizer KD: the rows with the teacher's generated completions (teacher-side examples
    from `teacher_sequences`) as text, tokenized again by both sides."""
    out = []
    for pair, record, example in zip(pairs, records, generated):
        completion = example.input_ids[len(prompt_of(example)):]
        ended = bool(completion) and completion[-1] == eos_token_id
        text = teacher_tokenizer.decode(completion, skip_special_tokens=True)
        out += pair_examples([with_completion(record, text)], student_tokenizer, teacher_tokenizer,
                             max_length=max_length, append_eos=ended, field="data.train")
    return out
