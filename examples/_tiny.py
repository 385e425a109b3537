"""Helpers shared by the examples: the ``--fast`` switch and the tiny stand-in model it uses.

Not an example itself (the leading underscore keeps it out of the list). ``--fast`` (or the environment variable
``GUARDEDP2P_EXAMPLE_FAST=1``) replaces the embedded SmolLM2 model with a tiny random Llama saved as an ordinary
Hugging Face folder, a word-level tokenizer over the words ``w0 … w119`` and a small JSONL file of sentences
made of those words. The examples then exercise exactly the same code paths in a few seconds, which is how
``tests/cli/test_examples.py`` keeps them from rotting. The numbers a fast run prints mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

FAST_ENV = "GUARDEDP2P_EXAMPLE_FAST"
WORDS = [f"w{i}" for i in range(120)]


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every example shares: ``--fast``, ``--steps``, ``--out``, ``--model``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument(
        "--fast",
        action="store_true",
        default=os.environ.get(FAST_ENV, "") not in ("", "0"),
        help=f"tiny random model + tiny tokenizer, runs in seconds (also: {FAST_ENV}=1)",
    )
    ap.add_argument(
        "--model", default="default", help="Hugging Face model folder, or 'default' (embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 20, or 6 with --fast)")
    ap.add_argument("--out", default=None, help="where the run's outputs go (default: a temporary folder)")
    return ap


def setup_fast(workdir: Path) -> tuple[str, str]:
    """Write the tiny model folder and a training JSONL file under ``workdir``; return (model_dir, data_file).

    One intra-op thread: tiny models gain nothing from more, and on a busy 2-core machine OpenMP spin-waiting
    makes them 10-30x slower.
    """
    import torch

    torch.set_num_threads(1)
    model_dir = workdir / "tiny-model"
    if not (model_dir / "config.json").is_file():
        tiny_model().save_pretrained(str(model_dir))
        tiny_tokenizer().save_pretrained(str(model_dir))
    data = write_text_jsonl(workdir / "train.jsonl")
    return str(model_dir), str(data)


def tiny_model(seed: int = 0):
    """A 6-block random Llama (hidden size 64); the same seed always gives the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def tiny_tokenizer():
    """A word-level tokenizer built in memory (no download) whose vocabulary fits :func:`tiny_model`."""
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


def _sentence(rng: random.Random, distinct: int = 4) -> list[str]:
    start = rng.randrange(0, distinct)
    return [WORDS[(start + k) % 100] for k in range(rng.randint(5, 9))]


def write_text_jsonl(path: Path, n: int = 48, seed: int = 0) -> Path:
    """``{"text": ...}`` records with a learnable pattern (each word is followed by its successor)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(_sentence(rng))}) + "\n")
    return path


def write_instruction_jsonl(path: Path, n: int = 48, seed: int = 0) -> Path:
    """``{"prompt": ..., "response": ...}`` records: the response continues the prompt's sequence."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            words = _sentence(rng)
            cut = len(words) // 2
            fh.write(json.dumps({"prompt": " ".join(words[:cut]), "response": " ".join(words[cut:])}) + "\n")
    return path


def print_summary(summary: dict) -> None:
    """The same table the CLI prints at the end of `guardedp2p client tune`."""
    from rich.console import Console

    from guardedp2p.cli.report import print_summary as _print

    _print(summary, Console(width=100))
