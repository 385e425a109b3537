"""Turn records into token ids and training labels.

Labels follow the Hugging Face causal-LM convention: ``labels`` is aligned with ``input_ids`` (the model
shifts them by one internally) and ``-100`` marks a position that carries no loss. For instruction records the
prompt part is masked, so the client trains on what the assistant should say, not on re-predicting the user's
prompt. Padding is added later by :func:`guardedp2p.data.collate.collate`, which also masks it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guardedp2p.data.loaders import DataFormatError, TaskKind, detect_kind

IGNORE_INDEX = -100


@dataclass
class DataConfig:
    """How records become training sequences.

    max_length: longest sequence in tokens; longer ones are cut on the right (for instruction records the
        response is cut, the prompt kept; a prompt that leaves no room for any response token drops the record).
    add_eos: append the tokenizer's EOS to LM text (and to an instruction response without a chat template),
        so the model learns where a record ends.
    use_chat_template: format instruction records with the tokenizer's chat template when it has one.
    system_prompt: a system turn to put before the user turn; None keeps the template's own default.
    prompt_format / response_format: plain-text layout used when no chat template is applied.
    """

    max_length: int = 128
    add_eos: bool = True
    use_chat_template: bool = True
    system_prompt: str | None = None
    prompt_format: str = "{prompt}\n"
    response_format: str = "{response}"

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise DataFormatError(f"DataConfig.max_length must be >= 2, got {self.max_length}")


Example = dict[str, list[int]]


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if eos is not None else []


def encode_lm(records: Sequence[dict[str, Any]], tokenizer: Any, config: DataConfig | None = None) -> list[Example]:
    """Encode ``text`` records: every real token is a label; sequences are truncated to ``max_length``."""
    config = config or DataConfig()
    out: list[Example] = []
    for rec in records:
        ids = _ids(tokenizer, rec["text"], add_special_tokens=True)
        if config.add_eos:
            ids = ids + _eos(tokenizer)
        ids = ids[: config.max_length]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_messages(prompt: str, config: DataConfig) -> list[dict[str, str]]:
    msgs = []
    if config.system_prompt is not None:
        msgs.append({"role": "system", "content": config.system_prompt})
    msgs.append({"role": "user", "content": prompt})
    return msgs


def _instruction_ids(rec: dict[str, Any], tokenizer: Any, config: DataConfig) -> tuple[list[int], list[int]]:
    """Return (prompt_ids, response_ids) whose concatenation is the full training sequence.

    The prompt part is rendered on its own (with the chat template's generation prompt, i.e. the opening of
    the assistant turn) and checked to be an exact token prefix of the rendered full conversation. If a
    tokenizer merges tokens across that boundary, the two parts are tokenized separately and concatenated,
    so the mask always falls exactly between prompt and response.
    """
    if config.use_chat_template and has_chat_template(tokenizer):
        msgs = _chat_messages(rec["prompt"], config)
        prefix_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": rec["response"]}], tokenize=False
        )
        special = False  # the template writes the special tokens itself
        eos: list[int] = []
    else:
        prefix_text = config.prompt_format.format(prompt=rec["prompt"])
        full_text = prefix_text + config.response_format.format(response=rec["response"])
        special = True
        eos = _eos(tokenizer) if config.add_eos else []
    if not full_text.startswith(prefix_text):
        raise DataFormatError(
            "the chat template does not render the prompt-only conversation as a prefix of the full one; "
            "set DataConfig.use_chat_template=False to use the plain prompt/response layout"
        )
    prefix = _ids(tokenizer, prefix_text, add_special_tokens=special)
    full = _ids(tokenizer, full_text, add_special_tokens=special)
    if full[: len(prefix)] == prefix:
        return prefix, full[len(prefix) :] + eos
    rest = _ids(tokenizer, full_text[len(prefix_text) :], add_special_tokens=False)
    return prefix, rest + eos


def encode_instruction(
    records: Sequence[dict[str, Any]], tokenizer: Any, config: DataConfig | None = None
) -> list[Example]:
    """Encode ``prompt``/``response`` records; labels are ``-100`` on the prompt (and template) tokens.

    Records whose prompt alone fills ``max_length`` would carry no loss; they are dropped with a warning
    rather than silently training on nothing.
    """
    config = config or DataConfig()
    out: list[Example] = []
    dropped = 0
    for rec in records:
        prompt_ids, response_ids = _instruction_ids(rec, tokenizer, config)
        ids = (prompt_ids + response_ids)[: config.max_length]
        n_prompt = min(len(prompt_ids), len(ids))
        if n_prompt >= len(ids):
            dropped += 1
            continue
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        out.append({"input_ids": ids, "labels": labels})
    if dropped:
        warnings.warn(
            f"dropped {dropped} of {len(records)} instruction records whose prompt fills max_length="
            f"{config.max_length}; raise DataConfig.max_length or shorten the prompts",
            stacklevel=2,
        )
    return out


def encode_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    config: DataConfig | None = None,
    kind: TaskKind | None = None,
) -> list[Example]:
    """Encode training records of kind ``lm`` or ``instruction`` (detected from the first record if not given)."""
    if not records:
        return []
    kind = kind or detect_kind(records[0])
    if kind == "lm":
        return encode_lm(records, tokenizer, config)
    if kind == "instruction":
        return encode_instruction(records, tokenizer, config)
    raise DataFormatError(
        "multiple-choice records are for evaluation (guardedp2p.data.mc_eval.evaluate_mc), not for training; "
        "give a file of 'text' or 'prompt'/'response' records to train on"
    )
