"""Turn records into token ids and training labels.

Labels follow the Hugging Face causal-LM convention: ``labels`` is aligned with ``input_ids`` (the model
shifts them by one internally) and ``-100`` marks a position that carries no loss. For instruction records the
prompt part is masked, so the client trains on what the assistant should say, not on re-predicting the user's
prompt; for chat records every turn but the assistant's is masked. ``DataConfig.loss_on = "all"`` trains on every
token instead. Padding is added later by :func:`guardedp2p.data.collate.collate`, which also masks it.

Chat records are rendered with the tokenizer's own chat template when it has one, so the adapters learn the
exact layout the model is prompted with at inference; a tokenizer without one gets :data:`SIMPLE_CHAT_TEMPLATE`
(``role: content`` lines, EOS after each assistant turn), documented in the user guide ("Your data").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from guardedp2p.data.errors import DataFormatError
from guardedp2p.data.fields import TaskKind, detect_kind

IGNORE_INDEX = -100

#: Chat layout for tokenizers without a chat template: one ``role: content`` line per turn, the EOS token right
#: after each assistant turn (so the model learns where its answer ends), and ``assistant: `` as the generation
#: prompt. Prompt a model tuned this way with the same layout.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
LossOn = Literal["assistant", "all"]


@dataclass
class DataConfig:
    """How records become training sequences.

    max_length: longest sequence in tokens; longer ones are cut on the right (for instruction records the
        response is cut, the prompt kept; a prompt that leaves no room for any response token drops the record).
    add_eos: append the tokenizer's EOS to LM text (and to an instruction response without a chat template),
        so the model learns where a record ends.
    use_chat_template: format instruction and chat records with the tokenizer's chat template when it has one
        (otherwise instruction records use prompt_format/response_format and chat records SIMPLE_CHAT_TEMPLATE).
    system_prompt: a system turn to put before the user turn (and before a conversation that has none); None
        keeps the template's own default.
    prompt_format / response_format: plain-text layout of instruction records when no chat template is applied.
    loss_on: ``assistant`` (default) puts the loss on the output of instruction records and on the assistant
        turns of chat records; ``all`` trains on every token, the prompt and the user turns included.
    """

    max_length: int = 128
    add_eos: bool = True
    use_chat_template: bool = True
    system_prompt: str | None = None
    prompt_format: str = "{prompt}\n"
    response_format: str = "{response}"
    loss_on: LossOn = "assistant"

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise DataFormatError(f"DataConfig.max_length must be >= 2, got {self.max_length}")
        if self.loss_on not in ("assistant", "all"):
            raise DataFormatError(f"loss_on must be 'assistant' or 'all', got {self.loss_on!r}")


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
        n_prompt = 0 if config.loss_on == "all" else min(len(prompt_ids), len(ids))
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


def _render(tokenizer: Any, messages: list[dict[str, str]], template: str | None, generation: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )
    return str(text)


def _chat_spans(messages: list[dict[str, str]], tokenizer: Any, template: str | None) -> tuple[str, list[int]]:
    """The rendered conversation and the character offsets where trained (assistant) and masked text alternate.

    Each assistant turn starts where the conversation before it, rendered with the generation prompt, ends, and
    stops where the conversation up to and including it ends. Both renderings must be prefixes of the full one;
    templates that rewrite earlier turns (e.g. drop past reasoning) break that and are refused with advice.
    """
    full = _render(tokenizer, messages, template, False)
    cuts: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], template, True) if i else ""
        end = _render(tokenizer, messages[: i + 1], template, False)
        if not (full.startswith(start) and full.startswith(end)) or len(end) < len(start):
            raise DataFormatError(
                "the chat template does not render a conversation's beginning as a prefix of the whole, so the "
                "assistant turns cannot be located; use the plain layout (DataConfig.use_chat_template=False, "
                "--no-chat-template) or train on every token (--loss-on all)"
            )
        if cuts and len(start) < cuts[-1]:
            raise DataFormatError("the chat template renders overlapping assistant turns; use --no-chat-template")
        cuts += [len(start), len(end)]
    return full, cuts


def _segment_ids(text: str, cuts: list[int], tokenizer: Any, special: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the token index of each character cut.

    The whole text is tokenized at once when every cut falls on a token boundary of it (the common case, and
    the tokens the model sees at inference); otherwise the pieces are tokenized separately and concatenated,
    so the mask always falls exactly on the cut.
    """
    full = _ids(tokenizer, text, add_special_tokens=special)
    bounds: list[int] = []
    for c in cuts:
        prefix = _ids(tokenizer, text[:c], add_special_tokens=special) if c else []
        if full[: len(prefix)] != prefix:
            break
        bounds.append(len(prefix))
    else:
        return full, bounds
    ids: list[int] = []
    bounds = []
    edges = [0, *cuts, len(text)]
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        if k:
            bounds.append(len(ids))
        if b > a or k == 0:  # the first piece, even empty, carries the special tokens (BOS) when wanted
            ids += _ids(tokenizer, text[a:b], add_special_tokens=special and k == 0)
    return ids, bounds


def chat_example(messages: list[dict[str, str]], tokenizer: Any, config: DataConfig) -> Example:
    """One untruncated example for a conversation: labels on assistant turns (or everywhere with ``loss_on="all"``)."""
    msgs = list(messages)
    if config.system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": config.system_prompt})
    own = config.use_chat_template and has_chat_template(tokenizer)
    template = None if own else SIMPLE_CHAT_TEMPLATE
    if config.loss_on == "all":  # no turn boundaries needed, so any template works
        ids = _ids(tokenizer, _render(tokenizer, msgs, template, False), add_special_tokens=not own)
        return {"input_ids": ids, "labels": list(ids)}
    text, cuts = _chat_spans(msgs, tokenizer, template)
    ids, bounds = _segment_ids(text, cuts, tokenizer, special=not own)
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in zip(bounds[::2], bounds[1::2]):
        labels[a:b] = ids[a:b]
    return {"input_ids": ids, "labels": labels}


def encode_chat(records: Sequence[dict[str, Any]], tokenizer: Any, config: DataConfig | None = None) -> list[Example]:
    """Encode ``messages`` records; labels are ``-100`` outside assistant turns unless ``loss_on="all"``.

    Sequences are cut to ``max_length``; a conversation whose assistant turns all fall beyond the cut would
    carry no loss and is dropped with a warning.
    """
    config = config or DataConfig()
    out: list[Example] = []
    dropped = 0
    for rec in records:
        ex = chat_example(rec["messages"], tokenizer, config)
        ids, labels = ex["input_ids"][: config.max_length], ex["labels"][: config.max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            dropped += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    if dropped:
        warnings.warn(
            f"dropped {dropped} of {len(records)} chat records with no assistant token within max_length="
            f"{config.max_length}; raise DataConfig.max_length (--max-length) or shorten the conversations",
            stacklevel=2,
        )
    return out


def encode_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    config: DataConfig | None = None,
    kind: TaskKind | None = None,
) -> list[Example]:
    """Encode training records of kind ``lm``, ``chat`` or ``instruction`` (detected from the first record if not
    given)."""
    if not records:
        return []
    kind = kind or detect_kind(records[0])
    if kind == "lm":
        return encode_lm(records, tokenizer, config)
    if kind == "instruction":
        return encode_instruction(records, tokenizer, config)
    if kind == "chat":
        return encode_chat(records, tokenizer, config)
    raise DataFormatError(
        "multiple-choice records are for evaluation (guardedp2p.data.mc_eval.evaluate_mc), not for training; "
        "give a file of text, chat or instruction records to train on"
    )
