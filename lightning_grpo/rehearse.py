"""`python -m lightning_grpo rehearse --config X.yaml [overrides]`: a config's run rehearsed on this machine's CPU
before a GPU is spent.

It parses the config as `fit` does, changes only what cannot exist here, prints each change, and launches
`python -m lightning_grpo fit` on the result exactly as a user does (the same CLI, Lightning's own launcher, as
many processes as `trainer.devices x num_nodes` up to `--max_processes`, gloo): 2 steps with a validation pass at
step 2, then a resume from the checkpoint written at step 2 for one more step. Everything else runs as written:
owner processes, composite rewards, the scoring server of a RemoteReward config (started on 127.0.0.1, as its
header says to start it), callbacks, loggers (W&B offline), checkpoints, FSDP2 sharding, VLLMSampler's sync,
sleep and verification calls (against `RehearsalEngine`, a CPU engine with the policy's architecture). The report
ends with the real config's per-GPU memory plan from the project's memory model (benchmarks/bench_step_memory.py),
when the model is a LLaSA size it knows, and every warning the runs printed. The exit status is non-zero when a
run failed.

What is substituted: hub model ids -> `builtin:tiny-llasa` (LlamaForCausalLM, LLaSA's token layout with 64
speech tokens); Whisper checkpoints -> `random:toy` (2 layers, 64 wide, English, random weights); X-codec2
checkpoints -> XCodec2Decoder at hidden 64 / depth 2 (random weights); `cuda:N` -> `cpu` and float16 rewards ->
float32; the vLLM engine -> RehearsalEngine; missing data paths -> `builtin:en`; sizes -> one prompt per process,
at most 4 completions per prompt, 16 new tokens; `num_nodes` -> 1 (Lightning's launcher starts one node's
processes; the per-node parts, an owner per node, are the same on every node).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import yaml

from .vllm_engine import EngineConfig, RawCompletion, SampleRequest

TINY_MODEL = "builtin:tiny-llasa"
TINY_WHISPER = "random:toy"
TINY_CODEC = {"class_path": "lightning_grpo.reward.codec.XCodec2Decoder",
              "init_args": {"checkpoint": None, "device": "cpu", "hidden_dim": 64, "depth": 2, "heads": 4}}
STEPS = 2
MAX_NEW_TOKENS = 16
MAX_GROUP_SIZE = 4
MAX_PROMPT_LENGTH = 256  # the tiny model's 1,024 positions hold prompt + completion
ENGINE = "lightning_grpo.rehearse.RehearsalEngine"
REPO = Path(__file__).resolve().parents[1]


class RehearsalEngine:
    """VLLMSampler's Engine on the CPU: a HF model of the policy's architecture that samples as vLLM is asked to
    (n per prompt, temperature, top-p, allowed ids, stop id, per-prompt seeds) and takes the synced weights."""

    def __init__(self, cfg: EngineConfig) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.cfg = cfg
        self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model_path)).eval()
        self.synced = False

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], request: SampleRequest) -> list[list[RawCompletion]]:
        if not self.synced:
            raise RuntimeError("RehearsalEngine.generate before any load_weights: the sampler did not sync the policy")
        out = []
        for i, prompt in enumerate(prompts):
            seed = request.seeds[i] if request.seeds else self.cfg.seed + i
            gen = torch.Generator().manual_seed(int(seed))  # never the trainer's random stream
            ids = torch.tensor([list(prompt)] * request.n)  # (n, P)
            logps: list[list[float]] = [[] for _ in range(request.n)]
            done = torch.zeros(request.n, dtype=torch.bool)
            for t in range(request.max_tokens):
                logits = self.model(ids).logits[:, -1].float() / max(request.temperature, 1e-5)  # (n, V)
                if request.allowed_token_ids is not None:
                    keep = torch.full_like(logits, float("-inf"))
                    keep[:, list(request.allowed_token_ids)] = 0.0
                    logits = logits + keep
                if t < request.min_tokens:
                    logits[:, request.stop_token_id] = float("-inf")
                logp = logits.log_softmax(-1)
                nxt = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]  # (n,)
                nxt = torch.where(done, torch.full_like(nxt, request.stop_token_id), nxt)
                for j in range(request.n):
                    if not done[j]:
                        logps[j].append(float(logp[j, nxt[j]]))
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                done |= nxt == request.stop_token_id
                if done.all():
                    break
            group = []
            for j in range(request.n):
                row = ids[j, len(prompt):len(prompt) + len(logps[j])].tolist()
                group.append(RawCompletion(row, logps[j], "stop" if row and row[-1] == request.stop_token_id else "length"))
            out.append(group)
        return out

    def prompt_logprobs(self, ids: Sequence[int], start: int) -> list[float]:
        from .vllm_sampler import policy_logprobs

        return policy_logprobs(self.model, ids, start)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = {k: v.detach().float().cpu() for k, v in weights}
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"the sync sent tensors the engine's model has no place for: {result.unexpected_keys[:5]}")
        self.synced = True

    def reset_prefix_cache(self) -> None:
        pass

    def sleep(self, level: int) -> None:
        pass

    def wake_up(self, tags: list[str]) -> None:
        pass

    def info(self) -> dict:
        return {"device": torch.device("cpu"), "model_runner": "rehearsal"}


def ranks(trainer: dict) -> int:
    """Training processes of a config's `trainer:` (devices as a count, an id list or "0,1", times num_nodes)."""
    devices = trainer.get("devices") or 1
    if isinstance(devices, str):
        devices = devices.strip().split(",") if "," in devices else (1 if devices == "auto" else int(devices))
    count = len(devices) if isinstance(devices, list) else int(devices)
    return count * int(trainer.get("num_nodes") or 1)


