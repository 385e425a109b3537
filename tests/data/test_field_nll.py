"""guardedp2p.data.field_nll: only the tokens of the named fields count, each scored by the previous position."""

from __future__ import annotations

import math

import pytest
import torch

from guardedp2p.data.field_nll import (
    FieldNotFoundError,
    evaluate_field_nll,
    evaluate_record_nll,
    find_spans,
    record_field_spans,
    token_group_masks,
)
from tests.tiny_models import VOCAB, tiny_model
from tests.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def table_logits(table: torch.Tensor):
    """logits_fn whose logits at position t are ``table[t]`` whatever the input (a hand-made model)."""

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        return table[:t].unsqueeze(0).expand(b, t, -1).clone()

    return fn


def test_hand_made_case_counts_only_the_field_token(tok):
    text = "w1 w2 w3 w4"
    ids = tok(text)["input_ids"]
    assert len(ids) == 4
    g = torch.Generator().manual_seed(0)
    table = torch.randn(4, len(tok), generator=g)
    span = [(6, 8)]  # "w3"
    got = evaluate_field_nll(table_logits(table), tok, [text], [span])
    want = -torch.log_softmax(table[1], -1)[ids[2]]  # token 2 is predicted at position 1
    assert got.tokens == 1 and got.nll == pytest.approx(float(want), rel=1e-6)
    # logits anywhere else do not matter
    table2 = table.clone()
    table2[0] += 5 * torch.randn(len(tok), generator=g)
    table2[2:] += 5 * torch.randn(2, len(tok), generator=g)
    assert evaluate_field_nll(table_logits(table2), tok, [text], [span]).nll == pytest.approx(got.nll, rel=1e-6)
    # a span over two tokens averages them
    both = evaluate_field_nll(table_logits(table), tok, [text], [[(3, 8)]])
    want2 = (want - torch.log_softmax(table[0], -1)[ids[1]]) / 2
    assert both.tokens == 2 and both.nll == pytest.approx(float(want2), rel=1e-6)


def test_first_token_is_never_scored_and_empty_gives_nan(tok):
    table = torch.zeros(3, len(tok))
    got = evaluate_field_nll(table_logits(table), tok, ["w1 w2 w3"], [[(0, 2)]])
    assert got.tokens == 0 and math.isnan(got.nll)


def test_groups_overlap_counted_once_overall(tok):
    text = "w1 w2 w3 w4 w5"
    table = torch.randn(5, len(tok), generator=torch.Generator().manual_seed(1))
    spans = {"pii": [(3, 8)], "codes": [(6, 11)]}  # w2 w3 | w3 w4
    got = evaluate_field_nll(table_logits(table), tok, [text], [spans])
    assert got.group_tokens == {"codes": 2, "pii": 2} and got.tokens == 3
    ids = tok(text)["input_ids"]
    per = [float(-torch.log_softmax(table[t - 1], -1)[ids[t]]) for t in range(1, 5)]
    assert got.groups["pii"] == pytest.approx((per[0] + per[1]) / 2, rel=1e-6)
    assert got.groups["codes"] == pytest.approx((per[1] + per[2]) / 2, rel=1e-6)
    assert got.nll == pytest.approx(sum(per[:3]) / 3, rel=1e-6)


def test_token_masks_use_character_overlap(tok):
    ids, masks = token_group_masks(tok, "w10 w11 w12", [(5, 6)])  # one character inside "w11"
    assert len(ids) == 3 and masks == {"fields": [False, True, False]}


def test_padding_and_batching_do_not_change_the_result(tok):
    model = tiny_model("llama")

    def fn(ids, mask):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9", "w10 w11 w12 w13"]
    spans = [find_spans(t, [t.split()[-2]]) for t in texts]
    one = evaluate_field_nll(fn, tok, texts, spans, batch_size=1)
    many = evaluate_field_nll(fn, tok, texts, spans, batch_size=3)
    assert one.tokens == many.tokens == 3
    assert one.nll == pytest.approx(many.nll, rel=1e-5)
    assert VOCAB >= len(tok)


def test_record_spans_from_pii_and_codes():
    from guardedp2p.data.hidden_rules import make_records

    rec = make_records(1, 0, "eval")[0]
    spans = record_field_spans(rec)
    assert [rec["text"][a:b] for a, b in spans["pii"]] == list(rec["pii"].values())
    assert [rec["text"][a:b] for a, b in spans["codes"]] == list(rec["codes"].values())
    with pytest.raises(FieldNotFoundError, match="does not occur"):
        record_field_spans({"text": "Patient X", "pii": {"name": "Y"}})


def test_record_nll_on_generated_records(tok):
    """With the tiny word tokenizer every real word is [UNK]; the metric still runs end to end on real records."""
    from guardedp2p.data.hidden_rules import make_records

    model = tiny_model("llama")

    def fn(ids, mask):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    recs = make_records(2, 0, "eval")
    got = evaluate_record_nll(fn, tok, recs, max_length=100)
    assert got.tokens > 0 and set(got.groups) == {"codes", "pii"} and math.isfinite(got.nll)
