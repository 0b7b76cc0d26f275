"""`GeneratorProcess`: the sampler in a process of its own, on a device of its own (the disaggregated layout).

    rollout:
      async_steps: 1                                   # generate step t+1 while step t trains
      sampler:
        class_path: lightning_grpo.generator.GeneratorProcess
        init_args:
          device: cuda:1                               # the generator's GPU (the trainer is on cuda:0)
          sampler:                                     # the real sampler, built in the generator process
            class_path: lightning_grpo.sampling.HFSampler
            init_args: {temperature: 0.8, max_new_tokens: 2048}

Colocated (every other sampler), the engine shares the training GPU and the two take turns. Here every training rank
starts one generator process (its `device`, or `devices[local_rank]`), which builds its own copy of the policy from
the policy's model source (`--model.model_name_or_path`, `--model.dtype`) and runs the inner sampler on it. Before
every rollout the trainer sends the policy's weights over a process group made for the pair (trainer rank,
generator): NCCL when both are on GPUs, gloo otherwise (a CUDA trainer with a CPU generator stages each tensor
through host memory). A sharded (FSDP2) policy is gathered one tensor at a time (`vllm_engine.hf_weights`), on
every rank together, each rank sending to its own generator.

Verified sync: after every transfer the generator returns a float64 sum of each tensor it received, and the trainer
compares them with the sums of what it sent: a transfer that lost, reordered or corrupted a tensor stops training
naming the tensor. An inner VLLMSampler then syncs the generator's copy into its engine with its own log-prob check
(`verify_every`).

Randomness: each rollout's seed is drawn from the trainer's torch RNG (the stream the rollout callback checkpoints),
so a resumed run samples what the uninterrupted run sampled; the generator's own streams are seeded with it.

Failure is loud: the generator writes to `<log_dir>/generator_rank<R>.log` (default log_dir:
`<default_root_dir>/generator`). A generator that dies, or raises while building or generating, makes the trainer's
next call raise naming the process, its exit code and that file, quoting its last lines; under
`--rollout.async_steps 1` every rank stops together (async_rollout.py). The generator exits when training ends or
its trainer process disappears (its end of the pipe closes).
"""

from __future__ import annotations

import atexit
import copy
import datetime
import functools
import inspect
import multiprocessing as mp
import os
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .reward.owner import _RANK_ENV, tail
from .sampling import Completions, Sampler, check_sampler
from .vllm_engine import hf_weights

_POLL_S = 0.5