class Substitutions:
    """The plain config, changed key by key; each change is recorded as `key: old -> new (why)`."""

    def __init__(self, config: dict, out: Path, max_processes: int) -> None:
        self.config, self.out, self.max_processes = config, out, max_processes
        self.notes: list[str] = []
        self.server_reward: dict | None = None  # what the rehearsal's scoring server serves, if the config needs one

    def set(self, node: dict, key: str, value: Any, where: str, why: str) -> None:
        if node.get(key) != value:
            self.notes.append(f"{where}.{key}: {node.get(key)!r} -> {value!r} ({why})")
            node[key] = value

    def apply(self) -> None:
        cfg = self.config
        trainer = cfg["trainer"]
        processes = min(ranks(trainer), self.max_processes)
        self.model(cfg["model"])
        self.data(cfg["data"], processes)
        self.rollout(cfg["rollout"])
        self.trainer(trainer, processes)

    def model(self, model: dict) -> None:
        name = str(model.get("model_name_or_path"))
        if not name.startswith("builtin:") and not Path(name).expanduser().is_dir():
            self.set(model, "model_name_or_path", TINY_MODEL, "model", "no hub here: a tiny LLaSA-shaped Llama built in code")

    def data(self, data: dict, processes: int) -> None:
        for key in ("train_data", "val_data"):
            value = data.get(key)
            if isinstance(value, str) and not value.startswith("builtin:") and not Path(value).expanduser().exists():
                self.set(data, key, "builtin:en", "data", "the path does not exist here")
        self.set(data, "prompts_per_step", processes, "data", "one prompt per process")
        self.set(data, "val_prompts_per_step", processes, "data", "one prompt per process")

    def rollout(self, rollout: dict) -> None:
        self.set(rollout, "group_size", min(int(rollout["group_size"]), MAX_GROUP_SIZE), "rollout", "CPU time")
        self.set(rollout, "val_group_size", min(int(rollout["val_group_size"]), MAX_GROUP_SIZE), "rollout", "CPU time")
        self.set(rollout, "max_prompt_length", min(int(rollout["max_prompt_length"]), MAX_PROMPT_LENGTH), "rollout",
                 "the tiny model's positions")
        self.sampler(rollout["sampler"], "rollout.sampler")
        self.reward(rollout["reward"], "rollout.reward")

    def sampler(self, node: dict, where: str) -> None:
        """A sampler, or a wrapper that runs one elsewhere (GeneratorProcess: its GPUs -> cpu, then its sampler)."""
        args = node.setdefault("init_args", {})
        if isinstance(args.get("sampler"), dict):
            for key in ("device", "devices"):
                value = args.get(key)
                if isinstance(value, str) and value.startswith("cuda"):
                    self.set(args, key, "cpu", where, "no GPU here")
                elif isinstance(value, list) and any(str(d).startswith("cuda") for d in value):
                    self.set(args, key, ["cpu"] * len(value), where, "no GPU here")
            self.sampler(args["sampler"], f"{where}.sampler")
            return
        self.set(args, "max_new_tokens", min(int(args["max_new_tokens"]), MAX_NEW_TOKENS), where, "CPU time")
        if node["class_path"].endswith("VLLMSampler"):
            self.set(args, "engine_factory", ENGINE, where,
                     "no vLLM on this CPU: a CPU engine; the sampler's sync, sleep and verification calls run")

    def reward(self, node: Any, where: str) -> None:
        """Walk a reward's class_path tree: models -> tiny ones, GPUs -> cpu, a RemoteReward -> the local server."""
        if isinstance(node, list):
            for i, item in enumerate(node):
                self.reward(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        args = node.get("init_args") if "class_path" in node else node
        if not isinstance(args, dict):
            return
        if str(node.get("class_path", "")).endswith("RemoteReward"):
            self.server_reward = {"class_path": "lightning_grpo.reward.whisper.WhisperReward", "init_args": {
                "whisper_model": TINY_WHISPER, "codec": TINY_CODEC, "device": "cpu", "language": "en", "batch_size": 16}}
            self.set(args, "url", "{server}", where, "the rehearsal's scoring server on 127.0.0.1 (tiny Whisper + codec)")
        for key, value in list(args.items()):
            if key == "device" and isinstance(value, str) and value.startswith("cuda"):
                self.set(args, key, "cpu", where, "no GPU here")
            elif key == "dtype" and value == "float16" and "device" in args:
                self.set(args, key, "float32", where, "float16 kernels are GPU-only")
            elif key == "whisper_model" and isinstance(value, str) and not _local_whisper(value):
                self.set(args, key, TINY_WHISPER, where, "no hub here: Whisper's architecture at tiny size, random weights")
            elif key == "codec" and isinstance(value, str):
                self.set(args, key, TINY_CODEC, where, "no hub here: X-codec2's decoder at tiny size, random weights")
            elif key == "log_dir" and isinstance(value, str) and not Path(value).is_absolute():
                self.set(args, key, str(self.out / value), where, "inside the rehearsal's directory")
            else:
                self.reward(value, f"{where}.{key}")

    def trainer(self, trainer: dict, processes: int) -> None:
        self.set(trainer, "accelerator", "cpu", "trainer", "no GPU here")
        self.set(trainer, "devices", processes, "trainer", f"devices x num_nodes, at most {self.max_processes} processes here")
        if int(trainer.get("num_nodes") or 1) > 1:
            self.set(trainer, "num_nodes", 1, "trainer", "Lightning's launcher starts one node's processes; each node's "
                     "parts (its owner or server) are the same on every node")
        if str(trainer.get("precision", "")).startswith("16"):
            self.set(trainer, "precision", "bf16-mixed", "trainer", "the CPU autocasts to bfloat16, not float16")
        strategy = trainer.get("strategy")
        if isinstance(strategy, dict) and strategy.get("class_path", "").endswith("ModelParallelStrategy"):
            args = strategy.setdefault("init_args", {})
            if args.get("data_parallel_size") not in (None, "auto"):
                self.set(args, "data_parallel_size", processes, "trainer.strategy", "every rehearsal process")
            if "nccl" in str(args.get("process_group_backend")):
                self.set(args, "process_group_backend", "gloo", "trainer.strategy", "NCCL needs GPUs")
        run = self.out / "run"
        self.set(trainer, "default_root_dir", str(run), "trainer", "the rehearsal's directory")
        for key, value in (("max_steps", STEPS), ("val_check_interval", STEPS), ("check_val_every_n_epoch", None),
                           ("limit_val_batches", 1), ("num_sanity_val_steps", 0), ("enable_progress_bar", False)):
            self.set(trainer, key, value, "trainer", f"{STEPS} steps and one validation pass")
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, dict) and "class_path" in logger:
                args = logger.setdefault("init_args", {})
                self.set(args, "save_dir", str(run), "trainer.logger", "the rehearsal's directory")
                if logger["class_path"].endswith("WandbLogger"):
                    self.set(args, "offline", True, "trainer.logger", "W&B offline: no account or network")
        for callback in trainer.get("callbacks") or []:
            name, args = callback.get("class_path", "").rsplit(".", 1)[-1], callback.setdefault("init_args", {})
            if name == "StepCheckpoint":
                self.set(args, "every_n_train_steps", STEPS, "trainer.callbacks.StepCheckpoint", "a checkpoint to resume from")
            elif name == "AudioSampleLogger":
                self.set(args, "every_n_steps", 1, "trainer.callbacks.AudioSampleLogger", "log within the rehearsal")
                if isinstance(args.get("codec"), str):
                    self.set(args, "codec", TINY_CODEC, "trainer.callbacks.AudioSampleLogger",
                             "no hub here: X-codec2's decoder at tiny size")
                if str(args.get("codec_device", "cpu")).startswith("cuda"):
                    self.set(args, "codec_device", "cpu", "trainer.callbacks.AudioSampleLogger", "no GPU here")


