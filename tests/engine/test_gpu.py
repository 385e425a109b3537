"""CUDA smoke tests (skipped without a GPU): the Online loop and the codecs on the device."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_online_step_on_cuda_matches_cpu():
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.split import loss_fn
    from tests.protocol_helpers import batch, client_parts, open_session, provider_app
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    fp32 = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}
    b = batch(model.config.vocab_size)
    losses = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        app = provider_app(m)
        parts, fp = client_parts(m)
        remote = RemoteTrunk(open_session(app, fp), fp32, gradients=True)
        ids, mask, labels = (b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        h1 = parts.bottom(ids, mask)
        loss = loss_fn(parts.top(remote(h1, mask, train=True), mask), labels)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int8-block", "nf4", "fp4"])
def test_codecs_round_trip_on_cuda_and_interoperate_with_cpu(codec):
    from guardedp2p.wire.codecs import get_codec

    c = get_codec(codec)
    x = torch.randn(4, 16, 576, device="cuda")
    enc_gpu = c.encode(x)
    enc_cpu = c.encode(x.cpu())
    out_gpu = c.decode(enc_gpu, tuple(x.shape), torch.float32, torch.device("cuda"))
    out_cpu = c.decode(enc_cpu, tuple(x.shape), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-3, atol=1e-3)
    for a, b in zip(enc_gpu.parts, enc_cpu.parts):
        assert a.dtype == b.dtype and a.shape == b.shape


# ---------------------------------------------------------------------- big models (issue #9)
SPLIT_2_2 = (2, 2)
FP32_CODECS = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from tests.tiny_models import tiny_model
    from tests.tiny_tokenizer import tiny_tokenizer

    folder = tmp_path_factory.mktemp("gpu-models") / "llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _reference_h(arch: str = "llama"):
    from guardedp2p.engine.split import SplitConfig, split_model
    from tests.tiny_models import tiny_batch, tiny_model

    ref = tiny_model(arch)
    ids, mask, _ = tiny_batch()
    parts = split_model(ref, SplitConfig(*SPLIT_2_2))
    with torch.no_grad():
        h1 = parts.bottom(ids, mask)
        h2 = parts.trunk(h1, mask)
    return ref, h1, mask, h2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.parametrize("device_map", ["cuda:0", "auto", "balanced"])
def test_device_map_trunk_on_cuda_matches_cpu(saved_llama, device_map):
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.placement import TrunkLoading, load_provider_trunk
    from guardedp2p.engine.split import SplitConfig

    ref, h1, mask, h2 = _reference_h()
    loaded = load_provider_trunk(str(saved_llama), SplitConfig(*SPLIT_2_2), TrunkLoading(device_map=device_map))
    assert loaded.fingerprint == model_fingerprint(ref, SplitConfig(*SPLIT_2_2))
    assert all(d.startswith("cuda") for d in loaded.devices)
    assert all(p.device.type == "cuda" for p in loaded.trunk.parameters())
    with torch.no_grad():
        out = loaded.trunk(h1, mask)  # CPU inputs: the trunk moves them to its first block
    assert out.device.type == "cuda" and _rel(out, h2) < 1e-4
    if torch.cuda.device_count() >= 2 and device_map == "balanced":
        assert loaded.devices == ["cuda:0", "cuda:1"]


def test_trunk_spread_over_devices_runs_forward_and_backward(saved_llama):
    """Blocks on different devices (cuda:1 when there is one, else the CPU): activations and the per-layer
    context follow the weights, and the input gradient comes back to the first device."""
    from guardedp2p.engine.placement import TrunkLoading, _move_trunk, load_provider_trunk
    from guardedp2p.engine.split import SplitConfig

    _, h1, mask, h2 = _reference_h()
    loaded = load_provider_trunk(str(saved_llama), SplitConfig(*SPLIT_2_2), TrunkLoading(device_map="cuda:0"))
    second = "cuda:1" if torch.cuda.device_count() >= 2 else "cpu"
    _move_trunk(loaded.trunk, ["cuda:0", second])
    x = h1.to("cuda:0").requires_grad_(True)
    out = loaded.trunk(x, mask)
    assert out.device == torch.device(second) and _rel(out, h2) < 1e-4
    out.sum().backward()
    assert x.grad is not None and x.grad.device.type == "cuda" and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("load_in, dtype, tol", [("8bit", "fp16", 0.03), ("8bit", "bf16", 0.05), ("4bit", "bf16", 0.2)])
def test_quantized_trunk_on_cuda(saved_llama, load_in, dtype, tol):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.placement import TrunkLoading, load_provider_trunk
    from guardedp2p.engine.split import SplitConfig

    ref, h1, mask, h2 = _reference_h()
    loaded = load_provider_trunk(str(saved_llama), SplitConfig(*SPLIT_2_2), TrunkLoading("cuda:0", dtype, load_in))
    assert loaded.fingerprint == model_fingerprint(ref, SplitConfig(*SPLIT_2_2))
    kind = bnb.nn.Linear8bitLt if load_in == "8bit" else bnb.nn.Linear4bit
    layers = [m for m in loaded.trunk.modules() if isinstance(m, kind)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    x = h1.to("cuda").requires_grad_(True)
    out = loaded.trunk(x, mask)
    assert _rel(out, h2) < tol
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("client_dtype", ["fp32", "bf16"])
def test_online_step_with_8bit_provider_and_cuda_client(saved_llama, client_dtype):
    """The whole path of docs/big-models.md on one GPU: provider serve --device-map cuda:0 --dtype fp16
    --load-in 8bit, client tune --device cuda --dtype bf16."""
    pytest.importorskip("bitsandbytes")
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.service.client import TuneOptions, prepare_client
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from guardedp2p.train.config import TrainConfig
    from tests.protocol_helpers import batch, open_session
    from tests.tiny_models import VOCAB

    app = build_provider_app(
        ProviderOptions(
            model=str(saved_llama), protocols=("online",), device_map="cuda:0", dtype="fp16", load_in="8bit"
        )
    )
    client = prepare_client(
        TuneOptions(model=str(saved_llama), device="cuda", dtype=client_dtype, train=TrainConfig(lora_r=4))
    )
    assert client.fingerprint == app.policy.fingerprint
    assert client.bottom.device.type == "cuda" and client.top.device.type == "cuda"
    remote = RemoteTrunk(open_session(app, client.fingerprint), FP32_CODECS, gradients=True)
    b = {k: v.to("cuda") for k, v in batch(VOCAB).items()}
    h1 = client.bottom(b["input_ids"], b["attention_mask"])
    loss = loss_fn(client.top(remote(h1, b["attention_mask"], train=True), b["attention_mask"]), b["labels"])
    loss.backward()
    lora = [p for part in (client.bottom, client.top) for n, p in part.named_parameters() if "lora_" in n]
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
