"""The tokenizer zoo: three real-format tokenizer families trained offline, deterministic, with offsets
into the original text, a BOS from the post-processor, a chat template, a save/reload round trip, and a
tiny Llama over each."""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoTokenizer

from distill.lm.tokenizer_zoo import KINDS, build_tokenizer, default_corpus, tiny_causal_lm

torch.set_num_threads(1)

SPECS = [(kind, size) for kind in KINDS for size in (300, 1000)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Naïve café?\t漢字 🙂"}]
UNSEEN = "a ჵ b"  # a character that is in no corpus text


@pytest.fixture(scope="module")
def corpus():
    return default_corpus()


@pytest.fixture(scope="module", params=SPECS, ids=[f"{kind}-{size}" for kind, size in SPECS])
def spec(request, corpus):
    kind, size = request.param
    return kind, size, build_tokenizer(kind, corpus, vocab_size=size)


def test_default_corpus_is_deterministic_and_varied(corpus):
    assert default_corpus() == corpus and len(corpus) == 400 and default_corpus(seed=1) != corpus
    text = "".join(corpus)
    for needle in ("  ", "\t", "\n", "é", "Ü", "漢", "🙂", "Привет", "𝔘"):
        assert needle in text
    assert not any(line.startswith(" ") for line in corpus)


def test_building_twice_gives_the_same_tokenizer(spec, corpus):
    kind, size, tokenizer = spec
    again = build_tokenizer(kind, corpus, vocab_size=size)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()  # merges, scores too
    assert build_tokenizer(kind, corpus, vocab_size=size, seed=1).get_vocab() != tokenizer.get_vocab()
    assert len(tokenizer) == (size + 256 if kind == "unigram_metaspace" else size)
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (tokenizer.unk_token_id is None) == (kind == "bytelevel_bpe")
    assert tokenizer.model_max_length == 512


def test_decode_round_trips_the_corpus(spec, corpus):
    kind, _, tokenizer = spec
    normalizer = tokenizer.backend_tokenizer.normalizer
    for text in corpus + [UNSEEN]:
        ids = tokenizer(text)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if kind == "wordpiece":  # lowercased, accents stripped, whitespace rebuilt by rule
            if text != UNSEEN:  # (the word of an unseen character is [UNK])
                assert "".join(decoded.split()) == "".join(normalizer.normalize_str(text).split())
        else:
            assert decoded == text  # exact, bytes and all
        assert tokenizer.unk_token_id not in ids or (kind == "wordpiece" and text == UNSEEN)


def test_bos_is_added_with_an_empty_span_and_offsets_point_into_the_text(spec, corpus):
    _, _, tokenizer = spec
    for text in corpus + [UNSEEN]:
        encoding = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        assert ids[0] == tokenizer.bos_token_id and offsets[0] == (0, 0)
        assert tokenizer.bos_token_id not in ids[1:] and tokenizer.eos_token_id not in ids
        offsets = offsets[1:]
        assert all(0 <= start < end <= len(text) for start, end in offsets)  # never empty, inside
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(offsets))  # never back


def test_each_span_holds_the_text_of_its_tokens(spec, corpus):
    """Tokens sharing one span (the bytes of a character, Hangul jamo after NFD) spell its text."""
    kind, _, tokenizer = spec
    normalize = tokenizer.backend_tokenizer.normalizer.normalize_str if kind == "wordpiece" else None
    for text in corpus + [UNSEEN]:
        for (start, end), group in itertools.groupby(_pieces(tokenizer, text), key=lambda piece: piece[1]):
            tokens = [token for token, _ in group]
            if kind == "wordpiece":
                if tokens != ["[UNK]"]:
                    assert "".join(t.removeprefix("##") for t in tokens) == normalize(text[start:end]).strip()
                continue
            if kind == "bytelevel_bpe":
                spelt = tokenizer.convert_tokens_to_string(tokens)
            else:  # ▁ is a space, <0xNN> a byte; the ▁ prepended to the text has no character of its own
                if start == 0 and tokens == ["▁"]:  # (but alone it has the first character's span)
                    continue
                spelt = b"".join(bytes([int(t[3:5], 16)]) if t.startswith("<0x") else t.replace("▁", " ").encode()
                                 for t in tokens).decode(errors="replace")
                spelt = spelt[1:] if start == 0 and spelt.startswith(" ") else spelt
            assert "\ufffd" in spelt or spelt == text[start:end]  # (or part of a character)


def _pieces(tokenizer, text):
    encoding = tokenizer(text, return_offsets_mapping=True)
    return list(zip(tokenizer.convert_ids_to_tokens(encoding["input_ids"]), encoding["offset_mapping"]))[1:]


def test_offset_quirks_of_each_family(corpus):
    bpe, wordpiece, unigram = (build_tokenizer(kind, corpus, vocab_size=300) for kind in KINDS)
    # The 3 bytes of an unseen character: 3 tokens, each with the span of the whole character.
    assert [span for _, span in _pieces(bpe, "ჵ")] == [(0, 1)] * 3
    assert _pieces(bpe, "a b")[1] == ("Ġb", (1, 3))  # the leading space is in the span
    assert _pieces(unigram, UNSEEN)[2:5] == [("<0xE1>", (2, 3)), ("<0x83>", (2, 3)), ("<0xB5>", (2, 3))]
    assert _pieces(wordpiece, "Naïve CAFÉ")[-1][1][1] == 10  # normalised pieces, original offsets
    assert _pieces(wordpiece, UNSEEN)[1] == ("[UNK]", (2, 3))


def test_chat_template_renders_and_tokenizes(spec):
    _, _, tokenizer = spec
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == (f"{bos}system\nBe brief.{eos}\n{bos}user\n{CHAT[1]['content']}{eos}\n{bos}assistant\n")
    assert not tokenizer.apply_chat_template(CHAT, tokenize=False).endswith("assistant\n")
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 3 and ids.count(tokenizer.eos_token_id) == 2
    assert ids[0] == tokenizer.bos_token_id


def test_save_and_reload_gives_the_same_tokenizer(spec, corpus, tmp_path):
    _, _, tokenizer = spec
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = corpus[:20] + [UNSEEN]
    assert reloaded(texts, return_offsets_mapping=True) == tokenizer(texts, return_offsets_mapping=True)
    assert reloaded.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "model_max_length"):
        assert getattr(reloaded, name) == getattr(tokenizer, name)


def test_tiny_causal_lm_runs_on_the_tokenized_text(spec, corpus):
    _, _, tokenizer = spec
    model = tiny_causal_lm(tokenizer, hidden_size=16, num_hidden_layers=1)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch = tokenizer(corpus[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer)) and torch.isfinite(logits).all()
    again = tiny_causal_lm(tokenizer, hidden_size=16, num_hidden_layers=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
