"""Tiny, seeded, random-weight causal LMs for fast tests (no downloads, a few ms each).

``tiny_model(arch)`` is a plain function so other test modules can import it directly; ``conftest.py`` wraps it
in fixtures. Each config is chosen to exercise the awkward paths of its architecture: tied embeddings (llama,
gpt2), grouped-query attention (llama, qwen2), sliding-window layers (qwen2, mistral; window smaller than the
test sequences), OPT's ``project_in``/``project_out`` (word_embed_proj_dim != hidden_size) and biases.
"""

from __future__ import annotations

import torch

ARCHES = ("llama", "qwen2", "mistral", "opt", "gpt2")
VOCAB = 160
N_LAYERS = 6


def tiny_config(arch: str, *, attn_implementation: str = "sdpa"):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common_rope = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common_rope, tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = Qwen2Config(
            **common_rope, tie_word_embeddings=False, use_sliding_window=True, sliding_window=4, max_window_layers=3
        )
    elif arch == "mistral":
        cfg = MistralConfig(**common_rope, tie_word_embeddings=False, sliding_window=5)
    elif arch == "opt":
        cfg = OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=2,
            eos_token_id=2,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHES}")
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_model(arch: str = "llama", *, seed: int = 0, attn_implementation: str = "sdpa"):
    """A fresh fp32 random model in eval mode; the same (arch, seed) always gives the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, attn_implementation=attn_implementation), dtype=torch.float32
    )
    return model.eval()


def tiny_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = VOCAB, pad_id: int = 0):
    """Right-padded batch: (input_ids, attention_mask, labels) with labels = -100 on the pads.

    Row 0 is full length, the others are shorter, so the padding mask matters.
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        valid = max(2, length - 3 * row)
        attention_mask[row, valid:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels
