"""Per-item utility (guardedp2p/evaluate/utility.py) equals the reference evaluators on a tiny model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from guardedp2p.data.mc_eval import evaluate_mc, score_continuations
from guardedp2p.evaluate.utility import cut_hooks, cut_transforms, mc_item_scores, record_field_nll
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import WORDS, tiny_tokenizer


def _items(n=12, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, 40)
        q = " ".join(WORDS[(start + k) % 100] for k in range(rng.randint(3, 7)))
        choices = [" ".join(rng.sample(WORDS[50:100], rng.randint(1, 3))) for _ in range(4)]
        out.append({"question": q, "choices": choices, "label": rng.randrange(4)})
    return out


def _logits_fn(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def test_cached_mc_scores_equal_the_harness_scores():
    torch.manual_seed(0)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = _items()
    ref = evaluate_mc(_logits_fn(model), tok, items, batch_size=5, return_predictions=True)
    got = mc_item_scores(model, tok, items)
    assert got.pred == ref["pred"] and got.acc == pytest.approx(ref["acc"])
    # answer NLL: minus the right choice's summed log-probability over its token count
    ll = score_continuations(
        _logits_fn(model), tok, [(it["question"], " " + it["choices"][it["label"]]) for it in items]
    )
    n_tok = [len(tok(" " + it["choices"][it["label"]], add_special_tokens=False)["input_ids"]) for it in items]
    assert np.allclose(got.answer_nll, [-a / n for a, n in zip(ll, n_tok)], atol=1e-4)


def test_cut_hooks_reproduce_the_split_forward_with_codecs():
    from guardedp2p.engine.split import SplitConfig, split_model

    model = tiny_model("llama")
    parts = split_model(model, SplitConfig(2, 2))
    up, down = cut_transforms("int8", "nf4")
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = parts.top(down(parts.trunk(up(parts.bottom(ids, mask)), mask)), mask)
        with cut_hooks(model, 2, 2, up, down):
            got = model(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask).logits  # hooks are gone again
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(plain, ref, atol=1e-4)


def test_record_field_nll_matches_a_direct_computation():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    recs = [
        {"text": "w1 w2 w3 w4 w5 w6", "codes": {"a": "w4 w5"}},
        {"text": "w9 w8 w7", "codes": {"a": "w8"}},
        {"text": "w1 w2"},
    ]
    got = record_field_nll(model, tok, recs, batch_size=2)
    assert np.isnan(got[2])
    with torch.no_grad():
        for r, v in zip(recs[:2], got[:2]):
            ids = tok(r["text"])["input_ids"]
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            words = r["text"].split()
            code = r["codes"]["a"].split()
            pos = [i for i, w in enumerate(words) if w in code]
            assert v == pytest.approx(-float(np.mean([float(lp[t - 1, ids[t]]) for t in pos])), abs=1e-5)
