"""The top-k codec of the teacher cache (`distill/lm/teacher/cache/codec.py`): bit streams worked out by hand, round
trips of both id schemes x both value modes, the size budget, and the errors for bad input and bad data."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distill.lm.teacher.cache.codec import (ID_SCHEMES, VALUE_SCHEMES, bits_for, decode_topk, encode_topk, encoded_bytes,
                                 pack_bits, rice_parameter, unpack_bits)

QWEN_VOCAB = 151936


def zipf_topk(rng: np.random.Generator, num_tokens: int, k: int, vocab_size: int):
    """A Zipf-like teacher: log_softmax(Zipfian unigram prior over ids + noise), its top-k sorted by
    log-prob descending (as torch.topk gives them, so not in id order) and the tail log-mass (exact, in
    float64, -inf when k = V)."""
    prior = -1.1 * np.log(np.arange(1, vocab_size + 1))  # low ids frequent, as in BPE vocabularies
    logits = prior + rng.normal(0.0, 2.0, (num_tokens, vocab_size))
    logits -= logits.max(axis=1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-logprobs, axis=1, kind="stable")
    ids = order[:, :k]
    rest = np.take_along_axis(logprobs, order[:, k:], axis=1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.exp(rest).sum(axis=1)) if k < vocab_size else np.full(num_tokens, -np.inf)
    return ids, np.take_along_axis(logprobs, ids, axis=1).astype(np.float32), tail.astype(np.float32)


def uniform_ids(rng: np.random.Generator, num_tokens: int, k: int, vocab_size: int) -> np.ndarray:
    return np.stack([rng.choice(vocab_size, k, replace=False) for _ in range(num_tokens)]).reshape(num_tokens, k)


def round_trip(ids, logprobs, tail, vocab_size, ids_scheme, values):
    arrays = encode_topk(ids, logprobs, tail, vocab_size=vocab_size, ids_scheme=ids_scheme, values=values)
    decoded = decode_topk(arrays, num_tokens=ids.shape[0], k=ids.shape[1], vocab_size=vocab_size,
                          ids_scheme=ids_scheme, values=values)
    return arrays, decoded


# ---- bit streams -------------------------------------------------------------------------------

def test_bits_for():
    assert [bits_for(v) for v in (1, 2, 3, 4, 5, 2**17, 2**17 + 1, QWEN_VOCAB)] == [1, 1, 2, 2, 3, 17, 18, 18]
    with pytest.raises(ValueError, match="vocab_size"):
        bits_for(0)


def test_pack_bits_by_hand():
    # LSB-first, 2 bits each: 1 -> bits 0,1 = 1,0; 2 -> bits 2,3 = 0,1; 3 -> bits 4,5 = 1,1; bits 6,7 padding 0.
    # Byte = bit0 + bit3 + bit4 + bit5 = 1 + 8 + 16 + 32 = 57 = 0b00111001.
    packed = pack_bits(np.array([1, 2, 3]), 2)
    assert packed.dtype == np.uint8 and packed.tolist() == [57]
    assert unpack_bits(packed, 2, 3).tolist() == [1, 2, 3]
    # 5 bits each: 31 fills bits 0-4, 1 sets bit 5: byte 0 = 0b00111111 = 63, byte 1 = 0 (padding).
    assert pack_bits(np.array([31, 1]), 5).tolist() == [63, 0]
    assert pack_bits(np.array([0, 0, 0]), 0).size == 0 and unpack_bits(np.zeros(0, np.uint8), 0, 3).tolist() == [0] * 3


@pytest.mark.parametrize("width", [0, 1, 3, 7, 8, 9, 11, 17, 18, 31, 32, 33, 57, 58, 63])
def test_pack_bits_matches_a_bit_by_bit_reference(width):
    rng = np.random.default_rng(width)
    for count in (0, 1, 7, 8, 9, 61):
        values = rng.integers(0, 2**width, count, dtype=np.uint64, endpoint=False) if width else np.zeros(count, int)
        bits = (values.astype(np.uint64)[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
        reference = np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little")
        packed = pack_bits(values, width)
        assert packed.tolist() == reference.tolist() and packed.size == math.ceil(count * width / 8)
        assert unpack_bits(packed, width, count).tolist() == values.astype(np.int64).tolist()


def test_pack_bits_rejects_bad_values():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        pack_bits(np.array([-1]), 3)
    with pytest.raises(ValueError, match="integer values"):
        pack_bits(np.array([1.0]), 3)
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(np.array([1]), 64)
    with pytest.raises(ValueError, match="truncated"):
        unpack_bits(np.array([57], np.uint8), 2, 5)


# ---- Golomb-Rice ---------------------------------------------------------------------------------

def test_rice_parameter():
    assert rice_parameter(64, 4) == 3
    assert rice_parameter(QWEN_VOCAB, 64) == 11  # expected gap bits: 12.73 at b = 11, 12.86 at 10, 13.22 at 12
    assert rice_parameter(5, 5) == 0 and rice_parameter(1, 1) == 0 and rice_parameter(2, 1) == 0
    for vocab_size in (10, 1000, 2**17, QWEN_VOCAB):
        for k in (1, 2, 8, 64):
            if k < vocab_size:
                assert abs(rice_parameter(vocab_size, k) - max(0.0, math.log2(vocab_size / k * math.log(2)))) < 1
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        rice_parameter(10, 11)


def test_rice_streams_by_hand():
    """One token, V = 64, k = 4, b = rice_parameter(64, 4) = 3, ids given as [40, 5, 18, 17].

    Sorted ids 5, 17, 18, 40 -> gaps 5, 17-5-1 = 11, 18-17-1 = 0, 40-18-1 = 21.
    Remainders (gap & 7): 5, 3, 0, 5; quotients (gap >> 3): 0, 1, 0, 2.
    Remainder stream, 3 bits each, LSB-first: 5 = 1,0,1 | 3 = 1,1,0 | 0 = 0,0,0 | 5 = 1,0,1
        bits 0-7  = 1,0,1,1,1,0,0,0 -> 1 + 4 + 8 + 16 = 29
        bits 8-11 = 0,1,0,1 (+ 4 padding zeros) -> 2 + 8 = 10
    Unary stream: q = 0 -> "0", 1 -> "10", 0 -> "0", 2 -> "110": bits 0,1,0,0,1,1,0 (7 bits)
        -> bit1 + bit4 + bit5 = 2 + 16 + 32 = 50."""
    ids = np.array([[40, 5, 18, 17]])
    logprobs = np.array([[-3.0, -0.5, -1.0, -2.0]], np.float32)
    arrays = encode_topk(ids, logprobs, np.array([-4.0], np.float32), vocab_size=64, values="float16")
    assert arrays["ids_rice_b"].tolist() == [3]
    assert arrays["ids_rem"].tolist() == [29, 10]
    assert arrays["ids_unary"].tolist() == [50] and arrays["ids_unary_bits"].tolist() == [7]
    assert arrays["logprobs"].tolist() == [[-0.5, -2.0, -1.0, -3.0]]  # permuted with the ids
    decoded_ids, decoded_logprobs, tail = decode_topk(arrays, num_tokens=1, k=4, vocab_size=64, ids_scheme="rice",
                                                      values="float16")
    assert decoded_ids.tolist() == [[5, 17, 18, 40]] and decoded_logprobs.tolist() == [[-0.5, -2.0, -1.0, -3.0]]
    assert tail.tolist() == [-4.0]


# ---- round trips ---------------------------------------------------------------------------------

CASES = [  # (tokens, k, vocab_size)
    (0, 4, 100),          # no tokens at all
    (6, 1, 50),           # k = 1
    (5, 1, 1),            # V = 1: the only token, tail -inf
    (6, 2, 2),            # V = 2, k = V
    (5, 1, 2),
    (4, 30, 30),          # k = V: every gap 0, b = 0, tail -inf
    (8, 16, 2**17),       # ids take exactly 17 bits
    (8, 16, 2**17 + 1),   # one more id: 18 bits
    (40, 8, 1000),
    (3, 64, QWEN_VOCAB),
]


def _check_round_trip(ids, logprobs, tail, vocab_size, ids_scheme, values):
    arrays, (got_ids, got_logprobs, got_tail) = round_trip(ids, logprobs, tail, vocab_size, ids_scheme, values)
    num_tokens, k = ids.shape
    for key, array in arrays.items():
        assert array.flags.c_contiguous and array.dtype in (np.uint8, np.int64, np.float16), key
    assert got_ids.dtype == np.int64 and got_ids.shape == (num_tokens, k)
    assert got_logprobs.dtype == np.float32 and got_logprobs.shape == (num_tokens, k)
    assert got_tail.dtype == np.float32 and got_tail.shape == (num_tokens,)
    if ids_scheme == "packed":
        assert np.array_equal(got_ids, ids)  # same order
        expected = logprobs
    else:
        order = np.argsort(ids, axis=1)
        assert np.array_equal(got_ids, np.take_along_axis(ids, order, axis=1))  # same set, ascending
        expected = np.take_along_axis(logprobs, order, axis=1)  # each value still next to its id
    if values == "float16":
        assert np.array_equal(got_logprobs, expected.astype(np.float16).astype(np.float32))
    else:
        low, high = expected.min(axis=1, keepdims=True), expected.max(axis=1, keepdims=True)
        lo, hi = low.astype(np.float16).astype(np.float64), high.astype(np.float16).astype(np.float64)
        bound = (hi - lo) / 510 + np.maximum(abs(lo - low), abs(hi - high)) + np.spacing(np.abs(expected))
        assert (np.abs(got_logprobs.astype(np.float64) - expected) <= bound).all()
    assert np.array_equal(got_tail, tail.astype(np.float16).astype(np.float32))  # -inf == -inf
    return arrays


@pytest.mark.parametrize("values", VALUE_SCHEMES)
@pytest.mark.parametrize("ids_scheme", ID_SCHEMES)
@pytest.mark.parametrize("num_tokens, k, vocab_size", CASES)
def test_round_trip(num_tokens, k, vocab_size, ids_scheme, values):
    rng = np.random.default_rng(num_tokens * 1000 + k)
    ids, logprobs, tail = zipf_topk(rng, num_tokens, k, vocab_size)
    if k == vocab_size:
        assert np.isneginf(tail).all()
    _check_round_trip(ids, logprobs, tail, vocab_size, ids_scheme, values)


@pytest.mark.parametrize("ids_scheme", ID_SCHEMES)
def test_round_trip_uniform_ids_and_edge_values(ids_scheme):
    """Uniform random ids (including 0 and V - 1), a token whose values are all equal (hi == lo: every
    q is 0 and the value comes back as float16(lo)), wide and narrow ranges, -inf and finite tails."""
    rng = np.random.default_rng(7)
    vocab_size, k = 2**17 + 1, 12
    ids = uniform_ids(rng, 20, k, vocab_size)
    ids[0] = np.r_[0, vocab_size - 1, 1 + rng.choice(vocab_size - 2, k - 2, replace=False)]  # both ends
    logprobs = np.sort(rng.uniform(-30, 0, (20, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    logprobs[1] = -2.5
    logprobs[2] = -1e-3 * np.arange(k)
    tail = rng.uniform(-20, -1, 20).astype(np.float32)
    tail[3] = -np.inf
    for values in VALUE_SCHEMES:
        arrays = _check_round_trip(ids, logprobs, tail, vocab_size, ids_scheme, values)
        if values == "int8":
            assert (arrays["logprobs_q"][1] == 0).all()


def test_negative_infinite_logprobs_need_float16():
    """Masked tokens (-inf) are stored exactly by float16; int8's per-token range cannot hold them."""
    ids = np.array([[0, 1, 2]])
    logprobs = np.array([[0.0, -np.inf, -np.inf]], np.float32)
    tail = np.array([-np.inf], np.float32)
    for ids_scheme in ID_SCHEMES:
        _check_round_trip(ids, logprobs, tail, 3, ids_scheme, "float16")
        with pytest.raises(ValueError, match="-inf.*int8"):
            encode_topk(ids, logprobs, tail, vocab_size=3, ids_scheme=ids_scheme, values="int8")


