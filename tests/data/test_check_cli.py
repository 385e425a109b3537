"""``guardedp2p data check``: the report as text and as JSON, mapping flags, errors with a clean exit code."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from guardedp2p.cli.main import app
from tests.tiny_tokenizer import tiny_tokenizer


def run(*argv: str):
    return CliRunner().invoke(app, ["data", "check", *argv])


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_data_check_json_with_tokenizer_and_mapping(tmp_path):
    tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    p = tmp_path / "qa.jsonl"
    p.write_text(
        "\n".join(json.dumps({"q": "w1 w2", "a": " ".join(["w3"] * n)}) for n in (1, 2, 9)) + "\n", encoding="utf-8"
    )
    res = run(str(p), "--model", str(tmp_path / "tok"), "--max-length", "8", "--json",
              "--instruction-field", "q", "--output-field", "a")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = last_json(res.output)
    assert out["ok"] and out["kind"] == "instruction" and out["records"] == 3 and out["source_format"] == "jsonl"
    assert out["fields"] == {"instruction": "q", "output": "a"}
    # plain layout: "w1 w2\n" + answer + [EOS] -> 2 + n + 1 tokens
    assert out["lengths"] == {"unit": "tokens", "min": 4, "median": 5.0, "max": 12}
    assert (out["max_length"], out["truncated"], out["dropped"]) == (8, 1, 0)
    assert out["loss_tokens"] == 2 + 3 + 6 and out["loss_on"] == "the output"
    every = last_json(run(str(p), "--model", str(tmp_path / "tok"), "--max-length", "8", "--json",
                          "--instruction-field", "q", "--output-field", "a", "--loss-on", "all").output)  # fmt: skip
    assert every["loss_tokens"] == 4 + 5 + 8


def test_data_check_text_output(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("body\nabc\nabcdef\n", encoding="utf-8")
    res = run(str(p), "--text-field", "body")
    assert res.exit_code == 0, res.output
    assert "2 text records (csv)" in res.output and "text <- 'body'" in res.output
    assert "min 3, median 4.5, max 6" in res.output


def test_data_check_errors_exit_2(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "w1"}]}\n', encoding="utf-8")
    res = run(str(p), "--json")
    assert res.exit_code == 2
    out = last_json(res.stdout)  # the CLI's --json error object (guardedp2p.cli.common.friendly_errors)
    assert out["ok"] is False and out["error"] == "DataFormatError" and out["exit_code"] == 2
    assert "line 1" in out["message"] and "no non-empty assistant turn" in out["message"]
    res = run(str(tmp_path / "missing.jsonl"))
    assert res.exit_code == 2 and "no such file or folder" in res.output
    res = run(str(p), "--data-kind", "sft")
    assert res.exit_code == 2 and "auto, text, chat, instruction, mc" in res.output
