"""Dynamic sampling (DAPO): zero-spread groups dropped, the step topped up with drawn prompts in bounded rounds
agreed over ranks, its counters logged, validation untouched, resume exact; `train/frac_reward_zero_std` and the
sample counts always logged; a sample budget stops training."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_grpo.batch import select_groups
from lightning_grpo.data import PromptDataModule, collate_prompts, topup_rows
from lightning_grpo.dynamic_sampling import pick_groups, reduce_stats, topup_size, zero_spread
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler
from test_checkpoint import KillAt, Killed
from test_ddp import ddp

G = 4
REF_TEXT, REF_CODES = "Reference words.", [3, 0, 63, 7, 7]


class SameFor(RuleReward):
    """The rule reward, except 0.5 for every sample of a prompt `constant(text)` says: a group without spread.
    Records every sample it scores."""

    def __init__(self, constant=lambda text: text.startswith("Same"), **kwargs) -> None:
        super().__init__(**{"codes_per_char": 0.3, "band": (0, 16), **kwargs})
        self.constant, self.seen = constant, []

    def score(self, samples):
        result = super().score(samples)
        self.seen.extend(samples)
        for i, s in enumerate(samples):
            if self.constant(s.text):
                result.rewards[i] = 0.5
        return result


def callback(reward, **kwargs) -> GRPORollout:
    # truncation keep: a tiny random policy's 8-token completions are often truncated, and penalize would give
    # whole groups the same reward 0
    return GRPORollout(HFSampler(max_new_tokens=8), reward, group_size=G, truncation="keep", **kwargs)


# -- the decisions, by hand ---------------------------------------------------------------------------------
def test_zero_spread_marks_groups_whose_rewards_all_equal():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5001])
    assert zero_spread(rewards, 4, tol=1e-6).tolist() == [True, False, False]
    assert zero_spread(rewards, 4, tol=1e-3).tolist() == [True, False, True]  # std 5e-5
    assert zero_spread(torch.full((6,), 0.1), 3, tol=0.0).tolist() == [True, True]
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        zero_spread(rewards, 5, 0.0)


def test_topup_size_scales_the_largest_shortfall_by_the_informative_rate():
    assert topup_size([2, 0], informative=2, scored=4, cap=8) == 4  # 2 short at a rate of 1/2
    assert topup_size([1, 0], informative=3, scored=4, cap=8) == 2  # ceil(1 / 0.75)
    assert topup_size([2, 1], informative=2, scored=4, cap=3) == 3  # at most a first round's prompts
    assert topup_size([1], informative=0, scored=4, cap=3) == 3  # nothing informative yet: a whole round
    assert topup_size([0, 0], informative=4, scored=4, cap=3) == 0


def test_pick_groups_takes_informative_groups_in_round_order_then_fills():
    assert pick_groups([[False, True, False, True], [True, True]], 3) == [(0, 1), (0, 3), (1, 0)]
    assert pick_groups([[True, False], [], [False, True]], 2) == [(0, 0), (2, 1)]  # round 1 generated, unscored
    assert pick_groups([[False, True], [False]], 2) == [(0, 1), (0, 0)]  # short: the first zero-spread group fills
    with pytest.raises(ValueError, match="3 groups cannot fill a step of 4"):
        pick_groups([[True, False], [False]], 4)


def test_reduce_stats_sums_ranks():
    ranks = [
        {"first_groups": 2, "first_zero_std": 0, "samples": 16, "extra_rounds": 1, "prompts_drawn": 2,
         "groups_generated": 4, "groups_trained": 2, "informative_trained": 2},
        {"first_groups": 2, "first_zero_std": 2, "samples": 16, "extra_rounds": 1, "prompts_drawn": 2,
         "groups_generated": 4, "groups_trained": 2, "informative_trained": 1},
    ]
    assert reduce_stats(ranks, dynamic=True) == {
        "train/frac_reward_zero_std": 0.5, "train/samples_generated": 32.0, "train/dynamic_extra_rounds": 1.0,
        "train/dynamic_prompts_drawn": 4.0, "train/dynamic_groups_dropped": 4.0, "train/frac_groups_informative": 0.75,
    }
    assert set(reduce_stats(ranks, dynamic=False)) == {"train/frac_reward_zero_std", "train/samples_generated"}


def test_topup_rows_are_a_stateless_disjoint_draw_that_skips_the_step():
    draw = lambda rank, start=0, count=3, step=5, skip=(0, 1, 2): topup_rows(12, 7, step, rank, 2, start, count, skip)  # noqa: E731
    assert draw(0) == draw(0)  # the same (seed, step) draws the same rows: a resumed run's
    assert draw(0) != draw(0, step=6)
    both = draw(0, count=4) + draw(1, count=4)
    assert len(set(both)) == 8 and not set(both) & {0, 1, 2}  # ranks never draw the same row; the step's are left out
    assert draw(0, start=2, count=2) == draw(0, count=4)[2:]  # a later round continues the rank's share
    assert draw(0, count=6)[5] == draw(0, count=1)[0]  # past the 4.5 rows of its share a rank starts again
    assert sorted(topup_rows(4, 7, 5, 0, 1, 0, 4, skip=range(4))) == [0, 1, 2, 3]  # all in the step: drawn again


# -- one step, outside a trainer ----------------------------------------------------------------------------
TEXTS = ["Same one.", "Vary one.", "Same two.", "Vary two.", "Same three.", "Vary three.", "Same four.", "Vary four."]


@pytest.fixture
def half_constant(tmp_path):
    """A train set of 4 prompts whose reward is constant and 4 whose reward varies; the `Vary` ones clone a voice."""
    path = tmp_path / "train.jsonl"
    rows = [{"text": t, **({"prompt_text": REF_TEXT, "prompt_codes": REF_CODES} if t.startswith("Vary") else {})}
            for t in TEXTS]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = PromptDataModule(train_data=str(path), val_data=None, prompts_per_step=4)
    dm.setup("fit")
    dm.train_dataloader()  # draws the data seed the top-ups use
    return dm


def test_half_constant_groups_are_replaced_by_informative_top_ups(half_constant):
    torch.manual_seed(0)
    policy = GRPOPolicy(learning_rate=1e-3, micro_batch_size=8)
    reward = SameFor()
    cb = callback(reward, dynamic_sampling=True, max_extra_rounds=3)
    cb.setup(None, policy, "fit")
    rows = {r["text"]: r for r in half_constant.train_rows}
    batch = collate_prompts([rows[t] for t in ["Same one.", "Vary one.", "Same two.", "Vary two."]])
    r, counts = cb.dynamic_rollout(policy, batch, step=0, topup=half_constant.topup_prompts)
    # 2 of 4 first-round groups have no spread; at the informative rate 1/2 one extra round of 2 / (1/2) = 4 prompts
    # draws the 4 prompts not in the step (none of the step's own), 2 of them informative: the step is full
    assert counts == {"first_groups": 4, "first_zero_std": 2, "samples": 32, "tokens": sum(
        len(s.codes) + s.stopped for s in reward.seen), "extra_rounds": 1, "prompts_drawn": 4, "groups_generated": 8,
        "groups_trained": 4, "informative_trained": 4}
    trained = r.texts[::G]
    assert sorted(trained) == sorted(t for t in TEXTS if t.startswith("Vary"))  # each once: no prompt drawn twice
    assert trained[:2] == ["Vary one.", "Vary two."]  # the first round's informative groups first
    assert not zero_spread(r.rewards, G, cb.zero_std_tol).any()
    assert len(reward.seen) == 32 and sorted({s.text for s in reward.seen}) == sorted(TEXTS)
    topped = [s for s in reward.seen[16:] if s.text.startswith("Vary")]
    assert topped and all(s.prompt_text == REF_TEXT and s.prompt_codes == REF_CODES for s in topped)  # references kept
    assert all(s.group == k // G for k, s in enumerate(reward.seen[16:]))  # `group` indexes the round's prompts
    assert reduce_stats([counts], dynamic=True)["train/frac_reward_zero_std"] == 0.5
    # a normal Rollout: every row's fields belong together (the reference codes are in the top-ups' prompts)
    assert r.rewards.shape == r.truncated.shape == (16,) and len(r.completion_ids) == len(r.reward_result.reasons) == 16
    assert torch.equal(r.rewards, r.reward_result.rewards)  # truncation keep: the reward's own
    assert r.completion_mask.sum(1).tolist() == [float(len(c)) for c in r.completion_ids]
    speech = cb.vocab.speech_start_id
    for i in range(16):
        prompt = r.input_ids[i, : r.prompt_width][r.attention_mask[i, : r.prompt_width].bool()].tolist()
        assert prompt == cb.encode_prompts(policy, {"text": [r.texts[i]], "prompt_text": [REF_TEXT],
                                                    "prompt_codes": [REF_CODES]})[0]
        assert prompt[-len(REF_CODES):] == [speech + c for c in REF_CODES]
        assert r.input_ids[i, r.prompt_width : r.prompt_width + len(r.completion_ids[i])].tolist() == r.completion_ids[i]


def test_selected_groups_keep_each_rows_log_probs_across_widths(tiny):
    """Rounds of different prompt widths and completion lengths, re-padded into one Rollout: the trainer's
    log-probs of every kept row equal those it computes in the row's own round."""
    torch.manual_seed(0)
    policy = GRPOPolicy(learning_rate=1e-3)
    cb = GRPORollout(HFSampler(max_new_tokens=6, return_logprobs=True), RuleReward(), group_size=2)
    cb.setup(None, policy, "fit")
    a = cb.make_rollout(policy, {"text": ["Hi.", "A much longer prompt text here, longer still."]}, 2, step=0)
    b = cb.make_rollout(policy, {"text": ["Mid length text.", "Yo."], "prompt_text": [None, REF_TEXT],
                                 "prompt_codes": [None, REF_CODES]}, 2, step=0)
    assert a.prompt_width != b.prompt_width
    merged = select_groups([a, b], [(1, 1), (0, 1), (1, 0)], cb.vocab.pad_id)
    rows = [(b, 2), (b, 3), (a, 2), (a, 3), (b, 0), (b, 1)]
    with torch.no_grad():
        got = policy.completion_logprobs(policy.policy, merged, slice(0, 6))
        for i, (src, j) in enumerate(rows):
            want = policy.completion_logprobs(policy.policy, src, slice(j, j + 1))[0]
            c = len(src.completion_ids[j])
            assert torch.allclose(got[i, :c], want[:c], atol=1e-5)
            assert merged.completion_mask[i].sum() == c and merged.completion_mask[i, c:].sum() == 0
            assert torch.equal(merged.sampler_logprobs[i, :c], src.sampler_logprobs[j, :c])
            assert merged.rewards[i] == src.rewards[j] and merged.reward_result.reasons[i] == src.reward_result.reasons[j]
            assert merged.texts[i] == src.texts[j] and merged.completion_ids[i] == src.completion_ids[j]
    assert merged.prompt_width == max(a.prompt_width, b.prompt_width)
    assert merged.timings["generate"] == pytest.approx(a.timings["generate"] + b.timings["generate"])
    assert select_groups([a], [(0, 0), (0, 1)], cb.vocab.pad_id) is a  # nothing dropped: the round as it is