def test_arrays_survive_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    ids, logprobs, tail = zipf_topk(np.random.default_rng(1), 10, 8, 500)
    for ids_scheme in ID_SCHEMES:
        for values in VALUE_SCHEMES:
            arrays = encode_topk(ids, logprobs, tail, vocab_size=500, ids_scheme=ids_scheme, values=values)
            save_file(arrays, tmp_path / "shard.safetensors")
            loaded = load_file(tmp_path / "shard.safetensors")
            options = dict(num_tokens=10, k=8, vocab_size=500, ids_scheme=ids_scheme, values=values)
            for got, want in zip(decode_topk(loaded, **options), decode_topk(arrays, **options)):
                assert np.array_equal(got, want)


# ---- size ----------------------------------------------------------------------------------------

def test_size_budget_at_qwen_vocabulary():
    rng = np.random.default_rng(3)
    num_tokens, k = 400, 64
    ids = uniform_ids(rng, num_tokens, k, QWEN_VOCAB)
    logprobs = np.sort(rng.uniform(-25, 0, (num_tokens, k)).astype(np.float32), axis=1)
    tail = rng.uniform(-10, -0.1, num_tokens).astype(np.float32)
    rice = encode_topk(ids, logprobs, tail, vocab_size=QWEN_VOCAB, ids_scheme="rice", values="int8")
    packed = encode_topk(ids, logprobs, tail, vocab_size=QWEN_VOCAB, ids_scheme="packed", values="int8")
    rice_ids = encoded_bytes({key: rice[key] for key in ("ids_rem", "ids_unary", "ids_unary_bits", "ids_rice_b")})
    assert rice_ids / num_tokens < 110
    assert encoded_bytes(rice) / num_tokens < 200
    assert packed["ids"].nbytes == num_tokens * math.ceil(64 * 18 / 8) == num_tokens * 144
    assert encoded_bytes(packed) == num_tokens * (144 + 64 + 3 * 2)  # ids, q, lo, hi, tail


