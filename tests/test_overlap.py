"""Scoring overlapped with generation and with the log-probs that need no reward; per-step timings.

Overlapped and sequential rollouts give the same samples, rewards and weights; the overlap is real (a piece is
scored while the sampler generates the next, and the trainer's reference log-probs run while a piece is still
being scored); samplers stream pieces in any order and the rewards land on their rows.
"""

from __future__ import annotations

import math
import threading

import lightning as L
import pytest
import torch

from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.base import RewardResult, SpeechSample
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler
from lightning_grpo import distributed
from lightning_grpo.scoring import RewardScoring, busy_seconds, reorder
from lightning_grpo.timing import PHASES, reduce_step
from lightning_grpo.vllm_engine import RawCompletion
from lightning_grpo.vllm_sampler import VLLMSampler


class Record(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = batch["rollout"]
        self.steps.append({
            "completions": [list(c) for c in r.completion_ids], "rewards": r.rewards.clone(),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "progress_bar": dict(trainer.progress_bar_metrics),
        })


def fit(policy, rollout, steps=2, prompts=2) -> Record:
    record = Record()
    L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[rollout, record],
    ).fit(policy, PromptDataModule(prompts_per_step=prompts, val_data=None))
    return record


@pytest.mark.parametrize("num_iterations, beta", [(2, 0.05)])
def test_overlapped_and_sequential_rollouts_give_identical_samples_rewards_and_weights(num_iterations, beta):
    """Same seed, same chunking (one prompt per generate call): only when the pieces are scored differs."""
    out = {}
    for overlap in (True, False):
        L.seed_everything(0)
        policy = GRPOPolicy(learning_rate=1e-2, beta=beta, num_iterations=num_iterations, micro_batch_size=3)
        cb = GRPORollout(HFSampler(max_new_tokens=10, prompts_per_chunk=1), RuleReward(codes_per_char=0.3, band=(0, 16)),
                         group_size=4, overlap_reward=overlap)
        out[overlap] = (fit(policy, cb, steps=2, prompts=3), {k: v.clone() for k, v in policy.policy.state_dict().items()})
    (on, w_on), (off, w_off) = out[True], out[False]
    for a, b in zip(on.steps, off.steps):
        assert a["completions"] == b["completions"]
        assert torch.equal(a["rewards"], b["rewards"])
        assert a["metrics"]["train/loss"] == b["metrics"]["train/loss"]
    assert len({r for s in on.steps for r in s["rewards"].tolist()}) > 3  # rewards vary: the updates do something
    initial = GRPOPolicy().policy.state_dict()
    assert any(not torch.equal(w_on[k], initial[k]) for k in w_on)
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on), "overlap changed the update"


class Gates:
    """Events that prove the overlap: set by the sampler and the policy, awaited by the reward."""

    def __init__(self) -> None:
        self.next_chunk_generated = threading.Event()
        self.logprob_computed = threading.Event()
        self.seen: list[tuple[str, bool]] = []


class GatedReward(RuleReward):
    """Piece 0 waits until the sampler has generated piece 1; the last piece waits until the trainer has
    computed a log-prob. Sequentially neither can happen (each wait would time out)."""

    def __init__(self, gates: Gates, pieces: int) -> None:
        super().__init__(codes_per_char=0.3)
        self.gates, self.pieces, self.calls = gates, pieces, 0

    def score(self, samples):
        k, self.calls = self.calls % self.pieces, self.calls + 1
        if k == 0:
            self.gates.seen.append(("scored while generating", self.gates.next_chunk_generated.wait(30)))
            self.gates.next_chunk_generated.clear()
        if k == self.pieces - 1:
            self.gates.seen.append(("scored while the trainer computed log-probs", self.gates.logprob_computed.wait(30)))
            self.gates.logprob_computed.clear()
        self.gates.seen.append(("on a worker thread", threading.current_thread() is not threading.main_thread()))
        return super().score(samples)


