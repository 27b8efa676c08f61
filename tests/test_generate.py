"""Batched KV-cache sampling (distill.lm.generate): exactness against references, sampling
statistics, top-p, EOS handling, examples and argument checks. Tiny in-memory models, one thread."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.lm.data import IGNORE_INDEX
from distill.lm.models import tiny_llama_config
from distill.lm.generate import sample

torch.set_num_threads(1)

VOCAB, PAD, BOS, EOS = 23, 0, 1, 2


def tiny_model(layers: int = 2, seed: int = 0, max_positions: int = 64):
    torch.manual_seed(seed)
    config = tiny_llama_config(VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                               max_position_embeddings=max_positions)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform attention and repetitive greedy text,
        for parameter in model.parameters():  # which would not notice attention to padding
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model.eval()


class FixedLogits(torch.nn.Module):
    """A stand-in LM whose logits come from `logits_for(call, batch)`; counts forward calls, dummy cache."""

    def __init__(self, logits_for, vocab: int = VOCAB):
        super().__init__()
        self.logits_for, self.vocab, self.calls = logits_for, vocab, 0
        self.config = SimpleNamespace(max_position_embeddings=128)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, **kwargs):
        logits = self.logits_for(self.calls, input_ids.shape[0]).expand(input_ids.shape[0], input_ids.shape[1], -1)
        self.calls += 1
        return SimpleNamespace(logits=logits, cache=object())


def distribution(probs: list[float]):
    """FixedLogits callback: every row and step gets log(probs)."""
    logits = torch.tensor(probs).log()
    return lambda call, batch: logits.expand(batch, 1, -1)


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Reference: no cache, no padding, full forward over the whole sequence at every step."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


PROMPTS = [[BOS, 5, 9, 12, 7, 3, 8], [BOS], [BOS, 14, 4], [BOS, 6, 6, 6, 20]]


def test_greedy_with_cache_and_left_padding_equals_naive_reference():
    model = tiny_model()
    out = sample(model, PROMPTS, max_new_tokens=10, pad_token_id=PAD, eos_token_id=None, greedy=True)
    assert out.prompt_length == 7 and out.sequences.shape == (4, 17) and out.new_tokens == 40
    with torch.no_grad():
        assert out.completions() == [naive_greedy(model, prompt, 10) for prompt in PROMPTS]
    # Left padding: pads and zero mask before each prompt, the prompt right-aligned.
    assert out.sequences[1, :7].tolist() == [PAD] * 6 + [BOS]
    assert out.attention_mask[1, :7].tolist() == [0] * 6 + [1]
    assert out.completion_mask[:, :7].sum() == 0 and out.completion_mask[:, 7:].all()


class Spy(torch.nn.Module):
    """Wraps a model and records the position ids and attention masks of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, **kwargs):
        self.seen.append((position_ids.tolist(), attention_mask.tolist()))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          use_cache=use_cache, **kwargs)


def test_position_ids_count_real_tokens_only():
    # RoPE scores depend on position differences only, so a shifted start would not change Llama's
    # tokens: check the ids themselves (absolute-position models would be wrong without them).
    spy = Spy(tiny_model(layers=1))
    sample(spy, [[BOS, 5, 9], [BOS]], max_new_tokens=3, pad_token_id=PAD, eos_token_id=None, greedy=True)
    assert spy.seen[0] == ([[0, 1, 2], [0, 0, 0]], [[1, 1, 1], [0, 0, 1]])
    assert [positions for positions, _ in spy.seen[1:]] == [[[3], [1]], [[4], [2]]]
    assert spy.seen[2][1] == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]


def test_greedy_equals_hf_generate_on_single_prompts():
    model = tiny_model(layers=1, seed=1)
    for prompt in PROMPTS[:3]:
        ours = sample(model, [prompt], max_new_tokens=8, pad_token_id=PAD, eos_token_id=EOS, greedy=True)
        theirs = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)).long(),
                                do_sample=False, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
        assert ours.completions()[0] == theirs[0, len(prompt):].tolist()


def test_temperature_zero_is_greedy_and_mode_is_restored():
    model = tiny_model(layers=1).train()
    zero = sample(model, PROMPTS, max_new_tokens=5, pad_token_id=PAD, eos_token_id=None, temperature=0.0)
    greedy = sample(model, PROMPTS, max_new_tokens=5, pad_token_id=PAD, eos_token_id=None, greedy=True)
    assert torch.equal(zero.sequences, greedy.sequences) and model.training


