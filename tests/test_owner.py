"""SharedReward in one process: the owner process scores like the reward in-process, starts and fails loudly,
and is configured from YAML. The 2-rank runs (one owner for both ranks) are in test_owner_ddp.py."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lightning_grpo.reward.base import SpeechSample
from lightning_grpo.reward.owner import SharedReward, pid_alive
from lightning_grpo.reward.rule import RuleReward
from owner_rewards import CountingRuleReward, FailingReward

ROOT = Path(__file__).resolve().parents[1]


def fake_trainer(root: Path, devices: int = 1) -> types.SimpleNamespace:
    """What SharedReward.start reads off a Trainer."""
    return types.SimpleNamespace(num_devices=devices, node_rank=0, local_rank=0, default_root_dir=str(root))


def samples() -> list[SpeechSample]:
    g = torch.Generator().manual_seed(0)
    out = [SpeechSample(f"text number {i}", torch.randint(0, 64, (int(n),), generator=g).tolist())
           for i, n in enumerate(torch.randint(1, 40, (30,), generator=g))]
    return out + [SpeechSample("empty", []), SpeechSample("bad", [], num_invalid=2), SpeechSample("odd", [3], num_invalid=1)]


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """One owner process (mode=process) serving CountingRuleReward, shared by the tests below."""
    root = tmp_path_factory.mktemp("owner")
    reward = SharedReward(functools.partial(CountingRuleReward, str(root), codes_per_char=0.4), mode="process",
                          max_retries=2, backoff_s=0.2)
    reward.start(fake_trainer(root))
    yield reward, root
    reward.close()


def test_the_owner_scores_what_the_reward_scores_in_process(owner):
    reward, root = owner
    got = reward.score(samples())
    want = RuleReward(codes_per_char=0.4).score(samples())
    assert torch.equal(got.rewards, want.rewards)
    assert got.reasons == want.reasons and "empty_speech" in got.reasons and "invalid_token" in got.reasons
    assert set(got.metrics) == set(want.metrics)  # samples without codes reach the reward: its own metrics
    for name, value in want.metrics.items():
        assert torch.equal(got.metrics[name].isnan(), value.isnan())
        assert torch.equal(got.metrics[name].nan_to_num(), value.nan_to_num()), name
    # built once, in the owner, not in this process; scored there
    assert (root / "loads.txt").read_text().split() == [str(reward.owner["pid"])]
    assert reward.owner["pid"] != os.getpid() and reward.max_concurrent_calls == 4


def test_concurrent_pieces_each_get_their_own_scores(owner):
    """Pieces in flight at once (the overlapped rollout) come back to their caller, in order."""
    reward, _ = owner
    pieces = [samples()[i:i + 5] for i in range(0, 30, 5)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(reward.score, pieces))
    local = RuleReward(codes_per_char=0.4)
    for piece, result in zip(pieces, results):
        assert torch.equal(result.rewards, local.score(piece).rewards)


def test_killed_owner_stops_scoring_with_an_error_naming_its_log(tmp_path):
    reward = SharedReward(functools.partial(CountingRuleReward, str(tmp_path)), mode="process", max_retries=3,
                          backoff_s=5.0)
    reward.start(fake_trainer(tmp_path))
    pid, log_path = reward.owner["pid"], reward.owner["log"]
    try:
        assert reward.score(samples()[:2]).rewards.shape == (2,)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError) as err:
            reward.score(samples()[:2])
        msg = str(err.value)
        # the dead process is seen before any retry: no backoff (5 s) was slept
        assert "after 1 attempt(s)" in msg and "killed by signal 9" in msg
        assert log_path in msg and "its last lines" in msg
        assert Path(log_path).is_file() and "Uvicorn running" in Path(log_path).read_text()
    finally:
        reward.close()


def test_an_owner_that_cannot_build_its_reward_stops_setup_naming_the_log(tmp_path):
    reward = SharedReward(functools.partial(FailingReward, "CUDA out of memory while loading Whisper"), mode="process")
    # the owner stops rather than answer 503 forever; a rank may read its exit or its last 503 first
    with pytest.raises(RuntimeError, match="exited with code 1|HTTP 503") as err:
        reward.start(fake_trainer(tmp_path))
    msg = str(err.value)
    assert "CUDA out of memory while loading Whisper" in msg and str(tmp_path / "reward_owner" / "node0.log") in msg
    reward.close()


def test_an_owner_that_never_starts_names_its_log(tmp_path, monkeypatch):
    """The owner process dies before binding its port (here: an interpreter that cannot start the server)."""
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ImportError: libcudart.so.12: cannot open shared object file' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(broken))
    reward = SharedReward(functools.partial(CountingRuleReward, str(tmp_path)), mode="process")
    with pytest.raises(RuntimeError, match="exited with code 3") as err:
        reward.start(fake_trainer(tmp_path))
    assert str(tmp_path / "reward_owner" / "node0.log") in str(err.value)
    assert "libcudart.so.12" in str(err.value)  # the log's last lines are quoted
    assert not (tmp_path / "reward_owner" / "node0_reward_factory.pkl").exists()  # cleaned up


def test_auto_mode_scores_in_process_for_one_rank(tmp_path):
    reward = SharedReward(functools.partial(CountingRuleReward, str(tmp_path)))  # mode auto
    reward.start(fake_trainer(tmp_path, devices=1))
    assert reward.client is None and reward.local is not None and reward.max_concurrent_calls == 1
    assert (tmp_path / "loads.txt").read_text().split() == [str(os.getpid())]
    assert torch.equal(reward.score(samples()).rewards, RuleReward().score(samples()).rewards)
    reward.close()


@pytest.mark.slow  # ~5 s: a trainer process and its owner
def test_the_owner_exits_when_its_trainer_is_killed(tmp_path):
    """A trainer SIGKILLed (no teardown, no atexit) must not leave its owner holding the reward device."""
    script = textwrap.dedent(f"""
        import functools, sys, time, types
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        from lightning_grpo.reward.owner import SharedReward
        from owner_rewards import CountingRuleReward
        r = SharedReward(functools.partial(CountingRuleReward, {str(tmp_path)!r}), mode="process")
        r.start(types.SimpleNamespace(num_devices=1, node_rank=0, local_rank=0, default_root_dir={str(tmp_path)!r}))
        print(r.owner["pid"], flush=True)
        time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        owner_pid = int(trainer.stdout.readline())
        assert pid_alive(owner_pid)
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 60  # it polls its parent every second
        while pid_alive(owner_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(owner_pid), "the reward owner outlived its trainer"
    finally:
        trainer.kill()


def test_shared_reward_is_configured_in_yaml_and_overridden_on_the_command_line(tmp_path):
    from lightning_grpo.cli import build_cli

    cfg = tmp_path / "shared.yaml"
    cfg.write_text(textwrap.dedent("""
        rollout:
          reward:
            class_path: lightning_grpo.reward.owner.SharedReward
            init_args:
              max_wait_ms: 25
              reward:
                class_path: lightning_grpo.reward.rule.RuleReward
                init_args: {codes_per_char: 0.5, band: [0, 16]}
    """))
    cli = build_cli(["--config", str(ROOT / "configs/tiny_cpu.yaml"), "--config", str(cfg),
                     "--rollout.reward.reward.codes_per_char", "0.7", f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.logger=false"], run=False)
    shared = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GRPORollout").reward
    assert isinstance(shared, SharedReward) and shared.mode == "auto" and shared.max_wait_ms == 25
    built = shared.reward()  # a factory: nothing is built at parse time, in any rank
    assert isinstance(built, RuleReward) and built.codes_per_char == 0.7 and built.band == (0, 16)


def test_a_description_carrying_weights_or_built_objects_is_refused_naming_the_key():
    from lightning_grpo.reward.spec import MAX_DESCRIPTION_BYTES, RewardSpec

    rule = "lightning_grpo.reward.rule.RuleReward"
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear at reward\.init_args\.codec"):
        SharedReward({"class_path": rule, "init_args": {"codec": torch.nn.Linear(2, 2)}})
    with pytest.raises(TypeError, match=r"torch\.Tensor at reward\.init_args\.codes_per_char"):
        SharedReward(functools.partial(RuleReward, codes_per_char=torch.tensor(0.5)))
    with pytest.raises(TypeError, match=r"RuleReward at reward\.init_args\.rewards\.rule"):  # a reward built here
        SharedReward({"class_path": "lightning_grpo.reward.composite.CompositeReward",
                      "init_args": {"rewards": {"rule": RuleReward()}}})
    with pytest.raises(ValueError, match=f"limit {MAX_DESCRIPTION_BYTES}.*file paths"):  # numbers enough to be weights
        RewardSpec({"class_path": rule, "init_args": {"table": [0.5] * 100_000}})
    with pytest.raises(TypeError, match="class_path"):
        SharedReward(lambda: RuleReward())


def test_a_description_builds_with_the_configs_type_checks_where_it_is_called():
    from lightning_grpo.reward.spec import RewardSpec, describe

    spec = describe(functools.partial(RuleReward, codes_per_char=0.25, band=(0, 8)))
    assert spec.config == {"class_path": "lightning_grpo.reward.rule.RuleReward",
                           "init_args": {"codes_per_char": 0.25, "band": (0, 8)}}
    built = spec()
    assert isinstance(built, RuleReward) and built.codes_per_char == 0.25 and built.band == (0, 8)
    nested = RewardSpec({"class_path": "lightning_grpo.reward.composite.CompositeReward", "init_args": {
        "rewards": {"rule": {"class_path": "lightning_grpo.reward.rule.RuleReward", "init_args": {"band": [0, 4]}}}}})
    assert nested().rewards["rule"].band == (0, 4)  # YAML's list is the signature's tuple, as on the command line
    with pytest.raises(Exception, match="codes_per_char"):
        RewardSpec({"class_path": "lightning_grpo.reward.rule.RuleReward", "init_args": {"codes_per_char": "lots"}})()
