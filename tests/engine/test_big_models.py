"""Provider trunk loading for big models (issue #9), on the CPU: option parsing and validation, placement plans,
device maps, and the real loader on tiny saved models (``device_map="cpu"``, ``--dtype``, and bitsandbytes 8-bit /
4-bit where its CPU backend runs). The CUDA side is in ``test_gpu.py``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from guardedp2p.engine.fingerprint import model_fingerprint
from guardedp2p.engine.loading import load_causal_lm
from guardedp2p.engine.placement import (
    PlacementError,
    QuantizationError,
    TrunkLoading,
    check_quantization,
    count_parts,
    load_provider_trunk,
    meta_model,
    module_device_map,
    parse_dtype,
    plan_trunk_devices,
)
from guardedp2p.engine.split import SplitConfig, build_trunk, split_model
from guardedp2p.errors import ConfigError
from tests.tiny_models import ARCHES, tiny_batch, tiny_config, tiny_model

SPLIT = SplitConfig(2, 2)
GIB = 1 << 30


def _bnb_cpu_ok(load_in: str) -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        check_quantization(load_in, ["cpu"])
    except QuantizationError:
        return False
    return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny models written with save_pretrained (what a provider's model folder looks like)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    from tests.tiny_tokenizer import tiny_tokenizer

    for arch in ("llama", "opt"):
        tiny_model(arch).save_pretrained(root / arch)
        tiny_tokenizer().save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def _reference(arch: str):
    ref = tiny_model(arch)
    ids, mask, _ = tiny_batch()
    parts = split_model(ref, SPLIT)
    with torch.no_grad():
        h1 = parts.bottom(ids, mask)
        h2 = parts.trunk(h1, mask)
    return ref, h1, mask, h2


# ------------------------------------------------------------------------------------------ options


def test_dtype_names():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
        parse_dtype("fp8")


@pytest.mark.parametrize(
    "loading, match",
    [
        (TrunkLoading(load_in="3bit"), "8bit, 4bit"),
        (TrunkLoading(dtype="half-ish"), "unknown dtype"),
        (TrunkLoading(device_map="tpu"), "unknown --device-map"),
        (TrunkLoading(device_map="everywhere"), "unknown --device-map"),
        (TrunkLoading(device_map="mps", load_in="8bit"), "not supported on mps"),
    ],
)
def test_bad_loading_options_are_config_errors(loading, match):
    with pytest.raises(ConfigError, match=match):
        loading.validate()


def test_provider_options_device_and_device_map():
    from guardedp2p.service.provider import ProviderOptions

    assert ProviderOptions(device="cpu").trunk_loading() == TrunkLoading("cpu", "fp32", None)
    assert ProviderOptions(device_map="balanced", dtype="bf16", load_in="4bit").trunk_loading() == TrunkLoading(
        "balanced", "bf16", "4bit"
    )
    with pytest.raises(ConfigError, match="disagree"):
        ProviderOptions(device="cpu", device_map="cuda:0").trunk_loading()


def test_cli_rejects_bad_options_before_loading(saved):
    from typer.testing import CliRunner

    from guardedp2p.cli.main import app

    runner = CliRunner()
    for args, match in [
        (["--load-in", "3bit"], "8bit, 4bit"),
        (["--dtype", "fp8"], "unknown dtype"),
        (["--device-map", "balanced"], "CUDA is not available"),
    ]:
        if args[0] == "--device-map" and torch.cuda.is_available():
            continue
        res = runner.invoke(app, ["provider", "serve", "--insecure", "--model", str(saved["llama"]), *args])
        assert res.exit_code == 2, res.output
        assert match in res.output


# ------------------------------------------------------------------------------------------ planning


def test_plan_without_gpus():
    assert plan_trunk_devices("auto", 3, GIB, gpu_free=[]) == ["cpu"] * 3
    assert plan_trunk_devices("cpu", 3, GIB, gpu_free=[80 * GIB]) == ["cpu"] * 3
    with pytest.raises(PlacementError, match="CUDA is not available"):
        plan_trunk_devices("balanced", 3, GIB, gpu_free=[])
    with pytest.raises(PlacementError, match="CUDA is not available"):
        plan_trunk_devices("cuda:0", 3, GIB, gpu_free=[])


def test_plan_auto_uses_as_few_gpus_as_hold_the_trunk():
    assert plan_trunk_devices("auto", 4, GIB, gpu_free=[40 * GIB, 40 * GIB]) == ["cuda:0"] * 4
    # 10 GiB * 0.85 = 8.5 GiB usable, 2 GiB of it for the client-side modules while loading: 6 blocks of 1 GiB
    plan = plan_trunk_devices("auto", 10, GIB, first_extra_bytes=2 * GIB, gpu_free=[10 * GIB, 10 * GIB])
    assert plan == ["cuda:0"] * 6 + ["cuda:1"] * 4
    with pytest.raises(PlacementError, match="--load-in 8bit or 4bit"):
        plan_trunk_devices("auto", 30, GIB, gpu_free=[10 * GIB, 10 * GIB])


def test_plan_balanced_and_single_gpu():
    assert plan_trunk_devices("balanced", 5, GIB, gpu_free=[40 * GIB] * 2) == ["cuda:0"] * 3 + ["cuda:1"] * 2
    assert plan_trunk_devices("balanced", 2, GIB, gpu_free=[40 * GIB] * 4) == ["cuda:0", "cuda:1"]
    with pytest.raises(PlacementError, match="balanced puts 3 trunk blocks"):
        plan_trunk_devices("balanced", 6, 4 * GIB, gpu_free=[10 * GIB] * 2)
    assert plan_trunk_devices("cuda:1", 3, GIB, gpu_free=[GIB, 40 * GIB]) == ["cuda:1"] * 3
    with pytest.raises(PlacementError, match="only 2 CUDA device"):
        plan_trunk_devices("cuda:2", 3, GIB, gpu_free=[GIB, 40 * GIB])
    with pytest.raises(PlacementError, match="cuda:0 has 1.0 GiB free"):
        plan_trunk_devices("cuda:0", 3, GIB, gpu_free=[GIB, 40 * GIB])


@pytest.mark.parametrize("arch", ARCHES)
def test_device_map_covers_every_weight_and_places_the_trunk(arch):
    meta = meta_model(tiny_config(arch))
    devices = ["cuda:0", "cuda:1"]  # trunk = blocks 2, 3 of 6
    dm = module_device_map(meta, SPLIT, devices)
    names = [k for k, _ in meta.named_parameters()] + [k for k, _ in meta.named_buffers()]
    for name in names:
        assert any(name == k or name.startswith(k + ".") for k in dm), name
    blocks = {"gpt2": "transformer.h"}.get(arch, "model.decoder.layers" if arch == "opt" else "model.layers")
    assert dm[f"{blocks}.2"] == "cuda:0" and dm[f"{blocks}.3"] == "cuda:1"
    assert dm[f"{blocks}.0"] == dm[f"{blocks}.5"] == "cuda:0"  # client-side blocks: transient, first trunk device
    with pytest.raises(PlacementError):
        module_device_map(meta, SPLIT, ["cpu"])


@pytest.mark.parametrize("arch", ARCHES)
def test_part_counts_add_up(arch):
    model = tiny_model(arch)
    c = count_parts(model, SPLIT)
    assert c.total == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert c.trunk == sum(p.numel() for p in build_trunk(model, SPLIT).parameters())
    assert c == count_parts(meta_model(model.config), SPLIT)
    assert 0 < c.trunk_quantizable < c.trunk and c.trunk_blocks == 2


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_device_map_cpu_load_equals_the_default_path(saved, arch):
    """device_map='cpu' through from_pretrained gives the same trunk and fingerprint as load + split."""
    model, _ = load_causal_lm(str(saved[arch]), device="cpu")
    trunk_ref = build_trunk(model, SPLIT)
    fp_ref = model_fingerprint(model, SPLIT)
    loaded = load_provider_trunk(str(saved[arch]), SPLIT, TrunkLoading(device_map="cpu"))
    assert loaded.fingerprint == fp_ref
    assert loaded.devices == ["cpu", "cpu"] and loaded.dtype == torch.float32
    _, h1, mask, _ = _reference(arch)
    with torch.no_grad():
        torch.testing.assert_close(loaded.trunk(h1, mask), trunk_ref(h1, mask), rtol=0, atol=0)
    # only the trunk blocks are kept: no embeddings, no head, no client blocks
    assert sum(p.numel() for p in loaded.trunk.parameters()) == count_parts(model, SPLIT).trunk
    assert not any(p.requires_grad for p in loaded.trunk.parameters())


def test_bf16_trunk_keeps_the_fingerprint_and_takes_fp32_inputs(saved):
    ref, h1, mask, h2 = _reference("llama")
    loaded = load_provider_trunk(
        str(saved["llama"]),
        SPLIT,
        TrunkLoading(device_map="auto" if not torch.cuda.is_available() else "cpu", dtype="bf16"),
    )
    assert loaded.fingerprint == model_fingerprint(ref, SPLIT)
    assert loaded.dtype == torch.bfloat16
    x = h1.clone().requires_grad_(True)
    out = loaded.trunk(x, mask)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - h2).norm() / h2.norm()).item() < 0.02
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("load_in, tol", [("8bit", 0.03), ("4bit", 0.2)])
def test_quantized_trunk_on_cpu(saved, load_in, tol):
    if not _bnb_cpu_ok(load_in):
        pytest.skip(f"bitsandbytes cannot run {load_in} layers on this CPU")
    import bitsandbytes as bnb

    ref, h1, mask, h2 = _reference("opt")
    loaded = load_provider_trunk(str(saved["opt"]), SPLIT, TrunkLoading(device_map="cpu", load_in=load_in))
    assert loaded.fingerprint == model_fingerprint(ref, SPLIT)  # client-side modules were not quantized
    kind = bnb.nn.Linear8bitLt if load_in == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, kind) for m in loaded.trunk.modules())
    x = h1.clone().requires_grad_(True)
    out = loaded.trunk(x, mask)
    assert ((out.float() - h2).norm() / h2.norm()).item() < tol
    out.float().sum().backward()  # the Online design needs the trunk's input gradient
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_quantized_provider_serves_an_online_step(saved):
    if not _bnb_cpu_ok("8bit"):
        pytest.skip("bitsandbytes cannot run 8-bit layers on this CPU")
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from tests.protocol_helpers import batch, client_parts, open_session

    app = build_provider_app(
        ProviderOptions(model=str(saved["llama"]), protocols=("online",), device="cpu", dtype="bf16", load_in="8bit")
    )
    parts, fp = client_parts(tiny_model("llama"))
    remote = RemoteTrunk(
        open_session(app, fp), {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}, gradients=True
    )
    b = batch(tiny_config("llama").vocab_size)
    h1 = parts.bottom(b["input_ids"], b["attention_mask"])
    loss = loss_fn(parts.top(remote(h1, b["attention_mask"], train=True), b["attention_mask"]), b["labels"])
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in parts.bottom.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_given_model_with_dtype_and_device_map(tiny_llama):
    from guardedp2p.service.provider import ProviderOptions, build_provider_app

    fp = model_fingerprint(tiny_llama, SPLIT)
    app = build_provider_app(ProviderOptions(protocols=("online",), device_map="cpu", dtype="bf16"), model=tiny_llama)
    assert app.policy.fingerprint == fp
    assert app.resources.trunk.compute_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="load_in quantizes while loading"):
        build_provider_app(ProviderOptions(protocols=("online",), load_in="8bit"), model=tiny_model("llama"))


# ------------------------------------------------------------------------------------------ fail early


def test_load_in_without_bitsandbytes_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(QuantizationError, match="pip install"):
        check_quantization("8bit", ["cuda"])


def test_load_in_without_a_backend_fails_before_loading(saved, monkeypatch):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    import bitsandbytes as bnb

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.nn, "Linear4bit", broken)
    import transformers

    called = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: called.append(1))
    with pytest.raises(QuantizationError, match="cannot run 4bit layers on the CPU.*put the trunk on a GPU"):
        load_provider_trunk(str(saved["llama"]), SPLIT, TrunkLoading(device_map="cpu", load_in="4bit"))
    assert not called


def test_load_in_refuses_gguf(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(QuantizationError, match="Hugging Face model folder"):
        load_provider_trunk(str(gguf), SPLIT, TrunkLoading(device_map="cpu", load_in="8bit"))


def test_split_that_does_not_fit_fails_before_loading(saved):
    with pytest.raises(ConfigError, match="leaves no trunk"):
        load_provider_trunk(str(saved["llama"]), SplitConfig(3, 3), TrunkLoading(device_map="cpu"))


# ------------------------------------------------------------------------------------------ client dtype


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_client_dtype_keeps_the_fingerprint_and_trains(tmp_path, dtype):
    """A bf16 checkpoint: the client loads it as is, casts its parts to --dtype after fingerprinting; the
    provider (fp32 trunk) agrees on the fingerprint and an Online step trains the fp32 LoRA weights."""
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.service.client import TuneOptions, prepare_client
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from guardedp2p.train.config import TrainConfig
    from tests.protocol_helpers import batch, open_session
    from tests.tiny_tokenizer import tiny_tokenizer

    folder = tmp_path / "bf16-model"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    client = prepare_client(TuneOptions(model=str(folder), device="cpu", dtype=dtype, train=TrainConfig(lora_r=4)))
    app = build_provider_app(ProviderOptions(model=str(folder), protocols=("online",), device="cpu"))
    assert client.fingerprint == app.policy.fingerprint
    want = parse_dtype(dtype)
    assert client.bottom.compute_dtype == want and client.top.compute_dtype == want
    lora = [p for part in (client.bottom, client.top) for n, p in part.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    remote = RemoteTrunk(
        open_session(app, client.fingerprint),
        {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")},
        gradients=True,
    )
    b = batch(tiny_config("llama").vocab_size)
    h1 = client.bottom(b["input_ids"], b["attention_mask"])
    loss = loss_fn(client.top(remote(h1, b["attention_mask"], train=True), b["attention_mask"]), b["labels"])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)


# ------------------------------------------------------------------------------------------ benchmark numbers


def test_bench_big_models_counts_match_the_published_sizes():
    """The hard-coded configs of benchmarks/bench_big_models.py give the published parameter counts, and the
    wire bytes it reports are at least the formula hidden x tokens x bytes (headers, scales, mask on top)."""
    from benchmarks.bench_big_models import configs, static_rows, wire_rows

    published = {"opt-1.3b": 1_315_758_080, "opt-6.7b": 6_658_473_984, "llama-2-7b": 6_738_415_616}
    for name, cfg in configs().items():
        params, memory = static_rows(name, cfg, SPLIT, 8)
        assert params["total"] == published[name]
        assert params["client"] + params["trunk"] == params["total"]
        trunk = memory["provider_trunk_mib"]
        assert trunk["fp32"] > trunk["bf16"] > trunk["8bit"] > trunk["4bit"]
    for row in wire_rows("tiny", 64, 2, 8, ["fp32", "int8", "nf4"]):
        assert row["formula_tensor_bytes"] * 4 < row["online_step_bytes"] < row["formula_tensor_bytes"] * 4 * 1.5 + 4096
        assert row["gradfree_step_bytes"] < row["online_step_bytes"]
