"""The tiny stand-in model of ``guardedp2p evaluate --fast``: minutes on a CPU, every code path of the real run.

A byte-level BPE tokenizer is trained in memory on the task's own text (a few hundred merges, deterministic),
so the records round-trip exactly through encode/decode and the secrets metric sees real dates and account
numbers; a random 4-block Llama (hidden 64, seeded) is built over its vocabulary. Nothing is downloaded, nothing
is written. The numbers a fast run prints say nothing about the real model: it exists so that CI can run the
whole frontier end to end and fail when a field goes missing.
"""

from __future__ import annotations

from typing import Any

import torch

FAST_VOCAB = 512


def fast_tokenizer(texts: list[str], vocab_size: int = FAST_VOCAB) -> Any:
    """A byte-level BPE over ``texts`` with BOS/EOS/pad specials, wrapped as a fast HF tokenizer (right padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.padding_side = "right"
    return fast


def fast_model(task: Any, *, seed: int = 0) -> tuple[Any, Any]:
    """(tiny random Llama, BPE tokenizer) for ``task`` (a :class:`guardedp2p.evaluate.tasks.TaskSource`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from guardedp2p.data.loaders import load_records

    texts = [str(r["text"]) for r in load_records(task.train)] + [str(r["text"]) for r in task.aux]
    texts += [str(it["question"]) + " " + " ".join(it["choices"]) for it in load_records(task.eval_mc)]
    tok = fast_tokenizer(texts)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval(), tok


__all__ = ["FAST_VOCAB", "fast_model", "fast_tokenizer"]
