"""Client-side LoRA: placement, trainability, and adapters that round-trip with stock PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_models import ARCHES, N_LAYERS, tiny_batch, tiny_model

from guardedp2p.engine.arch import get_arch
from guardedp2p.engine.lora import (
    AdapterError,
    LoraSettings,
    attach_lora,
    count_parameters,
    load_adapter_into_parts,
    lora_state_dict,
    save_adapter,
    trainable_parameters,
)
from guardedp2p.engine.split import SplitConfig, build_client_parts, build_trunk, loss_fn
from guardedp2p.errors import ConfigError

CFG = SplitConfig(2, 2)
CLIENT_LAYERS = CFG.client_layers(N_LAYERS)  # [0, 1, 4, 5]


def _layer_of(name: str) -> int:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    raise AssertionError(name)


def _randomize_b(*parts, seed=3):
    g = torch.Generator().manual_seed(seed)
    for part in parts:
        for n, p in part.named_parameters():
            if "lora_B" in n:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _client(arch, seed=0):
    model = tiny_model(arch, seed=seed)
    return model, build_client_parts(model, CFG), build_trunk(model, CFG)


def _eval_loss(cp, trunk, batch):
    ids, mask, labels = batch
    with torch.no_grad():
        return loss_fn(cp.top(trunk(cp.bottom(ids, mask), mask), mask), labels)


@pytest.mark.parametrize("arch", ARCHES)
def test_lora_only_on_client_layers_and_only_lora_trains(arch):
    model, cp, trunk = _client(arch)
    params = attach_lora(cp.bottom, cp.top, LoraSettings(r=4))
    names = [n for part in cp for n, p in part.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {_layer_of(n) for n in names} == set(CLIENT_LAYERS)
    targets = get_arch(model).lora_targets
    assert {n.split(".lora_")[0].split(".")[-1] for n in names} == set(targets)
    assert len(params) == len(names) == len(trainable_parameters(cp.bottom, cp.top))
    assert not any("lora_" in n for n, _ in trunk.named_parameters())
    trainable, total = count_parameters(cp.bottom, cp.top)
    assert 0 < trainable < total


def test_attach_flags_and_layer_selection():
    _, cp, _ = _client("llama")
    attach_lora(cp.bottom, cp.top, LoraSettings(), bottom=False)
    assert not any(p.requires_grad for p in cp.bottom.parameters())
    assert {_layer_of(n) for n, p in cp.top.named_parameters() if p.requires_grad} == {4, 5}

    _, cp, _ = _client("llama")
    attach_lora(cp.bottom, cp.top, LoraSettings(target_modules=["q_proj"]), layers=[1, 5])
    names = [n for part in cp for n, p in part.named_parameters() if p.requires_grad]
    assert {_layer_of(n) for n in names} == {1, 5} and all(".q_proj." in n for n in names)

    _, cp, _ = _client("llama")
    with pytest.raises(ConfigError, match="not client layers"):
        attach_lora(cp.bottom, cp.top, LoraSettings(), layers=[2])
    with pytest.raises(ConfigError, match="rank"):
        attach_lora(cp.bottom, cp.top, LoraSettings(r=0))


@pytest.mark.parametrize("arch", ARCHES)
def test_adapter_from_split_loads_into_unsplit_with_stock_peft(arch, tmp_path):
    from peft import PeftModel

    batch = tiny_batch()
    _, cp, trunk = _client(arch)
    attach_lora(cp.bottom, cp.top, LoraSettings(r=4, alpha=8))
    _randomize_b(cp.bottom, cp.top)  # as after training: the adapter changes the model
    split_loss = _eval_loss(cp, trunk, batch)
    out = save_adapter(cp.bottom, cp.top, tmp_path / "ad", base_model_name_or_path="tiny-" + arch)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["layers_to_transform"] == CLIENT_LAYERS
    assert conf["base_model_name_or_path"] == "tiny-" + arch and conf["task_type"] == "CAUSAL_LM"

    base = tiny_model(arch)
    ids, mask, labels = batch
    with torch.no_grad():
        base_loss = base(input_ids=ids, attention_mask=mask, labels=labels).loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = PeftModel.from_pretrained(base, str(out))
    assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()]
    # weights really loaded: every LoRA tensor of the full model equals the split one
    saved = lora_state_dict(cp.bottom, cp.top)
    loaded = {n.replace(".default", ""): p for n, p in full.named_parameters() if "lora_" in n}
    assert set(loaded) == set(saved)
    for n, t in saved.items():
        torch.testing.assert_close(loaded[n], t, rtol=0, atol=0)
    with torch.no_grad():
        full_loss = full(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(full_loss, split_loss, rtol=1e-6, atol=0)
    assert abs(full_loss.item() - base_loss.item()) > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_roundtrip_into_fresh_parts_and_from_full_model(arch, tmp_path):
    from peft import LoraConfig, get_peft_model

    batch = tiny_batch()
    _, cp, trunk = _client(arch)
    attach_lora(cp.bottom, cp.top, LoraSettings(r=4))
    _randomize_b(cp.bottom, cp.top)
    want = _eval_loss(cp, trunk, batch)
    save_adapter(cp.bottom, cp.top, tmp_path / "a")

    _, cp2, trunk2 = _client(arch)
    report = load_adapter_into_parts(cp2.bottom, cp2.top, tmp_path / "a")
    assert sum(report.loaded.values()) == len(lora_state_dict(cp.bottom, cp.top)) and not report.ignored_keys
    torch.testing.assert_close(_eval_loss(cp2, trunk2, batch), want, rtol=1e-6, atol=0)
    assert not any(p.requires_grad for part in cp2 for p in part.parameters())

    # an adapter trained on the *full* model (all layers) loads too; trunk-layer tensors are reported, not used
    spec = get_arch(tiny_model(arch))
    full = get_peft_model(
        tiny_model(arch),
        LoraConfig(
            r=4, target_modules=list(spec.lora_targets), fan_in_fan_out=spec.fan_in_fan_out, task_type="CAUSAL_LM"
        ),
    )
    _randomize_b(full, seed=9)
    full.save_pretrained(str(tmp_path / "full"))
    ids, mask, labels = batch
    _, cp3, trunk3 = _client(arch)
    report = load_adapter_into_parts(cp3.bottom, cp3.top, tmp_path / "full", is_trainable=True)
    assert report.ignored_keys and {_layer_of(k) for k in report.ignored_keys} == {2, 3}
    assert all(p.requires_grad == ("lora_" in n) for part in cp3 for n, p in part.named_parameters())
    # client layers now carry exactly the full model's LoRA tensors
    full_sd = {n.replace(".default", ""): p for n, p in full.named_parameters() if "lora_" in n}
    for k, t in lora_state_dict(cp3.bottom, cp3.top).items():
        torch.testing.assert_close(t, full_sd[k], rtol=0, atol=0)


def test_load_adapter_refuses_incomplete_or_pickled(tmp_path):
    _, cp, _ = _client("llama")
    attach_lora(cp.bottom, cp.top, LoraSettings(), layers=[0, 1])  # bottom only
    save_adapter(cp.bottom, cp.top, tmp_path / "bottom_only")
    _, cp2, _ = _client("llama")
    attach_lora(cp2.bottom, cp2.top, LoraSettings())  # expects LoRA on top layers too
    with pytest.raises(AdapterError, match="lacks"):
        load_adapter_into_parts(cp2.bottom, cp2.top, tmp_path / "bottom_only")

    (tmp_path / "pickled").mkdir()
    (tmp_path / "bottom_only" / "adapter_config.json").rename(tmp_path / "pickled" / "adapter_config.json")
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(AdapterError, match="safetensors"):
        load_adapter_into_parts(cp2.bottom, cp2.top, tmp_path / "pickled")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter_into_parts(cp2.bottom, cp2.top, tmp_path / "nothing")


def test_save_without_lora_is_an_error(tmp_path):
    _, cp, _ = _client("opt")
    with pytest.raises(AdapterError, match="attach_lora"):
        save_adapter(cp.bottom, cp.top, tmp_path / "x")


def test_one_training_step_moves_loss_and_adapter_reloads(tmp_path):
    """Default init (B = 0) + one SGD step: the adapter becomes non-trivial and survives save/load."""
    batch = tiny_batch()
    ids, mask, labels = batch
    _, cp, trunk = _client("qwen2")
    for p in trunk.parameters():
        p.requires_grad_(False)
    params = attach_lora(cp.bottom, cp.top, LoraSettings(r=4))
    before = _eval_loss(cp, trunk, batch)
    opt = torch.optim.SGD(params, lr=0.5)
    loss = loss_fn(cp.top(trunk(cp.bottom(ids, mask), mask), mask), labels)
    loss.backward()
    opt.step()
    after = _eval_loss(cp, trunk, batch)
    assert after < before
    save_adapter(cp.bottom, cp.top, tmp_path / "a")
    _, cp2, trunk2 = _client("qwen2")
    load_adapter_into_parts(cp2.bottom, cp2.top, tmp_path / "a")
    torch.testing.assert_close(_eval_loss(cp2, trunk2, batch), after, rtol=1e-6, atol=0)


def test_top_only_adapter_gradfree_style(tmp_path):
    """Gradfree freezes the bottom: the adapter then holds only top layers and still loads on the full model."""
    from peft import PeftModel

    batch = tiny_batch()
    _, cp, trunk = _client("mistral")
    attach_lora(cp.bottom, cp.top, LoraSettings(r=2), bottom=False)
    _randomize_b(cp.top)
    want = _eval_loss(cp, trunk, batch)
    out = save_adapter(cp.bottom, cp.top, tmp_path / "top")
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == [4, 5]
    full = PeftModel.from_pretrained(tiny_model("mistral"), str(out))
    ids, mask, labels = batch
    with torch.no_grad():
        torch.testing.assert_close(
            full(input_ids=ids, attention_mask=mask, labels=labels).loss, want, rtol=1e-6, atol=0
        )
    _, cp2, trunk2 = _client("mistral")
    report = load_adapter_into_parts(cp2.bottom, cp2.top, out)
    assert report.loaded == {"client top": len(lora_state_dict(cp.bottom, cp.top))}
    torch.testing.assert_close(_eval_loss(cp2, trunk2, batch), want, rtol=1e-6, atol=0)


def _perturb_top_blocks(cp, seed=5):
    """As after --top-train blocks: the top's block weights and final norm moved (LoRA B too)."""
    from guardedp2p.train.trainer import unfreeze_top_blocks

    names = unfreeze_top_blocks(cp.top, cp.bottom)
    g = torch.Generator().manual_seed(seed)
    params = dict(cp.top.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=g) * 0.05)
    return names


