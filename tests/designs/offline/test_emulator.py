"""Emulator construction: the reference layer-drop formula, global-index placement (the emulator computes exactly
what the full model's kept blocks compute), weight-code round trips, and distillation."""

from __future__ import annotations

import copy

import pytest
import torch

from guardedp2p.crypto.keys import generate_keypair, load_signing_key
from guardedp2p.designs.offline.emulator import (
    DistillConfig,
    EmulatorConfig,
    build_emulator,
    distill_emulator,
    kd_loss,
    layer_map,
    load_emulator,
    save_emulator,
    uniform_drop_indices,
)
from guardedp2p.designs.offline.quantize import dequantize_state, dequantize_tensor, quantize_state, quantize_tensor
from guardedp2p.engine.arch import get_arch, get_path
from guardedp2p.errors import ConfigError
from tests.tiny_models import tiny_batch, tiny_model


# ------------------------------------------------------------------------------------------------ layer selection
def test_uniform_drop_matches_the_reference_table():
    # offsite-tuning (arXiv 2302.04870) layer-drop table: OPT-1.3B (N=24, l=r=2, M=20, k=8) and OPT-6.7B (N=32, M=28, k=18)
    assert uniform_drop_indices(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert uniform_drop_indices(28, 18) == [0, 2, 3, 5, 6, 8, 10, 11, 13, 14, 16, 17, 19, 21, 22, 24, 25, 27]
    lm = layer_map(24, 2, 2, 8)
    assert list(lm.middle_kept) == [2 + i for i in (0, 3, 5, 8, 11, 14, 16, 19)]
    assert lm.depth == 12 and lm.bottom == (0, 1) and lm.top == (22, 23)
    assert layer_map(32, 2, 2, 18).depth == 22
    assert layer_map(48, 2, 2, 16).depth == 20 and layer_map(30, 2, 2, 18).depth == 22


def test_uniform_drop_guards_k_equal_one_and_bad_k():
    assert uniform_drop_indices(20, 1) == [0]
    assert uniform_drop_indices(1, 1) == [0]
    assert uniform_drop_indices(7, 7) == list(range(7))  # k = M keeps everything; first and last always kept
    for m, k in [(20, 2), (20, 5), (26, 13)]:
        idx = uniform_drop_indices(m, k)
        assert idx[0] == 0 and idx[-1] == m - 1 and len(set(idx)) == k
    for bad in (0, 21, -1):
        with pytest.raises(ConfigError):
            uniform_drop_indices(20, bad)
    with pytest.raises(ConfigError):
        layer_map(6, 3, 3, 1)  # no middle left
    assert len(layer_map(30, 2, 2).middle_kept) == 13  # default: half of M = 26, rounded up
    assert len(layer_map(30, 2, 2, keep_fraction=0.7).middle_kept) == 18
    assert len(layer_map(30, 2, 2, keep_fraction=0.01).middle_kept) == 1
    with pytest.raises(ConfigError):
        layer_map(30, 2, 2, keep_fraction=1.5)


def _manual_emulated_logits(model, lmap, ids, mask):
    """The full model's own modules, running only the blocks the layer map keeps."""
    arch = get_arch(model)
    blocks = get_path(model, arch.blocks_path)
    kept = lmap.kept
    h = arch.embed(model, ids, mask)
    ctx = arch.context(model, model.config, h, mask, kept)
    for i in kept:
        h = arch.call_block(blocks[i], h, ctx, i)
    return arch.head(model, h)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_emulator_runs_exactly_the_kept_blocks_of_the_full_model(arch):
    model = tiny_model(arch)
    ids, mask, _ = tiny_batch()
    valid = mask.bool()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        everything = build_emulator(model, EmulatorConfig(emulator_layers=2)).logits(
            ids, mask
        )  # M = 2: nothing dropped
        torch.testing.assert_close(everything[valid], full[valid], rtol=1e-5, atol=1e-5)
        emu = build_emulator(model, EmulatorConfig(bottom_layers=1, top_layers=1, emulator_layers=2))
        assert list(emu.layer_map.middle_kept) == [1, 4]
        ref = _manual_emulated_logits(model, emu.layer_map, ids, mask)
        torch.testing.assert_close(emu.logits(ids, mask)[valid], ref[valid], rtol=1e-5, atol=1e-5)
        assert (emu.logits(ids, mask)[valid] - full[valid]).abs().max() > 1e-3  # dropping blocks changes the output


def test_emulator_keeps_global_names_and_copies_weights():
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1))
    adapters, middle = emu.adapter_state(), emu.middle_state()
    assert {k.split(".")[2] for k in adapters if k.startswith("model.layers.")} == {"0", "1", "4", "5"}
    assert {k.split(".")[2] for k in middle} == {"2"}
    assert "lm_head.weight" not in adapters and "model.embed_tokens.weight" in adapters  # tied head shipped once
    with torch.no_grad():
        emu.model.model.layers[2].mlp.down_proj.weight.add_(1.0)
    assert not torch.equal(emu.model.model.layers[2].mlp.down_proj.weight, model.model.layers[2].mlp.down_proj.weight)
    assert sum(p.numel() for p in emu.model.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_provider_can_name_the_blocks_it_drops():
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(drop_blocks=(3,)))
    assert emu.layer_map.middle_kept == (2,)
    with pytest.raises(ConfigError, match="middle blocks"):
        build_emulator(model, EmulatorConfig(drop_blocks=(1,)))  # a client block
    with pytest.raises(ConfigError, match="not both"):
        build_emulator(model, EmulatorConfig(drop_blocks=(3,), keep_fraction=0.5))


