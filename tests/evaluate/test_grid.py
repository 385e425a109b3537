"""The legacy evaluation grid (guardedp2p.evaluate.grid.run_grid; the `guardedp2p evaluate` command is now the frontier,
tested in test_frontier.py) on a tiny random model + tiny tokenizer with tiny budgets: every row, the four axes, the
plot, and the invariants of each design (Offline: nothing observed online; Gradfree: no gradient bytes)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from guardedp2p.evaluate.grid import ROWS, ClientTruth, GridConfig, run_grid, sanity_line
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import WORDS, tiny_tokenizer, write_text_records


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin on a busy machine
    yield
    torch.set_num_threads(n)


def write_mc(path, n: int = 8, seed: int = 0):
    """Multiple-choice items in the tiny vocabulary: which word follows the sequence."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            start = rng.randrange(0, 4)
            q = " ".join(WORDS[(start + k) % 100] for k in range(5))
            right = WORDS[(start + 5) % 100]
            wrong = rng.sample([w for w in WORDS[50:100] if w != right], 3)
            label = rng.randrange(4)
            choices = wrong[:label] + [right] + wrong[label:]
            fh.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    return path


def _files(tmp_path):
    return {
        "data": str(write_text_records(tmp_path / "train.jsonl", n=48)),
        "eval_data": str(write_mc(tmp_path / "mc.jsonl")),
        "aux": str(write_text_records(tmp_path / "aux.jsonl", n=60, seed=1)),
    }