def test_rice_size_bound_holds_for_adversarial_ids():
    """Whatever the ids, a token takes at most k * (b + 1) + (V - k) / 2**b bits (gaps sum to <= V - k):
    842 bits = 105.3 bytes at k = 64, V = 151936, b = 11."""
    k, b = 64, rice_parameter(QWEN_VOCAB, 64)
    rows = [np.arange(k),                                       # all gaps 0: k * (b + 1) bits
            QWEN_VOCAB - 1 - np.arange(k),                      # one huge first gap
            np.linspace(0, QWEN_VOCAB - 1, k).astype(np.int64),  # evenly spread
            np.r_[np.arange(k - 1), QWEN_VOCAB - 1]]            # one huge last gap
    ids = np.stack(rows)
    arrays = encode_topk(ids, np.zeros(ids.shape, np.float32), np.zeros(len(rows), np.float32),
                         vocab_size=QWEN_VOCAB)
    bound_bits = k * (b + 1) + (QWEN_VOCAB - k) / 2**b
    assert arrays["ids_rem"].size * 8 + int(arrays["ids_unary_bits"][0]) <= len(rows) * bound_bits + 8
    assert np.array_equal(decode_topk(arrays, num_tokens=4, k=k, vocab_size=QWEN_VOCAB, ids_scheme="rice",
                                      values="int8")[0], np.sort(ids, axis=1))