# -- in a trainer -------------------------------------------------------------------------------------------
class Record(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.pending: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = batch["rollout"]
        self.steps.append({
            "texts": r.texts[:: r.group_size], "completions": [list(c) for c in r.completion_ids],
            "rewards": r.rewards.tolist(), "rows": len(r.completion_ids),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        })


class PendingAtTrainingStep(GRPOPolicy):
    record: Record

    def training_step(self, batch, batch_idx):
        self.record.pending.append(batch["rollout"].pending is not None)
        return super().training_step(batch, batch_idx)


def fit(cb, steps=2, prompts=2, policy=None, root=None, kill_at=None, ckpt_path=None, **data):
    from lightning_grpo.checkpointing import StepCheckpoint

    L.seed_everything(0)
    record = Record()
    policy = policy or PendingAtTrainingStep(learning_rate=1e-2, micro_batch_size=8)
    policy.record = record
    callbacks = [KillAt(kill_at), cb, record] + ([StepCheckpoint(dirpath=str(root), every_n_train_steps=1)] if root else [])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=root is not None,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )
    try:
        trainer.fit(policy, PromptDataModule(prompts_per_step=prompts, val_data=None, **data), ckpt_path=ckpt_path)
    except Killed:
        pass
    return record, policy, trainer


def test_off_by_default_keeps_the_rollout_and_logs_zero_spread_and_samples():
    cb = callback(SameFor(constant=lambda text: len(text) % 2 == 0))
    assert cb.dynamic_sampling is False and cb.max_samples is None
    record, _, _ = fit(cb, steps=3)
    assert record.pending == [True, True, True]  # the rewards still overlap training_step's log-probs
    fracs = []
    for k, s in enumerate(record.steps):
        m = s["metrics"]
        assert s["rows"] == 2 * G and not any(key.startswith("train/dynamic") for key in m)
        frac = zero_spread(torch.tensor(s["rewards"]), G, 1e-6).float().mean().item()
        assert m["train/frac_reward_zero_std"] == pytest.approx(frac)
        assert m["train/samples_generated"] == 2 * G and m["train/samples_generated_total"] == 2 * G * (k + 1)
        fracs.append(frac)
    assert 0 < max(fracs)  # some groups had no spread, and they were trained on all the same


