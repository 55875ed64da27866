"""Llama 3 RoPE scaling recovered from a GGUF file's `rope_freqs.weight`.

llama.cpp does not write Llama 3's `rope_scaling` parameters into the metadata; its
converter stores the resulting per-frequency divisors as a tensor instead. The engine
wants the parameters, so we find ones that reproduce the divisors and check that they do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from twolane.models.errors import GGUFError

# Llama 3.1's own values, used when the divisors leave too few points to fit.
DEFAULT_LOW_FREQ_FACTOR = 1.0
DEFAULT_HIGH_FREQ_FACTOR = 4.0
DEFAULT_ORIGINAL_CONTEXT = 8192
# The divisors are stored as fp32, so a recomputed table matches to about 1e-7.
MATCH_RTOL = 1e-5


def llama3_scaling_from_factors(
    factors: np.ndarray, head_dim: int, rope_theta: float
) -> dict[str, Any] | None:
    """Llama 3 `rope_scaling` parameters whose divisors equal `factors` (None: no scaling).

    Raises:
        GGUFError: no Llama 3 parameters reproduce the divisors.
    """
    factors = factors.astype(np.float64)
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise GGUFError(
            f"rope_freqs.weight has {factors.size} values, expected {inv_freq.size} (head_dim/2)"
        )
    factor = float(factors.max())
    if math.isclose(factor, 1.0, rel_tol=MATCH_RTOL):
        return None
    for params in [*_fit(factors, inv_freq, factor), _defaults(factor)]:
        if np.allclose(llama3_factors(inv_freq, **params), factors, rtol=MATCH_RTOL):
            return {"rope_type": "llama3", **params}
    raise GGUFError("rope_freqs.weight does not match any Llama 3 RoPE scaling")


def llama3_factors(
    inv_freq: np.ndarray,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """What each frequency is divided by under Llama 3 scaling with these parameters."""
    wavelen = 2 * math.pi / inv_freq
    old_len = original_max_position_embeddings
    # `smooth` runs from 0 at the long-wavelength cut-off to 1 at the short one.
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    in_band = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen > old_len / low_freq_factor, factor, in_band)
    return np.where(wavelen < old_len / high_freq_factor, 1.0, out)


def _fit(factors: np.ndarray, inv_freq: np.ndarray, factor: float) -> list[dict[str, Any]]:
    """Parameters fitted to the in-band divisors (none when fewer than two are in the band).

    In the band, smooth = (L / wavelen - lo) / (hi - lo) is linear in 1 / wavelen, so two
    points fix its slope and intercept; those two numbers determine every divisor, and any
    (lo, hi, L) that gives them is equivalent. We take lo = 1, as Llama 3 does. The fit
    carries fp32 noise (8.000001), so a rounded `hi` is offered first.
    """
    in_band = (factors > 1 + MATCH_RTOL) & (factors < factor * (1 - MATCH_RTOL))
    if in_band.sum() < 2:
        return []
    smooth = (1 / factors[in_band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[in_band] / (2 * math.pi), smooth, 1)
    if intercept >= 0:
        return []
    low = DEFAULT_LOW_FREQ_FACTOR
    high = float(low - low / intercept)
    return [
        {
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": candidate,
            "original_max_position_embeddings": round(float(slope) * (candidate - low)),
        }
        for candidate in (round(high, 3), high)
    ]


def _defaults(factor: float) -> dict[str, Any]:
    return {
        "factor": factor,
        "low_freq_factor": DEFAULT_LOW_FREQ_FACTOR,
        "high_freq_factor": DEFAULT_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": DEFAULT_ORIGINAL_CONTEXT,
    }
