"""Aligning two tokenizations of the same text: chunks of tokens that end at the same text position on both sides.

Each side gives the character span (start, end) of each of its tokens in one common text (`offsets`, from a fast
tokenizer's `return_offsets_mapping`, shifted into the text's coordinates), or None for a token that is not part
of the text (a special token, chat-template markup). A *split* of a side after its first i text tokens is
possible at character p when no token crosses p: every token before it ends at or before p and every token after
it starts at or after p. A common split is a position possible on both sides; the chunks are the stretches
between successive common splits, each holding at least one token of each side.

What this handles, and how:
- BOS / EOS / template tokens present on one side only: they have no span (None) and belong to no chunk.
- Byte-fallback and byte-level pieces of one multi-byte character: they share the character's span, so no split
  falls between them and they stay in one chunk.
- Leading-space markers (`Ġ`, `▁`): a token that covers the space before a word starts at the space; a tokenizer
  that drops spaces (WordPiece) leaves a gap. Splits are positions, so both meet at the word boundary and the
  space lands in the chunk that follows it.
- Normalisers that lowercase or strip accents: offsets still index the original text, so nothing changes.
- Whitespace or other text one side covers and the other does not: its tokens join the next chunk (or the last).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """One aligned chunk: token index ranges [start, end) into each side's sequence, and its text span."""

    student: tuple[int, int]
    teacher: tuple[int, int]
    text: tuple[int, int]


def _splits(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int, int]]:
    """(i, lo, hi): the side can be split after its first i text tokens at any position in [lo, hi]."""
    n = len(spans)
    suffix_start = [length] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix_start[i] = min(spans[i][0], suffix_start[i + 1])
    splits, prefix_end = [], 0
    for i in range(n + 1):
        if i:
            prefix_end = max(prefix_end, spans[i - 1][1])
        if prefix_end <= suffix_start[i]:
            splits.append((i, prefix_end, suffix_start[i]))
    return splits


def align(student: list[tuple[int, int] | None], teacher: list[tuple[int, int] | None], length: int) -> list[Chunk]:
    """The chunks of two tokenizations of a text of `length` characters (see the module docstring). Every text
    token of each side is in exactly one chunk, in order; chunks are contiguous and cover [0, length) together
    (their text spans meet at the common splits). Empty when either side has no text token. A spanless token
    between text tokens lies inside the index range of the chunk around it."""
    s_index = [k for k, span in enumerate(student) if span is not None]
    t_index = [k for k, span in enumerate(teacher) if span is not None]
    if not s_index or not t_index:
        return []
    s_spans = [_clip(student[k], length) for k in s_index]
    t_spans = [_clip(teacher[k], length) for k in t_index]
    s_splits, t_splits = _splits(s_spans, length), _splits(t_spans, length)
    # Common splits in order (both lists ascend in position): two pointers over the intervals.
    common, a, b = [], 0, 0
    while a < len(s_splits) and b < len(t_splits):
        i, s_lo, s_hi = s_splits[a]
        j, t_lo, t_hi = t_splits[b]
        lo, hi = max(s_lo, t_lo), min(s_hi, t_hi)
        if lo <= hi:
            common.append((i, j, lo))
        if s_hi < t_hi or (s_hi == t_hi and a + 1 < len(s_splits)):
            a += 1
        else:
            b += 1
    # Keep the splits that move both sides forward; the end closes the last chunk whatever it holds.
    kept = [(0, 0, 0)]
    for i, j, position in common:
        if i > kept[-1][0] and j > kept[-1][1]:
            kept.append((i, j, position))
    end = (len(s_spans), len(t_spans), length)
    if len(kept) > 1 and (kept[-1][0] == end[0] or kept[-1][1] == end[1]):
        kept[-1] = end  # one side is done: the last chunk takes the other side's trailing tokens
    elif kept[-1][:2] != end[:2]:
        kept.append(end)
    chunks = []
    for (i0, j0, p0), (i1, j1, p1) in zip(kept, kept[1:]):
        chunks.append(Chunk(student=(s_index[i0], s_index[i1 - 1] + 1), teacher=(t_index[j0], t_index[j1 - 1] + 1),
                            text=(p0, p1)))
    return chunks


def _clip(span: tuple[int, int], length: int) -> tuple[int, int]:
    start, end = int(span[0]), int(span[1])
    start, end = min(max(start, 0), length), min(max(end, 0), length)
    return start, max(start, end)
