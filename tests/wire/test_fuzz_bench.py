"""A short run of the fuzz bench in CI: mutated frames over real CURVE must not crash or hang the provider.

The full run (``python -m benchmarks.bench_fuzz``, 100 000 frames) is a benchmark; this budget (a few hundred
frames, ~2 s of fuzzing) catches a parser or handler that raises out of the serve loop, a request left without
a reply, or a provider that stops serving the honest client after the garbage (docs/wire.md, SECURITY.md).
"""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("zmq")


@pytest.fixture
def restore_log_level():
    """The bench silences the package logger (one warning per refused frame); give the level back afterwards."""
    logger = logging.getLogger("guardedp2p")
    level = logger.level
    yield
    logger.setLevel(level)


def test_short_fuzz_run_finds_no_crash_and_the_provider_keeps_serving(capsys, restore_log_level):
    from benchmarks import bench_fuzz

    frames = 300
    rc = bench_fuzz.main(["--frames", str(frames), "--seconds", "15", "--good-every", "100", "--timeout", "5"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = [r for r in lines if "frames" in r]
    assert len(summary) == 1, lines
    s = summary[0]
    assert not [r for r in lines if "good_client_error" in r], lines
    assert s["crashes"] == 0 and s["hangs"] == 0, s
    assert s["provider_serving"] is True, s
    # a step every 100 frames and one after the last mutated frame: the honest client was served throughout
    assert s["good_client_steps"] == (s["frames"] - 1) // 100 + 2, s
    # the budget was spent on the provider's refusal paths, not skipped
    assert s["frames"] >= 100, s
    assert s["error_replies"] > s["frames"] // 2, s
    assert s["provider_errors_counted"] > 0, s
    assert rc == 0
