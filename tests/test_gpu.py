"""CUDA smoke tests (skipped without a GPU): the Online loop and the codecs on the device."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_online_step_on_cuda_matches_cpu():
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.protocols.online import RemoteTrunk
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
    from guardedp2p.codecs import get_codec

    c = get_codec(codec)
    x = torch.randn(4, 16, 576, device="cuda")
    enc_gpu = c.encode(x)
    enc_cpu = c.encode(x.cpu())
    out_gpu = c.decode(enc_gpu, tuple(x.shape), torch.float32, torch.device("cuda"))
    out_cpu = c.decode(enc_cpu, tuple(x.shape), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-3, atol=1e-3)
    for a, b in zip(enc_gpu.parts, enc_cpu.parts):
        assert a.dtype == b.dtype and a.shape == b.shape
