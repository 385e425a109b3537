"""Pipelined split steps (issue 19): the client and the provider compute at the same time.

An unpipelined Online step runs bottom, trunk, top, top backward, trunk backward, bottom backward one after the
other, so the two parties take turns. Here the step's batch is cut into micro-batches (along the batch axis) and
up to ``max_in_flight`` of them travel at once: while the provider runs micro-batch k's trunk, the client runs
k-1's top and sends k+1's activations. Gradfree has no backward on the wire: its micro-batches' forwards overlap
with the client's top passes (and its trunk-output cache answers what it can, as in
:class:`guardedp2p.designs.gradfree.client.CachedRemoteTrunk`).

Same gradient, one optimizer step: each micro-batch's task loss is weighted by its share of the batch's label
tokens, so the sum of the micro-batches' gradients is the gradient of the batch's token-mean loss, and the step
(clipping, AdamW, schedule) is the trainer's. With one micro-batch the step is the trainer's
:meth:`~guardedp2p.train.trainer.SplitTrainer.train_step` bit for bit (tests/designs/online/test_pipeline.py).
Per-batch penalties that are not sums over tokens (dCor, the learned obfuscation) are computed per micro-batch and
averaged, as ``--grad-accum`` already does for its micro-batches.

Backpressure: at most ``max_in_flight`` micro-batches are on the wire per session (Online: ACT_UP sent, top pass
not yet done; Gradfree: ACT_UP sent, ACT_DOWN not yet read), never more than the provider's ACCEPT announces it
allows (kept graphs per session and per key, unanswered requests per client; docs/wire.md section 5), 4 against a
provider that announces nothing. The requests go out with :meth:`guardedp2p.protocol.client.ClientSession.send`
(which itself never exceeds the announced unanswered requests) and their replies are read in order, without
threads.

Why (GuardedTuning, arXiv 2501.04323, counts the split's cost as the sum of the parties' compute): with a free core
or device for each party, the step time falls from client + provider towards max(client, provider) plus one
micro-batch of each. It needs that free capacity: on a two-core machine saturated by other work the overlap
happens but the step is no shorter (docs/results/perf.md, ``python -m benchmarks.bench_online``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.engine.split import IGNORE_INDEX
from guardedp2p.errors import ConfigError
from guardedp2p.protocol.client import PendingRequest, announced_limit
from guardedp2p.train.trainer import SplitTrainer, StepResult

if TYPE_CHECKING:
    from guardedp2p.designs.gradfree.client import TrunkOutputCache

Batch = dict[str, torch.Tensor]

DEFAULT_MICRO_BATCHES = 2
"""Micro-batches per batch when pipelining is on and the protocol has no measured default of its own: the
cheapest pipelined setting in CPU (+5 % provider CPU per Online step; 4 cost +12 %)."""
MICRO_BATCHES_BY_PROTOCOL: dict[str, int] = {"online": 2, "gradfree": 4}
"""The fastest setting of each protocol in ``python -m benchmarks.bench_online`` on an idle 2-core CPU at batch 4
(docs/results/perf.md, section 0): Online 0.745x a local step with 2 (3: 0.765x, 4: 0.785x), Gradfree 0.442x with
4 (2: 0.493x). Gradfree's provider runs only forwards, so smaller pieces overlap better there."""


def default_micro_batches(protocol: str) -> int:
    """The ``--micro-batches`` a run of ``protocol`` gets when the user names none."""
    return MICRO_BATCHES_BY_PROTOCOL.get(protocol, DEFAULT_MICRO_BATCHES)


PROVIDER_INFLIGHT_DEFAULT = 4
"""Micro-batches in flight against a provider whose ACCEPT announces no bounds (one older than the announcement):
the graphs such a provider keeps per session by default (``ProviderConfig.max_inflight_steps``)."""