# ------------------------------------------------------------------------------------------------ layer sharing
def test_shared_slots_map_to_the_kept_block_before_them():
    lm = layer_map(30, 2, 2, keep_fraction=0.5, fill="share")
    shared = lm.shared_from()
    assert sorted(set(shared) | set(lm.middle_kept)) == list(lm.middle), "every middle slot runs a block"
    assert all(src in lm.middle_kept and src < g for g, src in shared.items())
    assert all(not any(src < k < g for k in lm.middle_kept) for g, src in shared.items()), "the nearest one"
    assert layer_map(30, 2, 2, keep_fraction=0.5).shared_from() == {}
    with pytest.raises(ConfigError, match="fill"):
        layer_map(30, 2, 2, fill="copy")


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_a_sharing_emulator_runs_each_kept_block_again_in_the_dropped_slots(arch, tmp_path):
    """``fill="share"`` (CRaSh): the emulator computes what the full model computes with every dropped block's
    weights replaced by the kept block before it, through the split parts and through the HF forward (whose
    KV cache a repeated block must not write twice), and it ships exactly the tensors a dropping emulator ships."""
    model = tiny_model(arch)
    ids, mask, _ = tiny_batch()
    valid = mask.bool()
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1, fill="share"))
    drop = build_emulator(model, EmulatorConfig(emulator_layers=1))
    assert emu.layer_map.shared_from() == {3: 2}
    ref = copy.deepcopy(model)
    blocks = get_path(ref, get_arch(ref).blocks_path)
    blocks[3].load_state_dict(blocks[2].state_dict())
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits[valid]
        torch.testing.assert_close(emu.logits(ids, mask)[valid], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            emu.model(input_ids=ids, attention_mask=mask).logits[valid], want, rtol=1e-5, atol=1e-5
        )
        assert (drop.logits(ids, mask)[valid] - want).abs().max() > 1e-4, "sharing is not dropping"
        # cached decoding: each shared slot keeps its keys in its own cache layer
        from transformers import DynamicCache

        seq = ids[:1, :6]
        cache = DynamicCache(config=emu.model.config)
        emu.model(input_ids=seq[:, :5], cache=cache, use_cache=True)
        step = emu.model(input_ids=seq[:, 5:], cache=cache, use_cache=True).logits[0, -1]
        whole = ref(input_ids=seq).logits[0, -1]
        torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
    assert emu.middle_state().keys() == drop.middle_state().keys()
    assert emu.adapter_state().keys() == drop.adapter_state().keys()
    generate_keypair(tmp_path / "keys", "provider")
    m = save_emulator(emu, tmp_path / "share", load_signing_key(tmp_path / "keys", "provider"))
    assert m["layers"]["fill"] == "share" and m["compression"]["fill"] == "share"
    assert (
        m["params"]["shipped"]
        == save_emulator(drop, tmp_path / "drop", load_signing_key(tmp_path / "keys", "provider"))["params"]["shipped"]
    )
    assert "fill" not in load_emulator(tmp_path / "drop", tmp_path / "keys" / "provider.sign.pub").manifest["layers"]
    back = load_emulator(tmp_path / "share", tmp_path / "keys" / "provider.sign.pub").emulator
    assert back.layer_map.fill == "share"
    with torch.no_grad():
        torch.testing.assert_close(back.logits(ids, mask)[valid], want, rtol=1e-5, atol=1e-5)