@pytest.mark.parametrize("bottom_lora", [False, True], ids=["gradfree", "online"])
def test_top_blocks_trained_in_full_save_as_peft_modules_to_save(bottom_lora, tmp_path):
    """--top-train blocks: the adapter carries the top blocks (LoRA merged in) as modules_to_save, loads with stock
    PEFT on the full model and into fresh client parts, and computes what the tuned split computed."""
    from peft import PeftModel

    batch = tiny_batch()
    _, cp, trunk = _client("llama")
    attach_lora(cp.bottom, cp.top, LoraSettings(r=2, alpha=4), bottom=bottom_lora)
    _randomize_b(cp.bottom, cp.top)
    assert _perturb_top_blocks(cp)
    want = _eval_loss(cp, trunk, batch)
    out = save_adapter(cp.bottom, cp.top, tmp_path / "ad", base_model_name_or_path="tiny", top_blocks=True)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["layers_to_transform"] == [0, 1] and conf["modules_to_save"] == [
        "model.layers.4",
        "model.layers.5",
        "model.norm",
    ]
    full = PeftModel.from_pretrained(tiny_model("llama"), str(out))
    ids, mask, labels = batch
    with torch.no_grad():
        got = full(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    _, cp2, trunk2 = _client("llama")
    report = load_adapter_into_parts(cp2.bottom, cp2.top, out)
    assert report.loaded["top_blocks"] > 0 and not report.ignored_keys
    torch.testing.assert_close(_eval_loss(cp2, trunk2, batch), want, rtol=1e-5, atol=1e-6)
    # the LoRA-only adapter of the same parts misses the blocks: a different model
    lora_only = save_adapter(cp.bottom, cp.top, tmp_path / "lora-only")
    _, cp3, trunk3 = _client("llama")
    load_adapter_into_parts(cp3.bottom, cp3.top, lora_only)
    assert abs(_eval_loss(cp3, trunk3, batch).item() - want.item()) > 1e-4


def test_top_blocks_adapter_for_another_split_is_refused(tmp_path):
    _, cp, _ = _client("llama")
    attach_lora(cp.bottom, cp.top, LoraSettings(r=2), bottom=False)
    _perturb_top_blocks(cp)
    out = save_adapter(cp.bottom, cp.top, tmp_path / "ad", top_blocks=True)
    model = tiny_model("llama")
    other = build_client_parts(model, SplitConfig(2, 1))
    with pytest.raises(AdapterError, match="another split|does not hold"):
        load_adapter_into_parts(other.bottom, other.top, out)