@dataclass(frozen=True)
class PipelineConfig:
    """``micro_batches``: pieces each batch is cut into (1: no pipelining; capped at the batch size).
    ``max_in_flight``: micro-batches on the wire at once; ``None``: as many as the provider's ACCEPT allows
    (:meth:`PipelinedStep.window`), 4 if it announces nothing; a value above the announced bounds is lowered to
    them."""

    micro_batches: int = DEFAULT_MICRO_BATCHES
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ConfigError(f"--micro-batches must be 1 or more (1 turns pipelining off), got {self.micro_batches}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be 1 or more, got {self.max_in_flight}")


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the tokens the causal-LM loss counts (labels shifted by one, ``IGNORE_INDEX`` left out), as
    :func:`guardedp2p.engine.split.loss_fn` does."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def split_batch(batch: Batch, parts: int) -> list[tuple[Batch, float | None]]:
    """Cut ``batch`` into at most ``parts`` row groups of near-equal size, each with its share of the batch's label
    tokens (``None`` when the batch stays whole). A group without a label token joins its neighbour (its loss would
    be NaN); a batch without any stays whole (its loss is NaN unpipelined too)."""
    rows = int(batch["labels"].shape[0])
    counts = label_tokens(batch["labels"])
    total = int(counts.sum())
    parts = max(1, min(parts, rows))
    if parts == 1 or total == 0:
        return [(batch, None)]
    groups = [list(g.tolist()) for g in torch.arange(rows).tensor_split(parts)]
    merged: list[list[int]] = []
    for g in groups:
        if merged and int(counts[g].sum()) == 0:
            merged[-1].extend(g)
        else:
            merged.append(g)
    if int(counts[merged[0]].sum()) == 0:  # only the first group can still lack labels
        merged[1:2] = [merged[0] + merged[1]]
        merged.pop(0)
    if len(merged) == 1:
        return [(batch, None)]
    out: list[tuple[Batch, float | None]] = []
    for g in merged:
        start, stop = g[0], g[-1] + 1  # groups are consecutive rows
        part = {k: v[start:stop] for k, v in batch.items()}
        out.append((part, int(counts[start:stop].sum()) / total))
    return out


@dataclass(eq=False)
class _Micro:
    """One micro-batch's state between its sends and its replies."""

    batch: Batch
    share: float | None  # share of its batch's label tokens (None: the whole batch)
    pieces: int  # micro-batches its batch was cut into
    owner: int  # index of its batch in the step
    sent: torch.Tensor | None = None  # what went up (the bottom's graph hangs off it in Online)
    inlet: torch.Tensor | None = None  # Online: where dL/dh1 enters the bottom's graph (see _GradientInlet)
    g1: torch.Tensor | None = None
    penalty: torch.Tensor | None = None  # dCor + obfuscation terms, already scaled; backward with the gradient
    dcor: torch.Tensor | None = None  # detached, for the step's report
    obf: torch.Tensor | None = None
    act: PendingRequest | None = None
    grad: PendingRequest | None = None
    step: int = 0
    cached: torch.Tensor | None = None  # Gradfree: the trunk output assembled from the cache (rows not asked for)
    missing: list[int] = field(default_factory=list)  # Gradfree: rows asked from the provider
    keys: list[str] = field(default_factory=list)


