"""Pipelined split steps (issue 19): the same optimizer step as the trainer's, with micro-batches in flight.

N = 1 must be the trainer's step bit for bit; N > 1 the same gradient within float tolerance (each micro-batch's
loss weighted by its share of the label tokens); never more micro-batches on the wire than the window.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from guardedp2p.designs.gradfree.client import CachedRemoteTrunk, TrunkOutputCache
from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.designs.online.pipeline import (
    PipelineConfig,
    PipelinedStep,
    label_tokens,
    pipelined_step,
    split_batch,
)
from guardedp2p.engine.split import loss_fn
from guardedp2p.errors import ConfigError, RemoteError
from guardedp2p.privacy.dcor import dcor_penalty
from guardedp2p.protocol.provider import ProviderConfig
from guardedp2p.train.config import TrainConfig
from guardedp2p.train.trainer import SplitTrainer
from tests.protocol_helpers import batch, client_parts, open_session, provider_app
from tests.tiny_models import tiny_model

FP32 = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


def _batches(vocab: int, n: int, *, b: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    return [batch(vocab, b=b, length=length, seed=10 + i) for i in range(n)]


class _Side:
    """One client (its own parts, trainer and session) against its own provider."""

    def __init__(
        self,
        model: torch.nn.Module,
        protocol: str,
        *,
        dcor: float = 0.0,
        config: ProviderConfig | None = None,
        cache_dir: Any = None,
    ) -> None:
        gradients = protocol == "online"
        self.app = provider_app(model, config=config)
        self.parts, fp = client_parts(model, bottom=gradients)
        codecs = FP32 if gradients else {"up": "fp32", "down": "fp32"}
        self.session = open_session(self.app, fp, protocol=protocol, codecs=codecs)
        self.remote = RemoteTrunk(self.session, codecs, gradients=gradients)
        self.cache = TrunkOutputCache(cache_dir, fp, "fp32") if cache_dir is not None else None
        cached = CachedRemoteTrunk(self.remote, self.cache) if not gradients else None

        def trunk(h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
            if cached is not None:
                return cached(h1, mask, train=train, input_ids=input_ids)
            return self.remote(h1, mask, train=train)

        cfg = TrainConfig(lr=1e-2, warmup_steps=0, dcor_alpha=dcor, max_grad_norm=1.0)
        self.trainer = SplitTrainer(
            self.parts.bottom,
            self.parts.top,
            trunk,
            cfg,
            loss_fn=loss_fn,
            train_bottom=gradients,
            dcor_fn=dcor_penalty if dcor else None,
        )

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainer.named_params.items()}

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.trainer.named_params.items() if p.grad is not None}


def _no_step(trainer: SplitTrainer) -> None:
    """Compare raw gradients: no clipping (the optimizer leaves ``.grad`` in place after its step)."""
    trainer.cfg.max_grad_norm = 0.0


@pytest.mark.parametrize("protocol", ["online", "gradfree"])
@pytest.mark.parametrize("accum", [1, 2])
def test_one_micro_batch_is_the_trainers_step_bit_for_bit(model: torch.nn.Module, protocol: str, accum: int) -> None:
    ref, pipe = _Side(model, protocol), _Side(model, protocol)
    step = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=1))
    for i in range(3):
        batches = _batches(model.config.vocab_size, accum, b=3)
        a = ref.trainer.train_step([copy.deepcopy(b) for b in batches])
        b = step(pipe.trainer, [copy.deepcopy(b) for b in batches])
        assert (a.loss, a.task_loss, a.dcor, a.lr, a.step) == (b.loss, b.task_loss, b.dcor, b.lr, b.step), i
        for (n, p), q in zip(ref.params().items(), pipe.params().values()):
            assert torch.equal(p, q), (i, n)
    assert pipe.trainer.times.steps == 3 and len(pipe.trainer.times.history) == 3


def test_one_micro_batch_with_dcor_is_bit_identical(model: torch.nn.Module) -> None:
    ref, pipe = _Side(model, "online", dcor=0.5), _Side(model, "online", dcor=0.5)
    step = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=1))
    batches = _batches(model.config.vocab_size, 1)
    a = ref.trainer.train_step(copy.deepcopy(batches))
    b = step(pipe.trainer, copy.deepcopy(batches))
    assert a.dcor > 0 and (a.loss, a.dcor) == (b.loss, b.dcor)
    for p, q in zip(ref.params().values(), pipe.params().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("protocol", ["online", "gradfree"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_micro_batches_give_the_unpipelined_gradient(model: torch.nn.Module, protocol: str, n: int) -> None:
    ref, pipe = _Side(model, protocol), _Side(model, protocol)
    _no_step(ref.trainer)
    _no_step(pipe.trainer)
    batches = _batches(model.config.vocab_size, 2)  # grad-accum 2, rows with 0..3 pads
    a = ref.trainer.train_step(copy.deepcopy(batches))
    b = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=n))(pipe.trainer, copy.deepcopy(batches))
    assert b.task_loss == pytest.approx(a.task_loss, rel=1e-5) and b.loss == pytest.approx(a.loss, rel=1e-5)
    ga, gb = ref.grads(), pipe.grads()
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)
    # the provider saw every row once per step (Online: each graph freed by its GRAD_UP)
    sessions = list(pipe.app.sessions.values())
    assert all(not getattr(s.handler, "pending", {}) for s in sessions)


def test_micro_batches_with_dcor_average_the_penalty(model: torch.nn.Module) -> None:
    """dCor is not a sum over tokens: pipelined, it is the mean of the micro-batches' penalties."""
    pipe = _Side(model, "online", dcor=0.5)
    batches = _batches(model.config.vocab_size, 1)
    halves = [part for part, _ in split_batch(batches[0], 2)]
    with torch.no_grad():
        want = [
            float(
                dcor_penalty(
                    pipe.parts.bottom.embed(h["input_ids"], h["attention_mask"]),
                    pipe.parts.bottom(h["input_ids"], h["attention_mask"]),
                    h["attention_mask"],
                    mode="token",
                )
            )
            for h in halves
        ]
    res = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=2))(pipe.trainer, copy.deepcopy(batches))
    assert res.dcor == pytest.approx(sum(want) / 2, rel=1e-5)
    assert res.loss == pytest.approx(res.task_loss + 0.5 * res.dcor, rel=1e-5)


