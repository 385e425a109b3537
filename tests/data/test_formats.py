"""The data formats users bring: chat, Alpaca/Dolly/TRL instruction records, field mapping, Parquet, JSON,
``datasets`` folders, Hub ids (with a fake ``load_dataset``: tests never reach the network), and the loss masks
each kind gets. The tiny word-level tokenizer of tests/tiny_tokenizer.py keeps every test in milliseconds.
"""

from __future__ import annotations

import json

import pytest

from guardedp2p.data import (
    IGNORE_INDEX,
    DataConfig,
    DataFormatError,
    FieldMapping,
    encode_chat,
    encode_instruction,
    encode_records,
    load_data,
    load_records,
)
from guardedp2p.errors import ConfigError
from tests.tiny_tokenizer import tiny_tokenizer

TEMPLATE = (
    "{% for m in messages %}[EOS] {{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[EOS] assistant {% endif %}"
)
CHAT = [
    {"role": "system", "content": "w90"},
    {"role": "user", "content": "w1 w2"},
    {"role": "assistant", "content": "w3 w4"},
    {"role": "user", "content": "w5"},
    {"role": "assistant", "content": "w6"},
]


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def tok_tpl():
    t = tiny_tokenizer()
    t.chat_template = TEMPLATE
    return t


def write_jsonl(path, recs) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs), encoding="utf-8")
    return str(path)


def trained(tok, ex) -> list[str]:
    """Tokens that carry the loss."""
    return [tok.convert_ids_to_tokens(lab) for lab in ex["labels"] if lab != IGNORE_INDEX]


# ---------------------------------------------------------------- detection and normalisation


def test_chat_records_detected_and_normalised(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT, "id": 3}, {"messages": CHAT[1:3]}])
    d = load_data(p)
    assert d.kind == "chat" and d.fields == {"messages": "messages"} and d.source_format == "jsonl"
    assert d.records[0] == {"messages": CHAT, "id": 3}


def test_sharegpt_conversations(tmp_path):
    conv = [{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w2"}]
    d = load_data(write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}]))
    assert d.kind == "chat" and d.fields == {"messages": "conversations"}
    assert d.records[0]["messages"] == [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]


@pytest.mark.parametrize(
    "rec, fields, prompt, response",
    [
        (
            {"instruction": "w1", "input": "w2", "output": "w3"},
            {"instruction": "instruction", "output": "output", "input": "input"},
            "w1\n\nw2",
            "w3",
        ),
        (
            {"instruction": "w1", "input": "", "output": "w3"},
            {"instruction": "instruction", "output": "output", "input": "input"},
            "w1",
            "w3",
        ),
        ({"instruction": "w1", "output": "w3"}, {"instruction": "instruction", "output": "output"}, "w1", "w3"),
        (
            {"instruction": "w1", "context": "w2", "response": "w3", "category": "qa"},
            {"instruction": "instruction", "output": "response", "input": "context"},
            "w1\n\nw2",
            "w3",
        ),
        ({"prompt": "w1", "completion": "w3"}, {"instruction": "prompt", "output": "completion"}, "w1", "w3"),
        ({"prompt": "w1", "response": "w3"}, {"instruction": "prompt", "output": "response"}, "w1", "w3"),
    ],
    ids=["alpaca", "alpaca-empty-input", "no-input", "dolly", "trl", "guardedp2p"],
)
def test_instruction_variants(tmp_path, rec, fields, prompt, response):
    d = load_data(write_jsonl(tmp_path / "i.jsonl", [rec]))
    assert d.kind == "instruction" and d.fields == fields
    assert d.records[0]["prompt"] == prompt and d.records[0]["response"] == response
    assert not {"instruction", "input", "output", "context", "completion"} & set(d.records[0])
    assert d.records[0].get("category") == rec.get("category")  # unrelated fields are kept