class SignallingSampler(HFSampler):
    def __init__(self, gates: Gates, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gates = gates

    def stream(self, *args, **kwargs):
        for k, chunk in enumerate(super().stream(*args, **kwargs)):
            if k == 1:
                self.gates.next_chunk_generated.set()
            yield chunk


class SignallingPolicy(GRPOPolicy):
    gates: Gates

    def training_step(self, batch, batch_idx):
        self.gates.seen.append(("rewards pending at training_step", batch["rollout"].pending is not None))
        return super().training_step(batch, batch_idx)

    def completion_logprobs(self, model, r, rows, entropy=False):
        out = super().completion_logprobs(model, r, rows, entropy)
        if model is self.reference:
            self.gates.logprob_computed.set()
        return out


def test_scoring_runs_while_generation_and_reference_logprobs_go_on():
    gates = Gates()
    L.seed_everything(0)
    policy = SignallingPolicy(beta=0.05, learning_rate=1e-3)
    policy.gates = gates
    cb = GRPORollout(SignallingSampler(gates, max_new_tokens=6, prompts_per_chunk=1), GatedReward(gates, pieces=3),
                     group_size=2)
    fit(policy, cb, steps=2, prompts=3)
    assert len(gates.seen) == 2 * (1 + 3 + 2)  # per step: pending check, 3 pieces on workers, 2 gates
    assert all(ok for _, ok in gates.seen), [what for what, ok in gates.seen if not ok]


def test_a_reward_error_stops_the_step_with_its_message():
    class Broken(RuleReward):
        def score(self, samples):
            raise RuntimeError("scoring server http://127.0.0.1:1 POST /score failed after 4 attempt(s)")

    cb = GRPORollout(HFSampler(max_new_tokens=4, prompts_per_chunk=1), Broken(), group_size=2)
    with pytest.raises(RuntimeError, match="failed after 4 attempt"):
        fit(GRPOPolicy(), cb, steps=1)
    assert cb._executor is None  # the workers were shut down on the exception


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failed_result_read_again_raises_again_without_a_second_collective(monkeypatch, workers):
    """The ranks agree to stop in one all_gather; a rank that reads the rewards again must not enter another one
    (no other rank would join it)."""
    from concurrent.futures import ThreadPoolExecutor

    class Broken(RuleReward):
        def score(self, samples):
            raise RuntimeError("the owner died")

    gathers = []
    monkeypatch.setattr(distributed, "gather_from_ranks", lambda obj, group=None: gathers.append(obj) or [obj])
    executor = ThreadPoolExecutor(workers) if workers else None
    pending = RewardScoring(Broken(), executor, finalize=lambda result: result.rewards)
    sample = SpeechSample(text="a", codes=[1, 2], stopped=True, truncated=False, num_invalid=0, language=None)
    pending.submit([0], [sample])
    for _ in range(2):
        with pytest.raises(RuntimeError, match="the owner died"):
            pending.result()
    assert gathers == ["RuntimeError: the owner died"]
    if executor is not None:
        executor.shutdown()


def test_pieces_queued_behind_a_failed_one_are_not_scored():
    """One worker: the first piece fails, the two queued behind it are never sent to the reward (each could wait a
    whole retry budget while the other ranks wait in their collective); result() raises the first piece's error."""
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    class FailsFirst(RuleReward):
        def score(self, samples):
            calls.append(len(samples))
            raise RuntimeError("the server stopped answering")

    executor = ThreadPoolExecutor(1)
    pending = RewardScoring(FailsFirst(), executor, finalize=lambda result: result.rewards)
    sample = SpeechSample(text="a", codes=[1, 2], stopped=True)
    gate = threading.Event()
    executor.submit(gate.wait)  # hold the worker until every piece is queued
    for row in range(3):
        pending.submit([row], [sample])
    gate.set()
    with pytest.raises(RuntimeError, match="the server stopped answering"):
        pending.result()
    assert calls == [1]
    executor.shutdown()


@pytest.mark.parametrize("overlap", [True, False])
def test_timings_are_logged_every_step_and_the_step_time_is_on_the_progress_bar(overlap):
    L.seed_everything(0)
    cb = GRPORollout(HFSampler(max_new_tokens=6, prompts_per_chunk=1), RuleReward(), group_size=2, overlap_reward=overlap)
    steps = fit(GRPOPolicy(beta=0.05, num_iterations=2), cb, steps=2).steps
    for s in steps:
        m = s["metrics"]
        for phase in PHASES:
            assert m[f"timing/{phase}"] >= 0, phase
        assert m["timing/weight_sync"] == 0  # HF generate shares the policy's weights
        assert m["timing/generate"] > 0 and m["timing/logprob"] > 0 and m["timing/update"] > 0 and m["timing/reward"] > 0
        parts = m["timing/generate"] + m["timing/logprob"] + m["timing/update"] + m["timing/reward_wait"]
        assert m["timing/step"] >= parts  # the phases are disjoint parts of the step
        if not overlap:  # sequential: the trainer waits for every call
            assert m["timing/reward_wait"] >= m["timing/reward"]
        assert m["perf/samples_per_s"] == pytest.approx(4 / m["timing/step"], rel=1e-5)
        tokens = sum(len(c) for c in s["completions"])
        assert m["perf/speech_tokens_per_s"] == pytest.approx(tokens / m["timing/step"], rel=1e-5)
        assert "perf/max_memory_allocated_gib" not in m  # CUDA only
        assert s["progress_bar"]["timing/step"] == pytest.approx(m["timing/step"])


def test_timings_reduce_to_the_slowest_rank_and_counts_to_the_sum():
    ranks = [
        {"timings": {"generate": 2.0, "reward": 1.0, "step": 5.0}, "samples": 8, "tokens": 100,
         "memory": {"perf/max_memory_allocated_gib": 3.0}},
        {"timings": {"generate": 1.0, "reward": 3.0, "update": 0.5, "step": 4.0}, "samples": 8, "tokens": 60,
         "memory": {"perf/max_memory_allocated_gib": 5.0}},
    ]
    out = reduce_step(ranks)
    assert out["timing/generate"] == 2.0 and out["timing/reward"] == 3.0 and out["timing/update"] == 0.5
    assert out["timing/step"] == 5.0 and out["timing/logprob"] == 0.0
    assert out["perf/samples_per_s"] == 16 / 5 and out["perf/speech_tokens_per_s"] == 160 / 5
    assert out["perf/max_memory_allocated_gib"] == 5.0


def test_busy_time_is_the_union_of_call_spans_and_results_return_to_their_rows():
    assert busy_seconds([(0, 2), (1, 3), (5, 6)]) == 4
    assert busy_seconds([(0, 4), (1, 2)]) == 4 and busy_seconds([]) == 0
    result = RewardResult(rewards=torch.tensor([0.1, 0.2, 0.3]), metrics={"m": torch.tensor([1.0, 2.0, math.nan])},
                          reasons=["a", "b", "c"], transcripts=["x", "y", "z"])
    back = reorder(result, [2, 0, 1])  # result row k belongs to sample rows[k]
    assert back.rewards.tolist() == pytest.approx([0.2, 0.3, 0.1]) and back.reasons == ["b", "c", "a"]
    assert back.transcripts == ["y", "z", "x"]
    assert back.metrics["m"][0] == 2.0 and math.isnan(back.metrics["m"][1]) and back.metrics["m"][2] == 1.0
    with pytest.raises(RuntimeError, match="exactly once"):
        reorder(result, [0, 0, 1])


def test_hf_sampler_chunks_are_pieces_of_the_same_rollout():
    from lightning_grpo.tiny import build_tiny_llasa

    model, _ = build_tiny_llasa()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11]]
    torch.manual_seed(0)
    chunks = list(HFSampler(max_new_tokens=5, prompts_per_chunk=2).stream(model, prompts, 3, 300, 0))
    assert [c.prompts for c in chunks] == [[0, 1], [2, 3], [4]]
    assert [len(c.completions.ids) for c in chunks] == [6, 6, 3]
    torch.manual_seed(0)
    whole = HFSampler(max_new_tokens=5, prompts_per_chunk=2).sample(model, prompts, 3, 300, 0)
    assert whole.ids == [row for c in chunks for row in c.completions.ids]  # sample() is the concatenated stream
    with pytest.raises(ValueError, match="prompts_per_chunk"):
        HFSampler(prompts_per_chunk=-1)


