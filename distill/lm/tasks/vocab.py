"""Word-level Hugging Face tokenizers for the built-in tasks (real `PreTrainedTokenizerFast`s)."""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def word_level_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose tokens are whitespace-separated words; `<bos>` starts every sequence."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
