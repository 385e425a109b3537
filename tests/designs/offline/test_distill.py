"""Emulator distillation (LM + 30 x RMS-normalised hidden MSE at the cut, arXiv 2302.04870): it lowers the
hidden-state error on held-out text, an interrupted and resumed run ends bit-identical to an uninterrupted one,
and the cache serves a finished length without recomputing and continues a shorter run to a longer one."""

from __future__ import annotations

import copy

import pytest
import torch

import guardedp2p.designs.offline.emulator as E
from guardedp2p.designs.offline.emulator import (
    DistillConfig,
    EmulatorConfig,
    build_emulator,
    distill_cache_key,
    distill_cached,
    distill_emulator,
    emulator_fidelity,
    model_digest,
    public_text_passages,
)
from guardedp2p.errors import ConfigError
from tests.tiny_models import tiny_model


def _examples(n=32, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 160, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def _middle(emu):
    return {k: v.clone() for k, v in emu.middle_state().items()}


def test_distillation_lowers_the_hidden_state_error_on_heldout_text():
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1))
    heldout = _examples(16, seed=99)  # never seen by the distillation
    before = emulator_fidelity(emu, model, heldout)
    distill_emulator(emu, model, _examples(), DistillConfig(steps=30, lr=3e-3, batch_size=8), progress=False)
    after = emulator_fidelity(emu, model, heldout)
    assert after["kd"] < 0.8 * before["kd"]
    assert after["loss_full"] == pytest.approx(before["loss_full"])  # the teacher is untouched
    assert after["ppl_ratio"] == pytest.approx(torch.tensor(after["loss_emulator"] - after["loss_full"]).exp().item())


def test_fidelity_of_an_emulator_that_keeps_every_block_is_exact():
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=2))  # 6 layers, 2/2 adapters: the whole middle
    f = emulator_fidelity(emu, model, _examples(8))
    assert f["kd"] == pytest.approx(0.0, abs=1e-10) and f["ppl_ratio"] == pytest.approx(1.0)


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, n):
    """Make the n+1-th distillation step raise, as a killed process would stop."""
    real = E.kd_loss
    calls = {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] > n:
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(E, "kd_loss", counting)


def test_interrupted_and_resumed_distillation_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    model = tiny_model("llama")
    cfg = DistillConfig(steps=8, lr=3e-3, batch_size=4, seed=3, warmup_steps=2, checkpoint_every=2)
    straight = build_emulator(model, EmulatorConfig(emulator_layers=1))
    distill_emulator(straight, copy.deepcopy(model), _examples(), cfg, progress=False)

    killed = build_emulator(model, EmulatorConfig(emulator_layers=1))
    with monkeypatch.context() as m:
        _kill_after(m, 5)  # dies after step 5; the last checkpoint is step 4
        with pytest.raises(_Killed):
            distill_cached(killed, model, _examples(), cfg, cache_dir=tmp_path, progress=False)
    resumed = build_emulator(model, EmulatorConfig(emulator_layers=1))  # a new process: fresh emulator
    s = distill_cached(resumed, model, _examples(), cfg, cache_dir=tmp_path, progress=False)
    assert s["steps"] == 8 and s["cached"] is False
    a, b = _middle(straight), _middle(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming"


def test_cache_serves_a_finished_length_and_continues_a_shorter_one(tmp_path, monkeypatch):
    model = tiny_model("llama")
    base = DistillConfig(steps=6, lr=3e-3, batch_size=4, seed=0, checkpoint_every=3)
    straight = build_emulator(model, EmulatorConfig(emulator_layers=1))
    distill_emulator(straight, copy.deepcopy(model), _examples(), base, progress=False)

    short = build_emulator(model, EmulatorConfig(emulator_layers=1))
    distill_cached(short, model, _examples(), DistillConfig(**{**base.__dict__, "steps": 3}), cache_dir=tmp_path)
    longer = build_emulator(model, EmulatorConfig(emulator_layers=1))
    s = distill_cached(longer, model, _examples(), base, cache_dir=tmp_path, progress=False)
    assert s["cached"] is False
    for k, v in _middle(straight).items():
        assert torch.equal(_middle(longer)[k], v), "continuing a 3-step run to 6 steps must equal a 6-step run"

    def boom(*a, **k):
        raise AssertionError("a cached length must not be recomputed")

    monkeypatch.setattr(E, "distill_emulator", boom)
    again = build_emulator(model, EmulatorConfig(emulator_layers=1))
    s = distill_cached(again, model, _examples(), base, cache_dir=tmp_path, progress=False)
    assert s["cached"] is True and again.info["distillation"]["steps"] == 6
    for k, v in _middle(straight).items():
        assert torch.equal(_middle(again)[k], v)


def test_cache_key_follows_model_layers_settings_and_data():
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1))
    d = model_digest(model)
    cfg = DistillConfig(steps=10)
    k = distill_cache_key(d, emu.layer_map, cfg, "data")
    assert k == distill_cache_key(d, emu.layer_map, DistillConfig(steps=99), "data")  # constant: steps share a folder
    assert k != distill_cache_key(d, emu.layer_map, DistillConfig(steps=10, schedule="cosine"), "data")
    assert k != distill_cache_key(d, emu.layer_map, DistillConfig(steps=10, lr=3e-4), "data")
    assert k != distill_cache_key(d, emu.layer_map, cfg, "other data")
    other = build_emulator(model, EmulatorConfig(emulator_layers=2))
    assert k != distill_cache_key(d, other.layer_map, cfg, "data")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[3].mlp.up_proj.weight[0, 0] += 1  # a middle block: outside the handshake fingerprint
    assert model_digest(changed) != d


def test_public_corpus_is_shipped_text_split_into_disjoint_train_and_heldout():
    train, held = public_text_passages("train"), public_text_passages("heldout")
    assert len(train) > 500 and len(held) > 50
    assert not set(train) & set(held)
    assert all(50 < len(p) <= 2000 for p in train[:50])
    with pytest.raises(ConfigError):
        public_text_passages("test")
    with pytest.raises(ConfigError):
        DistillConfig(schedule="linear").validate()


def test_provider_build_distils_on_the_public_corpus_once_and_then_loads_it(tmp_path):
    from guardedp2p.crypto.keys import generate_keypair, load_signing_key
    from guardedp2p.designs.offline.build import EmulatorBuildOptions, build_emulator_folder
    from tests.tiny_tokenizer import tiny_tokenizer

    generate_keypair(tmp_path / "keys", "provider")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    key = load_signing_key(tmp_path / "keys", "provider")

    def build(out):
        opts = EmulatorBuildOptions(
            out=str(tmp_path / out),
            emulator=EmulatorConfig(emulator_layers=1),
            distill=DistillConfig(steps=2, max_length=16, batch_size=2),
            distill_cache=str(tmp_path / "cache"),
            progress=False,
        )
        return build_emulator_folder(opts, model=model, tokenizer=tok, signing_key=key)

    first = build("emu1")["compression"]["distillation"]
    assert first["data"] == "builtin:python-docs" and first["cached"] is False and first["steps"] == 2
    second = build("emu2")["compression"]["distillation"]
    assert second["cached"] is True
    from safetensors.torch import load_file

    t1, t2 = (load_file(str(tmp_path / d / "emulator.safetensors")) for d in ("emu1", "emu2"))
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
