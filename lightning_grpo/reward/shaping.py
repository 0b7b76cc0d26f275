"""Reward shaping: CER and NLL utilities and their weighted harmonic mean (pure torch).

    U_cer  = 1 - tanh(beta_c * CER)                        in [0, 1]; CER >= 0, may exceed 1
    U_nll  = exp(-NLL / tau_n)                             in [0, 1]
    reward = (lc + ln) / (lc / U_cer + ln / U_nll)         weighted harmonic mean, clipped to [0, 1]

Defaults are the original recipe's (lc 0.6, ln 0.4, beta_c 3, tau_n 3; arXiv 2509.18798 shows the
harmonic CER+NLL mix beats either alone). Departures from the original, all for robustness: every
input gives a finite reward. A NaN or +inf NLL (nothing measured, or an impossible text) gives
U_nll = 0; a NaN CER counts as CER = inf (U_cer = 0); a negative CER or NLL is clamped to 0.
The harmonic mean is computed as (lc + ln) * Uc * Un / (lc * Un + ln * Uc), which equals the formula
above for U > 0 and goes to 0, without dividing by zero, when either utility is 0 (the limit of the
harmonic mean: one useless half makes the whole sample useless, which is what blocks reward hacking
by gaming only CER or only NLL).
"""

from __future__ import annotations

import torch


def u_cer(cer: torch.Tensor, beta_c: float = 3.0) -> torch.Tensor:
    """CER utility 1 - tanh(beta_c * CER). cer: (N,) -> (N,) in [0, 1]; NaN CER -> 0."""
    cer = torch.nan_to_num(cer.float(), nan=torch.inf).clamp(min=0.0)
    return (1.0 - torch.tanh(beta_c * cer)).clamp(0.0, 1.0)


def u_nll(nll: torch.Tensor, tau_n: float = 3.0) -> torch.Tensor:
    """NLL utility exp(-NLL / tau_n). nll: (N,) per-token mean NLL in nats -> (N,) in [0, 1]; NaN -> 0."""
    nll = torch.nan_to_num(nll.float(), nan=torch.inf).clamp(min=0.0)
    return torch.exp(-nll / tau_n).clamp(0.0, 1.0)


def harmonic_reward(
    cer: torch.Tensor,
    nll: torch.Tensor,
    lambda_c: float = 0.6,
    lambda_n: float = 0.4,
    beta_c: float = 3.0,
    tau_n: float = 3.0,
) -> torch.Tensor:
    """Weighted harmonic mean of U_cer and U_nll. cer, nll: (N,) -> reward (N,) float32 in [0, 1]."""
    if lambda_c < 0 or lambda_n < 0 or lambda_c + lambda_n <= 0:
        raise ValueError(f"lambda_c={lambda_c}, lambda_n={lambda_n} must be >= 0 with a positive sum")
    if beta_c <= 0 or tau_n <= 0:
        raise ValueError(f"beta_c={beta_c} and tau_n={tau_n} must be > 0")
    uc, un = u_cer(cer, beta_c), u_nll(nll, tau_n)
    if lambda_n == 0:  # the limit of the formula; the general branch would give 0 where U_nll = 0
        return uc
    if lambda_c == 0:
        return un
    denominator = lambda_c * un + lambda_n * uc
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    reward = torch.where(denominator > 0, (lambda_c + lambda_n) * uc * un / safe, torch.zeros_like(uc))
    return reward.clamp(0.0, 1.0)
