"""Noise schedules, following diffusers' DDPMScheduler exactly (computed in float64).

alphas_cumprod(kind, T, beta_start, beta_end) returns abar[0..T-1] as a float64 numpy array.
squaredcos_cap_v2 is diffusers' betas_for_alpha_bar with max_beta 0.999.
"""
import math

import numpy as np


def betas(kind="squaredcos_cap_v2", T=1000, beta_start=0.0001, beta_end=0.02):
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def ab(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - ab((i + 1) / T) / ab(i / T), 0.999) for i in range(T)],
                        dtype=np.float64)
    raise ValueError(kind)


def alphas_cumprod(kind="squaredcos_cap_v2", T=1000, beta_start=0.0001, beta_end=0.02):
    return np.cumprod(1.0 - betas(kind, T, beta_start, beta_end))


def timesteps(steps, T=1000, spacing="trailing", offset=0):
    """Discrete timesteps, descending, as diffusers' set_timesteps does."""
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = T // steps
        ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + offset
    elif spacing == "trailing":
        ratio = T / steps
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(spacing)
    return ts
