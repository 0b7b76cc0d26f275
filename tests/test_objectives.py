"""The policy-gradient objectives (token clip, GSPO, CISPO): values and gradients against numbers worked out by hand,
their agreements (one token per sequence, on-policy), how they compose, and the `--model.objective` key."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_grpo import grpo
from lightning_grpo.policy import GRPOPolicy


def ratios_to_logp(ratios: list[list[float]], logp: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp leaf with grad, old_logp) such that exp(logp - old_logp) = ratios exactly as far as float allows."""
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    old = lp.detach() - torch.log(torch.tensor(ratios, dtype=torch.float64))
    return lp, old


def loss_and_grad(objective, lp, old, adv, mask, mode, lo, hi, dual=None, is_weights=None):
    tok, clipped = grpo.policy_loss(objective, lp, old, adv, mask, lo, hi, dual, is_weights)
    loss = grpo.aggregate(tok, mask, mode)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad, clipped


def test_token_objective_value_and_gradient_by_hand():
    # ratios 1.5 and 0.5, A = 2, eps 0.2: token 1 is clipped at 1.2 (no gradient), token 2 is not (0.5*2 < 0.8*2)
    lp, old = ratios_to_logp([[1.5, 0.5]], [[-1.0, -2.0]])
    loss, grad, clipped = loss_and_grad("token", lp, old, torch.tensor([2.0]), torch.ones(1, 2), "token-mean", 0.2, 0.2)
    assert loss == pytest.approx((-2.4 - 1.0) / 2)
    # d/dlogp_2 of -A r_2 / 2 = -A r_2 / 2 = -0.5
    assert torch.allclose(grad, torch.tensor([[0.0, -0.5]], dtype=torch.float64))
    assert clipped.tolist() == [[True, False]]


