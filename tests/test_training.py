"""The GRPO loop end to end on the tiny LLaSA: it learns, the reference stays frozen, bad input is caught."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_grpo.data import PromptDataModule
from lightning_grpo.llasa import LlasaVocab, codes_to_ids, encode_prompt
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import Completions, HFSampler


class ScriptedSampler:
    """Returns the same completions every call: rows of speech ids, some without the stop token."""

    temperature, top_p, top_k = 1.0, 1.0, 0  # the Sampler Protocol's settings

    def __init__(self, rows: list[list[int]], truncated: list[bool], max_new_tokens: int = 8) -> None:
        self.rows, self.trunc, self.max_new_tokens = rows, truncated, max_new_tokens
        self.calls = 0

    def setup(self, pl_module) -> None:
        pass

    def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
        self.calls += 1
        k = len(prompts) * n
        return Completions(ids=[list(self.rows[i % len(self.rows)]) for i in range(k)],
                           truncated=[self.trunc[i % len(self.trunc)] for i in range(k)])


class Record(L.Callback):
    """Per training step: the loss, the logged metrics and the rollout's mean reward."""

    def __init__(self) -> None:
        self.losses, self.metrics, self.rewards = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.rewards.append(batch["rollout"].rewards.mean().item())


def fit(policy, rollout, max_steps=1, prompts_per_step=2) -> Record:
    """Train `policy` with `rollout` for `max_steps` on the embedded prompts; what each step logged."""
    record = Record()
    L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[rollout, record],
    ).fit(policy, PromptDataModule(prompts_per_step=prompts_per_step, val_data=None))
    return record


@pytest.mark.parametrize("restrict", [True, False])
def test_trainer_logprobs_equal_generate_sampling_distribution(restrict):
    """generate()'s own scores of the sampled tokens (left padding, its position ids, temperature,
    speech-only mask) equal what the trainer's chunked log-probs compute for the same rows."""
    torch.manual_seed(0)
    policy = GRPOPolicy(learning_rate=1e-3)
    rollout_cb = GRPORollout(HFSampler(temperature=0.7, max_new_tokens=6, return_logprobs=True), RuleReward(),
                             group_size=2, restrict_to_speech=restrict)
    rollout_cb.setup(None, policy, "fit")
    batch = {"text": ["Hi.", "A much longer prompt text here."], "language": [None, None]}
    r = rollout_cb.make_rollout(policy, batch, 2, step=0)
    assert r.prompt_width > len(encode_prompt(policy.tokenizer, "Hi."))  # the short prompt is left-padded
    with torch.no_grad():
        got = policy.completion_logprobs(policy.policy, r, slice(0, 4))
    m = r.completion_mask.bool()
    assert torch.allclose(got[m], r.sampler_logprobs[m], atol=1e-4)


def test_training_changes_policy_and_keeps_reference_bit_identical():
    torch.manual_seed(0)
    policy = GRPOPolicy(learning_rate=1e-2, beta=0.1, micro_batch_size=3)
    before_ref = {k: v.clone() for k, v in policy.reference.state_dict().items()}
    before_pol = {k: v.clone() for k, v in policy.policy.state_dict().items()}
    cb = GRPORollout(HFSampler(temperature=1.0, max_new_tokens=12), RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=4)
    fit(policy, cb, max_steps=3)
    for k, v in policy.reference.state_dict().items():
        assert torch.equal(v, before_ref[k]), f"reference weight {k} changed"
    assert not policy.reference.training and not any(p.requires_grad for p in policy.reference.parameters())
    changed = [k for k, v in policy.policy.state_dict().items() if not torch.equal(v, before_pol[k])]
    assert len(changed) > 0.9 * len(before_pol)
    # the reference is not saved with the policy, and is not loaded at all without KL
    assert not any(k.startswith("reference") for k in policy.state_dict())
    assert GRPOPolicy(beta=0.0).reference is None


