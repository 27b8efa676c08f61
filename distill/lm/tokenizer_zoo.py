"""Small, real-format tokenizers of the three families cross-tokenizer distillation meets, built offline.

Teacher and student of a cross-tokenizer run split the same text differently, and the alignment code
(which teacher tokens cover which student tokens) must cope with everything real tokenizers do. This
module trains, in a fraction of a second and without any download, one tokenizer per family with the
Hugging Face `tokenizers` library and wraps it as a `transformers.PreTrainedTokenizerFast`, so that it
is saved, reloaded (`AutoTokenizer.from_pretrained`), padded, chat-templated and offset-mapped exactly
like a hub tokenizer:

* ``"bytelevel_bpe"``: GPT-2 / Llama-3 byte-level BPE (tiktoken-style vocabularies).
* ``"wordpiece"``: BERT-style WordPiece with a lowercasing, accent-stripping normaliser.
* ``"unigram_metaspace"``: SentencePiece Unigram with ``▁`` word markers and byte fallback
  (Llama-2 / Mistral / T5 / Gemma family).

`default_corpus` is a deterministic training / test corpus full of the cases that break naive
alignment (multi-byte characters, whitespace runs, accents, CJK, emoji); `tiny_causal_lm` builds a tiny
Llama model over any of these tokenizers.

What breaks naive alignment (comparing token strings, or concatenating decoded tokens):

* token *strings* are not text: byte-level BPE may spell ``" café"`` as ``"Ġcaf"`` + ``"Ã©"``, Unigram
  as ``"▁caf"`` + ``"é"`` (or ``"<0xC3>"`` + ``"<0xA9>"`` after byte fallback), WordPiece as
  ``"cafe"`` (normalised, the accent gone) or ``"caf"`` + ``"##e"``;
* a token may be *part of a character*: byte-level BPE and byte fallback split a multi-byte character
  into several tokens, each of which decodes to nothing printable on its own;
* whitespace belongs to different tokens: byte-level BPE and Metaspace glue a word's leading space to
  the word (``Ġ``/``▁``), WordPiece drops whitespace altogether;
* normalisation changes the text: WordPiece lowercases, strips accents and turns tabs/newlines into
  spaces, so its decoded text is not the input text.

The character offsets (``return_offsets_mapping=True``) always point into the ORIGINAL text, and are
the reliable bridge between two tokenizers; their family-specific quirks are described in
`build_tokenizer`.
"""
from __future__ import annotations

import json
import random
from collections import Counter

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

KINDS = ("bytelevel_bpe", "wordpiece", "unigram_metaspace")
MODEL_MAX_LENGTH = 512

# Special tokens of each kind, in the roles PreTrainedTokenizerFast knows.
SPECIAL_TOKENS = {
    "bytelevel_bpe": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"},
    "wordpiece": {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"},
    "unigram_metaspace": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
}

# ChatML-like: every turn is `BOS role \n content EOS \n`, in the tokenizer's own BOS/EOS; the generation
# prompt opens an assistant turn. The BOS of the first turn is in the text, so tokenize rendered chats with
# add_special_tokens=False (apply_chat_template does) or the post-processor adds a second BOS.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ bos_token + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ bos_token + 'assistant\\n' }}{%- endif -%}"
)

# SentencePiece's default: the rarest characters that make up the last 0.05% of the corpus are left out
# of the Unigram vocabulary and reach the model as UTF-8 byte pieces (byte fallback), as in Llama-2.
CHARACTER_COVERAGE = 0.9995
BYTE_PIECES = [f"<0x{byte:02X}>" for byte in range(256)]


