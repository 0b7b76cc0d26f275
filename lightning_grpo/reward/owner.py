"""`SharedReward`: one reward per node, owned by one process, shared by every training rank on the node.

Without it each DDP rank builds its own reward: with `devices: 2` and `device: cuda:2` two copies of
Whisper large-v3 and X-codec2 load onto the third GPU and score one after the other. Wrap the reward instead:

    rollout:
      reward:
        class_path: lightning_grpo.reward.owner.SharedReward
        init_args:
          reward:                                   # the real reward, built only in the owner
            class_path: lightning_grpo.reward.whisper.WhisperReward
            init_args: {whisper_model: large-v3, device: cuda:2, dtype: float16, batch_size: 32}

`--rollout.reward.reward.beta_c 2` overrides a key of the real reward. With `mode: auto` (the default) a node
that trains on one rank scores in that rank's process, as the plain reward would; more ranks get an owner.

How: local rank 0 of each node starts the scoring server (`python -m lightning_grpo serve`, reward/server.py)
as the *owner process*, on the loopback interface, a free port and a random bearer token, with the reward's
description (the parsed `reward:` as plain `class_path` + `init_args`, reward/spec.py: never the built reward or
the config library's factory, which holds the Trainer) written into the run's directory. The owner binds, then
builds the reward on its device while /healthz answers "loading"; every rank learns the port and token through one all_gather and
waits until the owner is ready. Each rank scores through `RemoteReward` (reward/client.py), several pieces in
flight at once (`max_concurrent_calls`), and the owner's micro-batcher merges the requests of all ranks into
shared `Reward.score` calls (at most `max_batch_size` samples, `max_wait_ms` to gather company). The reward
runs in its own process, so it takes no GIL or CPU time from generation: what overlapping needs.

Why a process and HTTP rather than rank 0 hosting the reward behind a collective (measured in BENCHMARKS.md,
"One reward owner"): the transport costs are alike (milliseconds per step for 64 samples per rank), but a collective
makes every rank submit and collect at the same moment, which rules out scoring each rank's pieces while it
is still generating, and puts the reward's Python work and its CUDA context inside rank 0's training process.

Failure is loud: the owner writes to `<log_dir>/node<N>.log` (default log_dir: `<default_root_dir>/reward_owner`).
If it never binds, fails to build the reward, or stays "loading" past `ready_timeout_s`, every rank's setup
raises naming that file; if it dies mid-run (every rank watches its pid), every rank's next score raises, within
the client's retry budget, naming it and quoting its last lines. Never a silent zero. The owner exits when
training ends, fails, or its parent process disappears.

Multi-node: one owner per node (local rank 0 starts it; ranks pick their node's through the all_gather), so
`device: cuda:2` is the third GPU of every node. The owner sees only the GPUs its reward names (CUDA_VISIBLE_DEVICES,
`one_device_view`; `cuda:2` is its `cuda:0`), so nothing it creates on a bare `cuda` lands on training GPU 0.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import httpx

from .base import Reward, RewardBase, RewardResult, SpeechSample
from .client import RemoteReward
from .spec import RewardSpec, describe

log = logging.getLogger(__name__)

OwnerMode = Literal["auto", "process", "in_process"]
# the trainer's process-group variables: the owner is no rank and must not join the group
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK",
             "MASTER_ADDR", "MASTER_PORT")
_LOG_TAIL_LINES = 20


class SharedReward(RewardBase):
    """One reward per node for every training rank: an owner process, or this process when one rank trains."""

    def __init__(
        self,
        reward: Callable[[], Reward] | RewardSpec,
        mode: OwnerMode = "auto",
        max_batch_size: int = 256,
        max_wait_ms: float = 10.0,
        max_concurrent_calls: int = 4,
        max_samples_per_request: int = 64,
        ready_timeout_s: float = 900.0,
        start_timeout_s: float = 120.0,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        log_dir: str | None = None,
        give_up_after_s: float = 600.0,
    ) -> None:
        """
        Args:
            reward: the real reward (`class_path` + `init_args` in YAML), built once per node, in the owner, from
                its description (plain values: weights, tensors and built objects are refused). In Python: a
                RewardSpec, a class, or `functools.partial(Class, plain arguments)`.
            mode: `auto` (default): an owner process when more than one rank trains on the node, else the reward
                in this process (the plain reward's behaviour); `process`: an owner even for one rank (its own
                process: no GIL or CPU time taken from generation); `in_process`: every rank builds its own.
            max_batch_size: most samples per `Reward.score` call in the owner, over all ranks' requests; the
                reward's own `batch_size` then splits them for its device.
            max_wait_ms: how long the first request of an owner batch waits for others (any rank's) to join it;
                requests that arrive while a batch is scored join the next one at once, so a busy reward batches
                the ranks together without this wait.
            max_concurrent_calls: pieces of a rollout a rank has in flight at once (`--rollout.overlap_reward`).
            max_samples_per_request: samples per HTTP body (a rank's larger piece is split).
            ready_timeout_s: how long every rank waits, at setup, for the owner to build the reward (Whisper
                large-v3 and X-codec2 take a minute or more) before training stops with an error naming the log.
            start_timeout_s: how long local rank 0 waits for the owner process to import and bind its port.
            timeout_s: read timeout of one scoring request (a request waits behind other ranks' batches).
            max_retries: retries of a failed request; a dead owner is detected at once, not retried.
            backoff_s: wait before the first retry, doubled at each retry.
            log_dir: where the owner's log and its reward's description (a pickled RewardSpec) go; default
                `<trainer.default_root_dir>/reward_owner`.
            give_up_after_s: the most one rank's scoring call waits on the owner, retries included, before it
                raises (RemoteReward's; twice it must stay under the process group's timeout, checked at start).
        """
        if mode not in ("auto", "process", "in_process"):
            raise ValueError(f"--rollout.reward.mode={mode!r} must be auto, process or in_process")
        if max_batch_size < 1 or max_concurrent_calls < 1 or max_samples_per_request < 1:
            raise ValueError("--rollout.reward.max_batch_size, max_concurrent_calls and max_samples_per_request must be >= 1")
        self.reward = describe(reward)
        self.mode = mode
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.concurrent_requests = max_concurrent_calls
        self.max_samples_per_request = max_samples_per_request
        self.ready_timeout_s = ready_timeout_s
        self.start_timeout_s = start_timeout_s
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.give_up_after_s = give_up_after_s
        self.log_dir = log_dir
        self.local: Reward | None = None  # in_process: the reward itself
        self.client: _OwnerClient | None = None  # process: this rank's connection to its node's owner
        self.owner: dict[str, Any] | None = None  # url, pid, log, node of this node's owner
        self._proc: subprocess.Popen | None = None  # local rank 0 only
        self._factory_file: Path | None = None

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks: nothing started travels
        return {**self.__dict__, "local": None, "client": None, "owner": None, "_proc": None, "_factory_file": None}

    @property
    def max_concurrent_calls(self) -> int:
        """Read by the rollout: pieces in flight at once (an in-process reward takes one at a time)."""
        return self.concurrent_requests if self.client is not None else 1

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self, trainer: Any = None) -> None:
        """Called by the rollout callback's setup on every rank (a collective in `process` mode); idempotent."""
        if self.local is not None or self.client is not None:
            return
        ranks_on_node = int(getattr(trainer, "num_devices", 1) or 1) if trainer is not None else 1
        if self.mode == "in_process" or (self.mode == "auto" and ranks_on_node == 1) or trainer is None:
            if trainer is None and self.mode == "process":
                log.warning("SharedReward(mode=process) used outside a Trainer: building the reward in this process")
            self.local = self.reward()
            return
        from ..distributed import gather_from_ranks, raise_on_every_rank
        from .client import check_retry_budget

        check_retry_budget(self.give_up_after_s, trainer, "give_up_after_s")
        node, local_rank = int(trainer.node_rank), int(trainer.local_rank)
        log_dir = Path(self.log_dir or Path(trainer.default_root_dir) / "reward_owner").expanduser().resolve()
        mine = None
        try:
            if local_rank == 0:
                mine = self._spawn(log_dir, node)
        finally:
            # every rank reaches the all_gather, also when spawning failed (then its error is raised below)
            entries = gather_from_ranks({"node": node, "local_rank": local_rank, "owner": mine})
        owners = [e["owner"] for e in entries if e["node"] == node and e["local_rank"] == 0]
        if not owners or owners[0] is None:
            raise RuntimeError(
                f"the reward owner of node {node} did not start (local rank 0 raised the reason); its log: "
                f"{log_dir / f'node{node}.log'}"
            )
        self.owner = owners[0]
        self.client = _OwnerClient(self.owner, self._proc, token=self.owner["token"], timeout_s=self.timeout_s,
                                   max_retries=self.max_retries, backoff_s=self.backoff_s,
                                   max_samples_per_request=self.max_samples_per_request,
                                   ready_timeout_s=self.ready_timeout_s, max_concurrent_calls=self.concurrent_requests,
                                   give_up_after_s=self.give_up_after_s)
        self.client.check_pid_visible()
        error = None
        try:
            self.client._ensure_ready()  # the reward is built: model-loading errors stop training here
        except Exception as e:  # on the ranks of one node: every rank of every node stops together
            error = e
        raise_on_every_rank(error, "the reward owner")

    def _spawn(self, log_dir: Path, node: int) -> dict[str, Any]:
        """Local rank 0: start this node's owner and wait until it has bound its port."""
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"node{node}.log"
        factory_file = log_dir / f"node{node}_reward_factory.pkl"
        spec, visible = one_device_view(self.reward, os.environ.get("CUDA_VISIBLE_DEVICES"))
        payload = pickle.dumps(spec)  # a RewardSpec: plain data, built by the owner
        fd = os.open(factory_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the owner unpickles it: ours only
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        self._factory_file = factory_file
        atexit.register(self.close)  # also when the trainer dies outside Lightning's exception handling
        token = secrets.token_urlsafe(32)
        env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV and not k.startswith("TORCHELASTIC_")}
        env["WHISPER_SERVER_TOKEN"] = token  # not on the command line, where `ps` shows it
        if visible is not None:  # the owner sees only its reward's GPU(s): nothing it creates lands on a training GPU
            env["CUDA_VISIBLE_DEVICES"] = visible
        # the classes the trainer imported (e.g. from examples/ or a user's package) must import in the owner too
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([p for p in sys.path if p] + env.get("PYTHONPATH", "").split(os.pathsep)))
        for attempt in range(3):  # a free port can be taken between choosing it and binding it
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            # `python -m lightning_grpo serve` without the training CLI's imports (a few seconds less)
            cmd = [sys.executable, "-m", "lightning_grpo.reward.server", "--reward-factory", str(factory_file),
                   "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(self.max_batch_size),
                   "--max-wait-ms", str(self.max_wait_ms), "--max-batch-samples", str(self.max_samples_per_request),
                   "--exit-with-parent", str(os.getpid()), "--allow-empty-tokens", "--log-level", "info",
                   # its one client is this trainer (loopback, random token), sending its own data rows' paths
                   "--reference-dir", "/"]
            with open(log_path, "ab") as out:
                out.write(f"\n==== reward owner of node {node}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                          f"{' '.join(cmd)}\nits reward:\n{self.reward.to_yaml()}".encode())
                out.flush()
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
            threading.Thread(target=self._proc.wait, name="reward-owner-reaper", daemon=True).start()
            if self._wait_bound(url, log_path):
                log.info("reward owner of node %d: pid %d at %s, log %s", node, self._proc.pid, url, log_path)
                return {"url": url, "token": token, "pid": self._proc.pid, "log": str(log_path), "node": node}
            if "address already in use" not in tail(log_path).lower():
                break
        code = self._proc.poll()
        self.close()
        raise RuntimeError(
            f"the reward owner of node {node} {_exit_status(code) if code is not None else 'did not bind its port'} "
            f"within start_timeout_s={self.start_timeout_s}; its log: {log_path}\n{tail(log_path)}"
        )

    def _wait_bound(self, url: str, log_path: Path) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                httpx.get(f"{url}/healthz", timeout=1.0, trust_env=False)
                return True  # any answer, "loading" included: the port is ours
            except httpx.TransportError:
                time.sleep(0.1)
        return False

    def close(self) -> None:
        """Stop this node's owner (local rank 0) and drop the connection; the reward may be started again."""
        if self.client is not None:
            self.client.close()
            self.client = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._factory_file is not None:
            self._factory_file.unlink(missing_ok=True)
            self._factory_file = None
        self.local = None
        self.owner = None

    # ------------------------------------------------------------------------------------------- scoring
    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        if self.local is None and self.client is None:
            self.start(None)  # used outside a Trainer: the reward in this process
        if self.local is not None:
            return self.local.score(samples)
        return self.client.score(samples)  # type: ignore[union-attr]


class _OwnerClient(RemoteReward):
    """`RemoteReward` to this node's owner, which knows where the owner logs and whether its process is alive."""

    send_empty = True  # the owner runs with --allow-empty-tokens: the reward gives empty samples its own answer

    def __init__(self, owner: dict[str, Any], proc: subprocess.Popen | None, **kwargs: Any) -> None:
        super().__init__(url=owner["url"], **kwargs)
        self.owner = owner
        self.proc = proc
        self.pid: int | None = owner["pid"]

    def check_pid_visible(self) -> None:
        """Ranks in another PID namespace than the owner cannot watch its pid: they rely on retries alone."""
        if self.proc is None and not pid_alive(self.pid):
            log.warning("the reward owner's pid %s is not visible from this rank; a dead owner is found by retries", self.pid)
            self.pid = None

    def _give_up(self) -> str | None:
        if self.pid is None or (pid_alive(self.pid) and (self.proc is None or self.proc.poll() is None)):
            return None
        status = "has exited"
        if self.proc is not None:  # local rank 0 started it: its reaper thread has (or soon has) the exit status
            try:
                status = _exit_status(self.proc.wait(timeout=2))
            except subprocess.TimeoutExpired:
                pass
        return f"the reward owner process (pid {self.pid}) {status}"

    def _advice(self) -> str:
        path = self.owner["log"]
        return (f"The reward owner of node {self.owner['node']} (lightning_grpo.reward.owner.SharedReward, pid "
                f"{self.owner['pid']}) logs to {path}; its last lines:\n{tail(Path(path))}")


def one_device_view(spec: RewardSpec, visible: str | None) -> tuple[RewardSpec, str | None]:
    """The reward's description as the owner process sees it when only the GPUs its reward names are visible, and
    that CUDA_VISIBLE_DEVICES (None: leave the owner's GPUs as they are).

    `device` arguments of `cuda:N` (the reward's and those of rewards nested in it, e.g. a composite's) name GPUs of
    the trainer's view (`visible`, the trainer's CUDA_VISIBLE_DEVICES, or every GPU); in the owner they become
    `cuda:0`, `cuda:1`, ... in order of N. A reward that names no indexed GPU (`cpu`, or a bare `cuda`, the
    trainer's current GPU) is left as it is."""
    found: list[str] = []
    _map_devices(spec.config, lambda d: found.append(d) or d)
    indices = sorted({i for i in map(_cuda_index, found) if i is not None})
    if not indices or any(d.startswith("cuda") and _cuda_index(d) is None for d in found):
        return spec, None
    physical = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(max(indices) + 1)]
    if max(indices) >= len(physical):
        raise ValueError(f"the reward's device cuda:{max(indices)} is not one of the {len(physical)} GPUs this process "
                         f"sees (CUDA_VISIBLE_DEVICES={visible}): set --rollout.reward.reward.device to one of them")
    local = {n: i for i, n in enumerate(indices)}

    def remap(device: str) -> str:
        index = _cuda_index(device)
        return device if index is None else f"cuda:{local[index]}"

    return RewardSpec(_map_devices(spec.config, remap)), ",".join(physical[i] for i in indices)


def _cuda_index(device: Any) -> int | None:
    """N of a "cuda:N" device string; None for every other device (cpu, a bare cuda)."""
    text = str(device)
    return int(text.split(":", 1)[1]) if text.startswith("cuda:") and text.split(":", 1)[1].isdigit() else None


def _map_devices(obj: Any, fn: Callable[[str], str]) -> Any:
    """A description's plain data rebuilt with fn(value) for every `device` string in it (dicts and lists)."""
    if isinstance(obj, dict):
        return {k: fn(v) if k == "device" and isinstance(v, str) else _map_devices(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_devices(v, fn) for v in obj)
    return obj


def check_reward_devices(reward: Any, trainer: Any) -> None:
    """Raise when a reward is placed on a GPU that a training rank of this node uses (with vLLM beside the policy it
    has no room for Whisper): the reward's device as its config names it, and the rank's. CPU is shared freely."""
    strategy = getattr(trainer, "strategy", None)
    devices = list(getattr(strategy, "parallel_devices", None) or [getattr(strategy, "root_device", None)])
    training = {str(d): rank for rank, d in enumerate(devices) if d is not None and str(d).startswith("cuda")}
    for where, device in _reward_devices(reward, "rollout.reward"):
        name = "cuda:0" if device == "cuda" else device
        if name in training:
            raise ValueError(
                f"{where}={device} is the GPU of training rank {training[name]} (trainer.devices={len(devices)} trains "
                f"on {', '.join(training)}): put the reward on a GPU no rank trains on, e.g. cuda:{len(devices)}, or "
                "train on fewer devices"
            )


def _reward_devices(reward: Any, where: str) -> list[tuple[str, str]]:
    """(config key, device) of every placed part of a reward: a description's `device` keys, a module's parameters."""
    if isinstance(reward, SharedReward):
        reward = reward.reward
    if isinstance(reward, RewardSpec):
        found: list[tuple[str, str]] = []

        def walk(node: Any, key: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "device" and isinstance(v, str):
                        found.append((key + ".device", v))
                    walk(v, key if k == "init_args" else f"{key}.{k}")

        walk(reward.config.get("init_args") or {}, f"{where}.reward")
        return found
    if isinstance(getattr(reward, "rewards", None), dict):  # a composite's components
        return [d for name, r in reward.rewards.items() for d in _reward_devices(r, f"{where}.rewards.{name}")]
    if hasattr(reward, "parameters"):
        return [(f"{where}.device", d) for d in sorted({str(p.device) for p in reward.parameters()})]
    return []


def _exit_status(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux /proc; elsewhere existence only)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