def test_field_mapping(tmp_path):
    recs = [{"q": "w1", "ctx": "w2", "a": "w3"}, {"q": "w4", "a": "w5"}]
    p = write_jsonl(tmp_path / "m.jsonl", recs)
    with pytest.raises(DataFormatError, match="unrecognised record.*--instruction-field"):
        load_records(p)
    m = FieldMapping(instruction_field="q", input_field="ctx", output_field="a")
    d = load_data(p, m)
    assert d.kind == "instruction" and d.fields == {"instruction": "q", "output": "a", "input": "ctx"}
    assert [r["prompt"] for r in d.records] == ["w1\n\nw2", "w4"]
    body = write_jsonl(tmp_path / "b.jsonl", [{"body": "w1 w2", "label": 1}])
    assert load_data(body, FieldMapping(text_field="body")).records == [{"text": "w1 w2"}]
    dialog = write_jsonl(tmp_path / "d.jsonl", [{"dialog": CHAT}])
    assert load_data(dialog, FieldMapping(messages_field="dialog")).kind == "chat"
    with pytest.raises(DataFormatError, match="one of"):
        FieldMapping(kind="sft")
    with pytest.raises(ConfigError, match="non-empty"):
        FieldMapping(text_field=" ")


def test_ambiguous_record_resolved_by_kind(tmp_path):
    # the Hub copy of Alpaca: a formatted 'text' column next to instruction/input/output
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "w1", "input": "", "output": "w2", "text": "w1 w2"}])
    with pytest.raises(DataFormatError, match=r"several schemas \(lm, instruction\).*--data-kind"):
        load_records(p)
    ins = load_data(p, FieldMapping(kind="instruction"))
    assert ins.kind == "instruction" and ins.records == [{"prompt": "w1", "response": "w2"}]
    txt = load_data(p, FieldMapping(kind="text"))
    assert txt.kind == "lm" and txt.records == [{"text": "w1 w2"}]


@pytest.mark.parametrize(
    "rec, pattern",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": "w1"}, "JSON array"),
        ({"messages": [{"role": "user", "content": "w1"}]}, r"no non-empty assistant turn \(roles \['user'\]\)"),
        ({"messages": [{"content": "w1"}]}, r"turn 0: missing 'role'"),
        ({"messages": [{"role": "assistant", "content": None}]}, r"turn 0 \(assistant\): 'content'.*string"),
        ({"messages": ["w1"]}, "turn 0: expected an object"),
        ({"instruction": "w1", "output": ""}, "'output' is empty"),
        ({"instruction": 3, "output": "w1"}, "'instruction' must be a string"),
        ({"instruction": "w1", "input": 3, "output": "w1"}, "'input' must be a string"),
    ],
)
def test_chat_and_instruction_field_errors(tmp_path, rec, pattern):
    p = write_jsonl(tmp_path / "e.jsonl", [rec])
    with pytest.raises(DataFormatError, match=pattern):
        load_records(p)


def test_missing_field_named_for_later_record(tmp_path):
    p = write_jsonl(
        tmp_path / "e.jsonl", [{"instruction": "w1", "output": "w2"}, {"instruction": "w3", "outptu": "w4"}]
    )
    with pytest.raises(
        DataFormatError, match=r"line 2: unrecognised record.*kind 'instruction' \(line 1\).*\['output'\]"
    ):
        load_records(p)


# ---------------------------------------------------------------- on-disk formats


