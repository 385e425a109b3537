"""``--privacy off|balanced|fields|strong`` resolve to the documented parameters (guardedp2p/privacy/presets.py)."""

from __future__ import annotations

import json

import pytest

from guardedp2p.errors import ConfigError
from guardedp2p.privacy import presets as P
from guardedp2p.privacy.accounting import account, plan_run
from guardedp2p.privacy.noise import NoiseConfig, frequent_token_ids


def test_off_is_no_defence():
    p = P.resolve_preset("off")
    assert p.noise == {} and p.dcor_alpha == 0 and p.target_epsilon is None
    assert p.describe()["noise"] == {"kind": "none"}


def test_balanced_is_token_selective_dx_with_the_documented_epsilons():
    public = [[5, 5, 7, 9], [5, 7, 11]] * 3 + [[20 + i, 5] for i in range(40)]  # 20+i: in one record each
    p = P.resolve_preset("balanced", public_ids=public)
    assert p.noise["kind"] == "dx" and p.noise["dx_project"] is True
    assert p.noise["epsilon"] == P.BALANCED_EPSILON == 30.0
    assert p.noise["epsilon_keep"] == P.BALANCED_EPSILON_KEEP == 200.0
    assert p.noise["keep_ids"] == frequent_token_ids(public, min_share=P.BALANCED_KEEP_SHARE) == [5, 7]
    assert P.BALANCED_KEEP_SHARE == 0.1  # 9 and 11 are in 3 of 46 records, 20 + i in one each: not kept
    cfg = p.noise_config()
    assert cfg.keep_ids == (5, 7)
    plain = P.resolve_preset("balanced")
    assert "keep_ids" not in plain.noise and plain.noise["epsilon"] == 30.0


def test_fields_is_balanced_without_the_digits_on_its_keep_list():
    public = [[5, 5, 7, 9], [5, 7, 11]] * 3 + [[20 + i, 5] for i in range(40)]
    balanced = P.resolve_preset("balanced", public_ids=public)
    fields = P.resolve_preset("fields", public_ids=public, digit_ids=[7])  # 7: a digit in every record
    assert balanced.noise["keep_ids"] == [5, 7] and fields.noise["keep_ids"] == [5]
    assert {k: v for k, v in fields.noise.items() if k != "keep_ids"} == {
        k: v for k, v in balanced.noise.items() if k != "keep_ids"
    }
    assert fields.describe()["name"] == "fields" and "diagnoses 100 %" in fields.evidence


@pytest.mark.parametrize(
    "shape,releases",
    [
        (P.RunShape(), {"activation": 1, "gradient": 1}),  # the demo: 60 steps x 4 < 300 records
        (P.RunShape(design="gradfree", steps=150), {"activation": 2}),
        (P.RunShape(design="gradfree", steps=150, cached=True), {"activation": 1}),
    ],
)
def test_strong_meets_its_target_epsilon_over_the_run(shape, releases):
    p = P.resolve_preset("strong", shape=shape)
    n = p.noise
    assert n["kind"] == "gaussian" and n["clip"] == P.STRONG_CLIP and n["clip_unit"] == "record"
    assert n["delta"] == P.STRONG_DELTA == 1e-5 and p.target_epsilon == P.STRONG_EPSILON == 8.0
    assert ("grad_clip" in n) == (shape.design == "online")
    cfg = NoiseConfig.from_dict(n)
    plan = plan_run(
        cfg,
        design=shape.design,
        steps=shape.steps,
        batch_size=shape.batch_size,
        n_records=shape.n_records,
        cached=shape.cached,
    )
    assert {r.name: r.count for r in plan.releases} == releases
    eps = account(cfg, plan).epsilon
    assert 7.9 <= eps <= 8.0  # calibrated to the target, rounded up to stay within it


def test_strong_multiplier_grows_with_releases():
    one = P.resolve_preset("strong", shape=P.RunShape(design="gradfree")).noise["noise_multiplier"]
    two = P.resolve_preset("strong", shape=P.RunShape()).noise["noise_multiplier"]
    assert 1.0 < one < two


def test_describe_is_json_for_the_handshake_and_unknown_names_are_refused():
    for name in P.PRESETS:
        d = P.resolve_preset(name).describe()
        json.dumps(d)
        assert d["name"] == name and d["evidence"]
    with pytest.raises(ConfigError, match="off, balanced, fields, strong"):
        P.resolve_preset("paranoid")
    assert P.resolve_preset("strong", shape=P.RunShape(design="offline")).noise == {}
