"""Split generation (issue 18): greedy split decoding with lossless codecs gives exactly the unsplit model's tokens
(the same adapter loaded locally), each new token costs one position each way, and the provider keeps, bounds and
frees one trunk KV cache per session while it keeps serving other sessions."""

from __future__ import annotations

import copy

import pytest
import torch

from guardedp2p.designs.online.generate import (
    GenerateConfig,
    GenerationInterrupted,
    LocalCachedTrunk,
    PromptTooLong,
    SplitGenerator,
    load_generation_client,
    open_generation_session,
)
from guardedp2p.engine.arch import UnsupportedArchitectureError
from guardedp2p.engine.lora import save_adapter
from guardedp2p.engine.split import build_trunk
from guardedp2p.errors import RemoteError
from guardedp2p.protocol.provider import ProviderConfig
from guardedp2p.transport.inproc import InProcClientChannel
from guardedp2p.wire.framing import Message, decode, encode
from guardedp2p.wire.messages import MsgType
from tests.protocol_helpers import SPLIT, client_parts, provider_app
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer

PROMPTS = [[5, 17, 33, 8, 91, 40, 12, 77, 3], [44, 9, 120, 61], [7, 7, 19, 150, 2, 88]]


def _adapter(model, tmp_path):
    parts, _ = client_parts(model)
    return save_adapter(parts.bottom, parts.top, tmp_path / "adapter")


def _client(model, adapter=None):
    return load_generation_client(
        full_model=copy.deepcopy(model),
        tokenizer=tiny_tokenizer(),
        split=SPLIT,
        adapter=adapter,
        device="cpu",
        dtype=None,
    )


def _reference(model, adapter, prompts, max_new, eos=None):
    """The unsplit model with the adapter loaded by PEFT, transformers' generate, left padding, greedy."""
    from peft import PeftModel

    ref = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval() if adapter else copy.deepcopy(model)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    gen_cfg = copy.deepcopy(ref.generation_config)
    # eos None: exactly max_new steps. generate() reads an unset (None) eos as "the model's", so name an id the
    # model can never produce instead
    gen_cfg.eos_token_id = eos if eos is not None else model.config.vocab_size
    gen_cfg.pad_token_id, gen_cfg.do_sample = 0, False
    with torch.inference_mode():
        out = ref.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, max_new_tokens=max_new)
    rows = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