def test_gradfree_cache_is_used_and_filled(model: torch.nn.Module, tmp_path: Any) -> None:
    ref = _Side(model, "gradfree", cache_dir=tmp_path / "a")
    pipe = _Side(model, "gradfree", cache_dir=tmp_path / "b")
    _no_step(ref.trainer)
    _no_step(pipe.trainer)
    step = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=2), cache=pipe.cache)
    batches = _batches(model.config.vocab_size, 1)
    for _ in range(2):  # the second pass comes from the cache
        ref.trainer.train_step(copy.deepcopy(batches))
        step(pipe.trainer, copy.deepcopy(batches))
        for k, g in ref.grads().items():
            torch.testing.assert_close(pipe.grads()[k], g, rtol=1e-4, atol=1e-6)
    assert ref.cache is not None and pipe.cache is not None
    assert (pipe.cache.hits, pipe.cache.misses) == (ref.cache.hits, ref.cache.misses) == (4, 4)
    sent_acts = pipe.session.stats.bytes_up.get("ACT_UP", 0)
    assert sent_acts > 0 and pipe.session.stats.messages == 1 + 2  # HELLO, then two ACT_UPs on the first pass only


class _Watch:
    """Wraps a session: the most requests it ever had in flight, per message type."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.most = 0
        self.acts_without_grad = 0
        self.most_graphs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def send(self, msg: Any, *, expect: Any) -> Any:
        out = self.session.send(msg, expect=expect)
        self.most = max(self.most, self.session.in_flight)
        if msg.type.value == "ACT_UP" and msg.meta.get("train"):
            self.acts_without_grad += 1
        elif msg.type.value == "GRAD_UP":
            self.acts_without_grad -= 1
        self.most_graphs = max(self.most_graphs, self.acts_without_grad)
        return out

    def receive(self, pending: Any) -> Any:
        return self.session.receive(pending)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_in_flight_bounded_by_the_window_and_the_providers_graph_limit(model: torch.nn.Module, limit: int) -> None:
    pipe = _Side(model, "online", config=ProviderConfig(max_inflight_steps=limit))
    watch = _Watch(pipe.session)
    pipe.remote.session = watch
    step = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=4, max_in_flight=limit))
    step(pipe.trainer, _batches(model.config.vocab_size, 2))  # 8 micro-batches
    assert watch.most_graphs == limit  # used the window fully, never beyond
    assert watch.most <= 2 * limit


def test_window_follows_the_providers_announced_limits(model: torch.nn.Module) -> None:
    pipe = _Side(model, "online", config=ProviderConfig(max_inflight_steps=3, max_graphs_per_peer=4))
    limits = pipe.session.terms["limits"]
    assert (limits["max_inflight_steps"], limits["max_graphs_per_peer"]) == (3, 4)  # announced in ACCEPT
    step = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=8))
    assert step.window() == 3
    limits["max_graphs_per_peer"] = 2
    assert step.window() == 2
    limits["max_unanswered"] = 2  # Online: a GRAD_UP beside each ACT_UP, two requests per micro-batch
    assert step.window() == 1
    assert PipelinedStep(pipe.remote, PipelineConfig(max_in_flight=8)).window() == 1  # an explicit window is capped
    del pipe.session.terms["limits"]  # a provider older than the announcement: the old default
    assert step.window() == 4
    assert PipelinedStep(pipe.remote, PipelineConfig(max_in_flight=2)).window() == 2
    gradfree = _Side(model, "gradfree")
    gradfree.session.terms["limits"]["max_unanswered"] = 3  # Gradfree: one request per micro-batch
    assert PipelinedStep(gradfree.remote, PipelineConfig(micro_batches=8)).window() == 3


def test_a_window_over_the_announced_limit_is_lowered_to_it(model: torch.nn.Module) -> None:
    pipe = _Side(model, "online", config=ProviderConfig(max_inflight_steps=2))
    watch = _Watch(pipe.session)
    pipe.remote.session = watch
    step = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=4, max_in_flight=4))
    step(pipe.trainer, _batches(model.config.vocab_size, 1))
    assert watch.most_graphs == 2


def test_a_provider_announcing_nothing_gets_the_default_window_and_refuses_over_it(model: torch.nn.Module) -> None:
    pipe = _Side(model, "online", config=ProviderConfig(max_inflight_steps=2))
    del pipe.session.terms["limits"]  # as an older provider's ACCEPT
    step = PipelinedStep(pipe.remote, PipelineConfig(micro_batches=4))
    assert step.window() == 4
    with pytest.raises(RemoteError, match="in flight"):  # refused, not hung
        step(pipe.trainer, _batches(model.config.vocab_size, 1))


@pytest.mark.parametrize("protocol", ["online", "gradfree"])
def test_the_serve_loops_unanswered_cap_is_announced_and_kept(model: torch.nn.Module, protocol: str) -> None:
    """Through the real serve loop (in-process channel): its cap on unanswered requests reaches the client in ACCEPT
    and the pipeline stays under it; a window of 4 against a cap of 3 would get the client cut off."""
    import threading

    from guardedp2p.protocol.client import ClientSession
    from guardedp2p.service.serve import ServeConfig, serve_forever
    from guardedp2p.transport.inproc import InProcServerChannel
    from guardedp2p.wire.handshake import Hello

    side = _Side(model, protocol)  # its parts and trainer; the session below goes through the serve loop
    server, stop, out = InProcServerChannel(), threading.Event(), []
    serving = threading.Thread(
        target=serve_forever,
        args=(side.app, server, stop),
        kwargs={"poll_s": 0.05, "config": ServeConfig(max_unanswered=3), "server_out": out},
        daemon=True,
    )
    serving.start()
    try:
        session = ClientSession(server.connect("inproc:client"), timeout=20)
        codecs = FP32 if protocol == "online" else {"up": "fp32", "down": "fp32"}
        session.open(Hello(protocol, side.session.terms["fingerprint"], (2, 2), codecs))
        assert session.terms["limits"]["max_unanswered"] == 3 and session.max_in_flight == 3
        watch = _Watch(session)
        side.remote.session = watch
        step = PipelinedStep(side.remote, PipelineConfig(micro_batches=4))
        assert step.window() == (1 if protocol == "online" else 3)
        res = step(side.trainer, _batches(model.config.vocab_size, 2))
        assert res.step == 1 and watch.most <= 3
        assert out[0].stats["cut_off"] == 0
    finally:
        stop.set()
        serving.join(timeout=10)


def test_split_batch_shares_and_groups() -> None:
    b = batch(50, b=5, length=6)
    parts = split_batch(b, 2)
    assert [int(p["labels"].shape[0]) for p, _ in parts] == [3, 2]
    assert sum(s for _, s in parts if s is not None) == pytest.approx(1.0)
    assert split_batch(b, 1) == [(b, None)]
    assert len(split_batch(b, 99)) == 5
    # a row without a label token never forms a micro-batch of its own (its loss would be NaN)
    b["labels"][0] = -100
    b["labels"][1, 1:] = -100
    for part, share in split_batch(b, 5):
        assert int(label_tokens(part["labels"]).sum()) > 0 and share is not None and share > 0
    b["labels"][:] = -100
    assert split_batch(b, 3) == [(b, None)]


def test_config_and_factory() -> None:
    with pytest.raises(ConfigError):
        PipelineConfig(micro_batches=0)
    with pytest.raises(ConfigError):
        PipelineConfig(max_in_flight=0)
    remote = RemoteTrunk(None, FP32, gradients=True)
    assert pipelined_step(remote, 1) is None
    step = pipelined_step(remote, 3)
    assert isinstance(step, PipelinedStep) and step.config.micro_batches == 3
