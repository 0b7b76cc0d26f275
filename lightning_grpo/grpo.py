"""GRPO math as pure torch functions: advantages, token log-probs, clipped loss, KL, aggregation.

Notation: N = B*G rows (B prompts x G samples, grouped: rows i*G..i*G+G-1 share prompt i),
T = completion length (padded), H = hidden size, V = vocabulary rows scored.

Departures from the GRPO paper (DeepSeekMath, arXiv 2402.03300), all switchable:
- `aggregate` makes the normalisation explicit (token-mean as DAPO, seq-mean-token-mean as the paper,
  seq-mean-token-sum-norm as Dr.GRPO arXiv 2503.20783) and takes the whole mini-batch's normaliser,
  so gradient accumulation over micro-batches gives the same gradient as one big batch.
- `token_logprobs` never builds the full (N, T, V) logits: a custom autograd function scores chunks
  of tokens, keeps only the log-sum-exp, and recomputes each block in backward, so peak memory is
  one (chunk, V) block forward and backward (benchmarks/bench_memory.py). With
  `vocab_range` it scores only the rows LLaSA may emit (speech tokens + the stop token). It runs in
  fp32 under bf16 autocast and with TF32 on: the ratio, the KL and the importance weights are
  differences of log-probs, where bf16 logits would add noise of tenths of a nat.
- Clip is asymmetric (epsilon_low / epsilon_high, DAPO) with an optional dual clip (Ye et al. 2020)
  that bounds the loss of negative-advantage tokens whose ratio has exploded.
- Three objectives share that interface (`policy_loss`): the token-level clip above, GSPO's sequence-level
  ratio and clip (`gspo_policy_loss`) and CISPO's clipped stop-gradient weight (`cispo_policy_loss`). All three
  give the same gradient where the ratio is 1 (the first update of a rollout); they differ off-policy.
- `token_logprobs_and_entropy` also returns each position's entropy over the scored rows, from the same
  chunked pass (one extra elementwise sweep per block, no extra block): a metric, without gradient.
"""

from __future__ import annotations

import contextlib
from typing import Literal, NamedTuple

import torch

RewardScale = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k3"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
Objective = Literal["token", "gspo", "cispo"]

# (epsilon_low, epsilon_high) of each objective's paper, used when the config leaves them unset. GSPO: its paper's
# 3e-4 / 4e-4. CISPO: MiniMax-M1 sets no lower bound (epsilon_low 1 is a bound of 0) and tunes the upper one; 4 caps
# the weight at 5, ScaleRL's (Khatri et al. 2025, arXiv 2510.13786) eps_max, the value TRL recommends.
CLIP_DEFAULTS: dict[str, tuple[float, float]] = {"token": (0.2, 0.2), "gspo": (3e-4, 4e-4), "cispo": (1.0, 4.0)}


def group_advantages(rewards: torch.Tensor, group_size: int, scale: RewardScale = "group", eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages.

    rewards: (N,) with N = B*G grouped by prompt. Returns (N,) float32:
    r - mean(group), divided by the group's std ("group", GRPO), the whole batch's std ("batch",
    more robust for small G) or not at all ("none", Dr.GRPO). A zero-variance group gives zero.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs at least 2 samples per prompt")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # (B, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale={scale!r} is not one of group, batch, none")
    return centred.view(-1)


