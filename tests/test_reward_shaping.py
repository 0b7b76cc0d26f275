import math

import pytest
import torch

from lightning_grpo.reward.shaping import harmonic_reward, u_cer, u_nll


def test_utilities_match_hand_computed_values():
    # 1 - tanh(3 * 0.1) = 1 - 0.291313 = 0.708687; exp(-1.5 / 3) = 0.606531
    assert u_cer(torch.tensor([0.0, 0.1, 1.0])).tolist() == pytest.approx([1.0, 0.708687, 0.004945], abs=1e-6)
    assert u_nll(torch.tensor([0.0, 1.5, 3.0])).tolist() == pytest.approx([1.0, 0.606531, 0.367879], abs=1e-6)
    assert u_cer(torch.tensor([0.1]), beta_c=1.0).item() == pytest.approx(1 - math.tanh(0.1), abs=1e-7)
    assert u_nll(torch.tensor([1.5]), tau_n=1.0).item() == pytest.approx(math.exp(-1.5), abs=1e-7)


def test_harmonic_mean_matches_formula():
    # (0.6 + 0.4) / (0.6 / 0.708687 + 0.4 / 0.606531) = 1 / (0.846637 + 0.659487) = 0.663955
    r = harmonic_reward(torch.tensor([0.1, 0.0]), torch.tensor([1.5, 0.0]))
    assert r.tolist() == pytest.approx([0.663955, 1.0], abs=1e-5)
    # weights move the result towards the heavier utility
    only_cer = harmonic_reward(torch.tensor([0.1]), torch.tensor([1.5]), lambda_c=1.0, lambda_n=0.0)
    only_nll = harmonic_reward(torch.tensor([0.1]), torch.tensor([1.5]), lambda_c=0.0, lambda_n=1.0)
    assert only_cer.item() == pytest.approx(0.708687, abs=1e-6)
    assert only_nll.item() == pytest.approx(0.606531, abs=1e-6)


def test_every_input_gives_a_finite_reward_in_unit_interval():
    cer = torch.tensor([0.0, 5.0, math.inf, math.nan, -0.5, 0.0, 0.0, 0.0, 1e9])
    nll = torch.tensor([math.inf, 0.0, 0.0, 0.0, 0.0, math.nan, -2.0, 1e9, 1e9])
    r = harmonic_reward(cer, nll)
    assert torch.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()
    # a useless half (U = 0) makes the whole reward 0, without dividing by zero
    assert r[[0, 2, 3, 5, 7, 8]].tolist() == [0.0] * 6
    # negative inputs are clamped to 0: perfect
    assert r[4].item() == pytest.approx(1.0) and r[6].item() == pytest.approx(1.0)
    # CER above 1 (insertions) still gives a small positive utility, not a negative one
    assert 0 < u_cer(torch.tensor([1.5])).item() < u_cer(torch.tensor([1.0])).item()


def test_invalid_weights_are_rejected():
    with pytest.raises(ValueError, match="lambda_c"):
        harmonic_reward(torch.zeros(1), torch.zeros(1), lambda_c=0.0, lambda_n=0.0)
    with pytest.raises(ValueError, match="beta_c"):
        harmonic_reward(torch.zeros(1), torch.zeros(1), beta_c=0.0)
