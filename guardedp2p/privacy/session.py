"""The privacy of one split session, resolved once from the user's options: what the client does to what it
sends, and what the handshake and the summary say about it.

A run's protection is a property of the session, not of training (issue 16): the same :class:`SessionPrivacy`
puts dχ noise on the bottom's input embeddings, noise on every activation sent up (training and evaluation
forwards alike), noise on Online's gradient sent up, and the learned obfuscation penalty on the bottom's loss.
One generator serves the whole run (never re-seeded per step, :func:`guardedp2p.privacy.noise.client_noise`).

Precedence: an explicit ``--noise`` / ``--dcor`` wins over what a ``--privacy`` preset would set, and the
summary records both the preset and what was actually applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardedp2p.errors import ConfigError
from guardedp2p.privacy.noise import ClientNoise, NoiseConfig, client_noise
from guardedp2p.privacy.obfuscation import ObfuscationConfig, Obfuscator
from guardedp2p.privacy.presets import PRESETS, PrivacyPreset, RunShape, preset_digit_ids, resolve_preset

log = logging.getLogger("guardedp2p.client")

__all__ = ["DEMO_PUBLIC_TEXT", "SessionPrivacy", "public_token_ids", "resolve_session_privacy"]

DEMO_PUBLIC_TEXT = "demo-aux"
"""The shipped auxiliary demo records (other people, the demo's house style): the default public text."""


def public_token_ids(spec: str, tokenizer: Any, max_length: int, *, limit: int = 3000) -> list[list[int]]:
    """Token ids of public records in the client's style: ``demo-aux`` or a JSONL/JSON/CSV file of ``text``
    records, encoded as the client encodes its LM records. Public means public: the provider and any attacker
    may hold the same text, so nothing private may be given here."""
    from guardedp2p.data.loaders import load_records
    from guardedp2p.data.tokenize import DataConfig, encode_lm

    if spec == DEMO_PUBLIC_TEXT:
        from guardedp2p.data.demo import demo_paths

        spec = demo_paths().aux
    try:
        records = load_records(spec)
    except FileNotFoundError:
        raise ConfigError(f"public text {spec!r} not found: give a JSONL file of {{'text': ...}} records") from None
    texts = [{"text": str(r["text"])} for r in records[:limit] if isinstance(r, dict) and r.get("text")]
    if not texts:
        raise ConfigError(f"public text {spec!r} holds no record with a 'text' field")
    return [ex["input_ids"] for ex in encode_lm(texts, tokenizer, DataConfig(max_length=max_length))]


@dataclass
class SessionPrivacy:
    """The resolved mechanisms of one run (see the module docstring)."""

    noise: ClientNoise | None = None
    dcor_alpha: float = 0.0
    preset: PrivacyPreset | None = None
    obfuscation: ObfuscationConfig | None = None
    obfuscator: Obfuscator | None = None
    describe_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sent(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.noise.sent if self.noise is not None else None

    @property
    def grad(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.noise.grad if self.noise is not None else None

    @property
    def noise_dict(self) -> dict[str, Any]:
        return self.noise.cfg.to_dict() if self.noise is not None else {}

    def mark(self) -> torch.Tensor | None:
        """The noise generator's state, for :meth:`rewind` before a retried request.

        Why: a step (or evaluation) that fails after its activations left and is retried would otherwise send the
        same records again under FRESH noise, a release the accountant never counted; the average of two
        independent noisings is a less noisy view of the record. Rewound, the retry re-sends exactly the draws
        already released (the same record, the same weights, the same noise), so it releases nothing new.
        """
        return self.noise.generator.get_state() if self.noise is not None else None

    def rewind(self, state: torch.Tensor | None) -> None:
        """Back to a :meth:`mark`: the next draws repeat the ones made since."""
        if self.noise is not None and state is not None:
            self.noise.generator.set_state(state)

    def install(self, bottom: torch.nn.Module) -> None:
        """dχ on the bottom's input embeddings (every forward: training, evaluation, generation)."""
        if self.noise is not None:
            self.noise.install(bottom)

    def remove(self) -> None:
        if self.noise is not None:
            self.noise.remove()

    def block(
        self,
        *,
        design: str,
        steps: int,
        batch_size: int,
        n_records: int,
        grad_accum: int,
        cached: bool,
        max_tokens: int | None = None,
    ) -> dict[str, Any]:
        """The ``privacy`` map of the HELLO, ``summary.json`` and ``--json``: the preset, dCor, obfuscation and the
        noise with ε at δ over every release of a record during the run (dp-accounting; never the seed)."""
        from guardedp2p.privacy.accounting import privacy_block

        extra: dict[str, Any] = {"dcor_alpha": self.dcor_alpha, **self.describe_extra}
        if self.preset is not None:
            extra["preset"] = self.preset.describe()
        if self.obfuscation is not None:
            extra["obfuscation"] = self.obfuscation.describe()
        return privacy_block(
            self.noise.cfg if self.noise is not None else None,
            design=design,
            steps=steps,
            batch_size=batch_size,
            n_records=n_records,
            grad_accum=grad_accum,
            max_tokens=max_tokens,
            cached=cached,
            extra=extra,
        )


def resolve_session_privacy(
    *,
    preset: str,
    noise: dict[str, Any],
    dcor_alpha: float,
    obfuscation: ObfuscationConfig | None,
    design: str,
    shape: RunShape,
    tokenizer: Any,
    bottom: torch.nn.Module | None,
    d_model: int,
    public_text: str = DEMO_PUBLIC_TEXT,
    device: torch.device | str = "cpu",
    pad_id: int = 0,
) -> SessionPrivacy:
    """Resolve ``--privacy``, ``--noise``, ``--dcor`` and ``--obfuscate`` into one :class:`SessionPrivacy`.

    ``bottom`` is the client's bottom (the obfuscation trains against it; ``None`` for a frozen bottom, where
    obfuscation is refused). The preset's keep list (``balanced``) and the obfuscation's inverter read
    ``public_text``.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown privacy preset {preset!r}: use one of {', '.join(PRESETS)}")
    public: list[list[int]] | None = None

    def public_ids(spec: str) -> Sequence[Sequence[int]]:
        nonlocal public
        if spec != public_text:
            return public_token_ids(spec, tokenizer, shape.max_length)
        if public is None:
            public = public_token_ids(public_text, tokenizer, shape.max_length)
        return public

    resolved: PrivacyPreset | None = None
    if preset != "off":
        keyed = preset in ("balanced", "fields")  # their keep lists come from public text in the client's style
        resolved = resolve_preset(
            preset,
            shape=shape,
            public_ids=public_ids(public_text) if keyed else None,
            digit_ids=preset_digit_ids(preset, tokenizer),
        )
    spec = dict(noise) if noise else (dict(resolved.noise) if resolved is not None else {})
    if resolved is not None and dcor_alpha == 0:
        dcor_alpha = resolved.dcor_alpha
    cn = client_noise(spec, device) if spec and NoiseConfig.from_dict(spec).kind != "none" else None
    obfuscator = None
    if obfuscation is not None and obfuscation.weight > 0:
        if bottom is None:
            raise ConfigError(
                f"--obfuscate trains the client's bottom against an inverter; the {design} design freezes the "
                "bottom, so there is nothing to train (use --noise or --privacy instead)"
            )
        obfuscator = Obfuscator(
            obfuscation,
            lambda ids, mask: bottom(ids, mask),
            public_ids(obfuscation.public_text),
            d_model,
            transform=cn.sent if cn is not None else None,
            pad_id=pad_id,
            device=device,
        )
    if cn is not None and design == "online" and cn.cfg.calibrated and not cn.cfg.noises_gradient:
        log.warning(
            "the noise on the activations is calibrated, but the gradient this Online run sends up is not noised: "
            "the run has no finite epsilon (add grad_clip=...,grad_z=... to --noise, or use --privacy strong)"
        )
    extra: dict[str, Any] = {}
    if resolved is not None and noise:
        extra["preset_noise_overridden"] = True  # --noise given: it replaced the preset's noise
    return SessionPrivacy(cn, dcor_alpha, resolved, obfuscation if obfuscator else None, obfuscator, extra)