class StreamingEngine:
    """A fake vLLM engine that finishes prompts in reverse order, one per engine step (`generate_stream`).
    Prompt i's completion j: speech ids encoding (i, j), then the stop token."""

    def __init__(self, cfg, speech0: int) -> None:
        self.cfg, self.speech0, self.steps = cfg, speech0, 0

    def _group(self, i, request):
        return [RawCompletion([self.speech0 + i, self.speech0 + j, request.stop_token_id], [-0.5] * 3, "stop")
                for j in range(request.n)]

    def generate(self, prompts, request):
        return [self._group(i, request) for i in range(len(prompts))]

    def generate_stream(self, prompts, request):
        for i in reversed(range(len(prompts))):
            self.steps += 1
            yield [(i, self._group(i, request))]

    def load_weights(self, weights):
        list(weights)

    def reset_prefix_cache(self):
        pass

    def info(self):
        return {"device": self.cfg.device, "model_runner": "fake"}


def test_vllm_streams_finished_groups_and_their_rewards_land_on_their_rows(vocab):
    """Pieces come back in the engine's order (last prompt first); the rollout reorders nothing wrongly: each row's
    reward is its own sample's."""

    class TextReward:
        def score(self, samples):  # reward = (prompt index from the text) + code j / 100: tells rows apart
            return RewardResult(rewards=torch.tensor([int(s.text[-1]) + s.codes[1] / 100 for s in samples]))

    policy = GRPOPolicy()
    sampler = VLLMSampler(max_new_tokens=8, engine_factory=lambda cfg: StreamingEngine(cfg, vocab.speech_start_id))
    sampler.setup(policy)
    cb = GRPORollout(sampler, TextReward(), group_size=2)
    cb.setup(None, policy, "fit")
    chunks = list(sampler.stream(policy.policy, [[1], [2], [3]], 2, vocab.speech_gen_end_id, 0))
    assert [c.prompts for c in chunks] == [[2], [1], [0]]
    r = cb.make_rollout(policy, {"text": ["p0", "p1", "p2"], "language": [None] * 3}, 2, step=1)
    assert r.rewards.tolist() == pytest.approx([0.0, 0.01, 1.0, 1.01, 2.0, 2.01])
    assert r.completion_ids[2][:2] == [vocab.speech_start_id + 1, vocab.speech_start_id + 0]
    assert r.sampler_logprobs[0].tolist()[:3] == [-0.5] * 3
    assert sampler.metrics["timing/weight_sync"] > 0 and "timing/weight_sync" not in r.sampler_metrics
    assert r.timings["weight_sync"] == sampler.metrics["timing/weight_sync"]