def test_distilling_a_sharing_emulator_trains_its_kept_blocks_through_every_use():
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1, fill="share"))
    before = {k: v.clone() for k, v in emu.middle_state().items()}
    s = distill_emulator(emu, model, _examples(), DistillConfig(steps=8, lr=3e-3, batch_size=8, seed=0), progress=False)
    assert s["kd_last"] < s["kd_first"]
    assert any(not torch.equal(v, before[k]) for k, v in emu.middle_state().items())


# ------------------------------------------------------------------------------------------------ quantization
@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("int4", 4)])
def test_uniform_codes_round_trip_within_half_a_step(scheme, bits):
    w = torch.randn(33, 17) * 0.2
    parts = quantize_tensor(w, scheme)
    step = float(w.max() - w.min()) / (2**bits - 1)
    assert parts[".__qcodes"].dtype == torch.uint8
    assert parts[".__qcodes"].numel() == (w.numel() if bits == 8 else (w.numel() + 1) // 2)
    back = dequantize_tensor(parts, scheme, torch.float32)
    assert back.shape == w.shape
    assert (back - w).abs().max() <= step / 2 + 1e-6
    assert float(back.min()) == pytest.approx(float(w.min()), abs=1e-6)  # the grid is anchored at min


def test_nf4_codes_round_trip_and_constant_tensors():
    w = torch.randn(10, 70)
    back = dequantize_tensor(quantize_tensor(w, "nf4"), "nf4", torch.float32)
    assert back.shape == w.shape and (back - w).abs().max() < 0.25 * w.abs().max()
    const = torch.full((4, 4), 0.5)
    for scheme in ("int8", "int4", "nf4"):
        torch.testing.assert_close(dequantize_tensor(quantize_tensor(const, scheme), scheme, torch.float32), const)


def test_quantize_state_keeps_vectors_float_and_refuses_inconsistent_parts():
    state = {"a.weight": torch.randn(8, 8), "a.bias": torch.randn(8), "norm.weight": torch.ones(8)}
    stored = quantize_state(state, "int8")
    assert set(stored) == {
        "a.weight.__qcodes",
        "a.weight.__qscale",
        "a.weight.__qmin",
        "a.weight.__qshape",
        "a.bias",
        "norm.weight",
    }
    back = dequantize_state(stored, "int8")
    assert torch.equal(back["a.bias"], state["a.bias"])
    from guardedp2p.designs.offline.quantize import QuantizedFormatError

    bad = dict(stored)
    bad["a.weight.__qcodes"] = stored["a.weight.__qcodes"][:10]
    with pytest.raises(QuantizedFormatError):
        dequantize_state(bad, "int8")
    with pytest.raises(QuantizedFormatError):
        dequantize_state(stored, "none")


def test_weight_codes_share_the_wire_codecs_nf4_table_and_packing():
    from guardedp2p.wire.codecs import CODECS

    w = torch.randn(7, 37)  # 259 values: a partial last block and an odd count
    parts = quantize_tensor(w, "nf4")
    enc = CODECS["nf4"].encode(w.reshape(-1))
    assert torch.equal(parts[".__qcodes"], enc.parts[0]) and torch.equal(parts[".__qscale"], enc.parts[1])
    # int4: element 2i in the high nibble, as on the wire
    assert quantize_tensor(torch.tensor([[0.0, 15.0], [1.0, 0.0]]), "int4")[".__qcodes"].tolist() == [0x0F, 0x10]


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_legacy_low_nibble_first_emulator_still_loads(tmp_path, scheme):
    """Emulators written before the packing was shared hold the low nibble first and no compression.nibble_order."""
    from safetensors.torch import load_file, save_file

    from guardedp2p.crypto.manifest import sign_folder
    from guardedp2p.designs.offline.quantize import QuantizedFormatError
    from guardedp2p.wire.codecs.nibbles import swap_nibbles

    model = tiny_model("llama")
    generate_keypair(tmp_path / "k", "p")
    sk = load_signing_key(tmp_path / "k", "p")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=2, quantize=scheme))
    m = save_emulator(emu, tmp_path / "e", sk)
    assert m["compression"]["nibble_order"] == "high-first"
    current = load_emulator(tmp_path / "e", tmp_path / "k" / "p.sign.pub", load_tokenizer=False).emulator

    middle = tmp_path / "e" / "emulator.safetensors"
    stored = load_file(str(middle))
    legacy = {k: swap_nibbles(v) if k.endswith(".__qcodes") else v for k, v in stored.items()}
    save_file(legacy, str(middle), metadata={"format": "pt", "quantize": scheme})
    body = {k: v for k, v in m.data.items() if k not in ("format", "version", "files", "signer")}
    body["compression"] = {k: v for k, v in body["compression"].items() if k != "nibble_order"}
    sign_folder(tmp_path / "e", body, list(m.files), sk)
    old = load_emulator(tmp_path / "e", tmp_path / "k" / "p.sign.pub", load_tokenizer=False).emulator
    for k, v in current.middle_state().items():
        assert torch.equal(old.middle_state()[k], v), k

    body["compression"]["nibble_order"] = "sideways"
    sign_folder(tmp_path / "e", body, list(m.files), sk)
    with pytest.raises(QuantizedFormatError, match="nibble order"):
        load_emulator(tmp_path / "e", tmp_path / "k" / "p.sign.pub", load_tokenizer=False)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantized_emulator_round_trip_saves_bytes(tmp_path, scheme):
    model = tiny_model("llama")
    generate_keypair(tmp_path / "k", "p")
    sk = load_signing_key(tmp_path / "k", "p")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=2, quantize=scheme))
    m_float = save_emulator(emu, tmp_path / "f", sk, quantize="none")
    m_q = save_emulator(emu, tmp_path / "q", sk)
    assert m_q["compression"]["quantize"] == scheme
    f_size, q_size = m_float.files["emulator.safetensors"].size, m_q.files["emulator.safetensors"].size
    assert q_size < (0.35 if scheme == "int8" else 0.25) * f_size
    assert (
        m_q.files["adapters.safetensors"].sha256 == m_float.files["adapters.safetensors"].sha256
    )  # adapters ship exact
    loaded = load_emulator(tmp_path / "q", tmp_path / "k" / "p.sign.pub").emulator
    # the client's middle is exactly the provider's dequantized codes; the adapters are bit-exact
    expected = dequantize_state(quantize_state(emu.middle_state(), scheme), scheme)
    got = loaded.middle_state()
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    for k, v in emu.adapter_state().items():
        assert torch.equal(loaded.adapter_state()[k], v)
    ids, mask, _ = tiny_batch()
    valid = mask.bool()
    diff = (loaded.logits(ids, mask) - emu.logits(ids, mask))[valid].abs().max()
    assert 0 < diff < (0.05 if scheme == "int8" else 0.5)


