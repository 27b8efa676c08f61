"""Cross-tokenizer distillation: aligning two tokenizations of one text, and the data and teacher signal built on it."""