class GeneratorProcess:
    """A `Sampler` that runs `sampler` in a process of its own on `device`, with the policy's weights sent to it."""

    def __init__(
        self,
        sampler: Sampler,
        device: str = "cpu",
        devices: list[str] | None = None,
        transfer_dtype: str | None = None,
        model_dtype: str | None = None,
        log_dir: str | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        """
        Args:
            sampler: the sampler the process runs (lightning_grpo.sampling.HFSampler, lightning_grpo.vllm_sampler.
                VLLMSampler, ...), pickled to it before its setup (a VLLMSampler builds its engine there).
            device: the generator's device, `cpu` or `cuda:N` (numbered as this process sees the GPUs).
            devices: one device per training rank on a node, indexed by the local rank (a 2+2 layout:
                [cuda:2, cuda:3]); overrides `device`.
            transfer_dtype: cast the weights to this dtype before sending (`bfloat16` halves the transfer for a bf16
                engine); None sends the policy's own dtype.
            model_dtype: the dtype of the generator's copy of the policy (`bfloat16`: half the memory of fp32, and
                what a bf16 vLLM engine syncs from); None: the policy's `--model.dtype`.
            log_dir: where the generator writes its log; default `<default_root_dir>/generator`.
            start_timeout_s: how long the generator may take to build its model and sampler.
        """
        check_sampler(sampler)
        if devices is not None and not devices:
            raise ValueError("--rollout.sampler.devices must name one device per training rank, or be null")
        for d in devices or [device]:
            if torch.device(d).type not in ("cpu", "cuda"):
                raise ValueError(f"--rollout.sampler.device={d!r} must be cpu or cuda:N")
        self.inner, self.device, self.devices = sampler, device, devices
        self.transfer_dtype = getattr(torch, transfer_dtype) if transfer_dtype else None
        self.log_dir, self.start_timeout_s, self.model_dtype = log_dir, start_timeout_s, model_dtype
        for name in ("temperature", "top_p", "top_k", "max_new_tokens"):  # the trainer scores with the same settings
            setattr(self, name, getattr(sampler, name))
        self.metrics: dict[str, float] = {}
        self.process: Any = None
        self.log_path: Path | None = None
        self._conn: Any = None
        self._group: Any = None
        self._backend = "gloo"
        self._weights_sent, self._sync_s = False, 0.0

    # -- the process ------------------------------------------------------------------------------------------
    def setup(self, pl_module) -> None:
        """Start this rank's generator and its process group (a second call is a no-op)."""
        if self.process is not None:
            return
        trainer = getattr(pl_module, "_trainer", None)
        local_rank = trainer.local_rank if trainer is not None else 0
        root = trainer.default_root_dir if trainer is not None else "."
        device = self.devices[local_rank % len(self.devices)] if self.devices else self.device
        self._backend = "nccl" if torch.device(device).type == "cuda" and pl_module.device.type == "cuda" else "gloo"
        log_dir = Path(self.log_dir or Path(root) / "generator")
        log_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank if trainer is not None else 0
        self.log_path = log_dir / f"generator_rank{rank}.log"
        store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=self.start_timeout_s),
                              wait_for_workers=False)
        hp = pl_module.hparams
        spec = {"model": hp.model_name_or_path, "dtype": self.model_dtype or hp.dtype, "device": device, "port": store.port,
                "backend": self._backend, "log": str(self.log_path), "timeout_s": self.start_timeout_s}
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        process = ctx.Process(target=_generator_main, args=(child, shippable(self.inner), spec), daemon=True,
                              name=f"generator-rank{rank}")
        process.start()
        self.process = process  # only a started process: close() joins it
        child.close()
        atexit.register(self.close)
        self._store = store  # the child connects to it; it must outlive the group's setup
        self._group = _pair_group(self._backend, store, 0, self.start_timeout_s)
        self._receive("ready", self.start_timeout_s)

    def close(self) -> None:
        """Stop the generator (training ended or failed)."""
        if self.process is None:
            return
        try:
            self._conn.send(("close", None))
        except (OSError, ValueError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
        self.process = None

    def _send(self, kind: str, payload: Any = None) -> None:
        try:
            self._conn.send((kind, payload))
        except OSError:  # its end of the pipe closed: it died
            self.process.join(timeout=5)
            raise self._failure(f"died with exit code {self.process.exitcode}") from None

    def _receive(self, expected: str, timeout_s: float | None = None) -> Any:
        """The generator's next reply; an error naming the process and its log if it died or raised."""
        waited = 0.0
        while not self._conn.poll(_POLL_S):
            waited += _POLL_S
            if not self.process.is_alive():
                raise self._failure(f"died with exit code {self.process.exitcode}")
            if timeout_s is not None and waited > timeout_s:
                raise self._failure(f"did not answer within {timeout_s:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise self._failure(f"died with exit code {self.process.exitcode}") from None
        if kind == "error":
            raise self._failure(f"raised:\n{payload}")
        if kind != expected:
            raise self._failure(f"answered {kind!r} where {expected!r} was due")
        return payload

    def _failure(self, what: str) -> RuntimeError:
        log = tail(self.log_path) if self.log_path is not None and self.log_path.exists() else ""
        return RuntimeError(
            f"the generator process {self.process.name} (pid {self.process.pid}, --rollout.sampler "
            f"GeneratorProcess) {what}; its log: {self.log_path}" + (f"\n--- last lines ---\n{log}" if log else "")
        )

    # -- the Sampler Protocol ---------------------------------------------------------------------------------
    @torch.no_grad()
    def send_weights(self, model: torch.nn.Module) -> None:
        """Send `model`'s weights to the generator and check what it received; the next `sample()` uses them
        whatever model it is given (one-step-off: sent at the launch, sampled from on the generator thread)."""
        start = time.perf_counter()
        names, sums = [], []
        self._send("weights")
        for name, tensor in hf_weights(model, self.transfer_dtype):
            t = tensor.to(self.transfer_dtype) if self.transfer_dtype is not None else tensor
            t = t.contiguous() if self._backend == "nccl" else t.detach().cpu().contiguous()
            self._send("tensor", (name, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
            _broadcast(self._group, t)
            names.append(name)
            sums.append(float(t.double().sum()))
        self._send("end")
        received = self._receive("synced")
        bad = [n for n, a, b in zip(names, sums, received) if a != b]
        if len(received) != len(sums) or bad:
            raise RuntimeError(
                f"the generator's weights differ from the policy's after the transfer ({bad[:3] or 'tensor count'}): "
                f"the generator process {self.process.name} is not sampling from the policy"
            )
        self.metrics["sync/transferred_tensors"] = float(len(names))
        self._sync_s = time.perf_counter() - start
        self._weights_sent = True

    def sample(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], n: int, stop_token_id: int, step: int,
               allowed_token_ids: Sequence[int] | None = None) -> Completions:
        """Send `model`'s weights (unless `send_weights` just did), then have the generator sample n completions per
        prompt from them."""
        if self.process is None:
            raise RuntimeError("GeneratorProcess.setup(pl_module) must run before sample() (the rollout callback calls it)")
        seed = int(torch.randint(0, 2**62, ()).item())  # the trainer's stream: a resumed run draws the same
        pushed = self._weights_sent
        if not pushed:
            self.send_weights(model)
        self._weights_sent = False
        # a sync inside this call is part of its time (timing/weight_sync); one pushed at the launch is not
        self.metrics["timing/weight_sync"] = 0.0 if pushed else self._sync_s
        self.metrics["timing/weight_push"] = self._sync_s if pushed else 0.0
        allowed = None if allowed_token_ids is None else [int(t) for t in allowed_token_ids]
        self._send("sample", ([list(p) for p in prompts], n, stop_token_id, step, allowed, seed))
        comps, inner_metrics = self._receive("sampled")
        self.metrics.update(inner_metrics)
        return comps


def shippable(sampler: Any) -> Any:
    """A shallow copy of `sampler` whose config-built factories (e.g. `engine_factory:` given as a class_path) are
    plain `functools.partial(Class, **init_args)`: the config library's own factory holds the parsed command line,
    the Trainer and the policy, which neither pickle into the generator process nor belong there."""
    out = copy.copy(sampler)
    for name, value in vars(sampler).items():
        if isinstance(value, functools.partial) and not inspect.isclass(value.func):
            # the library's shape: partial(call, [instantiator,] Class, *args, **init_args)
            first = next((i for i, a in enumerate(value.args[:2]) if inspect.isclass(a)), None)
            if first is not None:
                setattr(out, name, functools.partial(value.args[first], *value.args[first + 1:], **value.keywords))
    return out


def _pair_group(backend: str, store: Any, rank: int, timeout_s: float) -> Any:
    """A two-process group (trainer rank 0, generator 1) outside the trainer's default group."""
    prefixed = dist.PrefixStore("generator", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, 2, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def _generator_main(conn: Any, sampler: Any, spec: dict[str, Any]) -> None:
    """The generator process: build the model and the sampler, then answer the trainer until it closes the pipe."""
    for key in _RANK_ENV:  # not a rank of the trainer's group
        os.environ.pop(key, None)
    log = open(spec["log"], "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        from .policy import load_model_and_tokenizer

        device = torch.device(spec["device"])
        if device.type == "cuda":  # this process sees only its GPU, so an engine it builds lands there
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = device.index or 0
            os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
            device = torch.device("cuda:0")
            torch.cuda.set_device(device)
        group = _pair_group(spec["backend"], dist.TCPStore("127.0.0.1", spec["port"], 2, False,
                                                           timeout=datetime.timedelta(seconds=spec["timeout_s"])),
                            1, spec["timeout_s"])
        model, tokenizer = load_model_and_tokenizer(spec["model"], spec["dtype"])
        model = model.to(device).requires_grad_(False).eval()
        # what a sampler's setup reads of a LightningModule (VLLMSampler: the HF config its engine is built from)
        sampler.setup(types.SimpleNamespace(policy=model, config=model.config, device=device, tokenizer=tokenizer))
        print(f"generator ready on {device} ({spec['backend']})", flush=True)
        conn.send(("ready", None))
    except Exception:  # noqa: BLE001 - the trainer reports it, naming this log
        traceback.print_exc()
        conn.send(("error", traceback.format_exc()))
        return
    params = model.state_dict()
    while True:
        try:
            kind, payload = conn.recv()
        except EOFError:  # the trainer is gone
            return
        try:
            if kind == "close":
                return
            if kind == "weights":
                conn.send(("synced", _receive_weights(conn, group, params, spec["backend"], device)))
            elif kind == "sample":
                prompts, n, stop, step, allowed, seed = payload
                torch.manual_seed(seed)
                comps = sampler.sample(model, prompts, n, stop, step, allowed)
                conn.send(("sampled", (comps, dict(getattr(sampler, "metrics", {}) or {}))))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            conn.send(("error", traceback.format_exc()))


@torch.no_grad()
def _receive_weights(conn: Any, group: Any, params: dict[str, torch.Tensor], backend: str,
                     device: torch.device) -> list[float]:
    """Receive tensors until "end", each into the model's own tensor of that name; their float64 sums."""
    sums = []
    while True:
        kind, meta = conn.recv()
        if kind == "end":
            return sums
        name, shape, dtype = meta
        if name not in params or tuple(params[name].shape) != tuple(shape):
            raise ValueError(f"the trainer sent {name} {shape}, which the generator's model has not (or shaped "
                             f"{tuple(params[name].shape) if name in params else 'absent'})")
        buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=device if backend == "nccl" else "cpu")
        _broadcast(group, buffer)
        params[name].copy_(buffer)
        sums.append(float(buffer.double().sum()))