def test_sampling_is_reproducible_per_seed():
    model = tiny_model(layers=1)

    def draw(seed):
        return sample(model, PROMPTS, max_new_tokens=12, pad_token_id=PAD, eos_token_id=None, temperature=1.5,
                      generator=torch.Generator().manual_seed(seed)).sequences

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_first_token_frequencies_match_tempered_softmax():
    model = tiny_model(layers=1)
    model.lm_head.weight.data.mul_(2.0)  # a few likely tokens and a tail, far enough from T=1 to tell apart
    temperature, rows, prompt = 0.5, 4000, [BOS, 5, 9]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    expected = torch.softmax(logits / temperature, -1)
    out = sample(model, [prompt] * rows, max_new_tokens=1, pad_token_id=PAD, eos_token_id=None,
                 temperature=temperature, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(out.sequences[:, -1], minlength=VOCAB).double() / rows
    # The tolerance must be tighter than the effect of ignoring temperature (or sampling uniformly).
    assert (expected - torch.softmax(logits, -1)).abs().max() > 0.1 and expected.max() < 0.5
    assert (frequencies - expected).abs().max() < 0.03


def test_top_p_never_samples_outside_the_nucleus():
    model = FixedLogits(distribution([0.05, 0.5, 0.15, 0.3]), vocab=4)
    out = sample(model, [[BOS]] * 2000, max_new_tokens=1, pad_token_id=PAD, eos_token_id=None, top_p=0.75,
                 generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.sequences[:, -1], minlength=4)
    assert counts[0] == 0 and counts[2] == 0  # nucleus {1, 3}: 0.5 + 0.3 reaches 0.75
    assert abs(counts[1].item() / 2000 - 0.5 / 0.8) < 0.04  # renormalised inside the nucleus
    tiny = sample(model, [[BOS]] * 200, max_new_tokens=3, pad_token_id=PAD, eos_token_id=None, top_p=1e-6,
                  generator=torch.Generator().manual_seed(0))
    assert (tiny.sequences[:, 1:] == 1).all()  # the top token is always kept


def test_vocab_size_excludes_padded_output_rows():
    model = FixedLogits(distribution([0.1, 0.1, 0.1, 0.7]), vocab=4)  # the favourite is a padded row
    out = sample(model, [[BOS]] * 500, max_new_tokens=2, pad_token_id=PAD, eos_token_id=None, vocab_size=3,
                 generator=torch.Generator().manual_seed(0))
    assert out.sequences[:, 1:].max() < 3
    greedy = sample(model, [[BOS]], max_new_tokens=1, pad_token_id=PAD, eos_token_id=None, vocab_size=3, greedy=True)
    assert greedy.sequences[0, -1] < 3


def test_eos_stops_its_row_and_masks_the_rest():
    def logits_for(call, batch):  # call 0 is the prompt forward; call k gives the token of step k
        logits = torch.zeros(batch, 1, VOCAB)
        logits[:, :, 7] = 5.0
        if call == 2:
            logits[0, :, EOS] = 10.0
        return logits

    model = FixedLogits(logits_for)
    out = sample(model, [[BOS, 4], [BOS]], max_new_tokens=6, pad_token_id=PAD, eos_token_id=EOS, greedy=True)
    assert out.completions() == [[7, 7, EOS], [7] * 6]
    assert out.sequences[0, 2:].tolist() == [7, 7, EOS, PAD, PAD, PAD]
    assert out.completion_mask[0].tolist() == [False, False, True, True, True, False, False, False]
    assert out.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert out.attention_mask[1].tolist() == [0, 1] + [1] * 6
    assert out.new_tokens == 9 and model.calls == 6


def test_loop_stops_early_when_every_row_hit_eos():
    def logits_for(call, batch):
        logits = torch.zeros(batch, 1, VOCAB)
        logits[:, :, EOS if call == 2 else 9] = 5.0
        return logits

    model = FixedLogits(logits_for)
    out = sample(model, [[BOS]] * 3, max_new_tokens=50, pad_token_id=PAD, eos_token_id=EOS, greedy=True)
    assert model.calls == 3 and out.sequences.shape == (3, 4)
    assert out.completions() == [[9, 9, EOS]] * 3


def test_to_examples_round_trip():
    model = tiny_model(layers=1)
    out = sample(model, PROMPTS, max_new_tokens=4, pad_token_id=PAD, eos_token_id=EOS,
                 generator=torch.Generator().manual_seed(0))
    examples = out.to_examples()
    for index, (example, prompt, completion) in enumerate(zip(examples, PROMPTS, out.completions())):
        assert example.input_ids == prompt + completion and example.id == str(index)
        assert example.labels == [IGNORE_INDEX] * len(prompt) + completion
    assert out.new_tokens == sum(len(c) for c in out.completions()) and out.tokens_per_second > 0


@pytest.mark.parametrize("prompts, max_new_tokens, field", [
    ([[BOS] * 10], 60, "max_new_tokens"),  # 10 + 60 over max_position_embeddings 64
    ([[BOS]], 0, "max_new_tokens"),
    ([[BOS], []], 4, "prompts"),
    ([], 4, "prompts"),
])
def test_bad_arguments_name_the_field(prompts, max_new_tokens, field):
    with pytest.raises(ValueError, match=field) as error:
        sample(tiny_model(layers=1), prompts, max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=EOS)
    if max_new_tokens == 60:
        assert "64" in str(error.value) and "70" in str(error.value)


def naive_filtered_greedy(teacher, student, prompt: list[int], steps: int, threshold: float) -> tuple[list[int], int]:
    """Reference reverse speculative decoding, greedy: full forwards, no cache; the teacher's argmax unless
    the student gives it less than `threshold`, then the student's argmax."""
    ids, replaced = torch.tensor([prompt]), 0
    for _ in range(steps):
        proposal = teacher(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        student_probs = student(input_ids=ids, use_cache=False).logits[0, -1].softmax(-1)
        if student_probs[proposal] < threshold:
            proposal, replaced = student_probs.argmax(), replaced + 1
        ids = torch.cat([ids, proposal.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist(), replaced


@torch.no_grad()
def test_student_filter_matches_a_no_cache_reference_and_its_limits():
    teacher, student = tiny_model(seed=0), tiny_model(seed=1)
    plain = sample(teacher, PROMPTS, max_new_tokens=8, pad_token_id=PAD, eos_token_id=None, greedy=True)
    off = sample(teacher, PROMPTS, max_new_tokens=8, pad_token_id=PAD, eos_token_id=None, greedy=True,
                 filter_model=student, filter_threshold=0.0)
    assert off.completions() == plain.completions() and off.replaced == 0
    # Threshold 1 vetoes every proposal: the text is the student's own greedy text.
    everything = sample(teacher, PROMPTS, max_new_tokens=8, pad_token_id=PAD, eos_token_id=None, greedy=True,
                        filter_model=student, filter_threshold=1.0)
    own = sample(student, PROMPTS, max_new_tokens=8, pad_token_id=PAD, eos_token_id=None, greedy=True)
    assert everything.completions() == own.completions() and everything.replaced == 8 * len(PROMPTS)
    # In between, token by token as the reference says, and some but not all tokens replaced.
    threshold = 0.05
    mixed = sample(teacher, PROMPTS, max_new_tokens=8, pad_token_id=PAD, eos_token_id=None, greedy=True,
                   filter_model=student, filter_threshold=threshold)
    expected = [naive_filtered_greedy(teacher, student, prompt, 8, threshold) for prompt in PROMPTS]
    assert mixed.completions() == [tokens for tokens, _ in expected]
    assert mixed.replaced == sum(count for _, count in expected)
    assert 0 < mixed.replaced < 8 * len(PROMPTS)
    assert not teacher.training and not student.training


def test_student_filter_replaces_only_tokens_the_student_finds_unlikely():
    # Teacher always proposes token 3 (p=1); the student gives token 3 probability 0.1 and token 4 0.9.
    teacher_probs = [1e-9] * VOCAB
    teacher_probs[3] = 1.0
    student_probs = [1e-9] * VOCAB
    student_probs[3], student_probs[4] = 0.1, 0.9
    teacher, student = FixedLogits(distribution(teacher_probs)), FixedLogits(distribution(student_probs))
    kept = sample(teacher, [[BOS]] * 3, max_new_tokens=4, pad_token_id=PAD, eos_token_id=None, temperature=1.0,
                  generator=torch.Generator().manual_seed(0), filter_model=student, filter_threshold=0.05)
    assert kept.completions() == [[3, 3, 3, 3]] * 3 and kept.replaced == 0
    vetoed = sample(teacher, [[BOS]] * 3, max_new_tokens=4, pad_token_id=PAD, eos_token_id=None, temperature=1.0,
                    generator=torch.Generator().manual_seed(0), filter_model=student, filter_threshold=0.2)
    tokens = [t for row in vetoed.completions() for t in row]
    assert vetoed.replaced == 12 and set(tokens) <= {3, 4} and tokens.count(4) >= 8  # student draws: 0.9 on 4
    with pytest.raises(ValueError, match="filter_threshold"):
        sample(teacher, [[BOS]], max_new_tokens=2, pad_token_id=PAD, eos_token_id=None, filter_model=student,
               filter_threshold=1.5)
