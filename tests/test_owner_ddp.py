"""Two CPU ranks (gloo) and one reward owner: one reward instance for both ranks, each rank gets its own samples'
rewards back (equal to in-process scores), both ranks' pieces share owner calls, timings are reduced over ranks,
and an owner killed mid-run stops both ranks with an error naming its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_grpo.llasa import LlasaVocab, parse_completion
from lightning_grpo.reward.base import SpeechSample
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.tiny import build_tiny_tokenizer

TESTS = Path(__file__).parent


def ddp(out: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TESTS / "ddp_worker.py"), str(out), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("owner_ddp")
    proc = ddp(out, "--shared_reward", "--max_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]


def test_two_ranks_share_one_reward_instance_and_get_their_own_scores(shared_run):
    out, ranks = shared_run
    loads = (out / "loads.txt").read_text().split()
    assert len(loads) == 1, f"the reward was built {len(loads)} times: {loads}"  # one model load for the node
    calls = [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]
    assert {c["pid"] for c in calls} == {int(loads[0])}  # every sample of both ranks was scored in the owner
    local = RuleReward(codes_per_char=0.3, band=(0, 16))
    vocab = LlasaVocab.from_tokenizer(build_tiny_tokenizer())
    texts_of = []
    for rank in ranks:
        texts = set()
        for step in rank["steps"]:
            group = len(step["completions"]) // len(step["texts"])
            parsed = [parse_completion(row, vocab, "flag") for row in step["completions"]]
            samples = [SpeechSample(step["texts"][i // group], p.codes, stopped=p.stopped, truncated=not p.stopped,
                                    num_invalid=p.num_invalid) for i, p in enumerate(parsed)]
            want = local.score(samples)
            assert step["raw_rewards"] == want.rewards.tolist()  # this rank's own samples' rewards, in its row order
            penalized = [0.0 if not p.stopped else r for p, r in zip(parsed, want.rewards.tolist())]
            assert step["rewards"] == penalized  # truncation: penalize (reward 0)
            assert step["reasons"] == want.reasons
            for name, values in want.metrics.items():
                assert step["metrics"][name] == pytest.approx(values.tolist(), nan_ok=True)
            texts |= set(step["texts"])
        texts_of.append(texts)
    assert not texts_of[0] & texts_of[1]  # the ranks sampled different prompts
    # the owner batched pieces of both ranks into shared Reward.score calls
    mixed = [c for c in calls if set(c["texts"]) & texts_of[0] and set(c["texts"]) & texts_of[1]]
    assert mixed, f"no owner call held samples of both ranks: {[len(c['texts']) for c in calls]}"


def test_timings_are_reduced_over_ranks(shared_run):
    _, ranks = shared_run
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert s0["logged_timings"] == s1["logged_timings"]  # both ranks log the reduced numbers
        for phase in ("generate", "reward", "reward_wait", "logprob", "update"):
            want = max(s0["timings"][phase], s1["timings"][phase])
            assert s0["logged_timings"][f"timing/{phase}"] == pytest.approx(want, rel=1e-6), phase  # logged as float32
        samples = len(s0["completions"]) + len(s1["completions"])
        assert s0["logged_timings"]["perf/samples_per_s"] == pytest.approx(samples / s0["logged_timings"]["timing/step"])


def test_an_owner_killed_mid_run_stops_every_rank_naming_its_log(tmp_path):
    proc = ddp(tmp_path, "--shared_reward", "--max_steps", "3", "--kill_owner_at", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = str(tmp_path / "owner" / "node0.log")
    for rank in (0, 1):
        err = (tmp_path / f"rank{rank}_error.txt").read_text()
        assert log in err and ("killed by signal 9" in err or "has exited" in err), err
        assert "after 1 attempt(s)" in err  # seen dead at once: the retry budget (3 attempts) was not spent
        assert "Uvicorn running" in err  # the owner's last log lines are quoted
    assert not (tmp_path / "rank0.json").exists()  # neither rank trained on


def test_a_reward_failing_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    """Not a hang, nor gloo's 'connection closed by peer' on the healthy rank: both ranks stop at the same point,
    the healthy one naming the failing rank and quoting its error."""
    proc = ddp(tmp_path, "--max_steps", "3", "--fail_rank1_at", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "illegal memory access" in (tmp_path / "rank1_error.txt").read_text()
    err0 = (tmp_path / "rank0_error.txt").read_text()
    assert "the reward failed on rank 1" in err0 and "illegal memory access" in err0


def test_a_cli_fit_on_two_processes_builds_a_nested_reward_once_in_the_owner(tmp_path):
    """`python -m lightning_grpo fit` as a user runs it (Lightning's launcher, 2 gloo ranks) with a SharedReward
    around a composite: the owner builds the whole reward once, no training rank builds any part of it, and
    training runs (the CLI's factory, which holds the command line object, never travels)."""
    owner_yaml = tmp_path / "owner.yaml"
    owner_yaml.write_text(f"""
rollout:
  reward:
    class_path: lightning_grpo.reward.owner.SharedReward
    init_args:
      mode: process
      reward:
        class_path: lightning_grpo.reward.composite.CompositeReward
        init_args:
          rewards:
            rule:
              class_path: owner_rewards.CountingRuleReward
              init_args: {{record_dir: {str(tmp_path)!r}, codes_per_char: 0.5}}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_grpo", "fit", "--config", "configs/tiny_cpu.yaml", "--config", str(owner_yaml),
         "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
         "--trainer.enable_progress_bar", "false", f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path}", "--rollout.reward.reward.rewards.rule.codes_per_char=0.7"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loads = (tmp_path / "loads.txt").read_text().split()
    owner_log = (tmp_path / "reward_owner" / "node0.log").read_text()
    assert len(loads) == 1 and f"Started server process [{loads[0]}]" in owner_log  # built once, in the owner
    assert "codes_per_char: 0.7" in owner_log  # the command line's override reached the owner's description
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls and {c["pid"] for c in calls} == {int(loads[0])}