def test_json_array_and_json_lines(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": "w1"}, {"text": "w2"}]), encoding="utf-8")
    d = load_data(str(arr))
    assert d.source_format == "json" and len(d.records) == 2
    lines = write_jsonl(tmp_path / "l.json", [{"text": "w1"}])
    assert load_records(lines) == [{"text": "w1"}]
    (tmp_path / "bad.json").write_text('[{"text": "w1"}, 3]', encoding="utf-8")
    with pytest.raises(DataFormatError, match="item 1: expected a JSON object"):
        load_records(str(tmp_path / "bad.json"))


def test_csv_chat_and_instruction(tmp_path):
    import csv

    p = tmp_path / "c.csv"
    with open(p, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["w1", "", "w2"])
        w.writerow(["w3", "w4", "w5"])
    assert [r["prompt"] for r in load_records(str(p))] == ["w1", "w3\n\nw4"]
    q = tmp_path / "m.csv"
    with open(q, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["messages"])
        w.writerow([json.dumps(CHAT)])
    assert load_data(str(q)).records[0]["messages"] == CHAT


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": CHAT, "source": "a"}, {"messages": CHAT[1:3], "source": None}]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "c.parquet"))
    d = load_data(str(tmp_path / "c.parquet"))
    assert d.kind == "chat" and d.source_format == "parquet"
    assert d.records == [{"messages": CHAT, "source": "a"}, {"messages": CHAT[1:3]}]  # null read as absent
    # a column that is null in some rows, as Parquet writes a union of schemas
    pq.write_table(
        pa.Table.from_pylist([{"text": "w1", "prompt": None}, {"text": None, "prompt": "w2"}]),
        str(tmp_path / "m.parquet"),
    )
    with pytest.raises(DataFormatError, match="row 1: unrecognised record with fields \\['prompt'\\]"):
        load_records(str(tmp_path / "m.parquet"))
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(DataFormatError, match="not a readable Parquet file"):
        load_records(str(tmp_path / "x.parquet"))


def test_datasets_folder_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "w1", "input": "w2", "output": "w3"}, {"instruction": "w4", "input": "", "output": "w5"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "alpaca"))
    d = load_data(str(tmp_path / "alpaca"))
    assert d.kind == "instruction" and d.source_format == "datasets"
    assert d.records == [{"prompt": "w1\n\nw2", "response": "w3"}, {"prompt": "w4", "response": "w5"}]
    datasets.Dataset.from_list([{"messages": CHAT}]).save_to_disk(str(tmp_path / "chat"))
    assert load_data(str(tmp_path / "chat")).records == [{"messages": CHAT}]
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataFormatError, match="not one written by `datasets.save_to_disk`.*accepted inputs"):
        load_records(str(tmp_path / "plain"))


def test_hub_id_needs_network_permission(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(DataFormatError, match="no such file or folder.*--allow-network"):
        load_records("someone/some-data")
    calls = []

    def fake_load_dataset(name, split):  # never the network in tests
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "w1", "completion": "w2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    d = load_data("someone/some-data:train[:10]", allow_network=True)
    assert calls == [("someone/some-data", "train[:10]")]
    assert d.kind == "instruction" and d.source_format == "hub" and d.path == "someone/some-data:train[:10]"
    load_data("someone/some-data", allow_network=True)
    assert calls[-1] == ("someone/some-data", "train")
    # a local file name is never taken for a Hub id
    with pytest.raises(DataFormatError, match="no such file or folder$"):
        load_records(str(tmp_path / "missing.jsonl"), allow_network=True)


# ---------------------------------------------------------------- loss masks


def test_chat_loss_on_assistant_turns_with_template(tok_tpl):
    ex = encode_chat([{"messages": CHAT}], tok_tpl)[0]
    toks = tok_tpl.convert_ids_to_tokens(ex["input_ids"])
    assert toks[:3] == ["[EOS]", "[UNK]", "w90"]  # the template's layout ([UNK]: the role names)
    assert trained(tok_tpl, ex) == ["w3", "w4", "w6"]
    # every trained position is the token itself, aligned with input_ids
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(ex["labels"], ex["input_ids"]))
    every = encode_chat([{"messages": CHAT}], tok_tpl, DataConfig(loss_on="all"))[0]
    assert every["labels"] == every["input_ids"] == ex["input_ids"]


def test_chat_fallback_template_without_chat_template(tok):
    assert not tok.chat_template
    ex = encode_chat([{"messages": CHAT}], tok)[0]
    toks = tok.convert_ids_to_tokens(ex["input_ids"])
    # "system: w90\nuser: w1 w2\nassistant: w3 w4[EOS]\n..." ('system', 'user', ':' are not in the vocabulary)
    assert toks == ["[UNK]", "[UNK]", "w90", "[UNK]", "[UNK]", "w1", "w2", "[UNK]", "[UNK]", "w3", "w4", "[EOS]",
                    "[UNK]", "[UNK]", "w5", "[UNK]", "[UNK]", "w6", "[EOS]"]  # fmt: skip
    assert trained(tok, ex) == ["w3", "w4", "[EOS]", "w6", "[EOS]"]
    tpl = tiny_tokenizer()
    tpl.chat_template = TEMPLATE
    assert encode_chat([{"messages": CHAT}], tpl, DataConfig(use_chat_template=False)) == [ex]