# ------------------------------------------------------------------------------------------------ distillation
def test_kd_loss_is_the_normalised_mse():
    ht = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])
    hs = torch.tensor([[[0.0, -1.0], [2.0, 1.0]]])
    rms2 = (1 + 1 + 4 + 0) / 4
    assert float(kd_loss(ht, hs)) == pytest.approx(((1 + 0 + 0 + 1) / 4) / rms2)
    mask = torch.tensor([[1, 0]])
    assert float(kd_loss(ht, hs, mask)) == pytest.approx(((1 + 0) / 2) / ((1 + 1) / 2))


def _examples(n=24, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 160, (length,), generator=g).tolist()} for _ in range(n)]


@pytest.mark.parametrize("w_lm", [1.0, 0.0])
def test_distillation_trains_only_the_middle_and_lowers_the_kd_loss(tmp_path, w_lm):
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1))
    adapters_before = {k: v.clone() for k, v in emu.adapter_state().items()}
    middle_before = {k: v.clone() for k, v in emu.middle_state().items()}
    teacher_before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DistillConfig(steps=12, lr=3e-3, batch_size=8, seed=0, w_lm=w_lm)
    s = distill_emulator(emu, model, _examples(), cfg, progress=False)
    assert s["steps"] == 12 and s["kd_last"] < s["kd_first"]
    for k, v in emu.adapter_state().items():
        assert torch.equal(v, adapters_before[k]), k
    assert any(not torch.equal(v, middle_before[k]) for k, v in emu.middle_state().items())
    for k, v in model.state_dict().items():
        assert torch.equal(v, teacher_before[k]), "the teacher must stay untouched"
    assert not any(p.requires_grad for p in emu.model.parameters())
    assert emu.info["distillation"]["steps"] == 12


