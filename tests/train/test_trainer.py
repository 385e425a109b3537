"""SplitTrainer, the one training loop of all three designs (guardedp2p/train/trainer.py).

The trunk here is a local frozen :class:`ProviderTrunk`; the designs differ only in what stands in for it, so
the optimizer step, accumulation, clipping, schedule, the frozen-bottom mode (Gradfree) and the resumable state
are tested once, on a tiny random Llama split 2/2/2 with LoRA on the client blocks.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from guardedp2p.engine.lora import LoraSettings, attach_lora
from guardedp2p.engine.split import SplitConfig, loss_fn, split_model
from guardedp2p.errors import ConfigError
from guardedp2p.train.config import TrainConfig
from guardedp2p.train.trainer import SplitTrainer, lr_lambda
from tests.tiny_models import tiny_batch, tiny_model

SPLIT = SplitConfig(bottom_layers=2, top_layers=2)


def make_trainer(cfg: TrainConfig, *, train_bottom: bool = True, trunk_spy: list | None = None) -> SplitTrainer:
    """A fresh, identical (seeded) split with LoRA on every client block; lora_B random so every LoRA tensor
    gets a non-zero gradient from the first step."""
    model = tiny_model("llama", seed=0)
    parts = split_model(model, SPLIT)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    attach_lora(parts.bottom, parts.top, LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in list(parts.bottom.named_parameters()) + list(parts.top.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    trunk = parts.trunk

    def trunk_fn(h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
        if trunk_spy is not None:
            trunk_spy.append(h1)
        return trunk(h1, mask)

    return SplitTrainer(parts.bottom, parts.top, trunk_fn, cfg, loss_fn=loss_fn, train_bottom=train_bottom)


def as_batch(seed: int = 0, batch: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    ids, mask, labels = tiny_batch(seed=seed, batch=batch, length=length)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_batch(seed: int, batch: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    """No padding: every row has the same number of labelled tokens, so a mean over micro-batches equals the
    mean over the whole batch (with padding the two weight tokens differently, as in HF)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 160, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def eval_loss(trainer: SplitTrainer, b: dict[str, torch.Tensor]) -> float:
    return float(loss_fn(trainer.logits_fn(b["input_ids"], b["attention_mask"]), b["labels"]))


def cfg_(**kw) -> TrainConfig:
    base = dict(steps=10, lr=1e-2, warmup_steps=0, schedule="constant", max_grad_norm=0.0)
    base.update(kw)
    return TrainConfig(**base)