def _local_whisper(name: str) -> bool:
    return name.startswith("random:") or name.endswith("-ct2") or Path(name).expanduser().exists()


def parsed_config(args: list[str]) -> dict:
    """The config `fit` would run, as plain YAML data (parsed and type-checked by the training CLI)."""
    from .cli import GRPOCLI
    from .data import PromptDataModule
    from .policy import GRPOPolicy

    class ParseOnly(GRPOCLI):
        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():  # the rehearsal's own argv is not the config's
        warnings.filterwarnings("ignore", ".*not recommended to provide both args and command line arguments")
        cli = ParseOnly(GRPOPolicy, PromptDataModule, args=args, run=False, parser_kwargs={"parser_mode": "omegaconf"},
                        seed_everything_default=0, auto_configure_optimizers=False)
    plain = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    plain.pop("config", None)
    return plain


def memory_plan(config: dict) -> list[str]:
    """Per GPU, the real config's rollout and update peaks from benchmarks/bench_step_memory.py's model (term by
    term; BENCHMARKS.md, "FSDP2: per-rank memory"), or why there is none."""
    model, trainer = config["model"], config["trainer"]
    size = re.search(r"Llasa-(\d+)B", str(model.get("model_name_or_path")), re.IGNORECASE)
    if size is None or not (REPO / "benchmarks" / "bench_step_memory.py").is_file():
        return ["no memory model for this config (a LLaSA-1B/3B/8B hub id and benchmarks/ are needed)"]
    sys.path.insert(0, str(REPO / "benchmarks"))
    import dataclasses

    from bench_sharded_memory import LLASA
    from bench_step_memory import GB, Layout, budget, layer_activation_bytes

    name = f"LLaSA-{size.group(1)}B"
    if name not in LLASA:
        return [f"no memory model for {name}"]
    sampler, elsewhere = config["rollout"]["sampler"], False
    while isinstance(sampler["init_args"].get("sampler"), dict):  # a generator process: the engine on its own GPU
        sampler, elsewhere = sampler["init_args"]["sampler"], True
    colocated = "VLLM" in sampler["class_path"] and not elsewhere
    fraction = float(sampler["init_args"].get("gpu_memory_utilization") or 0.0) if colocated else 0.0
    if model.get("lora"):
        if name != "LLaSA-8B":
            return [f"no LoRA memory model for {name} (benchmarks/bench_lora_memory.py counts LLaSA-8B)"]
        from bench_lora_memory import llasa8b_budget

        plans = {gpu: llasa8b_budget(gpu_gb=gpu, engine_fraction=fraction)[1]["totals"] for gpu in (48.0, 80.0)}
        what = f"{name} LoRA on 1 GPU, vLLM at {fraction:g} of the card (benchmarks/bench_lora_memory.py"
    else:
        strategy = trainer.get("strategy") or {}
        world = ranks(trainer)
        sharded = isinstance(strategy, dict) and str(strategy.get("class_path", "")).endswith("ModelParallelStrategy")
        offload = model.get("fsdp_offload") == "cpu"
        s = dataclasses.replace(LLASA[name], rows=int(model["micro_batch_size"]),
                                prompt=int(config["rollout"]["max_prompt_length"]),
                                completion=int(sampler["init_args"]["max_new_tokens"]))
        layer = layer_activation_bytes(s)
        plans = {gpu: budget(s, Layout(gpu_gb=gpu, engine_fraction=fraction, fsdp=world if sharded else 0,
                                       offload=offload), layer)["totals"] for gpu in (48.0, 80.0)}
        what = (f"{name}, {'FSDP2 over ' + str(world) + ' GPUs' if sharded else 'DDP'}{' with CPU offload' if offload else ''}, "
                f"micro-batch {s.rows} x ({s.prompt} + {s.completion}), vLLM at {fraction:g} of the card "
                "(benchmarks/bench_step_memory.py")
    lines = [f"{what}, per training GPU{'; the engine on GPUs of its own: see the config header' if elsewhere else ''}):"]
    for gpu, totals in plans.items():
        peaks = ", ".join(f"{phase} {totals[phase] / GB:.1f} GB" for phase in ("rollout", "update"))
        verdict = "fits" if max(totals["rollout"], totals["update"]) < gpu * GB else "DOES NOT FIT"
        lines.append(f"  on a {gpu:g} GB card: {peaks}: {verdict}")
    return lines