def test_on_with_every_group_informative_equals_off():
    """Nothing to drop: the same samples, rewards and update as without dynamic sampling."""
    out = {}
    for on in (False, True):
        record, policy, _ = fit(callback(RuleReward(codes_per_char=0.3, band=(0, 16)), dynamic_sampling=on), steps=2)
        out[on] = record, {k: v.clone() for k, v in policy.policy.state_dict().items()}
    (off, w_off), (on, w_on) = out[False], out[True]
    assert all(s["metrics"]["train/frac_reward_zero_std"] == 0 for s in off.steps)  # the premise
    for a, b in zip(off.steps, on.steps):
        assert (a["completions"], a["rewards"]) == (b["completions"], b["rewards"])
        assert a["metrics"]["train/loss"] == b["metrics"]["train/loss"]
        assert b["metrics"]["train/dynamic_extra_rounds"] == 0 and b["metrics"]["train/frac_groups_informative"] == 1
    assert all(torch.equal(w_off[k], w_on[k]) for k in w_off)


def test_rounds_are_bounded_and_a_constant_reward_falls_back_to_zero_advantage_groups():
    record, policy, _ = fit(callback(SameFor(constant=lambda text: True), dynamic_sampling=True, max_extra_rounds=2),
                            steps=1, policy=PendingAtTrainingStep(learning_rate=1e-2, micro_batch_size=8))
    m, s = record.steps[0]["metrics"], record.steps[0]
    # nothing informative: each of the 2 extra rounds draws a whole round (2 prompts), then the step trains on
    # 2 zero-spread groups, as many rows as ever
    assert m["train/dynamic_extra_rounds"] == 2 and m["train/dynamic_prompts_drawn"] == 4
    assert m["train/dynamic_groups_dropped"] == 4 and m["train/frac_groups_informative"] == 0
    assert m["train/frac_reward_zero_std"] == 1 and m["train/samples_generated"] == 6 * G and s["rows"] == 2 * G
    assert record.pending == [False]  # waited for in the callback, to decide
    L.seed_everything(0)
    initial = GRPOPolicy().policy.state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in policy.policy.state_dict().items())  # zero advantage: no update


