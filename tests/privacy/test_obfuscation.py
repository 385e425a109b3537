"""The learned obfuscation defence (guardedp2p/privacy/obfuscation.py) through the trainer's obfuscation hook:
on a tiny model, a bottom trained against the client's own inverter leaves a *fresh* inverter (trained afterwards
on public text through the final bottom, as an attacker would) reading back fewer tokens than without it."""

from __future__ import annotations

import pytest
import torch

from guardedp2p.engine.lora import LoraSettings, attach_lora
from guardedp2p.engine.split import SplitConfig, loss_fn, split_model
from guardedp2p.errors import ConfigError
from guardedp2p.privacy.obfuscation import ObfuscationConfig, Obfuscator, TokenInverter, inverter_token_accuracy
from guardedp2p.train.config import TrainConfig
from guardedp2p.train.trainer import SplitTrainer
from tests.tiny_models import tiny_model

SPLIT = SplitConfig(bottom_layers=2, top_layers=2)
D = 64


def sequences(n: int, seed: int, length: int = 12) -> list[list[int]]:
    """Sequences with structure (each token is the previous + a small step), so the task is learnable."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(3, 150, (1,), generator=g))
        steps = torch.randint(0, 3, (length,), generator=g)
        out.append([3 + (start + int(s)) % 157 for s in torch.cumsum(steps, 0)])
    return out


def as_batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(seqs)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def trained_bottom(weight: float | None, steps: int = 25):
    model = tiny_model("llama", seed=0)
    parts = split_model(model, SPLIT)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    attach_lora(parts.bottom, parts.top, LoraSettings(r=4, alpha=8))
    for name, p in parts.bottom.named_parameters():  # give the tiny bottom room to move (its blocks train too)
        if ".layers." in name and "lora" not in name:
            p.requires_grad_(True)

    def trunk_fn(h1, mask, *, train, input_ids):
        return parts.trunk(h1, mask)

    obf = None
    if weight is not None:
        cfg = ObfuscationConfig(weight=weight, hidden=64, inner_steps=2, warmup_steps=30, public_batch=16, lr=3e-3)
        obf = Obfuscator(cfg, parts.bottom, sequences(200, seed=7), D)
    trainer = SplitTrainer(
        parts.bottom,
        parts.top,
        trunk_fn,
        TrainConfig(steps=steps, warmup_steps=0, lr=3e-3),
        loss_fn=loss_fn,
        obfuscation=obf,
    )
    private = sequences(8 * steps, seed=11)
    res = None
    for s in range(steps):
        res = trainer.train_step([as_batch(private[8 * s : 8 * s + 8])])
    return parts.bottom, res, obf


def fresh_attacker_accuracy(bottom) -> float:
    """An attacker's inverter, trained from scratch on public text through the final bottom, on unseen records."""
    torch.manual_seed(5)
    public = sequences(400, seed=21)
    inv = TokenInverter(D, range(160), hidden=128)
    opt = torch.optim.AdamW(inv.parameters(), lr=3e-3)
    bottom.train(False)
    with torch.no_grad():
        feats = [bottom(torch.tensor(public[i : i + 32]), None) for i in range(0, 400, 32)]
    for _ in range(12):
        for i, h in enumerate(feats):
            ids = torch.tensor(public[32 * i : 32 * i + 32])
            loss = torch.nn.functional.cross_entropy(inv(h).reshape(-1, inv.n_out), ids.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    test = torch.tensor(sequences(64, seed=99))
    with torch.no_grad():
        h = bottom(test, None)
    return inverter_token_accuracy(inv, h, test, torch.ones_like(test))


def test_adversarial_defence_lowers_a_fresh_inverters_token_accuracy():
    plain, plain_res, _ = trained_bottom(None)
    defended, res, obf = trained_bottom(4.0)
    acc_plain = fresh_attacker_accuracy(plain)
    acc_def = fresh_attacker_accuracy(defended)
    assert acc_plain > 0.5  # undefended: the attacker reads most tokens back
    assert acc_def < acc_plain - 0.15, (acc_plain, acc_def)
    assert obf is not None and obf.inner_updates == 30 + 2 * 25
    assert res is not None and res.obfuscation >= 0
    assert res.task_loss < plain_res.task_loss + 1.5  # it still learns the task


def test_penalty_is_zero_at_chance_and_differentiable():
    _, parts = None, split_model(tiny_model("llama", seed=0), SPLIT)
    cfg = ObfuscationConfig(weight=2.0, hidden=0, inner_steps=0, warmup_steps=0)
    obf = Obfuscator(cfg, parts.bottom, sequences(10, seed=1), D)
    ids = torch.tensor(sequences(2, seed=3))
    h = torch.zeros(2, 12, D, requires_grad=True)
    with torch.no_grad():
        for p in obf.inverter.parameters():
            p.zero_()  # uniform prediction: chance
    val = obf.penalty(h, ids, torch.ones_like(ids))
    assert float(val) == pytest.approx(0.0, abs=1e-6)
    obf2 = Obfuscator(cfg, parts.bottom, sequences(10, seed=1), D)
    h2 = torch.randn(2, 12, D, requires_grad=True)
    val2 = obf2.penalty(h2, ids, torch.ones_like(ids))
    val2.backward()
    assert h2.grad is not None and float(val2) >= 0
    assert all(p.grad is None for p in obf2.inverter.parameters())  # the penalty never trains the inverter
    assert obf2.stats()["inner_updates"] == 0


def test_config_validation_and_describe():
    with pytest.raises(ConfigError):
        ObfuscationConfig(weight=-1).validate()
    with pytest.raises(ConfigError):
        ObfuscationConfig(public_batch=0).validate()
    with pytest.raises(ConfigError):
        Obfuscator(ObfuscationConfig(), lambda i, m: i, [[1]], D)
    d = ObfuscationConfig(weight=0.5).describe()
    assert d["weight"] == 0.5 and "adversarial" in d["mechanism"]