def start_server(reward: dict, out: Path) -> tuple[subprocess.Popen, str]:
    """`python -m lightning_grpo serve` on 127.0.0.1 with `reward`, as a RemoteReward config's header starts it."""
    import httpx

    from .reward.owner import _free_port

    config = out / "server_reward.yaml"
    config.write_text(yaml.safe_dump(reward))
    port = _free_port()
    log = open(out / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lightning_grpo", "serve", "--reward-config", str(config), "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"{url}/healthz", timeout=1.0, trust_env=False)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the rehearsal's scoring server did not start; its log: {out / 'server.log'}")


def launch(args: list[str], out: Path, name: str) -> tuple[int, float, list[str]]:
    """`python -m lightning_grpo <args>` as a user runs it; (exit status, seconds, warnings it printed)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    log = out / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "lightning_grpo", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env).returncode
    seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    if code:
        print(f"--- {name} failed (exit {code}); the end of {log}:\n" + "\n".join(text.splitlines()[-40:]))
    return code, seconds, warnings_in(text)


def warnings_in(text: str) -> list[str]:
    """The distinct warnings of a run's output: Python warnings (`file.py:N: [Category: ]message`) once per source
    line with their count (every rank prints its own), and logged `WARNING` lines."""
    found: dict[str, list] = {}  # source -> [message, count]
    lines = text.splitlines()
    for i, line in enumerate(lines):
        line = re.sub(r"^\[rank\d+\]:\s*", "", line)
        m = re.search(r"(\S+\.py:\d+): (?:(\w*Warning): ?)?(.*)$", line)
        if m and (m.group(2) or not line.lstrip().startswith("File ")):
            message = m.group(3).strip() or (lines[i + 1].strip() if i + 1 < len(lines) else "")
            source, message = m.group(1), f"{m.group(2) + ': ' if m.group(2) else ''}{message}"[:300]
        elif re.search(r"\bWARNING\b", line):
            source = message = line.strip()[:300]
        else:
            continue
        found.setdefault(Path(source).name if m else source, [message, 0])[1] += 1
    return [f"{message}{f' (x{count})' if count > 1 else ''}" for message, count in found.values()]


def rehearse(fit_args: list[str], out: Path, max_processes: int = 2) -> int:
    """Rehearse the run of `fit_args` (--config and overrides) in `out`; prints the report; the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    real = parsed_config(fit_args)
    config = copy.deepcopy(real)
    subs = Substitutions(config, out, max_processes)
    subs.apply()
    print(f"rehearsal of {' '.join(fit_args)} in {out}; substituted:")
    for note in subs.notes:
        print(f"  {note}")
    server = None
    ran: list[str] = []
    seen: list[str] = []
    failed = 0
    try:
        if subs.server_reward is not None:
            server, url = start_server(subs.server_reward, out)
            _replace(config, "{server}", url)
            ran.append(f"scoring server at {url} (log {out / 'server.log'})")
        path = out / "rehearsal.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        processes = config["trainer"]["devices"]
        runs = [("fit", ["fit", "--config", str(path)], f"fit: {STEPS} steps on {processes} process(es), validation at step {STEPS}")]
        if _checkpoints(config):
            runs.append(("resume", ["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 1)],
                         f"resume from the step-{STEPS} checkpoint (--ckpt_path last) for one more step"))
        for name, args, what in runs:
            code, seconds, warned = launch(args, out, name)
            ran.append(f"{what}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s (log {out / name}.log)")
            seen += [w for w in warned if w not in seen]
            if code:
                failed = code
                break
        if len(runs) == 1 and not failed:
            ran.append("resume: not rehearsed (the config writes no checkpoints)")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    print("ran:")
    for line in ran:
        print(f"  {line}")
    print("memory plan of the real config:")
    for line in memory_plan(real):
        print(f"  {line}")
    print(f"warnings ({len(seen)}):")
    for line in seen:
        print(f"  {line}")
    print("REHEARSAL FAILED" if failed else "rehearsal passed")
    return failed


def _checkpoints(config: dict) -> bool:
    callbacks = config["trainer"].get("callbacks") or []
    return any(str(c.get("class_path", "")).endswith(("StepCheckpoint", "ModelCheckpoint")) for c in callbacks)


def _replace(node: Any, old: str, new: str) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in list(items):
        if value == old:
            node[key] = new
        else:
            _replace(value, old, new)


def main(argv: list[str]) -> None:
    """`python -m lightning_grpo rehearse [--rehearse_dir DIR] [--max_processes N] --config X.yaml [fit overrides]`."""
    words, out, max_processes = list(argv), None, 2
    for flag in ("--rehearse_dir", "--max_processes"):
        if flag in words:
            i = words.index(flag)
            value = words[i + 1]
            del words[i:i + 2]
            out, max_processes = (Path(value), max_processes) if flag == "--rehearse_dir" else (out, int(value))
    if not any(w in ("-c", "--config") or w.startswith("--config=") for w in words):
        raise SystemExit("usage: python -m lightning_grpo rehearse [--rehearse_dir DIR] [--max_processes N] "
                         "--config X.yaml [fit overrides]")
    for i, word in enumerate(words):
        path = word.partition("=")[2] if word.startswith("--config=") else (words[i + 1] if word in ("-c", "--config") and i + 1 < len(words) else "")
        if path and is_preference_config(Path(path)):
            raise SystemExit(f"rehearse: {path} is a preference (DPO) round, run by `python -m lightning_grpo dpo fit`; "
                             "rehearse covers the GRPO configs. A DPO round on the CPU: `dpo fit --config "
                             f"{path} --data.train_pairs PAIRS.parquet --trainer.max_steps 2`")
    out = out or Path(tempfile.mkdtemp(prefix="rehearsal_"))
    sys.exit(rehearse(words, out.resolve(), max_processes))


def is_preference_config(path: Path) -> bool:
    """A config of `dpo fit` (model.objective: dpo), which the GRPO CLI does not parse."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # the CLI reports it
    return isinstance(config, dict) and (config.get("model") or {}).get("objective") == "dpo"