def build_tokenizer(kind: str, corpus: list[str], *, vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a tokenizer of family `kind` on `corpus` and wrap it as a `PreTrainedTokenizerFast`.

    Deterministic: the same `corpus`, `vocab_size` and `seed` give the same vocabulary, ids, merges and
    scores in every call and process (the `tokenizers` WordPiece and Unigram trainers are not: they break
    ties and sum in hash-map order, which differs from call to call; see `_wordpiece` and
    `_canonical_pieces` for how that is undone). `seed=0` trains on `corpus` as given (in its order);
    any other seed on a bootstrap resample of it (as many texts, drawn with replacement by
    `random.Random(seed)`), so one kind and size gives related but different vocabularies, like two
    models of one family (Llama-2 and Mistral). Every tokenizer has `bos_token`, `eos_token`,
    `pad_token` (and `unk_token` where the family has one) set, adds its BOS in `tokenizer(text)` through a
    TemplateProcessing post-processor (offsets (0, 0)), never adds EOS, has a ChatML-like `chat_template`
    in its own BOS/EOS (`BOS role\\n content EOS\\n` per message; `add_generation_prompt` opens
    `BOS assistant\\n`) and `model_max_length` 512. Special-token ids differ between kinds on purpose, so
    code that mixes up teacher and student ids fails loudly.

    kind ``"bytelevel_bpe"`` imitates GPT-2 / Llama-3 (tiktoken-style): text is mapped to its UTF-8
        bytes, each shown as a printable character (``Ġ`` = space), split with the GPT-2 regex
        (ByteLevel pre-tokenizer, add_prefix_space=False; Llama-3 uses a different regex that also
        splits digits in groups of three) and merged by BPE. All 256 bytes are in the vocabulary, so no
        text is unknown, and `vocab_size` counts them, the merges and the 3 special tokens, which come
        LAST as in Llama-3 (``<|begin_of_text|>`` BOS, ``<|end_of_text|>`` EOS, ``<|pad|>``).
        Decoding is exact. Offsets: a token's leading space is inside its span (``"ĠcafÃ©"`` spans
        `` café``: as in Llama-3, whose ByteLevel post-processor keeps `trim_offsets=False`); a token
        holding only some bytes of a multi-byte character spans the WHOLE character, so the tokens of one
        split character repeat the same span (``"ï"`` as ``"Ã"`` + ``"¯"``: (2, 3) twice) and a token
        holding the end of one character and the start of the next spans both (``"𝔘𝔫"`` split as
        ``"ðĿĶ"`` (0, 1), ``"ĺðĿĶ"`` (0, 2), ``"«ðĿĶ"`` (1, 3)...): spans overlap, starts and ends
        never decrease.
    kind ``"wordpiece"`` imitates BERT (uncased) WordPiece as a causal-LM tokenizer: a BertNormalizer
        removes control characters, turns every whitespace into a space, puts spaces around CJK
        ideographs (not kana or Hangul), strips accents and lowercases; the BertPreTokenizer splits on
        whitespace and punctuation; WordPiece marks word-internal pieces with ``##``. Special tokens
        ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, ``[EOS]`` 3; a word containing a character the vocabulary
        lacks becomes one ``[UNK]`` (every character of `corpus` is in it). Decoding gives the normalised
        text with whitespace rebuilt by rule (single spaces between words and around punctuation: "3.14"
        decodes to "3. 14"), never the input text. Offsets map the normalised pieces back to the
        ORIGINAL text: ``"Café"`` -> ``"cafe"`` spans the 4 original characters; a ``"##"`` piece spans
        only its own characters (the ``##`` has none: ``"naïve"`` as ``"na"`` + ``"##ive"`` spans (0, 2)
        and (2, 5)); a stripped precomposed accent stays inside its letter's span (``"##i"`` for ``"ï"``)
        while a separate combining accent (``"x"`` + U+0301) and all whitespace are in no token's span.
        Accent stripping decomposes (NFD) Hangul syllables into jamo, so with a small vocabulary one
        character becomes 2-3 pieces sharing its span (``"한"`` -> ``"ᄒ"``, ``"##ᅡ"``, ``"##ᆫ"``), as in
        BERT uncased.
    kind ``"unigram_metaspace"`` imitates SentencePiece Unigram as converted by transformers for
        Llama-2 / Mistral (Metaspace pre-tokenizer, replacement ``▁``, prepend_scheme ``"first"``, so
        only the start of the text gets a ``▁``; Metaspace decoder), with byte fallback: the installed
        `tokenizers` supports ``Unigram(byte_fallback=True)``, but its UnigramTrainer returns a model
        without it and without byte pieces, so the 256 pieces ``<0x00>``..``<0xFF>`` are added after
        the special tokens (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, bytes 4..259, as in
        Llama-2) and byte fallback switched on. Characters outside the 99.95% character coverage of
        `corpus` (SentencePiece's default) and characters never seen are encoded as their UTF-8 byte
        pieces instead of ``<unk>``; the decoder (ByteFallback, then Metaspace) turns them back into
        text. `vocab_size` is the learned vocabulary (special tokens included); the 256 byte pieces
        come on top, so ``len(tokenizer) <= vocab_size + 256``. Pieces do not stop at punctuation
        (``"▁мир!"``), and tabs and newlines are ordinary characters, not ``▁``. Decoding is exact except
        for the first space at the very start of a text (dropped, as in Llama-2). Offsets: a piece's
        ``▁`` stands for the space before the word, which is inside the span (``"▁café"`` spans
        `` café``); the ``▁`` prepended to the text has no character of its own, so a first piece
        ``"▁The"`` spans (0, 3), while a lone prepended ``"▁"`` token takes the span of the first
        character, overlapping the next token (``"▁"`` (0, 1), then ``"n"`` (0, 1) or ``"Ång"`` (0, 3));
        a ``"▁"`` token in a run of spaces spans one space. Byte fallback works on a whole run of
        unknown characters, and EVERY byte piece of the run spans the whole run (``"𝔘𝔫𝔦"`` -> 12 byte
        pieces, all (i, i+3)), not its own character.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind `{kind}`; choose one of {', '.join(KINDS)}")
    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("the corpus has no text to train a tokenizer on")
    # seed 0: the corpus in its own order; else a bootstrap resample (the trainers ignore order alone).
    training = texts if seed == 0 else random.Random(seed).choices(texts, k=len(texts))
    backend = {"bytelevel_bpe": _bytelevel_bpe, "wordpiece": _wordpiece,
               "unigram_metaspace": _unigram_metaspace}[kind](training, vocab_size, texts)
    special = SPECIAL_TOKENS[kind]
    bos = special["bos_token"]
    backend.post_processor = _with_bos(backend.post_processor, bos, backend.token_to_id(bos))
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHAT_TEMPLATE,
                                   model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False,
                                   **special)


