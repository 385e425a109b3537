"""guardedp2p.data.check: the pre-flight report (format, kind, fields, lengths, truncation) and its errors, the
tokenizer-only loader, and the data fingerprint a run's summary records."""

from __future__ import annotations

import hashlib
import json

import pytest

from guardedp2p.data import DataConfig, DataFormatError, FieldMapping, demo_paths
from guardedp2p.data.check import check_data, data_fingerprint, load_tokenizer
from guardedp2p.errors import ConfigError
from tests.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, recs) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs), encoding="utf-8")
    return str(path)


def text_recs(lengths):
    return [{"text": " ".join(f"w{i}" for i in range(n))} for n in lengths]


def test_check_text_with_tokenizer(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", text_recs([3, 5, 9]))
    r = check_data(p, tokenizer=tok, max_length=6, tokenizer_name="tiny")
    # each record is its words plus EOS: 4, 6, 10 tokens
    assert (r.kind, r.records, r.source_format, r.fields) == ("lm", 3, "jsonl", {"text": "text"})
    assert (r.lengths.unit, r.lengths.min, r.lengths.median, r.lengths.max) == ("tokens", 4, 6, 10)
    assert (r.max_length, r.truncated, r.dropped, r.loss_tokens) == (6, 1, 0, 4 + 6 + 6)
    assert r.sha256 == hashlib.sha256(open(p, "rb").read()).hexdigest()
    assert r.trainable and any("1 of 3 records are longer than --max-length 6" in w for w in r.warnings)
    text = r.format_text()
    assert "3 text records (jsonl)" in text and "min 4, median 6, max 10" in text and "(tiny)" in text
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d and d["lengths"] == {"unit": "tokens", "min": 4, "median": 6.0, "max": 10}


def test_check_without_tokenizer_reports_characters(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}, {"text": "abcdefg"}])
    r = check_data(p)
    assert (r.lengths.unit, r.lengths.min, r.lengths.max) == ("characters", 3, 7)
    assert r.truncated is None and r.max_length is None and r.tokenizer is None
    assert "characters, not tokens" in r.format_text()


def test_check_chat_counts_assistant_loss_and_drops(tmp_path, tok):
    long_user = " ".join(f"w{i}" for i in range(20))
    recs = [
        {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3"}]},
        {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "w4"}]},
    ]
    p = write_jsonl(tmp_path / "c.jsonl", recs)
    r = check_data(p, tokenizer=tok, max_length=12, mapping=FieldMapping())
    # simple layout: "user: w1\nassistant: w2 w3[EOS]\n" -> 8 tokens (user : w1 assistant : w2 w3 [EOS])
    assert (
        r.kind == "chat"
        and r.lengths.min == 8
        and r.lengths.max == 26
        and r.truncated == 1
        and r.dropped == 1
        and r.loss_tokens == 3
    )
    assert r.loss_on == "assistant turns" and "'role: content'" in r.rendering
    assert any("1 records keep no loss token" in w for w in r.warnings)
    every = check_data(p, tokenizer=tok, max_length=12, config=DataConfig(loss_on="all"))
    assert every.dropped == 0 and every.loss_tokens == 8 + 12 and every.loss_on == "every token"


def test_check_instruction_mapping_and_mc(tmp_path, tok):
    p = write_jsonl(tmp_path / "i.jsonl", [{"q": "w1", "a": "w2"}])
    r = check_data(p, tokenizer=tok, mapping=FieldMapping(instruction_field="q", output_field="a"))
    assert r.kind == "instruction" and r.fields == {"instruction": "q", "output": "a"} and r.loss_tokens == 2
    mc = check_data(demo_paths().eval_mc)
    assert mc.kind == "mc" and not mc.trainable and "evaluation" in mc.warnings[0]


def test_check_lists_bad_records_with_lines(tmp_path):
    lines = [
        {"instruction": "w1", "output": "w2"},
        {"instruction": "w1", "outptu": "w2"},
        {"instruction": "w1", "output": ""},
        {"text": "w1"},
    ]
    p = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataFormatError) as ei:
        check_data(p)
    msg = str(ei.value)
    assert isinstance(ei.value, ConfigError) and "3 bad record(s)" in msg
    assert "line 2: unrecognised record" in msg and "lacks field(s) ['output']" in msg
    assert "line 3: field 'output' is empty" in msg
    assert "line 4: record with fields ['text'] is of kind 'lm'" in msg
    assert msg.count("accepted schemas") == 1  # said once, at the end
    p = write_jsonl(tmp_path / "j.jsonl", [{"text": "w1"}, "{oops"])
    with pytest.raises(DataFormatError, match=r"line 2: invalid JSON .*each line must be one JSON object"):
        check_data(p)
    with pytest.raises(DataFormatError, match="unsupported file type '.txt'.*accepted inputs: .jsonl"):
        (tmp_path / "x.txt").write_text("w1")
        check_data(str(tmp_path / "x.txt"))


def test_check_names_record_whose_template_fails(tmp_path):
    t = tiny_tokenizer()
    t.chat_template = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}"
    msgs = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs + msgs}])
    with pytest.raises(DataFormatError, match=r"c.jsonl, line 1: the chat template"):
        check_data(p, tokenizer=t)


def test_data_fingerprint_file_and_folder(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", text_recs([2, 3]))
    fp = data_fingerprint(p)
    assert fp == {"path": p, "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest(), "records": 2}
    write_jsonl(tmp_path / "t.jsonl", text_recs([2, 4]))
    assert data_fingerprint(p)["sha256"] != fp["sha256"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(text_recs([2, 3, 4])).save_to_disk(str(tmp_path / "ds"))
    a = data_fingerprint(str(tmp_path / "ds"))
    assert a["records"] == 3 and a == data_fingerprint(str(tmp_path / "ds"))
    demo = data_fingerprint(demo_paths().train)
    assert demo["records"] == 300 and len(demo["sha256"]) == 64


def test_load_tokenizer_from_tokenizer_folder(tmp_path, tok):
    tok.save_pretrained(str(tmp_path / "tk"))
    loaded = load_tokenizer(str(tmp_path / "tk"))
    assert loaded("w1 w2")["input_ids"] == tok("w1 w2")["input_ids"] and loaded.padding_side == "right"
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