def test_chat_truncation_and_drop(tok):
    full = encode_chat([{"messages": CHAT}], tok)[0]
    cut = encode_chat([{"messages": CHAT}], tok, DataConfig(max_length=11))[0]
    assert cut["input_ids"] == full["input_ids"][:11] and trained(tok, cut) == ["w3", "w4"]
    with pytest.warns(UserWarning, match="dropped 1 of 2 chat records"):
        out = encode_chat([{"messages": CHAT}, {"messages": CHAT[1:3]}], tok, DataConfig(max_length=8))
    assert len(out) == 1  # the short conversation's assistant turn fits, the long one's does not


def test_chat_system_prompt_added_only_when_missing(tok_tpl):
    cfg = DataConfig(system_prompt="w50")
    ex = encode_chat([{"messages": CHAT[1:3]}], tok_tpl, cfg)[0]
    assert tok_tpl.convert_ids_to_tokens(ex["input_ids"])[:3] == ["[EOS]", "[UNK]", "w50"]
    ex = encode_chat([{"messages": CHAT}], tok_tpl, cfg)[0]
    assert "w50" not in tok_tpl.convert_ids_to_tokens(ex["input_ids"])


def test_single_turn_chat_equals_instruction(tok_tpl):
    chat = encode_chat([{"messages": CHAT[1:3]}], tok_tpl)[0]
    ins = encode_instruction([{"prompt": "w1 w2", "response": "w3 w4"}], tok_tpl)[0]
    assert chat == ins


def test_instruction_loss_on_output_and_all(tmp_path, tok_tpl):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "w1", "input": "w2", "output": "w3 w4"}])
    d = load_data(p)
    ex = encode_records(d.records, tok_tpl, DataConfig(), kind=d.kind)[0]
    assert trained(tok_tpl, ex) == ["w3", "w4"]
    assert "w2" in tok_tpl.convert_ids_to_tokens(ex["input_ids"])  # the input is part of the prompt
    ex = encode_records(d.records, tok_tpl, DataConfig(loss_on="all"), kind=d.kind)[0]
    assert ex["labels"] == ex["input_ids"]
    with pytest.raises(DataFormatError, match="loss_on"):
        DataConfig(loss_on="prompt")  # type: ignore[arg-type]


def test_encode_records_detects_chat(tok):
    ex = encode_records([{"messages": CHAT[1:3]}], tok)[0]
    assert trained(tok, ex) == ["w3", "w4", "[EOS]"]


def test_template_that_rewrites_history_is_refused(tok):
    # drops every assistant turn but the last: the beginning is no longer a prefix of the whole
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }} {% endif %}"
        "{% endfor %}{% if add_generation_prompt %}[EOS] {% endif %}"
    )
    with pytest.raises(DataFormatError, match="prefix.*--no-chat-template.*--loss-on all"):
        encode_chat([{"messages": CHAT}], tok)
    every = encode_chat([{"messages": CHAT}], tok, DataConfig(loss_on="all"))[0]
    assert every["labels"] == every["input_ids"] and every["input_ids"]


@pytest.mark.slow
def test_smollm2_chat_masks_assistant_turns():
    """With the real SmolLM2-Instruct template, the trained spans are exactly each answer and its end-of-turn."""
    from guardedp2p.data.check import load_tokenizer

    try:
        real = load_tokenizer("default")
    except ConfigError as exc:
        pytest.skip(str(exc))
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ]
    ex = encode_chat([{"messages": msgs}], real, DataConfig(max_length=512))[0]
    spans, cur = [], []
    for i, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            spans, cur = [*spans, real.decode(cur)], []
    spans += [real.decode(cur)] if cur else []
    assert spans == ["4.<|im_end|>\n", "6, of course.<|im_end|>\n"]
    single = encode_chat([{"messages": msgs[:2]}], real, DataConfig())[0]
    assert single == encode_instruction([{"prompt": "What is 2+2?", "response": "4."}], real, DataConfig())[0]
