"""benchmarks/bench_task.py scores each question once and its choices on the KV cache: it must give the same
log-likelihoods as guardedp2p.data.mc_eval (questions of several lengths, choices of several lengths)."""

from __future__ import annotations

import pytest

from guardedp2p.data.mc_eval import score_continuations
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer


def test_shared_prefix_scores_match_evaluate_mc():
    from benchmarks.bench_task import _logits_fn, mc_accuracy, mc_loglik_shared_prefix

    tok = tiny_tokenizer()
    model = tiny_model("llama")
    items = [
        {"question": "w1 w2 w3", "choices": ["w4", "w5 w6", "w7 w8 w9", "w10"], "label": 1, "rule": "a"},
        {"question": "w11 w12 w13", "choices": ["w14 w15", "w16", "w17", "w18 w19"], "label": 0, "rule": "a"},
        {"question": "w20 w21 w22 w23 w24", "choices": ["w25", "w26", "w27 w28", "w29"], "label": 3, "rule": "b"},
    ]
    fast = mc_loglik_shared_prefix(model, tok, items, batch_size=2)
    ref = score_continuations(
        _logits_fn(model), tok, [(it["question"], " " + c) for it in items for c in it["choices"]]
    )
    assert [x for s in fast for x in s] == pytest.approx(ref, abs=1e-4)
    res = mc_accuracy(model, tok, items)
    assert res["n"] == 3 and set(res["per_rule"]) == {"a", "b"}
