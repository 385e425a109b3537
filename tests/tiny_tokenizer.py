"""A word-level tokenizer built in memory (no download) whose vocabulary fits the tiny test models."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(120)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.padding_side = "right"
    return fast


def write_text_records(path: Path, n: int = 48, seed: int = 0, distinct: int = 100) -> Path:
    """Sentences with a learnable pattern (each word is followed by its successor), as ``text`` JSONL.

    ``distinct`` bounds the number of different starting words: a small value gives a task a tiny random model
    learns within a few steps.
    """
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            start = rng.randrange(0, distinct)
            words = [WORDS[(start + k) % 100] for k in range(rng.randint(5, 9))]
            fh.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path
