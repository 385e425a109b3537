"""The adaptive attacker (guardedp2p/attacks/adaptive.py) on a tiny random model: it replays the defence, its inverter
converges and reads undefended activations, and a blinded one cannot."""

from __future__ import annotations

import random

import pytest
import torch

from guardedp2p.attacks.adaptive import (
    AdaptiveConfig,
    Mechanism,
    invert,
    mechanism_transform,
    simulate_client_run,
    train_adaptive_inverter,
)
from guardedp2p.attacks.common import codec_transform
from guardedp2p.attacks.sip import SIPConfig
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import WORDS, tiny_tokenizer

SMALL = AdaptiveConfig(
    sip=SIPConfig(batch_size=16, lr=1e-2, hidden=32, holdout=0.0), max_epochs=3, eval_every=8, patience=2
)


def _records(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.randrange(0, 100)
        out.append({"text": " ".join(WORDS[(s + k) % 100] for k in range(rng.randint(5, 10)))})
    return out


def _mech(**kw):
    return Mechanism(
        **{"steps": 4, "batch_size": 4, "max_length": 16, "lora_r": 4, "lora_alpha": 8, "warmup_steps": 0, **kw}
    )


def test_the_mechanism_is_the_wires():
    assert mechanism_transform("fp32", {}) is None
    h = torch.randn(2, 5, 64)
    assert torch.equal(mechanism_transform("int8", {})(h), codec_transform("int8")(h))
    noisy = mechanism_transform("fp32", {"kind": "gaussian", "scale": 0.5})
    a, b = noisy(h), noisy(h)
    assert not torch.equal(a, b), "fresh noise every call, as on the wire"
    assert 0.4 < float((a - h).std()) < 0.6
    m = _mech(up_codec="nf4", dcor_alpha=2.0)
    assert m.key() != _mech(dcor_alpha=2.0).key() and m.simulation_key() == _mech(dcor_alpha=2.0).simulation_key()
    assert "dCor alpha 2" in m.describe() and "nf4" in m.describe()


def test_input_side_noise_is_replayed_on_the_attackers_bottom():
    from guardedp2p.attacks.adaptive import install_input_mechanism
    from guardedp2p.engine.split import SplitConfig, split_model

    dx = {"kind": "dx", "epsilon": 5.0}
    assert mechanism_transform("fp32", dx) is None  # dχ acts on the input embeddings, before the bottom
    bottom = split_model(tiny_model("llama"), SplitConfig(2, 2)).bottom
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        clean = bottom(ids, mask)
        cn = install_input_mechanism(bottom, dx)
        noisy = bottom(ids, mask)
        cn.remove()
    assert not torch.allclose(clean, noisy)
    assert install_input_mechanism(bottom, {"kind": "gaussian", "scale": 1.0}) is None


def test_replay_trains_the_bottom_only_where_the_design_does():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = [tok(r["text"])["input_ids"] for r in _records(16, 0)]
    assert simulate_client_run(model, tok, ids, _mech(design="gradfree"), [0, 2, 4]) == {0: {}, 2: {}, 4: {}}
    plain = simulate_client_run(model, tok, ids, _mech(), [0, 2, 4])
    dcor = simulate_client_run(model, tok, ids, _mech(dcor_alpha=4.0), [4])
    assert plain[0] == {} and plain[2] and plain[4]
    k = next(iter(plain[4]))
    assert k.startswith("bottom.") and "lora" in k
    assert not torch.equal(plain[2][k], plain[4][k])
    assert not torch.equal(plain[4][k], dcor[4][k]), "the dCor penalty changes what the replayed bottom learns"
    assert all("lora" not in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    aux, hold = _records(160, 1), _records(24, 2)
    return model, tok, train_adaptive_inverter(model, tok, aux, hold, _mech(), SMALL)


def test_inverter_converges_and_reads_undefended_activations(trained):
    from guardedp2p.engine.split import SplitConfig, split_model

    model, tok, adaptive = trained
    s = adaptive.summary()
    assert s["snapshot_steps"] == [0, 2, 4] and s["aux_train"] == 160 and s["aux_holdout"] == 24
    assert s["holdout_rougeL"] > 0.9 and s["convergence"][0]["step"] == 8
    assert [c["step"] for c in s["convergence"]] == sorted(c["step"] for c in s["convergence"])
    # a client sentence it never saw, through the pre-trained bottom (an Online client at step 0)
    recs = _records(3, 99)
    enc = [tok(r["text"])["input_ids"] for r in recs]
    L = max(map(len, enc))
    ids = torch.tensor([e + [0] * (L - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (L - len(e)) for e in enc])
    h1 = split_model(model, SplitConfig(2, 2)).bottom(ids, mask)
    guess = invert(adaptive, h1, mask)
    acc = float((guess == ids)[mask.bool()].float().mean())
    assert acc > 0.9
    blind = float((invert(adaptive, h1, mask, blind=True) == ids)[mask.bool()].float().mean())
    assert blind < 0.3


def test_blinded_training_learns_nothing(trained):
    model, tok, _ = trained
    blind = train_adaptive_inverter(
        model, tok, _records(160, 1), _records(24, 2), _mech(design="gradfree"), SMALL, blind=True
    )
    assert blind.summary()["holdout_rougeL"] < 0.3
