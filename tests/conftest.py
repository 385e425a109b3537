"""Shared fixtures: tiny random models (see tiny_models.py) and the embedded SmolLM2 for slow tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tiny_models  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spin-waiting made a 6-layer
# forward take ~1 s instead of ~30 ms. Override with GUARDEDP2P_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("GUARDEDP2P_TEST_THREADS", "1")))


@pytest.fixture
def tiny_model():
    """The factory ``tiny_model(arch, seed=0, attn_implementation="sdpa")``; each call builds a fresh model."""
    return tiny_models.tiny_model


@pytest.fixture
def tiny_llama():
    return tiny_models.tiny_model("llama")


@pytest.fixture
def tiny_batch():
    """Right-padded (input_ids, attention_mask, labels) for the tiny models' vocabulary."""
    return tiny_models.tiny_batch()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model, loaded once per session (~40 s on 2 cores)."""
    from guardedp2p.engine.loading import load_causal_lm

    return load_causal_lm("default", device="cpu")