def test_gspo_value_and_gradient_by_hand():
    """Row 0: two tokens with ratios 1.5 and 0.5, A = 2: s = (1.5 * 0.5)^(1/2) = sqrt(0.75), inside [0.8, 1.2]: every
    token's loss is -2 sqrt(0.75). Row 1: one token (then padding) with ratio 1.5, A = 1: s = 1.5, clipped at 1.2."""
    lp, old = ratios_to_logp([[1.5, 0.5], [1.5, 9.0]], [[-1.0, -2.0], [-0.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, 1.0])
    loss, grad, clipped = loss_and_grad("gspo", lp, old, adv, mask, "seq-mean-token-mean", 0.2, 0.2)
    s = math.sqrt(0.75)
    assert loss == pytest.approx((-2 * s + -1.2) / 2)
    # the paper's J = mean_i min(s_i A_i, clip(s_i) A_i): dJ/dlogp_t = A s / |y| for row 0 (2 tokens), and loss = -J:
    # -(2 * s / 2) / 2 rows = -s / 2 per token of row 0; row 1 is clipped: no gradient
    assert torch.allclose(grad, torch.tensor([[-s / 2, -s / 2], [0.0, 0.0]], dtype=torch.float64))
    assert clipped.tolist() == [[False, False], [True, True]]  # one decision per sequence
    # The token objective on the same numbers differs: token 1 of row 0 is clipped, token 2 is not.
    loss_tok, grad_tok, _ = loss_and_grad("token", lp, old, adv, mask, "seq-mean-token-mean", 0.2, 0.2)
    assert loss_tok == pytest.approx(((-2.4 - 1.0) / 2 + -1.2) / 2)
    # -A r_2 / (2 tokens) / (2 rows) = -2 * 0.5 / 4
    assert torch.allclose(grad_tok, torch.tensor([[0.0, -0.25], [0.0, 0.0]], dtype=torch.float64))


def test_gspo_clips_at_the_paper_range_and_only_against_the_advantage():
    """eps 3e-4 / 4e-4: mean log-ratio 5e-4 (s = e^5e-4 > 1.0004) is clipped for A > 0 (loss -A * 1.0004, no gradient)
    but not for A < 0 (loss -A s, gradient -A s / |y| per token); mean 2e-4 is inside for both signs."""
    delta = torch.tensor([[4e-4, 6e-4], [4e-4, 6e-4], [1e-4, 3e-4]], dtype=torch.float64)
    lp = torch.full((3, 2), -2.0, dtype=torch.float64, requires_grad=True)
    old = lp.detach() - delta
    adv = torch.tensor([1.0, -1.0, 1.0])
    tok, clipped = grpo.gspo_policy_loss(lp, old, adv, torch.ones(3, 2))  # the paper's defaults
    assert clipped.tolist() == [[True, True], [False, False], [False, False]]
    expected = torch.tensor([-(1 + 4e-4), math.exp(5e-4), -math.exp(2e-4)], dtype=torch.float64)
    assert torch.allclose(tok, expected[:, None].expand(3, 2), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(tok.sum(), lp)
    assert torch.allclose(grad, torch.tensor([[0.0, 0.0], [math.exp(5e-4)] * 2, [-math.exp(2e-4)] * 2],
                                             dtype=torch.float64), atol=1e-12)


def test_gspo_dual_clip_caps_a_negative_advantage_sequence():
    lp, old = ratios_to_logp([[4.0, 4.0]], [[-1.0, -1.0]])  # s = 4 > dual clip 3, A = -1
    tok, clipped = grpo.gspo_policy_loss(lp, old, torch.tensor([-1.0]), torch.ones(1, 2), 0.2, 0.2, dual_clip=3.0)
    assert torch.allclose(tok, torch.tensor([[3.0, 3.0]], dtype=torch.float64)) and clipped.all()
    (grad,) = torch.autograd.grad(tok.sum(), lp)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gspo_equals_the_token_loss_when_every_sequence_has_one_token(mode):
    """One loss token per row, at different positions, the rest padding with arbitrary log-probs: the sequence ratio
    is the token's, so loss, clipped tokens and gradient are the token objective's (clip, dual clip, TIS weights)."""
    g = torch.Generator().manual_seed(0)
    n, t = 16, 5
    lp = (-3 * torch.rand(n, t, generator=g)).requires_grad_(True)
    old = lp.detach() + 0.6 * torch.randn(n, t, generator=g)  # ratios from ~0.2 to ~5: every clip region is hit
    adv = torch.randn(n, generator=g)
    mask = torch.zeros(n, t)
    mask[torch.arange(n), torch.randint(0, t, (n,), generator=g)] = 1.0
    is_w = torch.rand(n, t, generator=g) * 2
    out = {}
    for objective in ("token", "gspo"):
        tok, clipped = grpo.policy_loss(objective, lp, old, adv, mask, 0.2, 0.28, 3.0, is_w)
        loss = grpo.aggregate(tok, mask, mode, max_len=t)
        out[objective] = loss, torch.autograd.grad(loss, lp)[0], clipped[mask.bool()]
    assert torch.allclose(out["gspo"][0], out["token"][0], rtol=1e-6)
    assert torch.allclose(out["gspo"][1], out["token"][1], rtol=1e-5, atol=1e-7)
    assert torch.equal(out["gspo"][2], out["token"][2])
    assert out["token"][2].any() and not out["token"][2].all()  # the clip acted on some tokens, not all


def test_cispo_value_and_gradient_by_hand():
    """r = 1.5, 0.5, 7 with clip [0.8, 5]: weights 1.5, 0.8, 5; loss -A w logp; gradient -A w on every token, the
    clipped ones included (PPO's clip would silence tokens 2 and 3)."""
    lp, old = ratios_to_logp([[1.5, 0.5, 7.0]], [[-1.0, -2.0, -0.5]])
    tok, clipped = grpo.cispo_policy_loss(lp, old, torch.tensor([2.0]), epsilon_low=0.2, epsilon_high=4.0)
    assert torch.allclose(tok, torch.tensor([[3.0, 3.2, 5.0]], dtype=torch.float64))
    assert clipped.tolist() == [[False, True, True]]
    (grad,) = torch.autograd.grad(tok.sum(), lp)
    assert torch.allclose(grad, torch.tensor([[-3.0, -1.6, -10.0]], dtype=torch.float64))
    # the defaults: no lower bound (0.5 stays 0.5), cap 5; a negative advantage pushes every token down, capped at 5
    tok, clipped = grpo.cispo_policy_loss(lp, old, torch.tensor([-1.0]))
    assert torch.allclose(tok, torch.tensor([[-1.5, -1.0, -2.5]], dtype=torch.float64))
    assert clipped.tolist() == [[False, False, True]]
    (grad,) = torch.autograd.grad(tok.sum(), lp)
    assert torch.allclose(grad, torch.tensor([[1.5, 0.5, 5.0]], dtype=torch.float64))


def test_cispo_takes_no_dual_clip():
    lp, old = ratios_to_logp([[1.5, 0.5, 7.0]], [[-1.0, -2.0, -0.5]])
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 3)
    with_dual, _ = grpo.policy_loss("cispo", lp, old, adv, mask, 1.0, 4.0, 3.0)
    without, _ = grpo.policy_loss("cispo", lp, old, adv, mask, 1.0, 4.0, None)
    assert torch.equal(with_dual, without)


def test_on_policy_the_three_objectives_give_one_gradient():
    """Where old = logp (the first update of a rollout) every ratio is 1: the same gradient -A dlogp / normaliser,
    also with TIS weights, which scale each token's term alike."""
    g = torch.Generator().manual_seed(1)
    lp = (-4 * torch.rand(6, 7, generator=g)).requires_grad_(True)
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 7, generator=g) > 0.3).float()
    is_w = torch.rand(6, 7, generator=g) * 2
    grads = {}
    for objective in ("token", "gspo", "cispo"):
        lo, hi = grpo.CLIP_DEFAULTS[objective]
        tok, clipped = grpo.policy_loss(objective, lp, lp.detach(), adv, mask, lo, hi, 3.0, is_w)
        grads[objective] = torch.autograd.grad(grpo.aggregate(tok, mask, "token-mean"), lp)[0]
        assert not clipped.any(), objective
    expected = -adv[:, None] * is_w * mask / mask.sum()
    for objective, grad in grads.items():
        assert torch.allclose(grad, expected, atol=1e-7), objective


