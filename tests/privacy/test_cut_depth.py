"""Cut depth (issue 16): Online and Gradfree run end to end over the in-process channel with 1, 2, 4 and 8 client
blocks on each side, with clipped activation noise on, and the client's cost is measurable at every depth."""

from __future__ import annotations

import copy

import pytest
import torch

from guardedp2p.engine.split import SplitConfig
from guardedp2p.service.client import TuneOptions, prepare_client, tune
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel
from tests.protocol_helpers import provider_app
from tests.tiny_models import tiny_config
from tests.tiny_tokenizer import tiny_tokenizer, write_text_records


@pytest.fixture(scope="module")
def deep_model():
    """The tiny llama with 18 blocks, so 8 + 8 client blocks leave a trunk of 2."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 18
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("design", ["online", "gradfree"])
@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_cut_depth_runs_end_to_end(deep_model, tmp_path, design, depth):
    data = write_text_records(tmp_path / "train.jsonl", n=16, distinct=3)
    opts = TuneOptions(
        protocol=design,
        model="tiny",
        data=str(data),
        out=str(tmp_path / "run"),
        train=TrainConfig(
            steps=2, batch_size=4, lr=5e-3, warmup_steps=0, checkpoint_every=0, max_length=16, lora_r=4, lora_alpha=8
        ),
        bottom_layers=depth,
        top_layers=depth,
        noise={"kind": "gaussian", "clip": 5.0, "noise_multiplier": 0.01},
        progress=False,
        timeout=2.0,
        retries=0,
        skip_eval=True,
    )
    app = provider_app(deep_model, SplitConfig(depth, depth))
    client = prepare_client(opts, model=copy.deepcopy(deep_model), tokenizer=tiny_tokenizer())
    assert len(client.split.client_layers(18)) == 2 * depth
    s = tune(opts, lambda: InProcClientChannel(app), client=client)
    assert s["steps"] == 2
    assert (s["gradient_bytes"] > 0) == (design == "online")
    assert s["time_split"]["client_compute_s"] > 0
    assert s["privacy"]["noise"]["noise_multiplier"] == 0.01 and s["privacy"]["noise"]["clip_unit"] == "record"