@contextlib.contextmanager
def _full_fp32(device_type: str):
    """Autocast off and IEEE fp32 matmuls (no TF32) inside: log-probs feed exp(logp - old_logp) and the KL,
    where bf16 logits (8 bits of mantissa: 0.06 at a logit of 16) would be noise of the size of the signal."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


class _ChunkedLogProbs(torch.autograd.Function):
    """log p(target) through rows [lo, hi) of an LM head, one (chunk, V') logits block alive at a time.

    Forward reduces each block in place to the (M,) log-sum-exp it keeps; backward recomputes each
    block and turns it in place into d logp / d logits = (onehot - softmax) / T, so the peak is one
    block (autograd's recompute + log-softmax backward would hold about four).
    Both run in fp32 whatever the autocast state (`_full_fp32`), also when backward runs outside the
    autocast context of forward. An fp32 head is used as is; a bf16/fp16 head is cast to fp32 once per
    call (V' x H x 4 bytes, freed on return; never kept between forward and backward).
    The rows are sliced in here rather than by the caller: backward writes the (V', H) gradient
    straight into the (V, H) one autograd needs for the whole head, instead of autograd's slice
    backward allocating that (V, H) tensor while the (V', H) one is still alive.
    hidden: (M, H), weight: (V, H) whole head, targets: (M,) indices into [lo, hi), bias: (V',) or None.
    With `with_entropy` forward also returns the (M,) entropy of each row's distribution, from the block in hand.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, lo, hi, chunk, temperature, with_entropy):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (M,)
        lse = torch.empty_like(out)
        entropy = torch.empty_like(out) if with_entropy else None  # (M,)
        with _full_fp32(hidden.device.type):
            w = weight[lo:hi].float()  # (V', H); a view of an fp32 head, no copy
            for a in range(0, hidden.shape[0], chunk):
                z = hidden[a : a + chunk].float() @ w.T  # (c, V')
                if bias is not None:
                    z += bias
                if temperature != 1.0:
                    z /= temperature
                picked = z.gather(-1, targets[a : a + chunk, None]).squeeze(-1)
                m = z.max(dim=-1, keepdim=True).values  # in-place log-sum-exp: no second (c, V') block
                log_s = z.sub_(m).exp_().sum(-1).log_()  # z now holds e = exp(z - m); log_s = log sum(e)
                lse[a : a + chunk] = log_s + m.squeeze(-1)
                out[a : a + chunk] = picked - lse[a : a + chunk]
                if entropy is not None:  # H = -sum p log p = log S - sum(e log e) / S, in place on e (0 log 0 = 0)
                    entropy[a : a + chunk] = log_s - z.xlogy_(z).sum(-1) / log_s.exp()
                del z  # freed before the next block is allocated
        ctx.save_for_backward(hidden, weight, targets, lse, bias)
        ctx.rows, ctx.chunk, ctx.temperature = (lo, hi), chunk, temperature
        if entropy is None:
            return out
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, g, *_):  # no gradient through the entropy (a metric)
        hidden, weight, targets, lse, bias = ctx.saved_tensors
        lo, hi = ctx.rows
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = acc = None
        # The (V, H) gradient (rows outside [lo, hi) zero) is accumulated over chunks in fp32 either in
        # place, allocated before the loop (peak: one block + (V, H)), or in a (V', H) buffer copied
        # into it after the loop (peak: (V', H) + the larger of a block and (V, H)). In place wins when
        # a block is smaller than the buffer (chunk < H: LLaSA-1B's 512 < 2048) or the rows are all of
        # them; a low-precision head always gets the fp32 buffer.
        rows, width = hi - lo, hidden.shape[1]
        in_place = weight.dtype == torch.float32 and (rows == weight.shape[0] or min(ctx.chunk, hidden.shape[0]) < width)
        with _full_fp32(hidden.device.type):
            w = weight[lo:hi].float()  # (V', H)
            if ctx.needs_input_grad[1]:
                grad_w = torch.zeros_like(weight) if in_place else None  # (V, H)
                acc = grad_w[lo:hi] if in_place else torch.zeros_like(w)  # (V', H) fp32
            for a in range(0, hidden.shape[0], ctx.chunk):
                h, gc = hidden[a : a + ctx.chunk].float(), g[a : a + ctx.chunk].float()
                z = h @ w.T  # (c, V'), becomes d logp / d logits in place
                if bias is not None:
                    z += bias
                if ctx.temperature != 1.0:
                    z /= ctx.temperature
                z.sub_(lse[a : a + ctx.chunk, None]).exp_().mul_(-gc[:, None])  # -g * softmax
                z.scatter_add_(-1, targets[a : a + ctx.chunk, None], gc[:, None])  # + g * onehot
                if ctx.temperature != 1.0:
                    z /= ctx.temperature
                if grad_h is not None:
                    grad_h[a : a + ctx.chunk] = z @ w
                if acc is not None:  # accumulate into acc.T: no (V', H) temporary
                    acc.T.addmm_(h.T, z)
                del z
            if acc is not None and not in_place:
                del w  # an fp32 copy of a bf16 head goes before (V, H) comes (the last block is gone)
                grad_w = torch.zeros_like(weight)
                grad_w[lo:hi] = acc  # one rounding to the head's dtype, after the fp32 sum
        return grad_h, grad_w, None, None, None, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 512,
    temperature: float = 1.0,
    vocab_range: tuple[int, int] | None = None,
    disallowed: tuple[int, ...] = (),
) -> torch.Tensor:
    """log p(targets) under the LM head, chunked so full logits never exist: (N, T) float32 (see `_token_logprobs`)."""
    return _token_logprobs(hidden, weight, targets, chunk_size, temperature, vocab_range, disallowed, False)


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 512,
    temperature: float = 1.0,
    vocab_range: tuple[int, int] | None = None,
    disallowed: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets), entropy), each (N, T) float32, from one chunked pass (see `_token_logprobs`).

    entropy[n, t] = -sum_v p(v) log p(v) of the distribution the log-prob is taken from: softmax of
    logits / temperature over the scored rows (vocab_range, with `disallowed` at -inf), i.e. what a sampler at that
    temperature restricted to those rows draws from, before any top-k / top-p truncation. The log-probs are those of
    `token_logprobs` (bit for bit) and keep their gradient; the entropy has none (a metric). It costs one
    elementwise sweep of each (chunk, V') block already in memory, no further block (benchmarks/bench_memory.py).
    """
    return _token_logprobs(hidden, weight, targets, chunk_size, temperature, vocab_range, disallowed, True)


def _token_logprobs(hidden, weight, targets, chunk_size, temperature, vocab_range, disallowed, with_entropy):
    """log p(targets) under the LM head, chunked so full logits never exist.

    hidden: (N, T, H) states that predict `targets` (N, T); weight: (V, H) LM head.
    vocab_range: score only rows [lo, hi) of the head (no copy of an fp32 head); `disallowed` ids
    inside it get -inf. Targets outside the scored rows are an error.
    Returns (N, T) float32 log-probs, computed in fp32 also under autocast (bf16-mixed) and with TF32
    enabled; differentiable w.r.t. hidden and weight. Peak extra memory is one chunk_size x V' float32
    block forward and backward, plus, in backward, the (V, H) gradient of the whole head that autograd
    accumulates into `weight.grad` (dense even with vocab_range: rows outside it are zeros), plus
    one fp32 cast of rows [lo, hi) if the head is bf16/fp16.
    """
    n, t, h = hidden.shape
    lo, hi = vocab_range if vocab_range is not None else (0, weight.shape[0])
    flat_t = targets.reshape(-1) - lo  # (N*T,)
    if flat_t.numel() and (flat_t.min() < 0 or flat_t.max() >= hi - lo):
        bad = (targets.reshape(-1)[(flat_t < 0) | (flat_t >= hi - lo)])[0].item()
        raise ValueError(f"target id {bad} is outside the scored vocabulary rows [{lo}, {hi})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    bias = None
    if disallowed:
        bias = torch.zeros(hi - lo, device=hidden.device, dtype=torch.float32)
        bias[torch.tensor(disallowed, device=hidden.device) - lo] = float("-inf")
    if n * t == 0:
        empty = hidden.new_zeros(n, t, dtype=torch.float32)
        return (empty, empty.clone()) if with_entropy else empty
    out = _ChunkedLogProbs.apply(hidden.reshape(n * t, h), weight, flat_t, bias, lo, hi, chunk_size, float(temperature),
                                 with_entropy)
    if with_entropy:
        return out[0].view(n, t), out[1].view(n, t)
    return out.view(n, t)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip: float | None = 3.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO clipped surrogate per token (objective "token": PPO, Schulman et al. 2017; GRPO, DeepSeekMath,
    arXiv 2402.03300).

    logp, old_logp: (N, T); advantages: (N,) broadcast over T; is_weights: optional (N, T) detached
    importance weights (sampler/trainer mismatch correction). Returns (loss (N, T), clipped (N, T) bool).
    loss = -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) with r = exp(logp - old_logp) per token; with dual clip
    c > 1, for A < 0 the loss is also capped at -c*A. A clipped token has no gradient.
    """
    adv = advantages[:, None].to(logp.dtype)  # (N, 1)
    ratio = torch.exp(logp - old_logp)
    loss, was_clipped = _clipped_surrogate(ratio, adv, epsilon_low, epsilon_high, dual_clip)
    if is_weights is not None:
        loss = loss * is_weights
    return loss, was_clipped


def _clipped_surrogate(ratio, adv, epsilon_low, epsilon_high, dual_clip):
    """-min(r*A, clip(r)*A), then the dual clip: ratio (N, T), adv (N, 1) -> (loss (N, T), clipped (N, T) bool)."""
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip={dual_clip} must be > 1 (or None to disable)")
        cap = -adv * dual_clip
        capped = (adv < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        was_clipped = was_clipped | capped
    return loss, was_clipped


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    dual_clip: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071), in its GSPO-token form.

    The ratio is the sequence's, normalised by its length: s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|)
    = exp(mean over the row's unmasked tokens of (logp - old_logp)), and the clip acts on it, one decision per
    sequence: J = mean_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i). GSPO-token gives token t the ratio
    s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]: s_i in value, gradient s_i * grad log pi(y_t). Its per-token loss
    -min(s_{i,t} A, clip(s_{i,t}) A) under `aggregate(..., "seq-mean-token-mean")` is the paper's J in value and
    gradient (A is per sequence here); under token-mean each sequence weighs by its length (TRL's GSPO with its
    default dapo loss does the same). The paper clips at 3e-4 / 4e-4: s_i is a geometric mean of token ratios.
    The dual clip (c > 1) caps the loss of a negative-advantage sequence at -c*A when s_i > c, as for tokens.
    With one token per sequence it is `clipped_policy_loss`, value and gradient.

    logp, old_logp, mask: (N, T); advantages: (N,); is_weights: optional (N, T) detached TIS weights, multiplied per
    token as in the token objective (the per-token truncated approximation of the sequence's weight).
    Returns (loss (N, T), clipped (N, T) bool): clipped is the row's sequence-level decision at every position.
    """
    m = mask.bool()
    per_token = torch.where(m, logp - old_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    seq_log_ratio = per_token.sum(-1) / m.sum(-1).clamp(min=1).to(logp.dtype)  # (N,); 0 for a row without tokens
    # (N, T): s_i in value (logp - logp.detach() is exactly 0; (s + logp) - logp would round s at logp's scale),
    # s_i * d logp_t in gradient
    ratio = torch.exp(seq_log_ratio.detach()[:, None] + (logp - logp.detach()))
    loss, was_clipped = _clipped_surrogate(ratio, advantages[:, None].to(logp.dtype), epsilon_low, epsilon_high, dual_clip)
    if is_weights is not None:
        loss = loss * is_weights
    return loss, was_clipped


def cispo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 1.0,
    epsilon_high: float = 4.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO, Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585).

    J = sum_i sum_t sg(r^_{i,t}) A_i log pi(y_{i,t}) / sum_i |y_i| with r^ = clip(r, 1-eps_low, 1+eps_high),
    r = exp(logp - old_logp) per token: the clip bounds a token's weight in the gradient, -r^ A grad log pi, and
    never removes it, where the PPO clip drops the gradient of every clipped token. The paper normalises by the
    step's tokens (token-mean) and sets no lower bound (eps_low 1 here: a bound of 0). At r = 1 the gradient is
    the token objective's. The loss value carries log pi: it is no surrogate of the return, compare objectives by
    their rewards, not their losses. The dual clip does not apply: the weight is capped for either sign of A.

    logp, old_logp: (N, T); advantages: (N,); is_weights: optional (N, T) detached TIS weights, multiplied per token.
    Returns (loss (N, T), clipped (N, T) bool: r was outside [1-eps_low, 1+eps_high]; such tokens keep a gradient).
    """
    ratio = torch.exp(logp.detach() - old_logp)
    weight = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # (N, T), no gradient
    loss = -advantages[:, None].to(logp.dtype) * weight * logp
    if is_weights is not None:
        loss = loss * is_weights
    return loss, weight != ratio


def policy_loss(
    objective: Objective,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    dual_clip: float | None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token loss (N, T) and clipped mask (N, T) of `objective` ("token", "gspo" or "cispo"), ready for
    `aggregate`; shapes as in `clipped_policy_loss`, mask (N, T) the completion tokens (GSPO's sequence mean)."""
    if objective == "token":
        return clipped_policy_loss(logp, old_logp, advantages, epsilon_low, epsilon_high, dual_clip, is_weights)
    if objective == "gspo":
        return gspo_policy_loss(logp, old_logp, advantages, mask, epsilon_low, epsilon_high, dual_clip, is_weights)
    if objective == "cispo":
        return cispo_policy_loss(logp, old_logp, advantages, epsilon_low, epsilon_high, is_weights)
    raise ValueError(f"objective {objective!r} is not one of token, gspo, cispo")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from samples of pi. (N, T) -> (N, T).

    k1 = log pi - log pi_ref (unbiased, can be negative, high variance);
    k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's low-variance, non-negative; GRPO paper).
    """
    delta = ref_logp - logp
    if estimator == "k1":
        return -delta
    if estimator == "k3":
        delta = delta.clamp(-20.0, 20.0)  # keeps exp finite for tokens the reference finds impossible
        return torch.exp(delta) - delta - 1
    raise ValueError(f"kl estimator {estimator!r} is not one of k1, k3")


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggregation = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce per-token loss (N, T) with mask (N, T) to a scalar.

    token-mean: sum(loss*mask) / num_tokens (default mask.sum());
    seq-mean-token-mean: sum over rows of each row's masked mean / num_seqs (default N);
    seq-mean-token-sum-norm: sum(loss*mask) / (num_seqs * max_len)  (Dr.GRPO; max_len required).
    Pass the whole mini-batch's num_tokens/num_seqs when `loss` is one micro-batch of it, so the
    micro-batch losses add up to the mini-batch loss. Rows with no unmasked token contribute 0.
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else torch.tensor(float(num_tokens))
        return (loss * mask).sum() / denom.clamp(min=1.0)
    seqs = float(loss.shape[0] if num_seqs is None else num_seqs)
    if mode == "seq-mean-token-mean":
        per_row = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_row.sum() / max(seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        if not max_len:
            raise ValueError("seq-mean-token-sum-norm needs max_len (the sampler's max_new_tokens)")
        return (loss * mask).sum() / (max(seqs, 1.0) * max_len)
    raise ValueError(f"loss aggregation {mode!r} is not one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm")


def token_mean_normaliser(mask: torch.Tensor) -> float:
    """token-mean's denominator for this rank: the step's completion tokens summed over all DDP ranks,
    divided by the number of ranks.

    DDP averages gradients over ranks, so dividing each rank's token sum by (all tokens / ranks)
    makes the update the mean over every token of the step, as on one process (TRL normalises the
    same way); dividing by the rank's own count would weight the tokens of a rank with short
    completions up.
    mask: (N, T) completion mask of this rank. Without a process group it is mask.sum().
    """
    count = mask.sum().detach().float()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        return count.item() / dist.get_world_size()
    return count.item()


def truncated_importance_weights(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance-sampling weights min(exp(trainer_logp - sampler_logp), cap) (TIS).

    Corrects for the sampler (vLLM's kernels, bf16) and the trainer giving the same sampled token
    different probabilities (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"). trainer_logp, sampler_logp, mask: (N, T). Returns detached (N, T)
    weights in [0, cap], 0 at padding; they multiply the per-token loss as constants.
    """
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError(
            f"trainer_logp {tuple(trainer_logp.shape)}, sampler_logp {tuple(sampler_logp.shape)} and mask "
            f"{tuple(mask.shape)} must have the same (N, T) shape"
        )
    if not cap >= 1:
        raise ValueError(f"importance cap {cap} must be >= 1")
    m = mask.bool()
    diff = torch.where(m, trainer_logp.detach().float() - sampler_logp.detach().float(), torch.zeros((), dtype=torch.float32))
    return torch.where(m, torch.exp(diff).clamp(max=cap), torch.zeros((), dtype=torch.float32))


class SamplerLogProbs(NamedTuple):
    """`sampler_token_logprobs`' result; each (N, T)."""

    truncated: torch.Tensor  # float32 log p of the target under the sampler's truncated distribution; -inf outside it
    full: torch.Tensor  # float32 log p of the target at the same temperature, no truncation (what the loss uses)
    kept: torch.Tensor  # bool: the target is inside the top-k / top-p set


@torch.no_grad()
def sampler_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    chunk_size: int = 512,
    vocab_range: tuple[int, int] | None = None,
    disallowed: tuple[int, ...] = (),
) -> SamplerLogProbs:
    """log p(targets) under the distribution a top-k / top-p sampler draws from, for importance weights.

    hidden: (N, T, H) states that predict `targets` (N, T); weight: (V, H) LM head; vocab_range / disallowed
    restrict the scored rows as in `token_logprobs`. Per position the distribution is built the way HF
    `generate` (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper) and vLLM's PyTorch sampler
    (`apply_top_k_top_p_pytorch`, the path of its CPU backend) build it: logits / temperature; top-k keeps
    every logit >= the k-th largest (ties at the k-th all kept); top-p sorts ascending, drops the tokens whose
    cumulative probability (softmax over what top-k kept) is <= 1 - top_p and always keeps the most likely
    one, i.e. keeps the smallest set of most likely tokens whose mass reaches top_p; then renormalises.
    Boundary differences, documented rather than hidden: (1) tokens with exactly equal logits at the nucleus
    boundary are kept in the order torch.sort happens to give, which can differ from the sampler's (vLLM's
    Triton kernel on GPU keeps lower ids first); (2) the scan here runs over the scored rows only, the sampler's
    over the whole vocabulary with -inf elsewhere, so a cumulative sum within float rounding (~1e-7) of
    1 - top_p can fall on the other side; (3) a bf16 sampler sees slightly different logits. A sampled target
    outside this set gets truncated = -inf (importance weight 0), and `kept` says where.
    No gradient; one (chunk_size, V) block (plus its sort) alive at a time. Returns float32 (N, T) tensors.
    """
    if not 0 < top_p <= 1 or top_k < 0 or temperature <= 0:
        raise ValueError(f"need 0 < top_p <= 1, top_k >= 0, temperature > 0 (got {top_p}, {top_k}, {temperature})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    n, t, h = hidden.shape
    lo, hi = vocab_range if vocab_range is not None else (0, weight.shape[0])
    w = weight[lo:hi]  # (V', H) view
    flat_t = targets.reshape(-1) - lo  # (M,)
    if flat_t.numel() and (flat_t.min() < 0 or flat_t.max() >= hi - lo):
        raise ValueError(f"a target id is outside the scored vocabulary rows [{lo}, {hi})")
    flat_h = hidden.reshape(n * t, h)
    truncated = torch.empty(n * t, dtype=torch.float32, device=hidden.device)
    full = torch.empty_like(truncated)
    bias = None
    if disallowed:
        bias = torch.zeros(hi - lo, device=hidden.device, dtype=torch.float32)
        bias[torch.tensor(disallowed, device=hidden.device) - lo] = float("-inf")
    with _full_fp32(hidden.device.type):  # the same fp32 head as the loss's log-probs, under autocast too
        w = w.float()
        for a in range(0, n * t, chunk_size):
            _truncated_chunk(flat_h[a : a + chunk_size].float(), w, flat_t[a : a + chunk_size, None], bias,
                             temperature, top_k, top_p, truncated[a : a + chunk_size], full[a : a + chunk_size])
    truncated, full = truncated.view(n, t), full.view(n, t)
    return SamplerLogProbs(truncated, full, torch.isfinite(truncated))


def _truncated_chunk(h, w, tgt, bias, temperature, top_k, top_p, truncated, full) -> None:
    """One chunk of `sampler_token_logprobs`: h (c, H), w (V', H), tgt (c, 1); writes truncated, full (c,)."""
    z = h @ w.T  # (c, V')
    if bias is not None:
        z += bias
    if temperature != 1.0:
        z /= temperature
    full.copy_((z.gather(-1, tgt) - torch.logsumexp(z, -1, keepdim=True)).squeeze(-1))
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (c, 1)
        z.masked_fill_(z < kth, float("-inf"))
    if top_p < 1.0:
        z_sorted, order = torch.sort(z, dim=-1, descending=False)  # (c, V') each
        drop = z_sorted.softmax(-1).cumsum_(-1) <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        z.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))
        del z_sorted, order, drop
    truncated.copy_((z.gather(-1, tgt) - torch.logsumexp(z, -1, keepdim=True)).squeeze(-1))
