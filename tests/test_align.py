"""Cross-tokenizer alignment (distill/lm/cross_tokenizer/align.py): hand cases for what breaks naive alignments,
and the partition property on random texts cut at random, overlapping and gapped token spans."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.lm.cross_tokenizer.align import align


def assert_partition(chunks, student, teacher, length):
    """Every text token of each side in exactly one chunk, in order; chunks non-empty on both sides, contiguous
    in text, covering [0, length)."""
    for side, spans in (("student", student), ("teacher", teacher)):
        covered = [k for chunk in chunks for k in range(*getattr(chunk, side))]
        text_tokens = [k for k, span in enumerate(spans) if span is not None]
        assert [k for k in covered if spans[k] is not None] == text_tokens
        assert len(covered) == len(set(covered))
        assert all(getattr(chunk, side)[1] > getattr(chunk, side)[0] for chunk in chunks)
    if chunks:
        assert chunks[0].text[0] == 0 and chunks[-1].text[1] == length
        assert all(a.text[1] == b.text[0] for a, b in zip(chunks, chunks[1:]))
        assert all(chunk.text[0] <= chunk.text[1] for chunk in chunks)


def test_leading_space_markers_and_dropped_spaces_meet_at_word_boundaries():
    text = "hello world"
    bpe = [(0, 5), (5, 11)]  # "hello", "Ġworld" (the space belongs to the word after it)
    wordpiece = [(0, 5), (6, 11)]  # "hello", "world" (spaces dropped)
    chunks = align(bpe, wordpiece, len(text))
    assert [(c.student, c.teacher) for c in chunks] == [((0, 1), (0, 1)), ((1, 2), (1, 2))]
    assert_partition(chunks, bpe, wordpiece, len(text))


def test_one_word_in_pieces_against_one_token():
    text = "unbelievable"
    pieces = [(0, 2), (2, 9), (9, 12)]  # "un", "##believ", "##able"
    whole = [(0, 12)]
    chunks = align(pieces, whole, len(text))
    assert [(c.student, c.teacher, c.text) for c in chunks] == [((0, 3), (0, 1), (0, 12))]


def test_bytes_of_one_character_never_split_and_special_tokens_are_left_out():
    text = "a🙂b"  # the emoji is one character; byte-level BPE may give it two tokens with the same span
    byte_level = [None, (0, 1), (1, 2), (1, 2), (2, 3), None]  # BOS, a, <byte>, <byte>, b, EOS
    other = [(0, 2), (2, 3)]  # "a🙂", "b"
    chunks = align(byte_level, other, len(text))
    assert [(c.student, c.teacher) for c in chunks] == [((1, 4), (0, 1)), ((4, 5), (1, 2))]
    assert_partition(chunks, byte_level, other, len(text))


def test_text_one_side_does_not_cover_joins_the_next_chunk():
    text = "a \nb"
    bpe = [(0, 1), (1, 2), (2, 3), (3, 4)]  # "a", "Ġ", "Ċ", "b"
    wordpiece = [(0, 1), (3, 4)]
    chunks = align(bpe, wordpiece, len(text))
    assert [(c.student, c.teacher) for c in chunks] == [((0, 1), (0, 1)), ((1, 4), (1, 2))]


def test_trailing_tokens_of_one_side_join_the_last_chunk():
    text = "ab "
    chunks = align([(0, 1), (1, 2), (2, 3)], [(0, 2)], len(text))
    assert [(c.student, c.teacher) for c in chunks] == [((0, 3), (0, 1))]


def test_nothing_to_align():
    assert align([None, None], [(0, 1)], 1) == [] and align([], [], 0) == []


@st.composite
def tokenization(draw, length: int):
    """Spans of a random tokenization of a text of `length` characters: random cut points, some pieces split into
    several tokens of the same span (bytes of one character), some gaps left uncovered (dropped whitespace), and
    spanless special tokens anywhere."""
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=length - 1))) if length > 1 else []
    bounds = [0, *cuts, length]
    spans = []
    for start, end in zip(bounds, bounds[1:]):
        kind = draw(st.sampled_from(["plain", "plain", "bytes", "gap", "special"]))
        if kind == "gap" and end - start > 1:
            spans.append((start + 1, end))  # its first character is dropped (a space a tokenizer skips)
        elif kind == "bytes":
            spans += [(start, end)] * draw(st.integers(2, 3))
        else:
            spans.append((start, end))
        if kind == "special":
            spans.append(None)
    if draw(st.booleans()):
        spans.insert(0, None)  # BOS
    return spans


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), tokenization(n), tokenization(n))))
def test_chunks_partition_both_tokenizations_of_any_text(case):
    length, student, teacher = case
    chunks = align(student, teacher, length)
    assert chunks
    assert_partition(chunks, student, teacher, length)
    # a chunk ends where both sides can split: no token of either side crosses a chunk boundary
    for chunk in chunks[:-1]:
        boundary = chunk.text[1]
        for spans in (student, teacher):
            assert all(span is None or span[1] <= boundary or span[0] >= boundary for span in spans)


@pytest.mark.parametrize("student,teacher", [([(0, 3)], [(0, 1), (1, 3)]), ([(0, 1), (0, 1)], [(0, 1)])])
def test_small_cases(student, teacher):
    assert_partition(align(student, teacher, 3 if student[-1][1] == 3 else 1), student, teacher,
                     3 if student[-1][1] == 3 else 1)


# ---- real tokenizers: every pair the tests build ------------------------------------------------------

ZOO = {"bpe300": ("bytelevel_bpe", 300), "bpe1000": ("bytelevel_bpe", 1000), "wordpiece": ("wordpiece", 300),
       "unigram": ("unigram_metaspace", 300)}
PAIRS = [("bpe300", "bpe1000"), ("bpe300", "wordpiece"), ("bpe1000", "unigram"), ("wordpiece", "unigram")]


@pytest.fixture(scope="module")
def zoo():
    from distill.lm.tokenizer_zoo import build_tokenizer, default_corpus

    corpus = default_corpus()
    return {name: build_tokenizer(kind, corpus, vocab_size=size) for name, (kind, size) in ZOO.items()}


def spans_of(tokenizer, text):
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    return [tuple(span) if token not in tokenizer.all_special_ids else None
            for token, span in zip(encoded.input_ids, encoded.offset_mapping)]


TEXTS = st.text(alphabet=st.sampled_from(list("abcxyz ABC  \t\n.,!?0123456789éüÜñ漢字かな🙂мир𝔘ꙮ")), min_size=1,
                max_size=60)


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(text=TEXTS)
def test_chunks_partition_real_tokenizations(zoo, pair, text):
    student, teacher = spans_of(zoo[pair[0]], text), spans_of(zoo[pair[1]], text)
    chunks = align(student, teacher, len(text))
    if all(span is None for span in student) or all(span is None for span in teacher):
        assert chunks == []  # e.g. only whitespace, which WordPiece drops
        return
    assert_partition(chunks, student, teacher, len(text))
