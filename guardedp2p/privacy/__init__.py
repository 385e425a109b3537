"""Privacy defences applied by the client: the NoPeek distance-correlation penalty and noise mechanisms.

* :mod:`guardedp2p.privacy.dcor` -- distance correlation (V- and U-statistics), ``dcor_penalty`` for training,
  ``dcor_leakage`` for reporting.
* :mod:`guardedp2p.privacy.noise` -- ``NoiseConfig``, Gaussian / Laplace activation noise (uncalibrated or
  calibrated from epsilon/delta), dχ-privacy on input embeddings.
"""

from guardedp2p.privacy.dcor import dcor_leakage, dcor_penalty, distance_correlation, pairwise_distances
from guardedp2p.privacy.noise import (
    NOISE_KINDS,
    NoiseConfig,
    add_activation_noise,
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    clip_per_sample,
    describe,
    dx_privacy_embeddings,
    dx_privacy_token_ids,
    gaussian_scale,
    laplace_scale,
)

__all__ = [
    "distance_correlation",
    "dcor_penalty",
    "dcor_leakage",
    "pairwise_distances",
    "NOISE_KINDS",
    "NoiseConfig",
    "add_activation_noise",
    "clip_per_sample",
    "laplace_scale",
    "gaussian_scale",
    "classical_gaussian_sigma",
    "analytic_gaussian_sigma",
    "dx_privacy_token_ids",
    "dx_privacy_embeddings",
    "describe",
]