def _with_bos(processor, bos: str, bos_id: int):
    """`processor` (or nothing) followed by a TemplateProcessing that puts BOS in front of every text."""
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                             special_tokens=[(bos, bos_id)])
    return template if processor is None else processors.Sequence([processor, template])


def _bytelevel_bpe(texts: list[str], vocab_size: int, corpus: list[str]) -> Tokenizer:
    special = list(SPECIAL_TOKENS["bytelevel_bpe"].values())
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens(special)  # after the learned vocabulary, as in Llama-3
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # Llama-3 keeps spaces in spans
    return backend


def _wordpiece(texts: list[str], vocab_size: int, corpus: list[str]) -> Tokenizer:
    """BERT-style WordPiece, trained the way `trainers.WordPieceTrainer` does (BPE merges over words, `##` on
    word-internal symbols, the vocabulary is the result) but deterministically: WordPieceTrainer numbers the
    `##` symbols in hash-map order, which breaks ties between equally frequent merges differently from call
    to call. Here every character gets two private code points, one for its word-initial form and one for
    its `##` form, a plain BpeTrainer (whose alphabet is sorted, so its ties are stable) learns merges over
    the encoded words, and the learned symbols are decoded back to `piece` / `##piece`. Both forms of
    every character of `corpus` (the whole corpus, not only the resample `texts`) are in the vocabulary,
    so no word of the corpus becomes [UNK]."""
    special = SPECIAL_TOKENS["wordpiece"]
    order = [special["pad_token"], special["unk_token"], special["bos_token"], special["eos_token"]]
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                            lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = [word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
    chars = sorted({char for text in corpus for char in normalizer.normalize_str(text) if not char.isspace()})
    if 2 * len(chars) > _PRIVATE_PLANE_SIZE:
        raise ValueError(f"the corpus has {len(chars)} distinct characters, too many for this WordPiece trainer")
    code = {char: index for index, char in enumerate(chars)}
    initial = {char: chr(_PRIVATE_PLANE + 2 * code[char]) for char in chars}
    inner = {char: chr(_PRIVATE_PLANE + 2 * code[char] + 1) for char in chars}
    encoded = [initial[word[0]] + "".join(inner[char] for char in word[1:]) for word in words]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=order, show_progress=False,
                                  initial_alphabet=sorted(initial.values()) + sorted(inner.values()))
    bpe.train_from_iterator(encoded, trainer)

    def decode(symbol: str) -> str:
        if symbol in order:
            return symbol
        offsets = [ord(char) - _PRIVATE_PLANE for char in symbol]
        text = "".join(chars[offset // 2] for offset in offsets)
        return text if offsets[0] % 2 == 0 else "##" + text

    vocab = {decode(symbol): index for symbol, index in bpe.get_vocab().items()}
    backend = Tokenizer(models.WordPiece(vocab, unk_token=special["unk_token"], continuing_subword_prefix="##"))
    backend.add_special_tokens(order)  # already in the vocabulary: ids 0-3
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return backend


_PRIVATE_PLANE, _PRIVATE_PLANE_SIZE = 0xF0000, 0xFFFE  # Supplementary Private Use Area-A


def _unigram_metaspace(texts: list[str], vocab_size: int, corpus: list[str]) -> Tokenizer:
    special = SPECIAL_TOKENS["unigram_metaspace"]
    order = [special["unk_token"], special["bos_token"], special["eos_token"], special["pad_token"]]
    metaspace = {"replacement": "▁", "prepend_scheme": "first"}
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=order, unk_token=order[0],
                                      show_progress=False)
    rare = _uncovered_characters(texts, CHARACTER_COVERAGE)
    # Rare characters are kept out of the learned vocabulary (they become byte pieces): train on the text
    # with each of them replaced by a space, i.e. a word boundary.
    backend.train_from_iterator([_blank_out(text, rare) for text in texts], trainer)
    learned = _unigram_pieces(backend)
    specials, pieces = learned[:len(order)], learned[len(order):]
    assert [piece for piece, _ in specials] == order, specials
    pieces = _canonical_pieces(pieces, Counter(char for text in texts for char in text))
    floor = min(score for _, score in pieces) - 10.0  # byte pieces only ever match via byte fallback
    vocab = specials + [(piece, floor) for piece in BYTE_PIECES] + pieces
    backend.model = models.Unigram(vocab, unk_id=0, byte_fallback=True)
    # ByteFallback turns runs of byte pieces back into characters; Metaspace turns ▁ into spaces and drops the
    # one prepended to the text. (Fuse before Metaspace would lose every space in tokenizers 0.23.)
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(**metaspace)])
    return backend