def _cfg(tmp_path, rows=tuple(ROWS)):
    return GridConfig(
        model="tiny",
        rows=rows,
        steps=3,
        batch_size=2,
        lr=1e-2,
        max_length=16,
        records=2,
        lora_r=4,
        lora_alpha=8,
        attack_budget="tiny",
        attacks=("sip", "bisr_b", "bisr_f", "bisr_bf", "tag"),
        eval_items=6,
        aux_records=60,
        out=str(tmp_path / "out"),
        **_files(tmp_path),
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One run of every row, shared by the tests that inspect it (the run dominates the cost)."""
    tmp_path = tmp_path_factory.mktemp("grid")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_grid(_cfg(tmp_path), model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    finally:
        torch.set_num_threads(n)
    return tmp_path, res


def test_grid_runs_every_row_with_four_axes_and_writes_results_and_plot(grid):
    tmp_path, res = grid
    out = tmp_path / "out"
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in on_disk["rows"]] == list(ROWS)
    png = out / "privacy_utility.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in res["rows"]:
        assert set(("utility", "privacy", "ip", "cost")) <= set(r), r["row"]
        assert (
            r["utility"]["metric"] == "acc"
            and 0.0 <= r["utility"]["after"] <= 1.0
            and 0.0 <= r["utility"]["before"] <= 1.0
        )
        assert 0.0 < r["ip"]["fraction"] < 1.0
        assert r["cost"]["train_s"] > 0
        if r["design"] == "offline":
            continue
        assert r["cost"]["bytes_per_step"] > 0
        p = r["privacy"]
        assert p["observations"] == 1 and p["sequences"] == 2, r["row"]
        assert 0.0 <= p["best_rougeL"] <= 1.0 and p["display"] == f"{p['best_rougeL']:.3f}"

    rows = {r["row"]: r for r in res["rows"]}
    off = rows["offline"]
    assert off["privacy"]["observations"] == 0 and off["privacy"]["best_rougeL"] is None
    assert off["privacy"]["display"] == "n/a (no online exchange)"
    assert off["cost"]["bytes_per_step"] == 0 and off["cost"]["one_off_bytes"] > 0
    assert off["ip"]["fraction"] > rows["online"]["ip"]["fraction"], (
        "the emulator's middle blocks add to what the client holds"
    )
    for key in ("gradfree", "gradfree_nf4"):
        g = rows[key]
        assert g["cost"]["gradient_bytes"] == 0
        assert all(v.get("skipped") for k, v in g["privacy"]["attacks"].items() if k in ("bisr_b", "bisr_bf", "tag"))
        assert "rougeL" in g["privacy"]["attacks"]["sip"]
    assert rows["online"]["cost"]["gradient_bytes"] > 0
    assert (
        rows["nf4"]["cost"]["bytes_per_step"]
        < rows["int8"]["cost"]["bytes_per_step"]
        < rows["online"]["cost"]["bytes_per_step"]
    )
    assert rows["gradfree_nf4"]["cost"]["bytes_per_step"] < rows["gradfree"]["cost"]["bytes_per_step"]
    assert rows["dcor_strong"]["run"]["dcor_alpha"] == 4.0 and rows["dcor_weak"]["run"]["dcor_alpha"] == 0.5
    assert res["sanity"]["no_defence_best_rougeL"] == rows["online"]["privacy"]["best_rougeL"]


def test_ground_truth_is_the_clients_batch_in_the_order_sent(grid):
    """Online: the client-side truth of the attacked step (the last one) equals the batch the client trained on then."""
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.data.loaders import load_data
    from guardedp2p.data.tokenize import DataConfig, encode_records

    tmp_path, res = grid
    online = next(r for r in res["rows"] if r["row"] == "online")
    assert online["privacy"]["train_observations"] == 3
    # the transcript also holds the evaluation forwards, which are never attacked
    assert online["privacy"]["observations_recorded"] > 3
    assert online["privacy"]["attacked_steps"] == [max(online["privacy"]["attacked_steps"])]
    # the attacked reconstruction's reference is the last (third) training batch, replayed independently here
    tok = tiny_tokenizer()
    loaded = load_data(str(tmp_path / "train.jsonl"))
    ex = encode_records(loaded.records, tok, DataConfig(max_length=16), kind=loaded.kind)
    it = BatchIterator(ex, 2, seed=0, pad_id=tok.pad_token_id)
    last = [next(it) for _ in range(3)][-1]
    ref = tok.decode(
        [int(t) for t, m in zip(last["input_ids"][0], last["attention_mask"][0]) if m], skip_special_tokens=True
    )
    sip = online["privacy"]["attacks"]["sip"]
    assert sip["example"]["ref"].split() == ref.split()


def test_client_truth_matches_a_subset_of_rows_by_nearest_activation():
    truth = ClientTruth(torch.nn.Linear(1, 1))
    ids = torch.tensor([[5, 6, 7], [8, 9, 0], [10, 11, 12]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    h = torch.randn(3, 3, 4)
    truth.on_bottom(None, (ids, mask), {}, h)
    # the Gradfree cache sent rows 2 and 1 only, slightly perturbed by a lossy codec
    truth.on_act_up("s", 7, h[[2, 1]] + 1e-3, mask[[2, 1]])
    assert torch.equal(truth.ids[("s", 7)], ids[[2, 1]])
    assert truth.train_keys == [("s", 7)]


def test_sanity_line_flags_a_weak_attack():
    weak = sanity_line([{"row": "online", "privacy": {"best_rougeL": 0.3}}])
    assert weak["ok"] is False and "likely broken" in weak["message"]
    assert sanity_line([{"row": "online", "privacy": {"best_rougeL": 0.93}}])["ok"] is True
    assert sanity_line([])["ok"] is None


def test_unknown_row_is_a_config_error(tmp_path):
    from guardedp2p.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown row"):
        GridConfig(rows=("online", "dp")).validate()


def _tiny_model_dir(tmp_path):
    model_dir = tmp_path / "tiny-model"
    tiny_model("llama").save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    return str(model_dir)


def test_bench_defences_tiny(tmp_path, capsys):
    from benchmarks import bench_defences

    f = _files(tmp_path)
    out = tmp_path / "bench"
    rc = bench_defences.main(
        [
            "--model",
            _tiny_model_dir(tmp_path),
            "--codecs",
            "fp32,int8",
            "--dcor",
            "0,0.5",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "16",
            "--lora-r",
            "4",
            "--eval-items",
            "4",
            "--data",
            f["data"],
            "--eval-data",
            f["eval_data"],
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    runs = [ln for ln in lines if ln["bench"] == "defence"]
    assert {(r["codec"], r["dcor"]) for r in runs} == {("fp32", 0.0), ("int8", 0.0), ("fp32", 0.5), ("int8", 0.5)}
    vs = [ln for ln in lines if ln["bench"] == "vs_fp32"]
    assert len(vs) == 2 and all(20 < v["bytes_pct_of_fp32"] < 60 for v in vs)
    assert (out / "defences.md").is_file() and (out / "accuracy_vs_bytes.png").is_file()


def test_bench_gradfree_tiny_inproc(tmp_path, capsys):
    from benchmarks import bench_gradfree

    f = _files(tmp_path)
    rc = bench_gradfree.main(
        [
            "--model",
            _tiny_model_dir(tmp_path),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "16",
            "--lora-r",
            "4",
            "--eval-items",
            "4",
            "--data",
            f["data"],
            "--eval-data",
            f["eval_data"],
            "--transport",
            "inproc",
            "--out",
            str(tmp_path / "gf"),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    designs = {(ln["design"], ln["codec"]): ln for ln in lines if ln["bench"] == "design"}
    assert set(designs) == {("gradfree", "fp32"), ("gradfree", "nf4"), ("online", "fp32"), ("local_lora", "-")}
    assert designs[("gradfree", "fp32")]["gradient_bytes"] == 0 and designs[("online", "fp32")]["gradient_bytes"] > 0
    cmp = lines[-1]
    assert cmp["bench"] == "gradfree_vs"
    assert 0 < cmp["gradfree_nf4_bytes_pct_of_online_fp32"] < cmp["gradfree_fp32_bytes_pct_of_online_fp32"] < 100