def test_seeded_learning_on_the_rule_reward():
    """Measured (seed 0, 30 steps, 4 prompts x 8): mean reward of the first 5 steps 0.235, last 5 steps 0.436."""
    L.seed_everything(0)
    policy = GRPOPolicy(learning_rate=3e-3, beta=0.02, micro_batch_size=32)
    cb = GRPORollout(HFSampler(temperature=1.0, max_new_tokens=48), RuleReward(codes_per_char=0.5, band=(0, 16)), group_size=8)
    seen = fit(policy, cb, max_steps=30, prompts_per_step=4).rewards
    first, last = sum(seen[:5]) / 5, sum(seen[-5:]) / 5
    print(f"mean reward first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.15, (first, last)


def test_truncation_policies(tiny, vocab):
    stopped = codes_to_ids([1, 2, 3], vocab)  # ends with <|SPEECH_GENERATION_END|>
    runaway = [vocab.code_to_id(1)] * 8
    policy = GRPOPolicy()
    out = {}
    for mode in ("penalize", "mask", "keep"):
        cb = GRPORollout(ScriptedSampler([stopped, runaway], [False, True]), RuleReward(codes_per_char=0.3),
                         group_size=2, truncation=mode, truncation_reward=-0.5)
        cb.setup(None, policy, "fit")
        out[mode] = cb.make_rollout(policy, {"text": ["abcdefghij"], "language": [None]}, 2, 0)
    raw = out["keep"].rewards
    assert out["penalize"].rewards.tolist() == [raw[0].item(), -0.5]
    assert out["mask"].completion_mask[1].sum() == 0 and out["mask"].completion_mask[0].sum() == 4
    assert torch.equal(out["mask"].rewards, raw)
    assert out["keep"].truncated.tolist() == [False, True]
    # only "mask" drops the truncated row from the loss; "keep" and "penalize" train on its 8 tokens
    assert out["keep"].completion_mask[1].sum() == 8 == out["penalize"].completion_mask[1].sum()


def test_no_nan_when_every_row_is_masked_or_advantage_is_zero(vocab):
    runaway = [vocab.code_to_id(1)] * 8
    policy = GRPOPolicy(learning_rate=1e-2)
    before = {k: v.clone() for k, v in policy.policy.state_dict().items()}
    cb = GRPORollout(ScriptedSampler([runaway], [True]), RuleReward(), group_size=2, truncation="mask")
    assert fit(policy, cb, max_steps=2).losses == [0.0, 0.0]
    # zero advantage and no loss tokens: weights move only through AdamW's weight decay (0 here)
    assert all(torch.equal(v, before[k]) for k, v in policy.policy.state_dict().items())


def test_invalid_and_empty_completions_get_reasons_not_crashes(vocab):
    policy = GRPOPolicy()
    junk = [vocab.text_understanding_start_id, vocab.speech_gen_end_id]
    empty = [vocab.speech_gen_end_id]
    cb = GRPORollout(ScriptedSampler([junk, empty], [False, False]), RuleReward(), group_size=2,
                     restrict_to_speech=False)
    cb.setup(None, policy, "fit")
    r = cb.make_rollout(policy, {"text": ["hello"], "language": [None]}, 2, 0)
    assert r.reward_result.reasons == ["invalid_token", "empty_speech"]
    assert r.rewards.tolist() == [0.0, 0.0]
    cb_err = GRPORollout(ScriptedSampler([junk], [False]), RuleReward(), group_size=2, on_invalid="error",
                         restrict_to_speech=False)
    cb_err.setup(None, policy, "fit")
    with pytest.raises(ValueError, match="is not a speech token"):
        cb_err.make_rollout(policy, {"text": ["hello"], "language": [None]}, 2, 0)


def test_bad_configuration_errors_name_the_flag():
    with pytest.raises(ValueError, match="--group_size=1"):
        GRPORollout(HFSampler(), RuleReward(), group_size=1)
    with pytest.raises(ValueError, match="--model.num_iterations=0"):
        GRPOPolicy(num_iterations=0)
    with pytest.raises(ValueError, match="--temperature=0"):
        HFSampler(temperature=0)
    dm = PromptDataModule(prompts_per_step=3)

    class TwoRanks:
        world_size = 2

    dm.trainer = TwoRanks()
    with pytest.raises(ValueError, match="--data.prompts_per_step=3 is not divisible by the 2"):
        dm.per_rank_batch_size()


def test_prompt_too_long_stops_the_step_with_the_text(tiny):
    policy = GRPOPolicy()
    cb = GRPORollout(HFSampler(max_new_tokens=2), RuleReward(), group_size=2, max_prompt_length=40)
    cb.setup(None, policy, "fit")
    with pytest.raises(ValueError, match="more than --max_prompt_length=40"):
        cb.make_rollout(policy, {"text": ["this text is long enough to pass forty tokens"], "language": [None]}, 2, 0)


def test_num_iterations_uses_old_logprobs_and_clips():
    L.seed_everything(0)
    policy = GRPOPolicy(learning_rate=5e-2, num_iterations=3, micro_batch_size=8)
    cb = GRPORollout(HFSampler(max_new_tokens=10), RuleReward(codes_per_char=0.3, band=(0, 8)), group_size=4)
    logged = fit(policy, cb, max_steps=3).metrics[-1]
    # a large step size moves the policy between iterations, so some ratios leave the clip range
    assert logged["train/clip_fraction"] > 0
    assert logged["train/ratio_mean"] != pytest.approx(1.0, abs=1e-6)


class EveryUpdateIsAStep(GRPOPolicy):
    """The stepping before a trainer step meant a rollout: every update through LightningOptimizer.step."""

    def _update(self, opt, final):
        opt.step()
        opt.zero_grad(set_to_none=True)


class Updates(L.Callback):
    """Per optimiser update: the learning rate it used and trainer.global_step when it ran."""

    def __init__(self) -> None:
        self.lrs, self.steps = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.steps.append(trainer.global_step)


def test_a_trainer_step_is_a_rollout_whatever_num_iterations(tmp_path, vocab):
    """num_iterations=2, max_steps=3: 3 rollouts, 6 updates, global_step 3, checkpoints and the LR
    schedule counting rollouts, and the same weights as 6 updates counted as 6 steps."""
    from lightning_grpo.checkpointing import StepCheckpoint

    rows = [codes_to_ids([1, 2, 3], vocab), codes_to_ids([9] * 6, vocab), codes_to_ids([4] * 2, vocab)]
    runs = {}
    for name, cls, max_steps, warmup in (("rollouts", GRPOPolicy, 3, 0), ("updates", EveryUpdateIsAStep, 6, 0),
                                         ("warmup", GRPOPolicy, 3, 2)):
        L.seed_everything(0)
        policy = cls(learning_rate=1e-2, num_iterations=2, micro_batch_size=2, warmup_steps=warmup)
        cb = GRPORollout(ScriptedSampler(rows, [False] * 3), RuleReward(codes_per_char=0.3, band=(0, 4)), group_size=2)
        updates, record = Updates(), Record()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[cb, updates, record, StepCheckpoint(dirpath=tmp_path / name, every_n_train_steps=2, save_last=False)],
        )
        trainer.fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
        runs[name] = (policy, cb, updates, record, trainer)
    policy, cb, updates, record, trainer = runs["rollouts"]
    assert (cb.train_rollouts, len(updates.lrs), trainer.global_step) == (3, 6, 3)
    assert updates.steps == [0, 0, 1, 1, 2, 2]  # the second update of a rollout does not advance the step
    assert len(record.losses) == 3
    # checkpoints every 2 steps = every 2 rollouts (+ the final one), named by rollouts
    assert sorted(p.name.split("-")[-1] for p in (tmp_path / "rollouts").iterdir()) == ["step=2.ckpt", "step=3.ckpt"]
    old_policy, old_cb, _, _, old_trainer = runs["updates"]
    assert (old_cb.train_rollouts, old_trainer.global_step) == (3, 6)
    for (k, a), b in zip(policy.policy.state_dict().items(), old_policy.policy.state_dict().values()):
        assert torch.equal(a, b), k
    # warm-up over 2 steps = 2 rollouts: both updates of a rollout use that rollout's learning rate
    _, _, warm_updates, warm_record, _ = runs["warmup"]
    assert warm_updates.lrs == pytest.approx([5e-3, 5e-3, 1e-2, 1e-2, 1e-2, 1e-2])
    assert [m["train/lr"] for m in warm_record.metrics] == pytest.approx([5e-3, 1e-2, 1e-2])