def _canonical_pieces(pieces: list[tuple[str, float]], char_counts: Counter) -> list[tuple[str, float]]:
    """The UnigramTrainer's pieces, made the same in every call. The trainer sums in hash-map order, so its
    log-probabilities differ in the last bits from call to call, and it gives the characters its EM model
    dropped a ladder of scores (min_score - 0.0001 k) in hash-set order. Here the ladder (the lowest
    single-character pieces, 0.0001 apart) is handed out again by corpus frequency (ties by code point),
    scores are rounded to 1e-6 and pieces ordered by score, then text (as SentencePiece orders them)."""
    pieces = sorted(pieces, key=lambda item: -item[1])
    singles = [index for index, (piece, _) in enumerate(pieces) if len(piece) == 1]
    ladder = singles[-1:]
    for index in reversed(singles[:-1]):
        if pieces[index][1] - pieces[ladder[-1]][1] > 1.5e-4:
            break
        ladder.append(index)
    chars = sorted((pieces[index][0] for index in ladder), key=lambda char: (-char_counts[char], char))
    scores = sorted((pieces[index][1] for index in ladder), reverse=True)
    for index, char, score in zip(sorted(ladder), chars, scores):
        pieces[index] = (char, score)
    return sorted(((piece, round(score, 6)) for piece, score in pieces), key=lambda item: (-item[1], item[0]))


def _unigram_pieces(backend: Tokenizer) -> list[tuple[str, float]]:
    """The trained Unigram model's (piece, log-probability) list, in id order."""
    return [(piece, score) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]


def _uncovered_characters(texts: list[str], coverage: float) -> set[str]:
    """The rarest characters beyond `coverage` of all character occurrences (SentencePiece's rule; ties in
    frequency broken by code point, so the set is deterministic). Whitespace is always covered."""
    counts = Counter(char for text in texts for char in text)
    total, covered, kept = sum(counts.values()), 0, set()
    for char, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if covered >= coverage * total and not char.isspace():
            continue
        kept.add(char)
        covered += count
    return set(counts) - kept


