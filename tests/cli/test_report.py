"""The run summary table shows what each design promises to report."""

from __future__ import annotations

from rich.console import Console

from guardedp2p.cli.report import print_summary


def _render(summary: dict) -> str:
    console = Console(width=120, record=True)
    print_summary(summary, console)
    return console.export_text()


def test_offline_summary_shows_the_five_numbers_and_ip_exposure():
    text = _render(
        {
            "protocol": "offline",
            "steps": 60,
            "loss_first": 5.8,
            "loss_last": 1.8,
            "eval_metric": "acc",
            "eval_before": 0.25,
            "eval_after": 0.531,
            "zero_shot_full": 0.266,
            "full_finetune": 0.578,
            "emulator_zero_shot": 0.25,
            "emulator_finetune": 0.531,
            "plug_in": 0.234,
            "param_fraction": 0.789,
            "bytes_up": 1,
            "bytes_down": 2,
        }
    )
    assert "0.266 → 0.578" in text and "0.250 → 0.531" in text and "0.234" in text
    assert "78.9 %" in text


def test_online_summary_has_no_offline_rows():
    text = _render(
        {
            "protocol": "online",
            "steps": 3,
            "loss_first": 4.0,
            "loss_last": 3.0,
            "eval_before": 0.2,
            "eval_after": 0.3,
            "bytes_per_step": 2048,
            "bytes_per_step_fp32": 8192,
        }
    )
    assert "five numbers" not in text and "75.0 %" in text