def test_gradient_checkpointing_switch():
    """Checkpointing keeps fewer activations for backward (so it is really on), changes no gradient."""
    grads, forwards = {}, {}
    for gc in (False, True):
        torch.manual_seed(0)
        policy = GRPOPolicy(gradient_checkpointing=gc)
        vocab = LlasaVocab.from_tokenizer(policy.tokenizer)
        cb = GRPORollout(ScriptedSampler([codes_to_ids([1, 2, 3], vocab), codes_to_ids([9] * 6, vocab)], [False, False]),
                         RuleReward(codes_per_char=0.3, band=(0, 4)), group_size=2)
        cb.setup(None, policy, "fit")
        r = cb.make_rollout(policy, {"text": ["hello"], "language": [None]}, 2, 0)
        assert policy.policy.training  # the mode the module is built in, sampling restores it
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logp = policy.completion_logprobs(policy.policy, r, slice(0, 2))
        adv = torch.tensor([1.0, -1.0])
        (-(logp * r.completion_mask).sum(-1) * adv).sum().backward()
        forwards[gc] = sum(saved)  # activation elements kept for backward
        grads[gc] = torch.cat([p.grad.flatten() for p in policy.policy.parameters() if p.grad is not None])
    assert forwards[True] < 0.7 * forwards[False], forwards
    assert torch.allclose(grads[False], grads[True], atol=1e-6)