def test_resume_with_dynamic_sampling_is_exact_and_the_sample_budget_stops(tmp_path):
    """Killed after step 2 and resumed to step 4: the same trained prompts, samples, rewards and weights as the
    uninterrupted run, top-up draws included; the sample count continues across the resume."""
    same = lambda text: len(text) % 2 == 0  # noqa: E731

    def run(root, **kw):
        cb = callback(SameFor(constant=same), dynamic_sampling=True, max_extra_rounds=2)
        return fit(cb, steps=4, root=root, max_train_samples=10, **kw)

    full, w_full, _ = run(tmp_path / "full")
    first, _, _ = run(tmp_path / "part", kill_at=2)
    rest, w_rest, resumed = run(tmp_path / "part", ckpt_path="last")
    assert len(first.steps) == 2 and len(rest.steps) == 2 and resumed.global_step == 4
    for key in ("texts", "completions", "rewards"):
        assert [s[key] for s in first.steps + rest.steps] == [s[key] for s in full.steps], key
    assert any(s["metrics"]["train/dynamic_extra_rounds"] > 0 for s in rest.steps)  # top-ups after the resume
    assert all(torch.equal(a, b) for a, b in zip(w_full.state_dict().values(), w_rest.state_dict().values()))
    total = sum(s["metrics"]["train/samples_generated"] for s in full.steps)
    assert rest.steps[-1]["metrics"]["train/samples_generated_total"] == full.steps[-1]["metrics"]["train/samples_generated_total"] == total
    # a budget of the first 2 steps' samples stops the run after step 2
    budget = int(sum(s["metrics"]["train/samples_generated"] for s in full.steps[:2]))
    cb = callback(SameFor(constant=same), dynamic_sampling=True, max_extra_rounds=2, max_samples=budget)
    stopped, _, trainer = fit(cb, steps=4, max_train_samples=10)
    assert trainer.global_step == 2 and [s["texts"] for s in stopped.steps] == [s["texts"] for s in full.steps[:2]]