def test_importance_weights_scale_every_objective_per_token():
    lp, old = ratios_to_logp([[1.1, 0.95, 1.3]], [[-1.0, -2.0, -0.5]])
    w = torch.tensor([[0.5, 2.0, 1.0]], dtype=torch.float64)
    mask, adv = torch.ones(1, 3), torch.tensor([1.0])
    for objective in ("token", "gspo", "cispo"):
        plain, _ = grpo.policy_loss(objective, lp, old, adv, mask, 0.2, 0.2, None)
        weighted, _ = grpo.policy_loss(objective, lp, old, adv, mask, 0.2, 0.2, None, w)
        assert torch.allclose(weighted, plain * w), objective
        g_plain = torch.autograd.grad(plain.sum(), lp)[0]
        g_weighted = torch.autograd.grad(weighted.sum(), lp)[0]
        assert torch.allclose(g_weighted, g_plain * w), objective


def test_unknown_objective_in_the_pure_function():
    with pytest.raises(ValueError, match="objective 'ppo' is not one of token, gspo, cispo"):
        grpo.policy_loss("ppo", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), 0.2, 0.2, None)


# -- the config key ---------------------------------------------------------------------------------------------


def test_objective_key_parses_from_yaml_and_the_command_line(tmp_path):
    from test_configs import ROOT, parse, parse_args

    cfg = parse(ROOT / "configs" / "tiny_cpu.yaml")
    assert cfg.model.objective == "token" and cfg.model.epsilon_low is None  # the defaults: today's loss
    assert parse(ROOT / "configs" / "tiny_cpu.yaml", "--model.objective", "gspo").model.objective == "gspo"
    path = tmp_path / "cispo.yaml"
    path.write_text("model:\n  objective: cispo\n  epsilon_high: 2.0\n")
    cfg = parse_args("--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--config", str(path))
    assert (cfg.model.objective, cfg.model.epsilon_high) == ("cispo", 2.0)


def test_a_bad_objective_is_rejected_naming_the_key(capsys):
    from test_configs import ROOT, parse

    with pytest.raises(SystemExit):
        parse(ROOT / "configs" / "tiny_cpu.yaml", "--model.objective", "ppo")
    assert "objective" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--model.objective='ppo' is not one of token, gspo, cispo"):
        GRPOPolicy(objective="ppo")
    with pytest.raises(ValueError, match=r"--model.epsilon_high=-0.1 must be >= 0"):
        GRPOPolicy(objective="gspo", epsilon_high=-0.1)


def test_clip_range_defaults_follow_the_objective_and_warn_where_they_cannot_act():
    assert GRPOPolicy(num_iterations=2).clip_range == (0.2, 0.2)
    assert GRPOPolicy(objective="gspo", num_iterations=2).clip_range == (3e-4, 4e-4)
    assert GRPOPolicy(objective="cispo", num_iterations=2, epsilon_high=2.0).clip_range == (1.0, 2.0)
    with pytest.warns(UserWarning, match="hardly ever clips"):
        GRPOPolicy(objective="gspo", epsilon_low=0.2, epsilon_high=0.2, num_iterations=2)
    with pytest.warns(UserWarning, match="num_iterations 1: every update is on-policy"):
        GRPOPolicy(objective="cispo")


@pytest.mark.parametrize("objective", ["gspo", "cispo"])
def test_each_objective_trains_and_logs_what_it_clipped(objective):
    """Two updates per rollout at a large step size: the second is off-policy, so the objective acts. With the KL term
    (beta > 0) the loss is finite, the weights move away from the reference, and what was clipped is logged (GSPO also
    per sequence)."""
    from test_training import fit

    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import HFSampler

    L.seed_everything(0)
    policy = GRPOPolicy(learning_rate=5e-2, num_iterations=2, micro_batch_size=8, objective=objective, beta=0.1,
                        **({"epsilon_low": 0.2, "epsilon_high": 0.5} if objective == "cispo" else {}))
    before = {k: v.clone() for k, v in policy.policy.state_dict().items()}
    cb = GRPORollout(HFSampler(max_new_tokens=10), RuleReward(codes_per_char=0.3, band=(0, 8)), group_size=4)
    logged = fit(policy, cb, max_steps=1).metrics[-1]
    assert math.isfinite(logged["train/loss"]) and math.isfinite(logged["train/entropy"])
    assert any(not torch.equal(v, before[k]) for k, v in policy.policy.state_dict().items())
    assert logged["train/kl"] > 0  # the second update's KL to the reference, after the first moved the policy
    assert 0 < logged["train/clip_fraction"] <= 0.5  # only the second update can clip
    if objective == "gspo":
        assert 0 < logged["train/seq_clip_fraction"] <= 0.5
    else:
        assert "train/seq_clip_fraction" not in logged
