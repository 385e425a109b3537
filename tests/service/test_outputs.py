"""Portable, traceable outputs (issue 21): the adapter names a base model stock ``AutoPeftModelForCausalLM`` loads
(a folder, or the export of the embedded default), ``guardedp2p model export`` writes a plain Hugging Face folder,
and ``summary.json`` says which data trained the run (file, SHA-256, records; or the demo records)."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from guardedp2p.service.client import TuneOptions, describe_data, prepare_client, tune
from guardedp2p.service.export import DEFAULT_NOTE, export_model, point_adapter_at, portable_base, recorded_export
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel
from tests.protocol_helpers import provider_app
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer, write_text_records


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Exports are remembered under GUARDEDP2P_CACHE: never the user's real cache."""
    monkeypatch.setenv("GUARDEDP2P_CACHE", str(tmp_path / "cache"))


def _saved_model(tmp_path):
    model = tiny_model("llama")
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model, folder


def test_adapter_of_a_folder_model_loads_with_auto_peft_and_summary_names_the_data(tmp_path):
    from peft import AutoPeftModelForCausalLM

    model, folder = _saved_model(tmp_path)
    data = write_text_records(tmp_path / "train.jsonl", n=24, distinct=3)
    train = TrainConfig(steps=2, batch_size=4, warmup_steps=0, max_length=16, lora_r=4, lora_alpha=8)
    opts = TuneOptions(model=str(folder), data=str(data), out=str(tmp_path / "run"), train=train, progress=False)
    client = prepare_client(opts, model=copy.deepcopy(model), tokenizer=tiny_tokenizer())
    app = provider_app(model)
    summary = tune(opts, lambda: InProcClientChannel(app), client=client)

    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(folder.resolve())
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "run" / "adapter"))
    ids = torch.tensor([[1, 5, 6, 7]])
    assert peft_model(input_ids=ids).logits.shape == (1, 4, model.config.vocab_size)
    assert "AutoPeftModelForCausalLM" in (tmp_path / "run" / "adapter" / "README.md").read_text()

    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["data"] == summary["data"]
    assert written["data"]["source"] == "file" and written["data"]["records"] == 24
    assert written["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_without_data_the_summary_says_demo():
    from guardedp2p.data.demo import demo_paths

    info = describe_data(TuneOptions(data=None))
    assert info["source"] == "demo" and info["path"] == demo_paths().train and info["records"] > 100
    assert info["eval"]["kind"] == "mc"


def test_default_base_is_the_recorded_export_else_a_note(tmp_path, monkeypatch):
    assert recorded_export() is None and portable_base("default") == DEFAULT_NOTE
    assert "guardedp2p model export default" in DEFAULT_NOTE
    export = tmp_path / "exported"
    export.mkdir()
    (export / "config.json").write_text("{}")
    from guardedp2p.service import export as export_mod

    export_mod._record_export("default", export)
    assert portable_base("default") == str(export.resolve())
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "default"}))
    point_adapter_at(adapter, portable_base("default"))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(export.resolve())


def test_export_writes_a_folder_stock_transformers_loads_with_the_same_fingerprint(tmp_path):
    from transformers import AutoModelForCausalLM

    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.split import SplitConfig

    model, folder = _saved_model(tmp_path)
    out = tmp_path / "export"
    exported = export_model(str(folder), out)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(exported.files)
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    split = SplitConfig(2, 2)
    assert model_fingerprint(loaded, split) == model_fingerprint(model, split)
    with pytest.raises(Exception, match="not empty"):
        export_model(str(folder), out)


@pytest.mark.slow
def test_default_model_export_loads_with_stock_transformers_and_adapters_point_at_it(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from typer.testing import CliRunner

    from guardedp2p.cli.main import app
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.lora import LoraSettings, attach_lora, save_adapter
    from guardedp2p.engine.split import SplitConfig, build_client_parts

    base, _ = load_causal_lm("default", device="cpu")
    split = SplitConfig(2, 2)
    parts = build_client_parts(copy.deepcopy(base), split)
    attach_lora(parts.bottom, parts.top, LoraSettings(r=4, alpha=8))
    adapter = save_adapter(parts.bottom, parts.top, tmp_path / "adapter", base_model_name_or_path=DEFAULT_NOTE)

    folder = tmp_path / "smollm2"
    res = CliRunner().invoke(app, ["model", "export", "default", str(folder), "--adapter", str(adapter), "--json"])
    assert res.exit_code == 0, res.output
    assert recorded_export() == folder.resolve()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert peft_model.peft_config["default"].base_model_name_or_path == str(folder.resolve())
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model_fingerprint(plain, split) == model_fingerprint(base, split)
