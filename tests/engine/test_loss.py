"""The causal-LM cross-entropy (guardedp2p/engine/loss.py): F.cross_entropy's value and gradient, with one
logits-sized tensor saved for the backward instead of two."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guardedp2p.engine.loss import causal_lm_cross_entropy
from guardedp2p.engine.split import loss_fn


def _case(rows: int = 37, vocab: int = 301, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = -100
    return logits, targets


def test_value_and_gradient_are_f_cross_entropys():
    logits, targets = _case()
    ref = F.cross_entropy(logits, targets, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref * 3.0, logits)
    got = causal_lm_cross_entropy(logits, targets, -100)
    (g_got,) = torch.autograd.grad(got * 3.0, logits)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-8)
    assert torch.all(g_got[::5] == 0)  # ignored rows get no gradient


def test_chunked_log_sum_exp_matches(monkeypatch):
    import guardedp2p.engine.loss as L

    logits, targets = _case(rows=50, vocab=64)
    whole = causal_lm_cross_entropy(logits, targets, -100)
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 64 * 3)  # 3 rows per chunk, a ragged last one
    torch.testing.assert_close(causal_lm_cross_entropy(logits, targets, -100), whole, rtol=1e-6, atol=0)


def test_every_target_ignored_gives_nan_like_torch():
    logits, _ = _case(rows=4)
    targets = torch.full((4,), -100)
    assert torch.isnan(causal_lm_cross_entropy(logits, targets, -100))
    assert torch.isnan(F.cross_entropy(logits, targets, ignore_index=-100))


def test_saves_no_logits_sized_tensor_but_the_logits():
    """What makes the client's training step lighter (docs/results/kit.md): F.cross_entropy saves its log-softmax
    next to the logits; this loss saves the logits themselves and per-row scalars only."""
    logits, targets = _case(rows=64, vocab=512)
    h = logits.detach().clone().requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    def big_saved(loss: object) -> tuple[int, set[int]]:
        x = h * 1.0
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(x, targets)  # type: ignore[operator]
        return x.data_ptr(), {t.data_ptr() for t in saved if t.numel() >= logits.numel()}

    x_ptr, big = big_saved(lambda x, t: causal_lm_cross_entropy(x, t, -100))
    assert big == {x_ptr}  # the logits, nothing else of their size
    x_ptr, big = big_saved(lambda x, t: F.cross_entropy(x, t, ignore_index=-100))
    assert big - {x_ptr}  # torch's saves its log-softmax: the hook sees what this test guards against


def test_loss_fn_uses_it_and_trains():
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    loss = loss_fn(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad[:, -1] == 0)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="rows"):
        causal_lm_cross_entropy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), -100)
