"""Privacy defences applied by the client, and the accounting of what they guarantee.

* :mod:`guardedp2p.privacy.dcor` -- distance correlation (V- and U-statistics), ``dcor_penalty`` for training,
  ``dcor_leakage`` for reporting.
* :mod:`guardedp2p.privacy.noise` -- ``NoiseConfig``: Gaussian / Laplace activation noise (uncalibrated, clipped
  per record or per token with a noise multiplier, or calibrated from ε/δ), Gaussian noise on the gradient Online
  sends up, (token-selective) dχ-privacy on the input embeddings; ``client_noise`` puts them on a run with one
  generator.
* :mod:`guardedp2p.privacy.accounting` -- ε over every release of a record in a run, by ``dp-accounting``.
* :mod:`guardedp2p.privacy.obfuscation` -- the learned defence: the bottom trained against the client's own inverter.
* :mod:`guardedp2p.privacy.presets` -- ``--privacy off|balanced|fields|strong`` resolved to documented parameters.

The accounting, obfuscation and preset modules load on first use (``dp-accounting`` is imported only there).
"""

from guardedp2p.privacy.dcor import dcor_leakage, dcor_penalty, distance_correlation, pairwise_distances
from guardedp2p.privacy.noise import (
    CLIP_UNITS,
    DEFAULT_DELTA,
    NOISE_KINDS,
    ClientNoise,
    NoiseConfig,
    add_activation_noise,
    add_gradient_noise,
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    client_noise,
    clip_per_sample,
    clip_per_token,
    describe,
    dx_privacy_embeddings,
    dx_privacy_token_ids,
    frequent_token_ids,
    gaussian_scale,
    install_input_noise,
    laplace_scale,
)

__all__ = [
    "distance_correlation",
    "dcor_penalty",
    "dcor_leakage",
    "pairwise_distances",
    "CLIP_UNITS",
    "DEFAULT_DELTA",
    "NOISE_KINDS",
    "ClientNoise",
    "NoiseConfig",
    "add_activation_noise",
    "add_gradient_noise",
    "client_noise",
    "clip_per_sample",
    "clip_per_token",
    "laplace_scale",
    "gaussian_scale",
    "classical_gaussian_sigma",
    "analytic_gaussian_sigma",
    "dx_privacy_token_ids",
    "dx_privacy_embeddings",
    "frequent_token_ids",
    "install_input_noise",
    "describe",
]