def test_bf16_weights_are_refused_and_bf16_mixed_learns_at_the_original_learning_rate():
    """bf16 weights would silently stop learning at lr 1e-6, so they are refused with the fix; fp32
    weights under bf16-mixed (bf16 matmuls, fp32 master weights) move at that learning rate."""
    with pytest.raises(ValueError, match=r"--model.dtype=bfloat16 .*silently stop learning.*bf16-mixed"):
        GRPOPolicy(dtype="bfloat16")
    with pytest.raises(ValueError, match="--model.dtype=float16"):
        GRPOPolicy(dtype="float16")
    # why: one AdamW step of lr 1e-6 leaves almost every bf16 weight unchanged
    torch.manual_seed(0)
    w = (0.02 * torch.randn(4096)).bfloat16().requires_grad_()
    before = w.detach().clone()
    w.grad = torch.randn(4096).bfloat16()
    torch.optim.AdamW([w], lr=1e-6, weight_decay=0.0).step()
    assert (w.detach() != before).float().mean() < 0.05

    L.seed_everything(0)
    policy = GRPOPolicy(learning_rate=1e-6, micro_batch_size=4, max_grad_norm=None)
    layers = {k: v.clone() for k, v in policy.policy.state_dict().items() if ".layers." in k}
    vocab = LlasaVocab.from_tokenizer(policy.tokenizer)
    cb = GRPORollout(ScriptedSampler([codes_to_ids([1, 2, 3], vocab), codes_to_ids([9] * 6, vocab)], [False, False]),
                     RuleReward(codes_per_char=0.3, band=(0, 4)), group_size=2)
    record = Record()
    L.Trainer(accelerator="cpu", devices=1, max_steps=1, precision="bf16-mixed", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, record]
              ).fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
    assert next(policy.policy.parameters()).dtype == torch.float32
    now = policy.policy.state_dict()
    moved = sum(int((now[k] != v).sum()) for k, v in layers.items()) / sum(v.numel() for v in layers.values())
    assert moved > 0.99, moved
    # Lightning's bf16-true converts the weights itself: refused at configure_optimizers, naming the flag
    with pytest.raises(ValueError, match=r"--trainer.precision=bf16-true would train bfloat16 weights"):
        L.Trainer(accelerator="cpu", devices=1, max_steps=1, precision="bf16-true", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]
                  ).fit(GRPOPolicy(), PromptDataModule(prompts_per_step=2, val_data=None))


