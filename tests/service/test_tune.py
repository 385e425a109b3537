"""Whole runs of the client's ``tune`` over the in-process channel on a tiny model: outputs, resumption with
no lost or repeated step, and the Gradfree invariants (no gradient bytes, cached second epoch)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from guardedp2p.service.client import TrainingInterrupted, TuneOptions, prepare_client, tune
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel
from tests.protocol_helpers import provider_app
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer, write_text_records


def _opts(tmp_path, protocol="online", steps=6, distinct=100, **kw):
    data = write_text_records(tmp_path / "train.jsonl", distinct=distinct)
    train = TrainConfig(
        steps=steps, batch_size=4, lr=5e-3, warmup_steps=1, checkpoint_every=2, max_length=16, lora_r=4, lora_alpha=8
    )
    return TuneOptions(
        protocol=protocol,
        model="tiny",
        data=str(data),
        out=str(tmp_path / f"run-{protocol}"),
        train=train,
        progress=False,
        timeout=1.0,
        retries=0,
        eval_batch_size=8,
        **kw,
    )


def _client(model, opts):
    return prepare_client(opts, model=copy.deepcopy(model), tokenizer=tiny_tokenizer())


def test_online_tune_writes_adapter_checkpoint_and_summary(tmp_path):
    model = tiny_model("llama")
    app = provider_app(model)
    opts = _opts(tmp_path, steps=12, distinct=3)
    opts.train.lr = 1e-2
    s = tune(opts, lambda: InProcClientChannel(app), client=_client(model, opts))
    assert s["steps"] == 12 and len(s["history"]) == 12
    assert s["loss_last"] < s["loss_first"]
    assert s["eval_metric"] == "loss" and s["eval_after"] < s["eval_before"]
    assert s["gradient_bytes"] > 0 and s["bytes_up"] > 0 and s["bytes_down"] > 0
    assert (tmp_path / "run-online" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "run-online" / "summary.json").read_text())["steps"] == 12
    assert not app.sessions, "the client says BYE at the end"


def test_adapter_loads_with_stock_peft_and_gives_the_same_eval_loss(tmp_path):
    from peft import PeftModel

    from guardedp2p.data.collate import collate
    from guardedp2p.engine.split import loss_fn

    model = tiny_model("llama")
    app = provider_app(model)
    opts = _opts(tmp_path, steps=4)
    client = _client(model, opts)
    s = tune(opts, lambda: InProcClientChannel(app), client=client)
    full = PeftModel.from_pretrained(copy.deepcopy(model), s["adapter_dir"]).eval()
    tok = tiny_tokenizer()
    b = collate(
        [{"input_ids": tok("w1 w2 w3 w4 w5")["input_ids"], "labels": tok("w1 w2 w3 w4 w5")["input_ids"]}],
        tok.pad_token_id,
    )
    with torch.no_grad():
        ref = full(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        h2 = app_trunk_forward(model, client.bottom(b["input_ids"], b["attention_mask"]), b["attention_mask"])
        mine = loss_fn(client.top(h2, b["attention_mask"]), b["labels"])
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protocol", ["gradfree", "online"])
def test_top_blocks_run_saves_them_and_the_adapter_computes_the_tuned_model(tmp_path, protocol):
    """--top-train blocks end to end: the top's blocks train in full at their own lr, the adapter carries them as
    PEFT modules_to_save, and stock PEFT on the full model computes what the tuned split computes."""
    from peft import PeftModel

    from guardedp2p.data.collate import collate
    from guardedp2p.engine.split import loss_fn

    model = tiny_model("llama")
    app = provider_app(model)
    opts = _opts(tmp_path, protocol=protocol, steps=4)
    opts.train.top_train, opts.train.top_lr = "blocks", 5e-4
    client = _client(model, opts)
    before = {n: p.detach().clone() for n, p in client.top.named_parameters() if ".layers.5.mlp.down_proj" in n}
    s = tune(opts, lambda: InProcClientChannel(app), client=client)
    after = dict(client.top.named_parameters())
    assert any(not torch.equal(v, after[n]) for n, v in before.items()), "the top block itself trained"
    conf = json.loads((tmp_path / f"run-{protocol}" / "adapter" / "adapter_config.json").read_text())
    assert conf["modules_to_save"] == ["model.layers.4", "model.layers.5", "model.norm"]
    full = PeftModel.from_pretrained(copy.deepcopy(model), s["adapter_dir"]).eval()
    tok = tiny_tokenizer()
    ids = tok("w1 w2 w3 w4 w5")["input_ids"]
    b = collate([{"input_ids": ids, "labels": ids}], tok.pad_token_id)
    with torch.no_grad():
        ref = full(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        h2 = app_trunk_forward(model, client.bottom(b["input_ids"], b["attention_mask"]), b["attention_mask"])
        mine = loss_fn(client.top(h2, b["attention_mask"]), b["labels"])
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_top_blocks_are_refused_for_offline(tmp_path):
    from guardedp2p.errors import ConfigError
    from guardedp2p.service.client import plan_tune

    opts = _opts(tmp_path, protocol="offline")
    opts.train.top_train = "blocks"
    with pytest.raises(ConfigError, match="full-block adapters"):
        plan_tune(opts)


def app_trunk_forward(model, h1, mask):
    from guardedp2p.engine.split import build_trunk

    return build_trunk(copy.deepcopy(model))(h1, mask)


def test_provider_death_checkpoints_and_resume_continues_without_lost_or_repeated_step(tmp_path):
    model = tiny_model("llama")
    # reference: one uninterrupted run
    ref_opts = _opts(tmp_path / "ref", steps=6) if (tmp_path / "ref").mkdir() is None else None
    ref_client = _client(model, ref_opts)
    ref = tune(ref_opts, lambda: InProcClientChannel(provider_app(model)), client=ref_client)

    (tmp_path / "cut").mkdir()
    opts = _opts(tmp_path / "cut", steps=6)
    app = provider_app(model)
    dying = InProcClientChannel(app)
    dying.fail_after = 1 + 2 * 3 + 1  # HELLO, 3 full steps, then the provider vanishes mid-step 4
    opts.skip_eval = True
    ref_opts.skip_eval = True
    with pytest.raises(TrainingInterrupted, match="--resume"):
        tune(opts, lambda: dying, client=_client(model, opts))
    state = json.loads((tmp_path / "cut" / "run-online" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3

    opts.resume = True
    app2 = provider_app(model)  # a restarted provider: a brand-new session
    resumed_client = _client(model, opts)
    s = tune(opts, lambda: InProcClientChannel(app2), client=resumed_client)
    assert s["resumed_from"] == 3 and s["steps"] == 6
    assert [h["step"] for h in s["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in s["history"]] == pytest.approx([h["loss"] for h in ref["history"]], rel=1e-5)
    for (n, a), (_, b) in zip(sorted(_lora(resumed_client).items()), sorted(_lora(ref_client).items())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)


def _lora(client):
    return {
        f"{i}.{n}": p.detach()
        for i, part in enumerate((client.bottom, client.top))
        for n, p in part.named_parameters()
        if p.requires_grad
    }


def test_gradfree_sends_no_gradient_bytes_and_epoch_two_is_served_from_cache(tmp_path):
    model = tiny_model("llama")
    app = provider_app(model)
    # 48 records, 4 held out for evaluation: 44 examples / batch 4 = 11 steps per epoch
    opts = _opts(tmp_path, protocol="gradfree", steps=22)
    opts.skip_eval = True
    s = tune(opts, lambda: InProcClientChannel(app), client=_client(model, opts))
    assert s["gradient_bytes"] == 0
    assert "GRAD_UP" not in s["bytes_by_type"]["up"] and "GRAD_DOWN" not in s["bytes_by_type"]["down"]
    epoch1, epoch2 = s["history"][:11], s["history"][11:]
    assert sum(h["bytes_up"] for h in epoch1) > 0
    assert all(h["bytes_up"] == 0 and h["bytes_down"] == 0 for h in epoch2), "epoch 2 must cost no traffic"
    assert s["cache_hits"] + s["cache_misses"] == 88 and s["cache_misses"] <= 44 and s["cache_hits"] >= 44
    assert s["loss_last"] < s["loss_first"]


def test_gradfree_provider_rejects_gradient_messages(tmp_path):
    from guardedp2p.wire.framing import Message, decode, encode
    from guardedp2p.wire.messages import MsgType
    from tests.protocol_helpers import client_parts, open_session

    model = tiny_model("llama")
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    session = open_session(app, fp, protocol="gradfree")
    msg = Message(
        MsgType.GRAD_UP,
        session=session.sid,
        step=1,
        tensors={"g": torch.zeros(1, 2, model.config.hidden_size)},
        codecs={"g": "fp32"},
    )
    reply = decode(app.handle("inproc:client", encode(msg)))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "not-allowed"
    assert MsgType.GRAD_UP not in app.sessions[session.sid].handler.handlers