def grad_norm(trainer: SplitTrainer) -> float:
    grads = [p.grad for p in trainer.named_params.values() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


# ---------------------------------------------------------------------------------------------- one step


def test_a_step_lowers_the_loss_on_its_batch():
    trainer = make_trainer(cfg_())
    b = as_batch()
    before = eval_loss(trainer, b)
    res = trainer.train_step([b])
    after = eval_loss(trainer, b)
    assert res.step == 1 and trainer.step == 1
    assert res.loss == pytest.approx(before, rel=1e-5)  # the reported loss is the pre-step loss of the batch
    assert res.task_loss == pytest.approx(res.loss)
    assert after < before - 1e-3, (before, after)
    for _ in range(4):
        trainer.train_step([b])
    assert eval_loss(trainer, b) < after


def test_only_trainable_client_parameters_move():
    trainer = make_trainer(cfg_())
    frozen = {
        n: p.detach().clone()
        for part in (trainer.bottom, trainer.top)
        for n, p in part.named_parameters()
        if not p.requires_grad
    }
    before = trainer.trainable_state()
    trainer.train_step([as_batch()])
    after = trainer.trainable_state()
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
    for part in (trainer.bottom, trainer.top):
        for n, p in part.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n


def test_grad_accumulation_equals_the_big_batch():
    big = full_batch(0, batch=4)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    one = make_trainer(cfg_(grad_accum=1))
    two = make_trainer(cfg_(grad_accum=2))
    r1 = one.train_step([big])
    r2 = two.train_step(halves)
    assert r2.loss == pytest.approx(r1.loss, rel=1e-5)
    assert one.named_params.keys() == two.named_params.keys()
    for n, p in one.named_params.items():
        q = two.named_params[n]
        assert p.grad is not None and float(p.grad.abs().max()) > 0, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    # and the updates agree
    for n, p in one.named_params.items():
        torch.testing.assert_close(two.named_params[n], p, rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_gradient_norm():
    b = as_batch()
    free = make_trainer(cfg_(max_grad_norm=0.0))
    free.train_step([b])
    raw = grad_norm(free)
    limit = raw / 10
    clipped = make_trainer(cfg_(max_grad_norm=limit))
    clipped.train_step([b])
    assert grad_norm(clipped) == pytest.approx(limit, rel=1e-3)
    # a limit above the norm leaves the gradient alone
    loose = make_trainer(cfg_(max_grad_norm=raw * 10))
    loose.train_step([b])
    assert grad_norm(loose) == pytest.approx(raw, rel=1e-5)


# ---------------------------------------------------------------------------------------------- schedule


def test_warmup_then_constant():
    fn = lr_lambda(cfg_(steps=10, warmup_steps=4, schedule="constant"))
    assert [fn(s) for s in range(10)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_warmup_then_cosine_to_zero():
    fn = lr_lambda(cfg_(steps=12, warmup_steps=4, schedule="cosine"))
    assert [fn(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert fn(4) == pytest.approx(1.0)  # decay starts after the warm-up
    assert fn(6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert fn(8) == pytest.approx(0.5)
    assert fn(12) == pytest.approx(0.0, abs=1e-12)
    assert fn(50) == pytest.approx(0.0, abs=1e-12)  # past the end it stays at 0, it does not come back up


def test_linear_and_no_warmup():
    fn = lr_lambda(cfg_(steps=10, warmup_steps=0, schedule="linear"))
    assert [fn(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda(cfg_(steps=10, warmup_steps=0, schedule="cosine"))(0) == pytest.approx(1.0)
    # a run shorter than its warm-up stays at the full rate once warmed up
    assert lr_lambda(cfg_(steps=3, warmup_steps=5, schedule="cosine"))(7) == 1.0


def test_the_trainer_steps_with_the_scheduled_rate():
    cfg = cfg_(steps=6, warmup_steps=2, schedule="cosine", lr=4e-3)
    trainer = make_trainer(cfg)
    b = as_batch()
    lrs = [trainer.train_step([b]).lr for _ in range(6)]
    fn = lr_lambda(cfg)
    assert lrs == pytest.approx([4e-3 * fn(s) for s in range(6)])
    assert lrs[0] == pytest.approx(2e-3) and lrs[1] == pytest.approx(4e-3)


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="schedule"):
        make_trainer(cfg_(schedule="step"))


# ---------------------------------------------------------------------------------------------- frozen bottom


def test_train_bottom_false_freezes_the_bottom():
    sent: list[torch.Tensor] = []
    trainer = make_trainer(cfg_(), train_bottom=False, trunk_spy=sent)
    assert all(not p.requires_grad for p in trainer.bottom.parameters())
    assert trainer.named_params and all(n.startswith("top.") for n in trainer.named_params)
    bottom_before = {n: p.detach().clone() for n, p in trainer.bottom.named_parameters()}
    top_before = trainer.trainable_state()
    trainer.train_step([as_batch()])
    assert not trainer.bottom.training
    assert sent and not sent[-1].requires_grad and sent[-1].grad_fn is None  # no graph through the bottom
    for n, p in trainer.bottom.named_parameters():
        assert torch.equal(p, bottom_before[n]), n
    assert any(not torch.equal(top_before[n], p) for n, p in trainer.named_params.items())


def test_nothing_to_train_is_a_config_error():
    model = tiny_model("llama")
    parts = split_model(model, SPLIT)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        SplitTrainer(parts.bottom, parts.top, lambda h, m, **kw: h, cfg_(), loss_fn=loss_fn)


# ---------------------------------------------------------------------------------------------- resume


def test_state_dict_round_trip_resumes_identically():
    cfg = cfg_(steps=6, warmup_steps=2, schedule="cosine", lr=5e-3, max_grad_norm=0.5, weight_decay=0.01)
    batches = [as_batch(seed=s) for s in range(6)]

    straight = make_trainer(cfg)
    ref = [straight.train_step([b]) for b in batches]

    first = make_trainer(cfg)
    for b in batches[:3]:
        first.train_step([b])
    trainable = first.trainable_state()
    state = copy.deepcopy(first.state_dict())
    del first

    resumed = make_trainer(cfg)
    resumed.load_trainable_state(trainable)
    resumed.load_state_dict(state)
    assert resumed.step == 3
    rest = [resumed.train_step([b]) for b in batches[3:]]
    assert [r.step for r in rest] == [4, 5, 6]
    assert [r.lr for r in rest] == pytest.approx([r.lr for r in ref[3:]], rel=1e-12)
    assert [r.loss for r in rest] == pytest.approx([r.loss for r in ref[3:]], rel=1e-6)
    for n, p in straight.named_params.items():
        torch.testing.assert_close(resumed.named_params[n], p, rtol=0, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_resuming_without_optimizer_state_would_differ():
    """Guards the test above: dropping the optimizer/schedule state does change the run, so it is not vacuous."""
    cfg = cfg_(steps=6, warmup_steps=2, schedule="cosine", lr=5e-3)
    batches = [as_batch(seed=s) for s in range(4)]
    straight = make_trainer(cfg)
    for b in batches:
        straight.train_step([b])
    first = make_trainer(cfg)
    for b in batches[:2]:
        first.train_step([b])
    naive = make_trainer(cfg)
    naive.load_trainable_state(first.trainable_state())
    for b in batches[2:]:
        naive.train_step([b])
    diff = max(float((naive.named_params[n] - p).detach().abs().max()) for n, p in straight.named_params.items())
    assert diff > 1e-5


def test_loading_a_state_from_other_lora_settings_is_refused():
    trainer = make_trainer(cfg_())
    state = trainer.trainable_state()
    state.pop(next(iter(state)))
    with pytest.raises(ConfigError, match="lacks 1 trainable"):
        trainer.load_trainable_state(state)
