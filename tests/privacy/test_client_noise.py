"""Noise on everything that leaves the client, through the trainer's hooks: clipped activation noise per record
or per token, the gradient sent up, dχ on the input embeddings, one generator per run; and the top's capacity
option (guardedp2p/privacy/noise.py, guardedp2p/train/trainer.py)."""

from __future__ import annotations

import pytest
import torch

from guardedp2p.engine.lora import LoraSettings, attach_lora
from guardedp2p.engine.split import SplitConfig, loss_fn, split_model
from guardedp2p.errors import ConfigError
from guardedp2p.privacy.noise import (
    NoiseConfig,
    add_activation_noise,
    add_gradient_noise,
    client_noise,
    clip_per_token,
    digit_token_ids,
    frequent_token_ids,
    install_input_noise,
    token_embedding,
)
from guardedp2p.train.config import TrainConfig
from guardedp2p.train.trainer import SplitTrainer
from tests.tiny_models import tiny_model

SPLIT = SplitConfig(bottom_layers=2, top_layers=2)


def batch(seed: int = 0, b: int = 3, length: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 160, (b, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make(cfg: TrainConfig | None = None, *, spy: list | None = None, grad_spy: list | None = None, **kw):
    model = tiny_model("llama", seed=0)
    parts = split_model(model, SPLIT)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    attach_lora(parts.bottom, parts.top, LoraSettings(r=4, alpha=8), bottom=kw.pop("train_bottom", True))

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.view_as(h)

        @staticmethod
        def backward(ctx, g):
            if grad_spy is not None:
                grad_spy.append(g.detach().clone())
            return g

    def trunk_fn(h1, mask, *, train, input_ids):
        if spy is not None:
            spy.append(h1.detach().clone())
        return Spy.apply(parts.trunk(h1, mask))

    trainer = SplitTrainer(
        parts.bottom, parts.top, trunk_fn, cfg or TrainConfig(steps=4, warmup_steps=0), loss_fn=loss_fn, **kw
    )
    return trainer, parts


# ------------------------------------------------------------------------------------------ generator once per run


def test_one_generator_per_run_two_steps_get_different_noise():
    """The same batch twice: what the provider receives differs by fresh noise (not re-seeded per step), while the
    clean activations are the same (lr 0 keeps the bottom still)."""
    noise = client_noise({"kind": "gaussian", "clip": 1.0, "noise_multiplier": 0.5})
    sent: list[torch.Tensor] = []
    clean: list[torch.Tensor] = []
    trainer, parts = make(TrainConfig(steps=4, warmup_steps=0, lr=1e-12), spy=sent, transform_sent=noise.sent)
    gen_state = noise.generator.get_state()
    b = batch()
    trainer.train_step([b])
    trainer.train_step([b])
    with torch.no_grad():
        for _ in range(2):
            clean.append(parts.bottom(b["input_ids"], b["attention_mask"]))
    assert torch.allclose(clean[0], clean[1])
    assert not torch.allclose(sent[0], sent[1])
    d = (sent[0] - sent[1]).std()
    assert float(d) == pytest.approx(0.5 * 2**0.5, rel=0.15)  # difference of two independent N(0, 0.25)
    assert not torch.equal(noise.generator.get_state(), gen_state)  # the run's one generator moved on


def test_the_online_run_makes_its_generator_once():
    """The run's session privacy (guardedp2p/privacy/session.py): one generator, fresh noise per call."""
    from guardedp2p.privacy.presets import RunShape
    from guardedp2p.privacy.session import resolve_session_privacy

    sp = resolve_session_privacy(
        preset="off",
        noise={"kind": "gaussian", "clip": 1.0, "noise_multiplier": 1.0},
        dcor_alpha=0.0,
        obfuscation=None,
        design="online",
        shape=RunShape(),
        tokenizer=None,
        bottom=None,
        d_model=8,
    )
    fn = sp.sent
    assert fn is not None
    h = torch.zeros(2, 3, 8)
    assert not torch.equal(fn(h), fn(h))


# ------------------------------------------------------------------------------------------ activation clipping


def test_record_and_token_clipping_bound_what_is_sent():
    h = torch.randn(4, 6, 16) * 10
    rec = add_activation_noise(h, NoiseConfig("gaussian", clip=2.0, scale=0.0))
    assert (rec.reshape(4, -1).norm(dim=1) <= 2.0 * (1 + 1e-5)).all()
    tok = clip_per_token(h, 0.5)
    assert (tok.norm(dim=-1) <= 0.5 * (1 + 1e-5)).all()
    cfg = NoiseConfig("gaussian", clip=0.5, noise_multiplier=2.0, clip_unit="token")
    assert cfg.effective_scale() == pytest.approx(1.0)
    out = add_activation_noise(h, cfg, torch.Generator().manual_seed(0))
    assert float((out - tok).std()) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "gaussian", "noise_multiplier": 1.0},  # no clip
        {"kind": "gaussian", "noise_multiplier": 1.0, "clip": 1.0, "scale": 0.2},  # two ways at once
        {"kind": "gaussian", "clip": 1.0, "clip_unit": "word"},
        {"kind": "gaussian", "clip": 1.0, "noise_multiplier": 1.0, "grad_clip": 1.0},  # half a gradient setting
        {"kind": "laplace", "scale": 1.0, "grad_clip": 1.0, "grad_noise_multiplier": 1.0},
        {"kind": "laplace", "clip": 1.0, "noise_multiplier": 1.0},
        {"kind": "dx", "epsilon": 5.0, "keep_ids": [1, 2]},  # no epsilon_keep
        {"kind": "gaussian", "scale": 1.0, "keep_ids": [1]},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        NoiseConfig(**kwargs)


def test_from_dict_refuses_unknown_keys_and_round_trips():
    with pytest.raises(ConfigError, match="accepted"):
        NoiseConfig.from_dict({"kind": "gaussian", "sigma": 1.0})
    cfg = NoiseConfig("dx", epsilon=5.0, keep_ids=(3, 4), epsilon_keep=50.0)
    assert NoiseConfig.from_dict(cfg.to_dict()) == cfg
    assert NoiseConfig.from_dict(None).kind == "none"


# ------------------------------------------------------------------------------------------ gradient sent up


def test_gradient_noise_clips_per_record_and_adds_noise():
    g = torch.randn(4, 5, 8)
    g[0] *= 1000
    cfg = NoiseConfig("gaussian", clip=1.0, noise_multiplier=1.0, grad_clip=0.1, grad_noise_multiplier=1e-9)
    out = add_gradient_noise(g, cfg, torch.Generator().manual_seed(0))
    # in units of one record's loss gradient (x B), each record's row has norm <= C_g
    assert ((out * 4).reshape(4, -1).norm(dim=1) <= 0.1 * (1 + 1e-4)).all()
    noisy = add_gradient_noise(
        torch.zeros(4, 5, 8),
        NoiseConfig("gaussian", clip=1.0, noise_multiplier=1.0, grad_clip=0.5, grad_noise_multiplier=2.0),
    )
    assert float((noisy * 4).std()) == pytest.approx(1.0, rel=0.25)
    assert add_gradient_noise(g, NoiseConfig("gaussian", scale=1.0)) is g


def test_trainer_noises_the_gradient_that_leaves_and_only_in_training():
    """grad_transform acts on dL/dh2 before the trunk's backward (which in Online sends GRAD_UP)."""
    clean: list[torch.Tensor] = []
    t0, _ = make(grad_spy=clean)
    t0.train_step([batch()])
    noise = client_noise(
        {"kind": "gaussian", "clip": 1e6, "noise_multiplier": 1e-9, "grad_clip": 1e-3, "grad_noise_multiplier": 5.0}
    )
    seen: list[torch.Tensor] = []
    t1, _ = make(grad_spy=seen, transform_sent=noise.sent, grad_transform=noise.grad)
    t1.train_step([batch()])
    assert len(seen) == len(clean) == 1
    # clipped to norm 1e-3 per record, the clean part is gone; what leaves is the N(0, (5e-3)²) noise (/ B = 3)
    assert float((seen[0] * 3).std()) == pytest.approx(5e-3, rel=0.2)
    cos = torch.nn.functional.cosine_similarity(seen[0].reshape(-1), clean[0].reshape(-1), dim=0)
    assert abs(float(cos)) < 0.2
    before = len(seen)
    t1.logits_fn(batch()["input_ids"], batch()["attention_mask"])  # evaluation: no backward, no hook
    assert len(seen) == before


# ------------------------------------------------------------------------------------------ dχ on the input


def test_dx_hook_perturbs_input_embeddings_with_run_generator():
    _, parts = make()
    b = batch()
    with torch.no_grad():
        clean = parts.bottom(b["input_ids"], b["attention_mask"])
    noise = client_noise({"kind": "dx", "epsilon": 50.0, "dx_project": False})
    noise.install(parts.bottom)
    with torch.no_grad():
        a = parts.bottom(b["input_ids"], b["attention_mask"])
        c = parts.bottom(b["input_ids"], b["attention_mask"])
    assert not torch.allclose(a, clean) and not torch.allclose(a, c)
    noise.remove()
    with torch.no_grad():
        assert torch.allclose(parts.bottom(b["input_ids"], b["attention_mask"]), clean)
    assert install_input_noise(parts.bottom, NoiseConfig("gaussian", scale=1.0)) is None


def test_token_selective_dx_spares_the_kept_tokens():
    _, parts = make()
    emb = token_embedding(parts.bottom)
    ids = torch.arange(3, 103).view(4, 25)
    keep = list(range(3, 53))
    cfg = NoiseConfig("dx", epsilon=2.0, epsilon_keep=1e5, keep_ids=tuple(keep), dx_project=True)
    install_input_noise(parts.bottom, cfg, torch.Generator().manual_seed(0))
    out = emb(ids)
    same = (out - emb.weight[ids]).norm(dim=-1) < 1e-6
    kept = torch.isin(ids, torch.tensor(keep))
    assert bool(same[kept].all())  # ε_keep huge: kept tokens come through
    assert float(same[~kept].float().mean()) < 0.3  # the others are mostly substituted


def test_frequent_token_ids_by_share_of_records():
    seqs = [[5, 5, 5, 5, 9], [5, 7, 11], [7, 5, 2]]
    assert frequent_token_ids(seqs, 2) == [5, 7]  # 9 is frequent in one record only: share 1/3
    assert frequent_token_ids(seqs, min_share=0.5) == [5, 7]
    assert frequent_token_ids(seqs, min_share=1.0) == [5]
    assert frequent_token_ids(seqs, 2, exclude=[5]) == [7, 2]
    with pytest.raises(ConfigError):
        frequent_token_ids(seqs, -1)
    with pytest.raises(ConfigError):
        frequent_token_ids(seqs, min_share=2.0)


def test_digit_token_ids_are_every_token_spelling_a_digit():
    class Tok:
        vocab = {"a": 0, "1": 1, " 20": 2, "b7": 3, " x": 4, "\u00b2": 5}

        def get_vocab(self):
            return dict(self.vocab)

        def decode(self, ids):
            return {v: k for k, v in self.vocab.items()}[ids[0]]

    assert digit_token_ids(Tok()) == [1, 2, 3, 5]
    seqs = [[0, 1, 4], [1, 0], [1, 4, 0]]  # every record has the digit "1" (a date, an account number)
    assert 1 in frequent_token_ids(seqs, min_share=0.5)
    assert frequent_token_ids(seqs, min_share=0.5, exclude=digit_token_ids(Tok())) == [0, 4]


# ------------------------------------------------------------------------------------------ top capacity


def test_top_blocks_train_in_full_but_never_a_shared_weight():
    t, parts = make(TrainConfig(steps=2, warmup_steps=0, top_train="blocks", top_lr=1e-3), train_bottom=False)
    names = [n for n in t.named_params if n.startswith("top.")]
    assert any("base_layer" in n or "mlp" in n for n in names)
    shared = {id(p) for p in parts.bottom.parameters()}
    assert not any(id(p) in shared for n, p in t.named_params.items())
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert not any(n.startswith("bottom.") for n in t.named_params)
    lrs = sorted({g["lr"] for g in t.optimizer.param_groups})
    assert lrs == [1e-3]
    before = {n: p.detach().clone() for n, p in t.named_params.items()}
    b = batch()
    with torch.no_grad():
        h1 = parts.bottom(b["input_ids"], b["attention_mask"])
    t.train_step([b])
    with torch.no_grad():
        assert torch.equal(parts.bottom(b["input_ids"], b["attention_mask"]), h1)  # what is sent did not move
    moved = [n for n, p in t.named_params.items() if not torch.equal(p, before[n]) and "lora" not in n]
    assert moved
    with pytest.raises(ConfigError):
        TrainConfig(top_train="everything").validate()


def test_client_cost_reports_params_time_memory():
    t, _ = make()
    t.train_step([batch()])
    cost = t.client_cost()
    assert cost["trainable_params"] > 0 and cost["client_params"] >= cost["trainable_params"]
    assert cost["step_s"] > 0 and cost["peak_rss_mib"] > 0


# ------------------------------------------------------------------------------------------ --noise spec


def test_parse_noise_spec():
    from guardedp2p.privacy.noise import parse_noise_spec

    assert parse_noise_spec(None) == {} and parse_noise_spec("none") == {}
    assert parse_noise_spec("gaussian:0.1") == {"kind": "gaussian", "scale": 0.1}
    assert parse_noise_spec("gaussian:clip=620,z=1.7,unit=token,grad_clip=1,grad_z=1.7") == {
        "kind": "gaussian",
        "clip": 620.0,
        "noise_multiplier": 1.7,
        "clip_unit": "token",
        "grad_clip": 1.0,
        "grad_noise_multiplier": 1.7,
    }
    assert parse_noise_spec("dx:eps=30,project=false") == {"kind": "dx", "epsilon": 30.0, "dx_project": False}
    for bad in (
        "uniform:1",
        "gaussian:abc",
        "gaussian:z=1",
        "gaussian:seed=3,clip=1",
        "gaussian:clip=x",
        "dx:eps=3,project=maybe",
        "gaussian:clip=1,z=1,grad_clip=1",
    ):
        with pytest.raises(ConfigError):
            parse_noise_spec(bad)
