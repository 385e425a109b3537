"""Batch encoded examples into tensors, and iterate batches deterministically and resumably.

Right padding is used everywhere: the causal models we split keep real tokens at positions ``0..len-1``, so
rotary position ids and the cut activations of a row do not depend on how long the other rows of the batch
are. Pad positions get ``attention_mask = 0`` and ``labels = -100`` (even when the pad id equals the EOS id,
as in SmolLM2, a real EOS keeps its label because masking goes by position, not by id).

:class:`BatchIterator` derives each epoch's order from ``(seed, epoch)`` alone, so its whole state is two
integers; a run restored from a checkpoint continues with exactly the batch that would have come next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from guardedp2p.data.tokenize import IGNORE_INDEX, Example
from guardedp2p.errors import ConfigError


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into ``input_ids``, ``attention_mask``, ``labels`` (int64, ``[B, T]``), right-padded.

    An example without ``labels`` is trained on every token (labels = input_ids).
    """
    if not batch:
        raise ConfigError("collate() got an empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)
    n = len(batch)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        ids = ex["input_ids"]
        lab = ex.get("labels", ids)
        if len(lab) != len(ids):
            raise ConfigError(f"example {i}: {len(ids)} input_ids but {len(lab)} labels")
        k = len(ids)
        if k == 0:
            raise ConfigError(f"example {i} has no tokens")
        input_ids[i, :k] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, :k] = 1
        labels[i, :k] = torch.as_tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def examples_digest(examples: Sequence[Example]) -> str:
    """A short hash of the examples' token ids, stored in the iterator state to catch resuming on other data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(len(ex["input_ids"]).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in ex["input_ids"]))
    return h.hexdigest()[:16]


class BatchIterator:
    """Endless (or ``max_epochs``-long) iterator of collated batches with a checkpointable position.

    Each epoch visits every example once in an order drawn from a ``torch.Generator`` seeded with
    ``(seed, epoch)``; ``shuffle=False`` keeps file order. With ``drop_last=False`` the last batch of an
    epoch may be smaller. :meth:`state_dict` returns plain ints and strings (safe to put in JSON or msgpack).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int = 0,
        pad_id: int = 0,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        max_epochs: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            raise ConfigError("BatchIterator needs at least one example")
        if drop_last and len(examples) < batch_size:
            raise ConfigError(f"drop_last=True with {len(examples)} examples < batch_size={batch_size} yields no batch")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.max_epochs = max_epochs
        self.epoch = 0
        self.position = 0  # index of the next batch within the current epoch
        self._digest = examples_digest(self.examples)
        self._order_epoch: int | None = None
        self._order: list[int] = []

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch_order(self, epoch: int) -> list[int]:
        """The example indices of ``epoch`` in visiting order (a pure function of seed and epoch)."""
        if not self.shuffle:
            return list(range(len(self.examples)))
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_indices(self) -> list[int]:
        """Advance by one batch and return its example indices (without collating)."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            raise StopIteration
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        start = self.position * self.batch_size
        idx = self._order[start : start + self.batch_size]
        self.position += 1
        return idx

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in self.next_indices()], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_examples": len(self.examples),
            "digest": self._digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; refuse a state saved with other data, seed or batching."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "shuffle", "drop_last", "num_examples", "digest"):
            if key in state and state[key] != mine[key]:
                raise ConfigError(
                    f"cannot resume the batch iterator: checkpoint has {key}={state[key]!r} but this run has "
                    f"{mine[key]!r}; resume with the same data, seed and batch size, or start a fresh run"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ConfigError(f"cannot resume the batch iterator: bad position epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
