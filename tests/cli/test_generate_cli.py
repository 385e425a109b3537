"""``client generate`` and ``client chat`` as real processes over CURVE on 127.0.0.1 (tiny llama saved as a Hugging
Face folder, with a chat template): the tokens equal the unsplit model's ``generate`` with the same adapter, batch
mode prints one JSON result per line, the chat REPL streams answers, and bad input ends in a clear message."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from guardedp2p.cli.demo import ProviderProcess, free_port
from guardedp2p.cli.main import app
from guardedp2p.crypto.keys import generate_keypair
from guardedp2p.engine.lora import save_adapter
from tests.protocol_helpers import client_parts
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer

CLI = [sys.executable, "-m", "guardedp2p.cli.main"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w99 {% endif %}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root / "model")
    parts, _ = client_parts(model)
    save_adapter(parts.bottom, parts.top, root / "adapter")
    keys = root / "keys"
    for name in ("provider", "client"):
        generate_keypair(keys, name)
    return root, model, tok, keys


@pytest.fixture(scope="module")
def provider(world):
    root, _, _, keys = world
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = ["--model", str(root / "model"), "--bind", endpoint, "--keys", str(keys), "--name", "provider"]
    args += ["--allow", str(keys / "client.key"), "--protocols", "online,gradfree"]
    with ProviderProcess(args, root, ready_timeout=120) as p:
        yield endpoint, p


def _client_args(world, endpoint):
    root, _, _, keys = world
    return [
        "--connect",
        endpoint,
        "--provider-key",
        str(keys / "provider.key"),
        "--keys",
        str(keys),
        "--model",
        str(root / "model"),
        "--adapter",
        str(root / "adapter"),
        "--device",
        "cpu",
    ]


def _reference(model, adapter, prompt_ids, max_new):
    from peft import PeftModel

    ref = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    with torch.inference_mode():
        out = ref.generate(
            input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0
        )
    row = out[0, len(prompt_ids) :].tolist()
    return row[: row.index(2) + 1] if 2 in row else row


def test_generate_batch_mode_equals_unsplit_generate_over_curve(world, provider):
    root, model, tok, _ = world
    endpoint, _ = provider
    prompts = ["w1 w2 w3", "w40 w41", "w7 w8 w9 w10 w11"]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cmd = [*CLI, "client", "generate", "--prompts", str(root / "prompts.jsonl"), "--max-new-tokens", "12"]
    res = subprocess.run(cmd + _client_args(world, endpoint) + ["--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    results, cost = lines[:-1], lines[-1]["cost"]
    assert [r["index"] for r in results] == [0, 1, 2]
    for r, p in zip(results, prompts):
        assert r["tokens"] == _reference(model, root / "adapter", tok(p)["input_ids"], 12), p
    # the prompt step (3 rows x 5 positions) and then one position per row and step: 3 x 64 fp32 values + framing
    steps, position = cost["decode_steps"], 3 * 64 * 4
    assert steps == 11 and steps * position < cost["bytes_up"] < 5 * position + steps * (position + 400) + 1500


def test_generate_one_prompt_streams_text_and_chat_answers(world, provider):
    root, model, tok, _ = world
    endpoint, _ = provider
    cmd = [*CLI, "client", "generate", "--prompt", "w5 w6", "--max-new-tokens", "6", "--chat"]
    res = subprocess.run(cmd + _client_args(world, endpoint), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ids = tok("w5 w6 w99 ", add_special_tokens=False)["input_ids"]
    expected = tok.decode([t for t in _reference(model, root / "adapter", ids, 6) if t != 2], skip_special_tokens=True)
    assert res.stdout.strip() == expected.strip()
    assert "new token(s)" in res.stderr
    chat = subprocess.run(
        [*CLI, "client", "chat", "--max-new-tokens", "6", *_client_args(world, endpoint)],
        input="w5 w6\n/reset\nw1\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    answers = [line for line in chat.stdout.splitlines() if "model> " in line]
    assert len(answers) == 2 and answers[0].split("model> ")[-1].strip() == expected.strip()


def test_the_sessions_protection_applies_at_inference(world, provider):
    """--privacy / --noise act on generation as on training: dx on the input embeddings changes what the trunk
    computes, so the tokens leave the clean reference (dx at epsilon 0.1 replaces almost every input token)."""
    root, model, tok, _ = world
    endpoint, _ = provider
    prompts = ["w1 w2 w3", "w40 w41", "w7 w8 w9 w10 w11"]
    (root / "prompts-dx.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cmd = [*CLI, "client", "generate", "--prompts", str(root / "prompts-dx.jsonl"), "--max-new-tokens", "8"]
    (root / "public.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    cmd += ["--privacy", "balanced", "--public-text", str(root / "public.jsonl"), "--noise", "dx:0.1", "--json"]
    res = subprocess.run(cmd + _client_args(world, endpoint), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(x) for x in res.stdout.splitlines() if x.strip()][:-1]
    clean = [_reference(model, root / "adapter", tok(p)["input_ids"], 8) for p in prompts]
    assert [r["tokens"] for r in results] != clean


def test_bad_input_ends_in_a_clear_message(world, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["client", "generate", "--prompt", "x", "--protocol", "offline"])
    assert res.exit_code == 2 and "online or gradfree" in res.output
    res = runner.invoke(app, ["client", "generate"])
    assert res.exit_code == 2 and "exactly one of --prompt" in res.output
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    res = runner.invoke(app, ["client", "generate", "--prompts", str(bad)])
    assert res.exit_code == 2 and "p.jsonl:2" in res.output
    res = runner.invoke(app, ["client", "generate", "--prompt", "x", "--top-p", "0.5"])
    assert res.exit_code == 2 and "temperature" in res.output


def test_a_pseudonymised_adapter_encodes_prompts_and_decodes_answers(world, provider, tmp_path):
    """An adapter tuned with --pseudonymize (OUT/pseudonym.json and OUT/pseudonym.key beside OUT/adapter): the
    prompt the trunk sees carries the key's surrogate, so the tokens are the reference's for the *encoded* prompt,
    and the answer is decoded back; without its key the adapter is refused with a clear message."""
    import shutil

    from guardedp2p.privacy.pseudonym import FieldPseudonymizer, PseudonymSchema, read_key, save_schema

    root, model, tok, _ = world
    endpoint, _ = provider
    out = tmp_path / "run"
    shutil.copytree(root / "adapter", out / "adapter")
    schema = PseudonymSchema.from_mapping({"w3": ["w10", "w20", "w30", "w40"]})
    save_schema(schema, out / "pseudonym.json")
    # a key that moves w10, so the encoded prompt differs from the plain one
    key = next(
        bytes([i]) * 32 for i in range(64) if FieldPseudonymizer(schema, bytes([i]) * 32).forward["w3"]["w10"] != "w10"
    )
    (out / "pseudonym.key").write_text(key.hex() + "\n")
    coder = FieldPseudonymizer(schema, read_key(out / "pseudonym.key"))
    prompt = "w1 w3: w10 w11"
    sent = coder.encode(prompt)
    assert sent != prompt
    args = _client_args(world, endpoint)
    args[args.index(str(root / "adapter"))] = str(out / "adapter")
    cmd = [*CLI, "client", "generate", "--prompt", prompt, "--max-new-tokens", "6", "--json"]
    res = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (result,) = [json.loads(x) for x in res.stdout.splitlines() if x.strip()][:-1]
    assert result["tokens"] == _reference(model, out / "adapter", tok(sent)["input_ids"], 6)
    raw = tok.decode([t for t in result["tokens"] if t != 2], skip_special_tokens=True)
    assert result["text"] == coder.decode_continuation(sent, prompt, raw)
    chat = subprocess.run(
        [*CLI, "client", "chat", "--max-new-tokens", "6", *args],
        input=prompt + "\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    chat_ids = tok(sent + " w99 ", add_special_tokens=False)["input_ids"]
    chat_raw = tok.decode(
        [t for t in _reference(model, out / "adapter", chat_ids, 6) if t != 2], skip_special_tokens=True
    )
    (answer,) = [line.split("model> ")[-1] for line in chat.stdout.splitlines() if "model> " in line]
    assert answer.strip() == coder.decode(chat_raw).strip()
    (out / "pseudonym.key").unlink()
    res = CliRunner().invoke(app, ["client", "generate", "--prompt", prompt, *args])
    assert res.exit_code == 2 and "--pseudonym-key" in res.output