def test_validation_and_bad_settings():
    with pytest.raises(ValueError, match="max_extra_rounds=-1 must be >= 0"):
        callback(RuleReward(), dynamic_sampling=True, max_extra_rounds=-1)
    with pytest.raises(ValueError, match="zero_std_tol=-0.1 must be >= 0"):
        callback(RuleReward(), zero_std_tol=-0.1)
    with pytest.raises(ValueError, match="max_samples=0 must be >= 1"):
        callback(RuleReward(), max_samples=0)

    class NoTopUps(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([{"text": "Hi."}] * 2, batch_size=2)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback(RuleReward(), dynamic_sampling=True)])
    with pytest.raises(ValueError, match="NoTopUps has none: use the `data:` group"):
        trainer.fit(GRPOPolicy(), NoTopUps())


# -- two ranks ----------------------------------------------------------------------------------------------
def test_two_ranks_agree_on_rounds_when_only_one_needs_top_ups(tmp_path):
    """Rank 1's reward is constant for some prompts, rank 0's never: rank 0 is full after its first round, yet
    generates (unscored) in every round rank 1 needs; both train the same number of rows, nothing hangs."""
    ranks = ddp(tmp_path, "--dynamic", "--max_steps", "3")
    full_and_short = 0
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        c0, c1 = s0["counts"], s1["counts"]
        assert len(s0["completions"]) == len(s1["completions"]) == 2 * G
        assert c0["extra_rounds"] == c1["extra_rounds"] and c0["prompts_drawn"] == c1["prompts_drawn"]
        assert c0["first_zero_std"] == 0 and c0["informative_trained"] == 2
        assert s0["logged_rollout"] == s1["logged_rollout"] == {
            **reduce_stats([c0, c1], dynamic=True), "train/samples_generated_total": s0["logged_rollout"]["train/samples_generated_total"]}
        if c1["first_zero_std"] and c0["extra_rounds"]:
            full_and_short += 1
            assert c0["samples"] == 2 * G + c0["prompts_drawn"] * G  # rank 0 generated its top-ups too
            assert s0["trained_texts"] == s0["texts"]  # and trained on its own first round
            assert s1["trained_texts"] != s1["texts"]
    assert full_and_short >= 1
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=0, abs=1e-9)


@pytest.mark.slow
def test_two_rank_resume_with_dynamic_sampling_is_exact(tmp_path):
    common = ["--dynamic", "--max_train_samples", "12"]
    full = ddp(tmp_path / "full", *common, "--max_steps", "5")
    first = ddp(tmp_path / "first", *common, "--max_steps", "2", "--ckpt_dir", str(tmp_path / "ckpt"))
    rest = ddp(tmp_path / "rest", *common, "--max_steps", "5", "--ckpt_dir", str(tmp_path / "ckpt"), "--resume")
    for rank in (0, 1):
        for key in ("trained_texts", "completions", "rewards"):
            assert [s[key] for s in first[rank]["steps"] + rest[rank]["steps"]] == [s[key] for s in full[rank]["steps"]]
        assert rest[rank]["checksum"] == full[rank]["checksum"]
    assert any(s["counts"]["extra_rounds"] for s in rest[1]["steps"])