def test_distillation_resumes_from_its_checkpoint_without_lost_or_repeated_step(tmp_path):
    model = tiny_model("llama")
    cfg = DistillConfig(steps=6, lr=3e-3, batch_size=4, seed=1)
    straight = build_emulator(model, EmulatorConfig(emulator_layers=1))
    distill_emulator(straight, copy.deepcopy(model), _examples(), cfg, progress=False)
    killed = build_emulator(model, EmulatorConfig(emulator_layers=1))
    _run_until(killed, model, cfg, 3, tmp_path / "ck")
    resumed = build_emulator(model, EmulatorConfig(emulator_layers=1))  # a new process: fresh emulator, same folder
    s = distill_emulator(
        resumed, copy.deepcopy(model), _examples(), cfg, checkpoint_dir=tmp_path / "ck", progress=False
    )
    assert s["steps"] == 6
    for k, v in straight.middle_state().items():
        torch.testing.assert_close(resumed.middle_state()[k], v, rtol=1e-5, atol=1e-6)


def _run_until(emu, model, cfg, stop, ckpt):
    """Run a ``cfg.steps`` distillation but stop after ``stop`` steps (as a killed process would)."""
    import guardedp2p.designs.offline.emulator as E

    class Stop(Exception):
        pass

    calls = {"n": 0}
    real = E.loss_fn

    def counting(logits, labels):
        calls["n"] += 1
        if calls["n"] > stop:
            raise Stop
        return real(logits, labels)

    E.loss_fn = counting
    try:
        with pytest.raises(Stop):
            distill_emulator(
                emu,
                copy.deepcopy(model),
                _examples(),
                DistillConfig(**{**cfg.__dict__, "checkpoint_every": 1}),
                checkpoint_dir=ckpt,
                progress=False,
            )
    finally:
        E.loss_fn = real