def test_importance_correction_uses_sampler_logprobs(vocab):
    """With sampler log-probs far below the trainer's, weights hit the cap and are logged."""

    class WithLogprobs(ScriptedSampler):
        def sample(self, *a, **k):
            c = super().sample(*a, **k)
            c.logprobs = [[-30.0] * len(row) for row in c.ids]
            return c

    L.seed_everything(0)
    policy = GRPOPolicy(importance_correction=True, importance_cap=2.0, learning_rate=1e-3)
    cb = GRPORollout(WithLogprobs([codes_to_ids([1, 2], vocab), codes_to_ids([40] * 5, vocab)], [False, False]),
                     RuleReward(codes_per_char=0.3, band=(0, 8)), group_size=2)
    logged = fit(policy, cb).metrics[-1]
    assert logged["train/is_weight_mean"] == pytest.approx(2.0)
    assert logged["train/is_weight_capped_frac"] == pytest.approx(1.0)


def test_sampler_metrics_reach_the_logger(vocab):
    class Timed(ScriptedSampler):
        metrics = {"rollout/sync_s": 0.25, "sync/logprob_mean_abs_diff": 0.01}

    cb = GRPORollout(Timed([codes_to_ids([1, 2], vocab)], [False]), RuleReward(), group_size=2)
    logged = fit(GRPOPolicy(), cb).metrics[-1]
    assert logged["rollout/sync_s"] == pytest.approx(0.25)
    assert logged["sync/logprob_mean_abs_diff"] == pytest.approx(0.01)


def test_policy_loads_a_local_hf_directory_with_a_bf16_reference(tmp_path, tiny):
    """The path users take with HKUSTAudio/Llasa-1B, on a saved tiny LLaSA (no hub): fp32 policy, bf16 KL reference."""
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy = GRPOPolicy(model_name_or_path=str(tmp_path), reference_dtype="bfloat16", beta=0.1, gradient_checkpointing=True)
    # from_pretrained returns eval mode, where HF silently skips gradient checkpointing
    assert policy.policy.training and policy.policy.is_gradient_checkpointing
    assert len(policy.tokenizer) == len(tok)
    for (name, a), b, c in zip(model.state_dict().items(), policy.policy.state_dict().values(),
                               policy.reference.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a, b), name
        assert c.dtype == torch.bfloat16 and torch.equal(a.bfloat16(), c), name
    assert not policy.reference.training and not any(p.requires_grad for p in policy.reference.parameters())
    # buffers keep their dtype (Llama's rotary frequencies stay fp32, as from_pretrained(dtype=bf16) leaves them)
    assert all(b.dtype == torch.float32 for b in policy.reference.buffers() if b.is_floating_point())
    # the reference is a copy: training the policy cannot move it
    with torch.no_grad():
        next(policy.policy.parameters()).add_(1.0)
    assert torch.equal(next(iter(model.state_dict().values())).bfloat16(), next(iter(policy.reference.state_dict().values())))


def test_dropout_of_a_pretrained_checkpoint_is_off_in_train_mode(tmp_path, tiny):
    """A checkpoint trained with dropout (attention_dropout 0.5 here) must score the same tokens the same way
    twice in the policy's train mode: the clipped ratio compares two passes of the same function."""
    model, tok = tiny
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy = GRPOPolicy(model_name_or_path=str(tmp_path), attn_implementation="eager").policy
    assert policy.training
    ids = torch.tensor([encode_prompt(tok, "Dropout must be off.")])
    assert torch.equal(policy(ids).logits, policy(ids).logits)