# ---- errors --------------------------------------------------------------------------------------

def _good_input():
    ids = np.array([[3, 1, 4], [0, 9, 2]])
    return ids, np.full(ids.shape, -1.5, np.float32), np.array([-2.0, -np.inf], np.float32)


@pytest.mark.parametrize("ids_scheme", ID_SCHEMES)
@pytest.mark.parametrize("change, match", [
    (lambda i, lp, t: (np.array([[3, 1, 10], [0, 9, 2]]), lp, t), r"outside \[0, 10\)"),
    (lambda i, lp, t: (np.array([[3, 1, -1], [0, 9, 2]]), lp, t), r"outside \[0, 10\)"),
    (lambda i, lp, t: (np.array([[3, 1, 4], [0, 9, 9]]), lp, t), "duplicate ids"),
    (lambda i, lp, t: (i, lp[:, :2], t), "shape mismatch: logprobs"),
    (lambda i, lp, t: (i, lp, t[:1]), "shape mismatch: tail_logmass"),
    (lambda i, lp, t: (i[0], lp[0], t), "2-D"),
    (lambda i, lp, t: (i, np.where(i == 4, np.nan, lp).astype(np.float32), t), "NaN"),
    (lambda i, lp, t: (i, np.where(i == 4, np.inf, lp).astype(np.float32), t), r"\+inf"),
    (lambda i, lp, t: (i, np.where(i == 4, -np.inf, lp).astype(np.float32), t), "-inf"),
    (lambda i, lp, t: (i, np.where(i == 4, -7e4, lp).astype(np.float32), t), "float16 range"),
    (lambda i, lp, t: (i, lp, np.array([np.nan, 0], np.float32)), "tail_logmass contains NaN"),
    (lambda i, lp, t: (i, lp, np.array([np.inf, 0], np.float32)), r"tail_logmass contains \+inf"),
    (lambda i, lp, t: (i.astype(np.float32), lp, t), "ids must be integers"),
])
def test_bad_input_is_refused(change, match, ids_scheme):
    ids, logprobs, tail = change(*_good_input())
    with pytest.raises(ValueError, match=match):
        encode_topk(ids, logprobs, tail, vocab_size=10, ids_scheme=ids_scheme, values="int8")


