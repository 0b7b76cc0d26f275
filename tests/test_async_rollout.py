"""One-step-off rollouts (`--rollout.async_steps 1`): which weights drew each step's samples, exact resume with a
rollout in flight, a failing generator, and the CLI."""

from __future__ import annotations

import copy
import csv
import threading

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_checkpoint import KillAt, Killed, cli_fit, logged_steps
from test_ddp import ddp
from test_owner_ddp import ddp as ddp_process

from lightning_grpo.async_rollout import THREAD_NAME
from lightning_grpo.checkpointing import StepCheckpoint
from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler


class Record(L.Callback):
    """Each step's prompts, samples, rewards, staleness, and the weights it started from."""

    def __init__(self):
        self.prompts, self.samples, self.rewards, self.staleness, self.rollouts, self.weights = [], [], [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(copy.deepcopy(pl_module.policy.state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = batch["rollout"]
        self.prompts.append(tuple(batch["text"]))
        self.samples.append(r.completion_ids)
        self.rewards.append(r.rewards.tolist())
        self.staleness.append(r.sampler_metrics["rollout/staleness"])
        self.rollouts.append(r)


class FailsAt(HFSampler):
    """A generator that raises from training rollout `at` on."""

    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def stream(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
        if step >= self.at:
            raise RuntimeError("CUDA error: out of memory (the generator)")
        yield from super().stream(model, prompts, n, stop_token_id, step, allowed_token_ids)


def run(root, max_steps, every=None, kill_at=None, ckpt_path=None, max_train_samples=None, val_every=None,
        sampler=None, async_steps=1):
    L.seed_everything(0)
    record = Record()
    callbacks = [KillAt(kill_at),
                 GRPORollout(sampler or HFSampler(max_new_tokens=8, return_logprobs=True, temperature=1.0),
                             RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=2, truncation="keep",
                             async_steps=async_steps),
                 record]
    if every:
        callbacks.append(StepCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=every))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=CSVLogger(str(root), name="run"), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1 if val_every else 0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1, num_sanity_val_steps=0,
        enable_checkpointing=bool(every), callbacks=callbacks,
    )
    policy = GRPOPolicy(learning_rate=3e-2, micro_batch_size=8, importance_correction=True)
    dm = PromptDataModule(prompts_per_step=2, val_data="builtin:en" if val_every else None, val_prompts_per_step=2,
                          max_train_samples=max_train_samples)
    try:
        trainer.fit(policy, dm, ckpt_path=ckpt_path)
    except Killed:
        pass
    return trainer, policy, record


def test_each_step_trains_on_samples_drawn_by_the_weights_of_one_update_before(tmp_path):
    """The sampler's own log-probs of step t's samples are the teacher-forced log-probs of the weights step t-1
    started from (step 0: its own), not of the weights that train on them."""
    steps = 4
    _, policy, rec = run(tmp_path, steps)
    assert rec.staleness == [0.0, 1.0, 1.0, 1.0]
    model = copy.deepcopy(policy.policy)

    def gap(rollout, weights):
        model.load_state_dict(weights)
        logp = policy.completion_logprobs(model, rollout, slice(0, len(rollout.texts)))
        mask = rollout.completion_mask.bool()
        return (logp - rollout.sampler_logprobs)[mask].abs().max().item()

    assert gap(rec.rollouts[0], rec.weights[0]) < 1e-4
    for t in range(1, steps):
        assert gap(rec.rollouts[t], rec.weights[t - 1]) < 1e-4, t  # drawn by the previous step's weights
        assert gap(rec.rollouts[t], rec.weights[t]) > 1e-3, t  # and trained by weights that moved since
    # each step's prompts are the loader's, in the loader's order: the next batch was predicted right
    assert len(set(rec.prompts)) == steps


def test_synchronous_steps_train_on_samples_of_their_own_weights_with_no_generator_thread(tmp_path):
    """`async_steps 0` is today's loop: every step's samples come from the weights that step starts from, and no
    generator thread is started."""
    steps = 3
    _, policy, rec = run(tmp_path, steps, async_steps=0)
    assert rec.staleness == [0.0] * steps
    assert not any(t.name == THREAD_NAME for t in threading.enumerate())
    model = copy.deepcopy(policy.policy)
    for t in range(steps):
        model.load_state_dict(rec.weights[t])
        r = rec.rollouts[t]
        logp = policy.completion_logprobs(model, r, slice(0, len(r.texts)))
        assert (logp - r.sampler_logprobs)[r.completion_mask.bool()].abs().max().item() < 1e-4, t
    assert any((rec.weights[t][k] != rec.weights[t + 1][k]).any() for t in range(steps - 1) for k in rec.weights[t])


@pytest.mark.parametrize(
    "max_train_samples, every, kill_at, val_every",
    # mid-epoch; across an epoch's end (2 steps per epoch: the rollout in flight is the next epoch's first);
    # validation right after the checkpointed step (it waits for the generator and samples from a fork of the RNG)
    [(None, 2, 2, None), (4, 1, 3, None), (None, 2, 2, 2)],
    ids=["mid_epoch", "next_epoch", "validation"],
)
def test_killed_run_resumed_trains_on_the_samples_of_the_uninterrupted_run(tmp_path, max_train_samples, every, kill_at,
                                                                           val_every):
    """The checkpoint holds the rollout in flight (generated from the weights of one update before the checkpoint);
    the resumed run trains on it, then continues the generator's random stream."""
    steps = 5
    kw = dict(max_train_samples=max_train_samples, val_every=val_every)
    _, full, full_rec = run(tmp_path / "full", steps, every, **kw)
    killed, _, first = run(tmp_path / "part", steps, every, kill_at=kill_at, **kw)
    assert killed.global_step == kill_at
    ckpt = torch.load(tmp_path / "part" / "ckpt" / "last.ckpt", weights_only=True)
    stored = ckpt["callbacks"]["GRPORollout"]["in_flight"]
    assert stored["step"] == kill_at and stored["weights_step"] == kill_at - 1
    resumed, policy, second = run(tmp_path / "part", steps, every, ckpt_path="last", **kw)
    assert resumed.global_step == steps
    assert logged_steps(tmp_path / "part") == list(range(steps))
    assert stored["rank_rollouts"][0]["completion_ids"] == full_rec.samples[kill_at]
    assert first.prompts + second.prompts == full_rec.prompts
    assert first.samples + second.samples == full_rec.samples
    assert first.rewards + second.rewards == full_rec.rewards
    assert second.staleness[0] == 1.0  # the stored rollout, not one generated in place from the resumed weights
    assert len({r for step in full_rec.rewards for r in step}) > 4
    for (k, a), b in zip(full.state_dict().items(), policy.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_failing_generator_stops_training_naming_it(tmp_path):
    with pytest.raises(RuntimeError, match=r"rollout generator \(rollout-generator thread.*rank 0.*out of memory"):
        run(tmp_path, 4, sampler=FailsAt(2, max_new_tokens=8))


def test_a_generator_failing_on_one_rank_stops_every_rank_naming_it(tmp_path):
    """Rank 1's generator thread raises while rank 0's is fine: both ranks stop at the next step's start with rank 1's
    error, instead of rank 0 waiting in the update's all-reduce."""
    proc = ddp_process(tmp_path, "--max_steps", "4", "--async_steps", "1", "--fail_generator_rank1_at", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]  # each rank wrote the error it stopped with and exited
    for rank in (0, 1):
        err = (tmp_path / f"rank{rank}_error.txt").read_text()
        assert "rollout generator" in err and "of rank 1 failed" in err and "out of memory" in err, err


def test_two_ranks_train_one_step_off(tmp_path):
    ranks = ddp(tmp_path, "--max_steps", "3", "--async_steps", "1")
    for rank in ranks:
        assert [s["staleness"] for s in rank["steps"]] == [0.0, 1.0, 1.0]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # one model: the update's all-reduce ran on every step
    assert ranks[0]["steps"][1]["texts"] != ranks[1]["steps"][1]["texts"]  # each rank generated its own prompts


def test_cli_one_step_off_trains_and_logs_staleness(tmp_path):
    """The tiny CPU config with --rollout.async_steps 1 and the importance correction the lag needs."""
    cli = cli_fit(tmp_path, "--trainer.max_steps=4", "--rollout.async_steps=1",
                  "--rollout.sampler.return_logprobs=true", "--model.importance_correction=true")
    assert cli.trainer.global_step == 4
    with next((tmp_path / "lightning_logs").glob("version_*/metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("rollout/staleness")]
    assert [float(r["rollout/staleness"]) for r in rows] == [0.0, 1.0, 1.0, 1.0]
    weights = [float(r["train/is_weight_mean"]) for r in rows]
    assert weights[0] == pytest.approx(1.0, abs=1e-5) and all(abs(w - 1.0) > 1e-5 for w in weights[1:])
    assert all(float(r["timing/rollout_wait"]) >= 0 for r in rows)


@pytest.mark.parametrize("kwargs, match", [
    ({"async_steps": 2}, "--rollout.async_steps=2 must be 0"),
    ({"async_steps": 1, "dynamic_sampling": True}, "dynamic_sampling"),
])
def test_bad_settings_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPORollout(HFSampler(), RuleReward(), **kwargs)


def test_a_datamodule_that_cannot_tell_the_next_batch_is_refused_before_the_first_step():
    class NoTrainBatch(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([{"text": "Hi."}] * 2, batch_size=2)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[GRPORollout(HFSampler(max_new_tokens=4), RuleReward(), group_size=2, async_steps=1)])
    with pytest.raises(ValueError, match=r"async_steps 1 .*train_batch\(\); NoTrainBatch has none.*--rollout.async_steps 0"):
        trainer.fit(GRPOPolicy(), NoTrainBatch())