def _blank_out(text: str, chars: set[str]) -> str:
    return "".join(" " if char in chars else char for char in text) if chars else text


# ---- a corpus ---------------------------------------------------------------------------------------

_WORDS = ("the quick brown fox jumps over lazy dog and then it runs into a small house where people "
          "read books about learning models tokens words with many letters while others write simple "
          "programs to count numbers every morning before lunch because nothing is easier than this "
          "distillation teacher student vocabulary alignment").split()
_ACCENTED = ("café Ümlaut naïve résumé façade Ångström jalapeño São Paulo über Zoë fiancée "
             "crème brûlée").split()
_CJK = ["漢字かな", "東京", "日本語のテキスト", "中文字符", "한국어", "カタカナ"]
_CYRILLIC = "Привет мир привет Москва язык модель".split()
_EMOJI = ["🙂", "🚀", "👍🏽", "❤️"]
_RARE = ["𝔘𝔫𝔦", "ꙮ", "🦜", "ǅ", "Ꮳ"]  # a handful of occurrences: outside Unigram's character coverage
_PUNCT = [".", ",", "!", "?", ";", ":", "...", "(", ")", "\"", "'", "-", "--", "%", "$", "#", "@", "&"]
_GAPS = [" "] * 12 + ["  ", "   ", "\t", "\n", " \n", "\n\n", "\t\t"]


def default_corpus(seed: int = 0, size: int = 400) -> list[str]:
    """`size` short deterministic texts (a function of `seed` only) for training and testing tokenizers.

    English-like words, numbers (integers, decimals, long digit runs), punctuation, runs of whitespace
    (double and triple spaces, tabs, newlines, blank lines), accented Latin (``café Ümlaut naïve``),
    CJK and Hangul, Cyrillic and emoji (including multi-code-point ones: skin tone, variation selector),
    so multi-byte characters are frequent. A few rare characters (``𝔘``, ``ꙮ``, ``🦜``...) appear in
    only a couple of texts: they fall outside the Unigram tokenizer's character coverage and exercise
    byte fallback. No text starts with a space (SentencePiece-style tokenizers drop a leading space), and
    text index 0 contains one of every kind."""
    rng = random.Random(f"tokenizer-zoo-corpus-{seed}")

    def item() -> str:
        roll = rng.random()
        if roll < 0.55:
            word = rng.choice(_WORDS)
            return word.capitalize() if rng.random() < 0.15 else word
        if roll < 0.65:
            return rng.choice([str(rng.randrange(100)), str(rng.randrange(10 ** 6)), f"{rng.uniform(0, 100):.2f}",
                               str(rng.randrange(10 ** 12, 10 ** 13))])
        if roll < 0.75:
            return rng.choice(_ACCENTED)
        if roll < 0.82:
            return rng.choice(_CJK)
        if roll < 0.88:
            return rng.choice(_CYRILLIC)
        if roll < 0.93:
            return rng.choice(_EMOJI)
        return rng.choice(_PUNCT)

    texts = ["The café  Ümlaut naïve\t漢字かな 🙂 Привет, мир! 42 + 3.14 = 45.14\nend 𝔘𝔫𝔦"]
    for index in range(1, size):
        parts = [item() for _ in range(rng.randrange(4, 14))]
        if index % 97 == 13:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(_RARE))
        text = parts[0]
        for part in parts[1:]:
            text += (part if part in _PUNCT and rng.random() < 0.7 else rng.choice(_GAPS) + part)
        texts.append(text)
    return texts[:size]


# ---- a model ----------------------------------------------------------------------------------------

def tiny_causal_lm(tokenizer, *, hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0):
    """A randomly initialised (seeded, global RNG untouched) tiny LlamaForCausalLM over `tokenizer`:
    `tiny_llama_config` with vocab_size = len(tokenizer) and the tokenizer's BOS/EOS/PAD ids, in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    from distill.lm.models import tiny_llama_config

    config = tiny_llama_config(len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                               num_attention_heads=4 if hidden_size % 8 == 0 else 2,
                               max_position_embeddings=MODEL_MAX_LENGTH)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()