def test_bad_options_are_refused():
    ids, logprobs, tail = _good_input()
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        encode_topk(ids, logprobs, tail, vocab_size=2)
    with pytest.raises(ValueError, match="unknown ids_scheme 'huffman'"):
        encode_topk(ids, logprobs, tail, vocab_size=10, ids_scheme="huffman")
    with pytest.raises(ValueError, match="unknown values scheme 'int4'"):
        encode_topk(ids, logprobs, tail, vocab_size=10, values="int4")
    arrays = encode_topk(ids, logprobs, tail, vocab_size=10)
    with pytest.raises(ValueError, match="unknown ids_scheme"):
        decode_topk(arrays, num_tokens=2, k=3, vocab_size=10, ids_scheme="Rice", values="int8")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        encode_topk(np.zeros((2, 0), int), np.zeros((2, 0), np.float32), tail, vocab_size=10)


@pytest.mark.parametrize("values", VALUE_SCHEMES)
@pytest.mark.parametrize("ids_scheme", ID_SCHEMES)
def test_truncated_or_mismatched_data_is_refused(ids_scheme, values):
    ids, logprobs, tail = zipf_topk(np.random.default_rng(5), 12, 8, 1000)
    arrays = encode_topk(ids, logprobs, tail, vocab_size=1000, ids_scheme=ids_scheme, values=values)
    options = dict(num_tokens=12, k=8, vocab_size=1000, ids_scheme=ids_scheme, values=values)
    for key in arrays:
        if key in ("ids_unary_bits", "ids_rice_b"):
            continue
        cut = dict(arrays, **{key: arrays[key][:-1]})  # one byte / element / row fewer
        with pytest.raises(ValueError, match=f"'{key}' is truncated"):
            decode_topk(cut, **options)
        with pytest.raises(ValueError, match=f"missing array '{key}'"):
            decode_topk({name: a for name, a in arrays.items() if name != key}, **options)
    with pytest.raises(ValueError, match="truncated"):
        decode_topk(arrays, **dict(options, num_tokens=13))  # more tokens than were encoded
    with pytest.raises(ValueError, match="num_tokens"):
        decode_topk(arrays, **dict(options, num_tokens=11))
    other = "packed" if ids_scheme == "rice" else "rice"
    with pytest.raises(ValueError, match="missing array"):
        decode_topk(arrays, **dict(options, ids_scheme=other))


def test_truncated_unary_stream_with_its_bit_count_is_refused():
    """Cutting the unary stream and its bit count together leaves fewer codes than num_tokens * k."""
    ids, logprobs, tail = zipf_topk(np.random.default_rng(6), 12, 8, 1000)
    arrays = encode_topk(ids, logprobs, tail, vocab_size=1000)
    bits = int(arrays["ids_unary_bits"][0]) - 16
    cut = dict(arrays, ids_unary=arrays["ids_unary"][:(bits + 7) // 8].copy(),
               ids_unary_bits=np.array([bits], np.int64))
    with pytest.raises(ValueError, match="'ids_unary' holds .* codes"):
        decode_topk(cut, num_tokens=12, k=8, vocab_size=1000, ids_scheme="rice", values="int8")


def test_corrupted_ids_are_refused():
    ids, logprobs, tail = _good_input()
    arrays = encode_topk(ids, logprobs, tail, vocab_size=10, ids_scheme="packed")  # 4 bits per id
    arrays["ids"] = np.full_like(arrays["ids"], 0xFF)  # every id decodes to 15 >= 10
    with pytest.raises(ValueError, match="outside"):
        decode_topk(arrays, num_tokens=2, k=3, vocab_size=10, ids_scheme="packed", values="int8")
    rice = encode_topk(ids, logprobs, tail, vocab_size=10)
    rice["ids_rem"] = np.full_like(rice["ids_rem"], 0xFF)
    with pytest.raises(ValueError, match="outside"):
        decode_topk(rice, num_tokens=2, k=3, vocab_size=10, ids_scheme="rice", values="int8")
