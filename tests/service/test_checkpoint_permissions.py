"""Checkpoints hold weights and optimizer moments derived from private data: owner-only permissions (issue 20)."""

from __future__ import annotations

import torch

from guardedp2p.train.checkpoint import load_checkpoint, save_checkpoint


def test_checkpoint_folder_is_0700_and_files_0600(tmp_path) -> None:
    state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "step": 3}
    d = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, state, {"protocol": "online"})
    save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {**state, "step": 4}, {"protocol": "online"})
    assert d.stat().st_mode & 0o777 == 0o700
    files = list(d.iterdir())
    assert files and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    trainable, tstate, meta = load_checkpoint(d)
    assert tstate["step"] == 4 and torch.equal(trainable["w"], torch.zeros(2))