def test_peak_memory_reads_the_step_peaks_of_the_cuda_allocator(monkeypatch):
    """CPU: {} (nothing to measure); CUDA (its calls faked here): the allocator's peaks in GiB, reset per step."""
    from lightning_grpo import timing

    assert timing.peak_memory(torch.device("cpu")) == {}
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 5 * 2**29)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(d))
    gpu = torch.device("cuda", 1)
    assert timing.peak_memory(gpu) == {"perf/max_memory_allocated_gib": 3.0, "perf/max_memory_reserved_gib": 2.5}
    timing.reset_peak_memory(gpu)
    timing.reset_peak_memory(torch.device("cpu"))
    assert calls == [gpu]


@pytest.mark.gpu
def test_peak_memory_and_timings_are_logged_on_cuda():
    L.seed_everything(0)
    cb = GRPORollout(HFSampler(max_new_tokens=6, prompts_per_chunk=1), RuleReward(), group_size=2)
    record = Record()
    L.Trainer(accelerator="gpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[cb, record]).fit(GRPOPolicy(beta=0.05), PromptDataModule(prompts_per_step=2, val_data=None))
    for step in record.steps:
        m = step["metrics"]
        assert 0 < m["perf/max_memory_allocated_gib"] <= m["perf/max_memory_reserved_gib"]
        assert m["timing/update"] > 0 and m["timing/step"] >= m["timing/generate"] + m["timing/update"]


def test_a_sampler_that_overrides_sample_but_not_stream_is_sampled_through_sample(vocab):
    """Subclasses written before streaming (e.g. the cost-curve benchmark's fixed-length sampler) keep working."""

    class NoStop(HFSampler):
        def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
            allowed = [i for i in allowed_token_ids if i != stop_token_id]
            return super().sample(model, prompts, n, stop_token_id, step, allowed_token_ids=allowed)

    policy = GRPOPolicy()
    cb = GRPORollout(NoStop(max_new_tokens=5, prompts_per_chunk=1), RuleReward(), group_size=2)
    cb.setup(None, policy, "fit")
    r = cb.make_rollout(policy, {"text": ["a", "b"], "language": [None, None]}, 2, step=0)
    assert [len(c) for c in r.completion_ids] == [5] * 4 and r.truncated.all()