class PipelinedStep:
    """One optimizer step of a :class:`SplitTrainer` with its micro-batches pipelined over ``remote``'s session.

    Use in place of ``trainer.train_step(micro_batches)``; evaluation still goes through the trainer's trunk.
    ``cache``: Gradfree's trunk-output cache (forward-only trunks only)."""

    def __init__(
        self, remote: RemoteTrunk, config: PipelineConfig | None = None, *, cache: TrunkOutputCache | None = None
    ) -> None:
        if cache is not None and remote.gradients:
            raise ConfigError("a trunk-output cache needs a forward-only (gradfree) trunk")
        self.remote = remote
        self.config = config or PipelineConfig()
        self.cache = cache

    def window(self) -> int:
        """Micro-batches allowed on the wire at once (see :class:`PipelineConfig`), within the bounds the provider's
        ACCEPT announces (docs/wire.md section 5): the training graphs it keeps per session
        (``max_inflight_steps``) and per key (``max_graphs_per_peer``), and its unanswered requests per client
        (``max_unanswered``; Online needs two per micro-batch: one micro-batch's GRAD_UP is in flight beside
        another's ACT_UP). A provider that announces none of them (an older one) gets the default of 4, its own
        default graph limit. An explicit ``max_in_flight`` is capped by the announced bounds too."""
        terms = getattr(self.remote.session, "terms", None)  # a session, or a test's stand-in without one
        graphs = [announced_limit(terms, k) for k in ("max_inflight_steps", "max_graphs_per_peer")]
        bounds = [g for g in graphs if g is not None]
        unanswered = announced_limit(terms, "max_unanswered")
        if unanswered is not None:
            bounds.append(unanswered // 2 if self.remote.gradients else unanswered)
        limit = min(bounds) if bounds else PROVIDER_INFLIGHT_DEFAULT
        if self.config.max_in_flight is not None:
            limit = min(limit, self.config.max_in_flight)
        return max(1, limit)

    def __call__(self, trainer: SplitTrainer, micro_batches: Iterable[Batch]) -> StepResult:
        t0 = time.perf_counter()
        trainer.bottom.train(trainer.train_bottom)
        trainer.top.train(True)
        trainer.optimizer.zero_grad(set_to_none=True)
        batches = list(micro_batches)
        n_batches = len(batches)
        items: list[_Micro] = []
        for j, b in enumerate(batches):
            pieces = split_batch(b, self.config.micro_batches)
            items += [_Micro(part, share, len(pieces), j) for part, share in pieces]
        gradients = self.remote.gradients and trainer.train_bottom
        window = self.window()
        queue: deque[tuple[str, _Micro]] = deque()  # replies to take, in the order they were asked for
        report = _Report(n_batches, trainer.cfg.dcor_alpha)
        launched = open_ = done = 0
        while done < len(items):
            while launched < len(items) and open_ < window:
                self._launch(trainer, items[launched], n_batches, gradients)
                queue.append(("act", items[launched]))
                launched += 1
                open_ += 1
            kind, item = queue.popleft()
            if kind == "act":
                report.add(item, self._top(trainer, item, n_batches, gradients))
                open_ -= 1
                if gradients:
                    queue.append(("grad", item))
                    continue
                if item.penalty is not None:  # a trained bottom under a forward-only trunk: its penalties only
                    item.penalty.backward()
            else:
                self._bottom_backward(item)
            done += 1
        return _finish(trainer, t0, report.total(), report.task, report.dcor, report.obf)

    # ------------------------------------------------------------------ the three pieces of a micro-batch
    def _launch(self, trainer: SplitTrainer, item: _Micro, n_batches: int, gradients: bool) -> None:
        """Bottom forward, the penalties on what is sent, and ACT_UP (Gradfree: only for rows not cached)."""
        ids, mask = item.batch["input_ids"], item.batch["attention_mask"]
        if trainer.train_bottom:
            h1 = trainer.bottom(ids, mask)
        else:
            with torch.no_grad():
                h1 = trainer.bottom(ids, mask)
        sent = trainer.transform_sent(h1) if trainer.transform_sent is not None else h1
        item.sent = sent
        if gradients:  # before the penalties, as RemoteTrunk's Function comes before them in the trainer's graph
            item.inlet = _GradientInlet.apply(sent, item)
        penalty: torch.Tensor | None = None
        cfg = trainer.cfg
        if cfg.dcor_alpha > 0 and trainer.dcor_fn is not None and trainer.train_bottom:
            embeds = trainer.bottom.embed(ids, mask).detach()
            dcor = trainer.dcor_fn(embeds, h1, mask, mode=cfg.dcor_mode)
            penalty = cfg.dcor_alpha * dcor
            item.dcor = dcor.detach()
        if trainer.obfuscation is not None and trainer.train_bottom:
            obf = trainer.obfuscation(sent, ids, mask)
            penalty = obf if penalty is None else penalty + obf
            item.obf = obf.detach()
        if penalty is not None:
            # as the trainer's (loss / n).backward() weights it: each term gets 1/n (1/pieces of it per piece)
            item.penalty = penalty / n_batches if item.pieces == 1 else penalty / (item.pieces * n_batches)
        if gradients:
            item.step = self.remote.next_step()
            item.act = self.remote.send_forward(sent, mask, train=True, step=item.step)
            return
        self._launch_forward_only(item, sent, mask, ids)

    def _launch_forward_only(
        self, item: _Micro, sent: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor
    ) -> None:
        """Gradfree: ask only for the rows the cache lacks (all rows without a cache)."""
        cache = self.cache
        if cache is None:
            item.missing = list(range(int(sent.shape[0])))
        else:
            lengths = mask.to(torch.long).sum(dim=1).tolist()
            item.keys = [cache.key(input_ids[i, :n]) for i, n in enumerate(lengths)]
            out = torch.zeros(sent.shape, dtype=sent.dtype, device=sent.device)
            for i, key in enumerate(item.keys):
                hit = cache.get(key)
                if hit is None or hit.shape[0] != lengths[i]:
                    item.missing.append(i)
                    continue
                out[i, : lengths[i]] = hit.to(sent.device, sent.dtype)
            cache.hits += len(item.keys) - len(item.missing)
            cache.misses += len(item.missing)
            item.cached = out
        if not item.missing:
            return
        rows = sent if cache is None else sent.index_select(0, torch.tensor(item.missing, device=sent.device))
        rmask = mask if cache is None else mask.index_select(0, torch.tensor(item.missing, device=mask.device))
        item.act = self.remote.send_forward(rows, rmask, train=False, step=self.remote.next_step())
        item.sent = rows if cache is not None else sent

    def _trunk_output(self, item: _Micro) -> torch.Tensor:
        assert item.sent is not None
        if item.act is None:  # every row came from the cache
            assert item.cached is not None
            return item.cached
        h2 = self.remote.take_forward(item.act, item.sent)
        item.act = None
        if item.cached is None:
            return h2
        out, cache = item.cached, self.cache
        assert cache is not None
        lengths = item.batch["attention_mask"].to(torch.long).sum(dim=1).tolist()
        for j, i in enumerate(item.missing):
            out[i] = h2[j]
            cache.put(item.keys[i], h2[j, : lengths[i]])
        return out

    def _top(self, trainer: SplitTrainer, item: _Micro, n_batches: int, gradients: bool) -> torch.Tensor:
        """The trunk output's top pass and backward; Online then sends dL/dh2 up. Returns the task loss."""
        h2 = self._trunk_output(item)
        mask = item.batch["attention_mask"]
        if gradients:
            h2 = h2.detach().requires_grad_(True)
        logits = trainer.top(h2, mask)
        task = trainer.loss_fn(logits, item.batch["labels"])
        scaled = task / n_batches if item.share is None else task * item.share / n_batches
        scaled.backward()
        if gradients:
            g2 = h2.grad
            assert g2 is not None
            if trainer.grad_transform is not None:
                g2 = trainer.grad_transform(g2)
            item.grad = self.remote.send_backward(g2, item.step)
        return task.detach()

    def _bottom_backward(self, item: _Micro) -> None:
        """Online: dL/dh1 from the provider, through what was sent into the bottom (with the penalties)."""
        assert item.grad is not None and item.sent is not None and item.inlet is not None
        item.g1 = self.remote.take_backward(item.grad, item.sent)
        roots = [item.inlet] if item.penalty is None else [item.inlet, item.penalty]
        torch.autograd.backward(roots, [torch.ones_like(r) for r in roots])
        item.sent = item.inlet = item.g1 = item.penalty = item.grad = None  # free the bottom's graph now


class _GradientInlet(torch.autograd.Function):
    """Where the provider's dL/dh1 enters the bottom's graph: a scalar node made when the activation is sent, whose
    backward returns the micro-batch's ``g1``. Why not ``backward(sent, g1)``: a node made at that point of the
    forward runs at the same point of the backward as RemoteTrunk's Function does in the trainer's graph, so the
    gradients meeting at h1 (the trunk's, dCor's) are added in the same order and one micro-batch is bit-identical
    to :meth:`SplitTrainer.train_step`."""

    @staticmethod
    def forward(ctx: Any, sent: torch.Tensor, item: _Micro) -> torch.Tensor:
        ctx.item = item
        return sent.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g1 = ctx.item.g1
        assert g1 is not None, "the bottom's backward runs only once dL/dh1 has arrived"
        return g1, None


class _Report:
    """The step's loss figures, summed as the trainer sums them (whole batches: the very same float operations)."""

    def __init__(self, n_batches: int, dcor_alpha: float) -> None:
        self.n, self.alpha = n_batches, dcor_alpha
        self.losses = [0.0] * n_batches
        self.task = self.dcor = self.obf = 0.0

    def add(self, item: _Micro, task: torch.Tensor) -> None:
        zero = torch.zeros(())
        dcor = item.dcor if item.dcor is not None else zero
        obf = item.obf if item.obf is not None else zero
        loss = task
        if item.dcor is not None:
            loss = loss + self.alpha * dcor
        if item.obf is not None:
            loss = loss + obf
        if item.share is None:  # the whole batch: float(x) / n, as SplitTrainer.train_step
            self.losses[item.owner] += float(loss)
            self.task += float(task) / self.n
            self.dcor += float(dcor) / self.n
            self.obf += float(obf) / self.n
            return
        penalty = float(loss) - float(task)
        self.losses[item.owner] += float(task) * item.share + penalty / item.pieces
        self.task += float(task) * item.share / self.n
        self.dcor += float(dcor) / item.pieces / self.n
        self.obf += float(obf) / item.pieces / self.n

    def total(self) -> float:
        return sum(loss / self.n for loss in self.losses)


def _finish(trainer: SplitTrainer, t0: float, tot: float, task: float, dcor: float, obf: float) -> StepResult:
    """Clip, AdamW, schedule and bookkeeping exactly as :meth:`SplitTrainer.train_step` ends."""
    params = list(trainer.named_params.values())
    if trainer.cfg.max_grad_norm and trainer.cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, trainer.cfg.max_grad_norm)
    lr = float(trainer.scheduler.get_last_lr()[0])
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.step += 1
    res = StepResult(trainer.step, tot, task, dcor, lr, time.perf_counter() - t0, obf)
    trainer.times.history.append(res)
    trainer.times.steps += 1
    return res


def pipelined_step(
    remote: RemoteTrunk, micro_batches: int, *, cache: TrunkOutputCache | None = None
) -> PipelinedStep | None:
    """The step function for a run with ``--micro-batches N``: ``None`` for 1 (the trainer's own step)."""
    if micro_batches <= 1:
        return None
    return PipelinedStep(remote, PipelineConfig(micro_batches=micro_batches), cache=cache)


__all__ = [
    "DEFAULT_MICRO_BATCHES",
    "MICRO_BATCHES_BY_PROTOCOL",
    "default_micro_batches",
    "PipelineConfig",
    "PipelinedStep",
    "label_tokens",
    "pipelined_step",
    "split_batch",
]