def _session(app, client, **kw):
    return open_generation_session(lambda: InProcClientChannel(app), client, timeout=5.0, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_split_greedy_generation_equals_unsplit_generate_with_the_same_adapter(arch, tmp_path):
    model = tiny_model(arch)
    adapter = _adapter(model, tmp_path)
    app = provider_app(model)
    client = _client(model, adapter)
    gs = _session(app, client)
    gen = SplitGenerator(client.bottom, client.top, client.tokenizer, gs.trunk)
    cfg = GenerateConfig(max_new_tokens=24, eos_token_ids=())
    # one batch of three left-padded prompts (qwen2/mistral: longer than the sliding window), then one alone
    batched = [g.tokens for g in gen.generate(PROMPTS, cfg)]
    alone = [g.tokens for g in gen.generate(PROMPTS[1:2], cfg)]
    assert batched == _reference(model, adapter, PROMPTS, 24)
    assert alone == _reference(model, adapter, PROMPTS[1:2], 24)
    # the adapter matters: without it the tokens differ (so the test would notice an adapter that is not applied)
    plain = SplitGenerator(*_parts(_client(model)), gs.trunk).generate(PROMPTS, cfg)
    assert [g.tokens for g in plain] == _reference(model, None, PROMPTS, 24)
    assert [g.tokens for g in plain] != batched
    gs.close()
    assert not app.sessions


def _parts(client):
    return client.bottom, client.top, client.tokenizer


def test_eos_ends_a_row_and_the_others_go_on_exactly_as_generate(tmp_path):
    model = tiny_model("llama")
    adapter = _adapter(model, tmp_path)
    free = _reference(model, adapter, PROMPTS, 16)
    eos = free[1][3]  # a token row 1 produces early: that row stops there, the others may go on
    ref = _reference(model, adapter, PROMPTS, 16, eos=eos)
    app = provider_app(model)
    client = _client(model, adapter)
    gen = SplitGenerator(*_parts(client), _session(app, client).trunk)
    out = gen.generate(PROMPTS, GenerateConfig(max_new_tokens=16, eos_token_ids=(eos,)))
    assert [g.tokens for g in out] == ref
    assert out[1].finish_reason == "eos" and out[1].tokens[-1] == eos
    assert {g.finish_reason for g in out} <= {"eos", "length"}


def test_each_new_token_sends_one_position_each_way_and_the_provider_caches_the_trunk(tmp_path):
    model = tiny_model("llama")
    app = provider_app(model)
    client = _client(model)
    gs = _session(app, client)
    gen = SplitGenerator(*_parts(client), gs.trunk)
    stats = gs.session.stats
    d = model.config.hidden_size
    gen.generate([PROMPTS[0]], GenerateConfig(max_new_tokens=2, eos_token_ids=()))
    up0, down0 = stats.bytes_up["ACT_UP"], stats.bytes_down["ACT_DOWN"]
    handler = app.sessions[gs.session.sid].handler
    gen.generate([PROMPTS[0]], GenerateConfig(max_new_tokens=12, eos_token_ids=()))
    # the second generation: one prompt step (like the first) + 11 decode steps of one position each
    per_step_up = (stats.bytes_up["ACT_UP"] - 2 * up0) / 10
    per_step_down = (stats.bytes_down["ACT_DOWN"] - 2 * down0) / 10
    assert 4 * d < per_step_up < 4 * d + 400, "one fp32 position up (plus its mask byte and the header)"
    assert 4 * d < per_step_down < 4 * d + 400
    assert gs.trunk.last_meta["cache_len"] == len(PROMPTS[0]) + 11
    # per-position cache size of the 2 trunk blocks: 2 (k, v) x 2 kv heads x 16 head dim x 4 bytes
    assert handler.kv.nbytes() == (len(PROMPTS[0]) + 11) * 2 * 2 * 2 * 16 * 4
    gs.close()  # BYE frees the cache with the session
    assert handler.kv is None


def test_generation_applies_the_sessions_noise_at_every_step_and_is_recorded(tmp_path):
    from guardedp2p.attacks.transcript import TranscriptRecorder, load_transcript
    from guardedp2p.privacy.noise import client_noise

    model = tiny_model("llama")
    app = provider_app(model, recorder=TranscriptRecorder(tmp_path / "rec"))
    client = _client(model)
    noise = {"kind": "gaussian", "scale": 0.5, "seed": 3}
    gen = SplitGenerator(
        *_parts(client), _session(app, client).trunk, transform_sent=client_noise(noise, client.device).sent
    )
    clean = SplitGenerator(*_parts(client), LocalCachedTrunk(build_trunk(copy.deepcopy(model), SPLIT)))
    gen.generate([PROMPTS[1]], GenerateConfig(max_new_tokens=5, eos_token_ids=()))
    obs = load_transcript(tmp_path / "rec")
    assert len(obs) == 5 and all(o.meta.get("generate") for o in obs)
    assert [o.meta["cache"] for o in obs] == ["new"] + ["extend"] * 4
    assert [tuple(o.h1.shape) for o in obs] == [(1, 4, 64)] + [(1, 1, 64)] * 4
    # what the provider saw is the noisy activation: compare with the clean bottom output of the same tokens
    seen = []
    clean.trunk = _Spy(clean.trunk, seen)
    tokens = [int(t) for t in PROMPTS[1]]
    clean.generate([tokens], GenerateConfig(max_new_tokens=1, eos_token_ids=()))
    assert (obs[0].h1 - seen[0]).abs().mean() > 0.2, "the prompt's activation must carry the noise"
    assert not load_transcript(tmp_path / "rec", train_only=True), "generation steps are not training steps"


class _Spy:
    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def __call__(self, h1, mask, *, past_len):
        self.seen.append(h1.clone())
        return self.inner(h1, mask, past_len=past_len)


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = tiny_model("llama")
    client = _client(model)
    trunk = LocalCachedTrunk(build_trunk(copy.deepcopy(model), SPLIT))
    gen = SplitGenerator(*_parts(client), trunk)
    greedy = gen.generate(PROMPTS, GenerateConfig(max_new_tokens=10, eos_token_ids=()))
    a = gen.generate(PROMPTS, GenerateConfig(max_new_tokens=10, temperature=1.5, seed=7, eos_token_ids=()))
    b = gen.generate(PROMPTS, GenerateConfig(max_new_tokens=10, temperature=1.5, seed=7, eos_token_ids=()))
    c = gen.generate(PROMPTS, GenerateConfig(max_new_tokens=10, temperature=1.5, seed=8, eos_token_ids=()))
    k1 = gen.generate(PROMPTS, GenerateConfig(max_new_tokens=10, temperature=0.7, top_k=1, seed=1, eos_token_ids=()))
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    assert [g.tokens for g in k1] == [g.tokens for g in greedy]
    with pytest.raises(Exception, match="temperature"):
        gen.generate(PROMPTS, GenerateConfig(top_p=0.9))


def test_stop_strings_cut_the_text():
    model = tiny_model("llama")
    client = _client(model)
    gen = SplitGenerator(*_parts(client), LocalCachedTrunk(build_trunk(copy.deepcopy(model), SPLIT)))
    prompt = client.tokenizer("w1 w2 w3")["input_ids"]
    free = gen.generate([prompt], GenerateConfig(max_new_tokens=12, eos_token_ids=()))[0]
    words = free.text.split()
    assert len(words) >= 4, free.text
    stop = words[2]
    out = gen.generate([prompt], GenerateConfig(max_new_tokens=12, eos_token_ids=(), stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and free.text.startswith(out.text)
    assert len(out.tokens) < len(free.tokens)


def test_a_prompt_longer_than_the_negotiated_limit_is_refused_before_sending():
    model = tiny_model("llama")
    app = provider_app(model, config=ProviderConfig(max_tokens_per_step=8))
    client = _client(model)
    gs = _session(app, client)
    gen = SplitGenerator(*_parts(client), gs.trunk, max_tokens_per_step=gs.max_tokens_per_step)
    with pytest.raises(PromptTooLong, match="at most 8 tokens per step"):
        gen.generate([PROMPTS[0]], GenerateConfig(max_new_tokens=2))
    with pytest.raises(PromptTooLong, match="context is 128"):
        gen.generate([[5] * 128], GenerateConfig(max_new_tokens=2))
    assert gs.session.stats.bytes_up.get("ACT_UP", 0) == 0
    # prompts that fit one by one are sent in batches that fit the limit (4 + 6 tokens: two steps)
    out = gen.generate([PROMPTS[1], PROMPTS[2]], GenerateConfig(max_new_tokens=3, eos_token_ids=()))
    assert [len(g.tokens) for g in out] == [3, 3] and gen.stats.batches == 2


def test_cache_budget_is_refused_clearly_and_the_provider_serves_other_sessions():
    model = tiny_model("llama")
    per_position = 2 * 2 * 2 * 16 * 4  # two trunk blocks, k and v, 2 kv heads of 16, fp32
    app = provider_app(model, config=ProviderConfig(max_kv_bytes_per_session=20 * per_position))
    client = _client(model)
    gs = _session(app, client)
    gen = SplitGenerator(*_parts(client), gs.trunk)
    with pytest.raises(GenerationInterrupted, match="budget") as err:
        gen.generate([PROMPTS[0]], GenerateConfig(max_new_tokens=30, eos_token_ids=()))
    assert err.value.remote_code == "cache-budget"
    assert len(err.value.partial[0].tokens) == 20 - len(PROMPTS[0]) + 1  # every token the budget allowed
    assert app.sessions[gs.session.sid].handler.kv is None, "a refused cache is freed"
    # the same session, and another client's session, still generate within the budget
    other = _session(app, client, codecs={"up": "fp32", "down": "fp32"}, protocol="gradfree")
    for g in (gen, SplitGenerator(*_parts(client), other.trunk)):
        assert len(g.generate([PROMPTS[1]], GenerateConfig(max_new_tokens=5, eos_token_ids=()))[0].tokens) == 5


def test_a_provider_that_restarts_mid_generation_ends_it_with_a_clear_message():
    model = tiny_model("llama")
    app = provider_app(model)
    client = _client(model)
    gen = SplitGenerator(*_parts(client), _session(app, client).trunk)

    def restart(index, token):
        if len(gen_tokens) == 3:
            app.sessions.clear()  # the provider process restarted: it knows no session any more
        gen_tokens.append(token)

    gen_tokens: list[int] = []
    with pytest.raises(GenerationInterrupted, match="no longer knows this session") as err:
        gen.generate([PROMPTS[2]], GenerateConfig(max_new_tokens=10, eos_token_ids=()), on_token=restart)
    assert err.value.partial[0].tokens == gen_tokens[:4]


def test_provider_refuses_an_extend_without_a_cache_and_frees_an_idle_cache():
    model = tiny_model("llama")
    now = [0.0]
    app = provider_app(model, config=ProviderConfig(step_timeout=10.0), clock=lambda: now[0])
    client = _client(model)
    gs = _session(app, client)
    h = torch.zeros(1, 1, model.config.hidden_size)
    mask = torch.ones(1, 1, dtype=torch.int8)

    def act(step, meta):
        msg = Message(MsgType.ACT_UP, session=gs.session.sid, step=step, meta=meta, tensors={"h": h, "mask": mask})
        msg.codecs = {"h": "fp32"}
        return decode(app.handle("inproc:client", encode(msg)))

    reply = act(1, {"generate": True, "cache": "extend", "past_len": 4})
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "cache-mismatch"
    assert act(2, {"generate": True, "cache": "new", "past_len": 0}).meta["cache_len"] == 1
    reply = act(3, {"generate": True, "cache": "extend", "past_len": 5})
    assert reply.meta["code"] == "cache-mismatch" and "1 positions" in reply.meta["message"]
    assert act(4, {"generate": True, "cache": "sideways", "past_len": 0}).meta["code"] == "bad-activation"
    assert act(5, {"generate": True, "cache": "extend", "past_len": 1}).meta["cache_len"] == 2
    now[0] = 11.0
    gs.session.ping()  # any message runs the expiry: the idle cache is freed, the session stays
    assert app.sessions[gs.session.sid].handler.kv is None
    assert act(6, {"generate": True, "cache": "extend", "past_len": 2}).meta["code"] == "cache-mismatch"


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_unsupported_architectures_are_refused_clearly(arch):
    model = tiny_model(arch)
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2"):
        _client(model)
    app = provider_app(model)
    from tests.protocol_helpers import open_session

    parts, fp = client_parts(model, lora=False)
    session = open_session(app, fp)
    msg = Message(
        MsgType.ACT_UP,
        step=1,
        meta={"generate": True, "cache": "new", "past_len": 0},
        tensors={"h": torch.zeros(1, 2, model.config.hidden_size), "mask": torch.ones(1, 2, dtype=torch.int8)},
        codecs={"h": "fp32"},
    )
    with pytest.raises(RemoteError, match="cannot serve generation"):
        session.request(msg, expect=MsgType.ACT_DOWN)
    session.ping()  # and the session still works


def _reference_model_tokens(ref, prompts, max_new):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    with torch.inference_mode():
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def test_offline_deliverables_generate_through_the_split_full_blocks_and_signed_bundle(tmp_path):
    """Issue 18 item 5: what an Offline run leaves the client (a full-block adapter, or the signed bundle the
    provider plugged in) generates through the same split, against a provider serving the base model."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from peft import PeftModel

    from guardedp2p.crypto.manifest import DigestMismatchError, sign_folder
    from guardedp2p.designs.offline.plugin import ADAPTER_FILES, BUNDLE_KIND, full_block_parameters, save_full_blocks
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.split import build_client_parts

    model = tiny_model("llama")
    app = provider_app(model)
    cfg = GenerateConfig(max_new_tokens=12, eos_token_ids=())
    # 1. full-block adapter: the client's blocks themselves were tuned (here: perturbed)
    tuned = copy.deepcopy(model)
    parts = build_client_parts(tuned, SPLIT)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in full_block_parameters(parts.bottom, parts.top).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = save_full_blocks(parts.bottom, parts.top, tmp_path / "full")
    client = _client(model, folder)
    out = SplitGenerator(*_parts(client), _session(app, client).trunk).generate(PROMPTS, cfg)
    assert [o.tokens for o in out] == _reference_model_tokens(tuned.eval(), PROMPTS, 12)
    # 2. the signed LoRA bundle: verified, plugged in, and equal to the unsplit model with the adapter
    adapter = _adapter(model, tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ADAPTER_FILES:
        (bundle / name).write_bytes((adapter / name).read_bytes())
    body = {
        "kind": BUNDLE_KIND,
        "base_fingerprint": model_fingerprint(model, SPLIT),
        "split": {"bottom_layers": 2, "top_layers": 2},
        "emulator_manifest_sha256": "0" * 64,
        "adapter": {"format": "peft-lora", "client_layers": [0, 1, 4, 5]},
    }
    sign_folder(bundle, body, ADAPTER_FILES, Ed25519PrivateKey.generate())
    client = _client(model, bundle)
    out = SplitGenerator(*_parts(client), _session(app, client).trunk).generate(PROMPTS, cfg)
    ref = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    assert [o.tokens for o in out] == _reference_model_tokens(ref, PROMPTS, 12)
    # a damaged bundle is refused before anything is loaded
    weights = bundle / ADAPTER_FILES[1]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        _client(model, bundle)


@pytest.mark.slow
def test_default_model_split_greedy_generation_equals_unsplit_with_the_same_adapter(smollm2, tmp_path):
    from guardedp2p.designs.online.generate import encode_prompt

    model, tok = smollm2
    adapter = _adapter(model, tmp_path)
    app = provider_app(model)
    client = load_generation_client(
        full_model=copy.deepcopy(model), tokenizer=tok, split=SPLIT, adapter=adapter, device="cpu", dtype=None
    )
    texts = ["Write a haiku about autumn.", "What is 2 + 2?", "Name three colours of the rainbow, please."]
    prompts = [encode_prompt(tok, t, chat=True) for t in texts]
    gen = SplitGenerator(client.bottom, client.top, tok, _session(app, client).trunk)
    out = gen.generate(prompts, GenerateConfig(max_new_tokens=24, eos_token_ids=()))
    assert [g.tokens for g in out] == _reference(model, adapter, prompts, 24)
    assert all(g.text.strip() for g in out)
