"""Resumable checkpoints (guardedp2p/train/checkpoint.py): a round trip resumes the run exactly, a save killed
half-way leaves the previous checkpoint usable, and nothing half-written or damaged is taken as a checkpoint.

Owner-only permissions (folder 0700, files 0600) are checked in tests/service/test_checkpoint_permissions.py;
here only the debris of a killed save is checked to be as closed as a finished checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guardedp2p.train import checkpoint as ckpt
from guardedp2p.train.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, save_checkpoint
from tests.train.test_trainer import as_batch, cfg_, make_trainer


def fake_state(step: int) -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(step)
    trainable = {"top.w": torch.randn(3, 4, generator=g), "bottom.b": torch.randn(5, generator=g)}
    state = {
        "step": step,
        "optimizer": {"state": {0: {"exp_avg": torch.randn(3, 4, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        "scheduler": {"last_epoch": step},
    }
    return trainable, state


def step_of(directory: Path) -> int:
    return load_checkpoint(directory)[1]["step"]


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_restores_tensors_state_meta_and_rng(tmp_path):
    d = tmp_path / "run" / "checkpoint"  # the parent is created
    trainable, state = fake_state(7)
    meta = {"protocol": "online", "data": {"epoch": 1, "pos": 3}, "history": [{"step": 1, "loss": 2.5}]}
    torch.manual_seed(123)
    save_checkpoint(d, trainable, state, meta)
    expected_draw = torch.rand(4)  # what the RNG gives right after the save
    assert has_checkpoint(d)
    assert sorted(p.name for p in d.iterdir()) == sorted([ckpt.TRAINABLE, ckpt.OPTIM, ckpt.STATE])
    assert not d.with_name("checkpoint.tmp").exists() and not d.with_name("checkpoint.old").exists()

    torch.manual_seed(999)
    t2, s2, m2 = load_checkpoint(d)
    assert torch.equal(torch.rand(4), expected_draw)  # the RNG state is restored
    assert t2.keys() == trainable.keys() and all(torch.equal(t2[k], trainable[k]) for k in trainable)
    assert s2["step"] == 7 and s2["scheduler"] == {"last_epoch": 7}
    assert torch.equal(s2["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert m2 == {**meta, "step": 7}  # the step is recorded in the meta too
    assert json.loads((d / ckpt.STATE).read_text())["step"] == 7


def test_a_trainer_resumed_from_disk_continues_exactly(tmp_path):
    cfg = cfg_(steps=4, warmup_steps=1, schedule="cosine", lr=5e-3, max_grad_norm=0.5)
    batches = [as_batch(seed=s) for s in range(4)]
    straight = make_trainer(cfg)
    for b in batches:
        straight.train_step([b])

    first = make_trainer(cfg)
    for b in batches[:2]:
        first.train_step([b])
    save_checkpoint(tmp_path / "ck", first.trainable_state(), first.state_dict(), {"protocol": "online"})
    del first

    resumed = make_trainer(cfg)
    trainable, state, meta = load_checkpoint(tmp_path / "ck")
    resumed.load_trainable_state(trainable)
    resumed.load_state_dict(state)
    assert resumed.step == meta["step"] == 2
    for b in batches[2:]:
        resumed.train_step([b])
    for n, p in straight.named_params.items():
        torch.testing.assert_close(resumed.named_params[n], p, rtol=0, atol=1e-7)


def test_a_second_save_replaces_the_first(tmp_path):
    d = tmp_path / "ck"
    save_checkpoint(d, *fake_state(3), {})
    save_checkpoint(d, *fake_state(6), {})
    assert step_of(d) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no .tmp / .old left behind


# ---------------------------------------------------------------------------------------------- interrupted saves


def test_a_save_killed_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    save_checkpoint(d, *fake_state(3), {"n": 3})

    def dies_half_way(obj, path, *a, **kw):
        Path(path).write_bytes(b"PK\x03\x04 half an optimizer")
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, *fake_state(6), {"n": 6})
    monkeypatch.undo()
    debris = d.with_name("ck.tmp")
    assert debris.exists()  # the partial write went to the temporary folder only
    assert debris.stat().st_mode & 0o777 == 0o700  # and nobody else could look into it meanwhile
    assert has_checkpoint(d)
    _, state, meta = load_checkpoint(d)
    assert state["step"] == 3 and meta["n"] == 3
    save_checkpoint(d, *fake_state(9), {})  # the next save clears the debris
    assert step_of(d) == 9 and not d.with_name("ck.tmp").exists()


def test_a_save_killed_between_the_renames_falls_back_to_the_old_copy(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    save_checkpoint(d, *fake_state(3), {})
    real_replace = ckpt.os.replace
    calls: list[tuple] = []

    def killed_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, *fake_state(6), {})
    monkeypatch.undo()
    assert not d.exists() and d.with_name("ck.old").is_dir()
    assert has_checkpoint(d)
    assert step_of(d) == 3  # the previous complete checkpoint, not nothing
    save_checkpoint(d, *fake_state(9), {})
    assert step_of(d) == 9 and not d.with_name("ck.old").exists()


# ---------------------------------------------------------------------------------------------- not valid


def test_no_checkpoint(tmp_path):
    assert not has_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="without --resume"):
        load_checkpoint(tmp_path / "nothing")


def test_an_unswapped_temporary_folder_is_not_a_checkpoint(tmp_path):
    """Even a complete .tmp is not taken: only the rename makes a save count."""
    d = tmp_path / "ck"
    save_checkpoint(d, *fake_state(3), {})
    d.rename(d.with_name("ck.tmp"))
    assert not has_checkpoint(d)
    with pytest.raises(CheckpointError):
        load_checkpoint(d)


def test_a_folder_without_its_state_file_is_not_a_checkpoint(tmp_path):
    d = tmp_path / "ck"
    save_checkpoint(d, *fake_state(3), {})
    (d / ckpt.STATE).unlink()  # tensors written, state never was
    assert not has_checkpoint(d)
    with pytest.raises(CheckpointError):
        load_checkpoint(d)


@pytest.mark.parametrize(
    "damage",
    ["truncated tensors", "truncated optimizer", "missing optimizer", "broken state json", "state without step"],
)
def test_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path, damage):
    d = tmp_path / "ck"
    save_checkpoint(d, *fake_state(3), {})
    if damage == "truncated tensors":
        data = (d / ckpt.TRAINABLE).read_bytes()
        (d / ckpt.TRAINABLE).write_bytes(data[: len(data) // 2])
    elif damage == "truncated optimizer":
        data = (d / ckpt.OPTIM).read_bytes()
        (d / ckpt.OPTIM).write_bytes(data[: len(data) // 2])
    elif damage == "missing optimizer":
        (d / ckpt.OPTIM).unlink()
    elif damage == "broken state json":
        (d / ckpt.STATE).write_text('{"step": ')
    else:
        (d / ckpt.STATE).write_text('{"protocol": "online"}')
    with pytest.raises(CheckpointError, match="without --resume"):
        load_checkpoint(d)


def test_the_optimizer_file_is_read_with_weights_only(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    save_checkpoint(d, *fake_state(3), {})
    seen: list[object] = []
    real_load = ckpt.torch.load

    def spy(*a, **kw):
        seen.append(kw.get("weights_only"))
        return real_load(*a, **kw)

    monkeypatch.setattr(ckpt.torch, "load", spy)
    load_checkpoint(d)
    assert seen == [True]
