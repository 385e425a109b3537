"""The client's privacy options reach the run: ``--privacy`` presets, ``--noise`` (activation, gradient and dχ),
``--obfuscate`` and ``--micro-batches`` change what the tiny model's run computes, and the summary / HELLO say
what was on (issue 16)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from guardedp2p.errors import ConfigError
from guardedp2p.privacy.obfuscation import ObfuscationConfig
from guardedp2p.service.client import TuneOptions, plan_tune, prepare_client, tune
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel
from tests.protocol_helpers import provider_app
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer, write_text_records


def _opts(tmp_path, name, protocol="online", steps=3, **kw):
    data = kw.pop("data", None) or write_text_records(tmp_path / "train.jsonl", distinct=20)
    train = TrainConfig(steps=steps, batch_size=4, lr=5e-3, warmup_steps=1, checkpoint_every=0, max_length=16, lora_r=4)
    return TuneOptions(
        protocol=protocol,
        model="tiny",
        data=str(data),
        out=str(tmp_path / name),
        train=train,
        progress=False,
        timeout=5.0,
        retries=0,
        skip_eval=True,
        public_text=str(data),
        **kw,
    )


def _run(tmp_path, name, model, **kw):
    opts = _opts(tmp_path, name, **kw)
    app = provider_app(model)
    client = prepare_client(opts, model=copy.deepcopy(model), tokenizer=tiny_tokenizer())
    return tune(opts, lambda: InProcClientChannel(app), client=client)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, model):
    return _run(tmp_path_factory.mktemp("clean"), "clean", model)


def test_gaussian_noise_changes_what_the_provider_computes_and_reports_epsilon(tmp_path, model, clean):
    noise = {"kind": "gaussian", "clip": 5.0, "noise_multiplier": 2.0, "clip_unit": "record", "delta": 1e-5}
    s = _run(tmp_path, "act-only", model, noise=noise)
    assert s["privacy"]["noise"]["run"]["epsilon"] == "inf", "Online's gradient leaves un-noised: no finite bound"
    s = _run(tmp_path, "dp", model, noise={**noise, "grad_clip": 1.0, "grad_noise_multiplier": 2.0})
    assert s["loss_first"] != pytest.approx(clean["loss_first"], abs=1e-4)
    run = s["privacy"]["noise"]["run"]
    assert run["epsilon"] > 0 and run["delta"] == 1e-5
    assert "seed" not in s["privacy"]["noise"]


def test_balanced_preset_puts_dx_on_the_input_and_names_itself(tmp_path, model, clean):
    s = _run(tmp_path, "balanced", model, privacy="balanced")
    assert s["privacy"]["preset"]["name"] == "balanced"
    assert s["privacy"]["noise"]["kind"] == "dx" and s["privacy"]["noise"]["keep_ids"] > 0
    assert s["loss_first"] != pytest.approx(clean["loss_first"], abs=1e-4)


def test_fields_preset_keeps_fewer_tokens_than_balanced_none_with_a_digit(tmp_path, model):
    from guardedp2p.privacy.noise import digit_token_ids

    tok = tiny_tokenizer()
    digits = set(digit_token_ids(tok))
    balanced = _run(tmp_path, "b", model, privacy="balanced")["privacy"]["noise"]["keep_ids"]
    fields = _run(tmp_path, "f", model, privacy="fields")["privacy"]
    assert fields["preset"]["name"] == "fields" and 0 < fields["noise"]["keep_ids"] < balanced
    assert digits, "the tiny vocabulary spells its words with digits (w1, w2, ...)"


def test_explicit_noise_overrides_the_preset(tmp_path, model):
    s = _run(tmp_path, "over", model, privacy="balanced", noise={"kind": "gaussian", "scale": 0.5})
    assert s["privacy"]["noise"]["kind"] == "gaussian"
    assert s["privacy"]["preset_noise_overridden"] is True


def test_obfuscation_adds_its_penalty_to_every_step(tmp_path, model, clean):
    obf = ObfuscationConfig(weight=1.0, hidden=0, warmup_steps=2, public_batch=4, max_length=16)
    s = _run(tmp_path, "obf", model, obfuscation=obf)
    assert s["privacy"]["obfuscation"]["weight"] == 1.0
    assert all(row["obfuscation"] > 0 for row in s["history"])
    assert s["history"][0]["loss"] > s["history"][0]["task_loss"]


def test_obfuscation_is_refused_for_gradfree(tmp_path):
    opts = _opts(tmp_path, "gf", protocol="gradfree", obfuscation=ObfuscationConfig())
    with pytest.raises(ConfigError, match="freezes"):
        plan_tune(opts)


def test_micro_batches_pipeline_the_steps_with_the_same_first_loss(tmp_path, model, clean):
    s = _run(tmp_path, "mb", model, micro_batches=2)
    assert s["micro_batches"] == 2 and s["steps"] == 3
    assert s["loss_first"] == pytest.approx(clean["loss_first"], rel=1e-4)
    assert s["client_cost"]["trainable_params"] > 0


def test_gradfree_with_noise_caches_each_records_noised_output_and_accounts_one_release(tmp_path, model):
    noise = {"kind": "gaussian", "clip": 5.0, "noise_multiplier": 1.0, "clip_unit": "record"}
    s = _run(tmp_path, "gf", model, protocol="gradfree", steps=25, noise=noise)  # 48 records, batch 4: 2+ epochs
    assert s["cache_hits"] > 0, "the second epoch is served from the cache, so nothing is sent again"
    releases = {r["name"]: r["count"] for r in s["privacy"]["noise"]["run"]["releases"]}
    assert list(releases.values()) == [1], releases
    cached_eps = s["privacy"]["noise"]["run"]["epsilon"]
    s2 = _run(tmp_path, "gf-nocache", model, protocol="gradfree", steps=25, noise=noise, cache=False)
    assert s2.get("cache_hits", 0) == 0 and s2["privacy"]["noise"]["run"]["epsilon"] > cached_eps


def test_a_run_cannot_be_resumed_under_other_privacy_settings(tmp_path, model):
    from guardedp2p.train.checkpoint import CheckpointError

    _run(tmp_path, "resume", model)
    with pytest.raises(CheckpointError, match="privacy setting"):
        _run(tmp_path, "resume", model, privacy="balanced", resume=True)


def test_the_dx_hook_leaves_the_bottom_with_the_run(tmp_path, model):
    opts = _opts(tmp_path, "hook", privacy="balanced")
    client = prepare_client(opts, model=copy.deepcopy(model), tokenizer=tiny_tokenizer())
    tune(opts, lambda: InProcClientChannel(provider_app(model)), client=client)
    from guardedp2p.privacy.noise import token_embedding

    assert not token_embedding(client.bottom)._forward_hooks


def test_a_retried_step_resends_the_noise_already_released_not_fresh_draws(tmp_path, model):
    """A step that fails after its activations left is retried on a new session; with fresh noise the provider
    would hold two independent noisings of the same records (a release the accountant never counted)."""
    from guardedp2p.transport.base import PeerTimeout
    from guardedp2p.wire.framing import MsgType, decode

    sent: list[torch.Tensor] = []
    failed_after: list[int] = []

    class DropsOneGradient(InProcClientChannel):
        def send(self, frames):
            msg = decode([bytes(f) for f in frames])
            if msg.type == MsgType.ACT_UP:
                sent.append(next(iter(msg.tensors.values())).clone())
            if msg.type == MsgType.GRAD_UP and len(sent) == 2 and not failed_after:
                failed_after.append(len(sent))  # the second step's activations are out: drop its gradient
                raise PeerTimeout("the provider went away mid-step")
            super().send(frames)

    noise = {"kind": "gaussian", "clip": 5.0, "noise_multiplier": 1.0, "clip_unit": "record", "delta": 1e-5}
    opts = replace(_opts(tmp_path, "retried", noise=noise), retries=1)
    app = provider_app(model)
    client = prepare_client(opts, model=copy.deepcopy(model), tokenizer=tiny_tokenizer())
    s = tune(opts, lambda: DropsOneGradient(app), client=client)
    assert failed_after and s["steps"] == 3
    assert len(sent) == 4, "three steps, the second sent twice (on the new session it is that session's step 1)"
    assert torch.equal(sent[1], sent[2]), "the retry re-sent the draws already released"
    assert s["privacy"]["noise"]["run"]["epsilon"] == "inf"


def test_pseudonymize_encodes_the_records_keeps_the_key_and_names_the_fields(tmp_path, model):
    """--pseudonymize: the records are tokenised with their field values substituted by the client's key, the key
    stays in OUT (owner-only) and the summary/HELLO name the fields, never the mapping."""
    import json
    import os

    from guardedp2p.privacy.pseudonym import FieldPseudonymizer, load_schema, read_key
    from guardedp2p.service.client import prepare_data

    values = ["w10", "w20", "w30", "w40"]
    data = tmp_path / "fields.jsonl"
    data.write_text("".join(json.dumps({"text": f"w3: {values[i % 4]} w5 w6 w7"}) + "\n" for i in range(24)))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"w3": values}))
    s = _run(tmp_path, "pseudo", model, pseudonym=str(schema), data=str(data))
    out = tmp_path / "pseudo"
    assert s["privacy"]["pseudonym"]["fields"] == ["w3"] and "w10" not in json.dumps(s["privacy"])
    assert os.stat(out / "pseudonym.key").st_mode & 0o777 == 0o600
    coder = FieldPseudonymizer(load_schema(out / "pseudonym.json"), read_key(out / "pseudonym.key"))
    tok = tiny_tokenizer()
    opts = _opts(tmp_path, "pseudo", pseudonym=str(schema), data=str(data))
    sent = prepare_data(opts, tok).train_examples
    plain = prepare_data(replace(opts, pseudonym=None), tok).train_examples
    assert len(sent) == len(plain)
    for a, b in zip(sent, plain):  # the value's token is the key's surrogate; nothing else moved
        wa, wb = tok.convert_ids_to_tokens(a["input_ids"]), tok.convert_ids_to_tokens(b["input_ids"])
        assert wa[2] == coder.forward["w3"][wb[2]] and wa[:2] + wa[3:] == wb[:2] + wb[3:]
    assert any(coder.forward["w3"][v] != v for v in values)
