"""Run by test_fsdp.py: 2-process CPU (gloo) fits under Lightning's ModelParallelStrategy (FSDP2), several per
launch (each phase is its own trainer.fit in the same two processes), writing what each rank saw to OUT/<phase>.

    python tests/fsdp_worker.py OUT [--tied_dir DIR] [--accelerator gpu --devices N] PHASE [PHASE ...]

Phases:
  step      one GRPO step on a scripted rollout (scripted_sampler), untied builtin tiny model, beta 0;
            counts the all-gathers and reduce-scatters of every FSDP unit during training_step
  step_ref  the same with a KL reference (beta 0.1), gradient checkpointing and the tied model of --tied_dir;
            saves a sharded checkpoint (OUT/step_ref/ckpt/last.ckpt)
  sync      one step with VLLMSampler (bf16 engine, top_p 0.9) and a fake engine, under bf16-mixed, with importance
            weights: what each rank's engine received, the sync check
  full / first / rest   the resume test: 4 steps; 2 steps with a checkpoint per step; resumed to 4 steps
  <phase>_offload   step, step_ref or sync with --model.fsdp_offload cpu (FSDP2's CPUOffloadPolicy)
  full_offload / rest_offload   step_ref_offload run to 2 steps; resumed from step_ref_offload's checkpoint to 2
Every phase writes rank{r}.json, and rank 0 the policy's whole weights (weights.pt).
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_fixtures import ScriptedSampler, scripted_policy_kwargs  # noqa: E402

from lightning_grpo.checkpointing import StepCheckpoint  # noqa: E402
from lightning_grpo.data import PromptDataModule  # noqa: E402
from lightning_grpo.policy import GRPOPolicy  # noqa: E402
from lightning_grpo.reward.rule import RuleReward  # noqa: E402
from lightning_grpo.rollout import GRPORollout  # noqa: E402
from lightning_grpo.sampling import HFSampler  # noqa: E402
from lightning_grpo.vllm_engine import RawCompletion, hf_weights  # noqa: E402
from lightning_grpo.vllm_sampler import VLLMSampler, policy_logprobs  # noqa: E402

COMMS: dict[str, int] = {}  # "<model>/<unit>/<all_gather|reduce_scatter>" -> count, during training_step


def _counting(base, key):
    class Counting(base):
        def __call__(self, *args, **kwargs):
            COMMS[key] = COMMS.get(key, 0) + 1
            return super().__call__(*args, **kwargs)

    return Counting()


def count_comms(model: torch.nn.Module, label: str) -> None:
    """Route every FSDP unit's all-gather and reduce-scatter of `model` through a counter (FSDP2's public hooks)."""
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule):
            unit = "head" if name == "lm_head" else "root" if name == "" else "layers"
            m.set_custom_all_gather(_counting(DefaultAllGather, f"{label}/{unit}/all_gather"))
            m.set_custom_reduce_scatter(_counting(DefaultReduceScatter, f"{label}/{unit}/reduce_scatter"))


RESTORE_SAW: dict = {}  # where the policy's shards were when a resume created AdamW's state to load into
RUNNING: list[GRPOPolicy] = []  # the policy of the current fit


def _spy_on_optimizer_state_init() -> None:
    """Record what torch's `_init_optim_state` sees when it creates AdamW's state (with a zero step, where the
    parameters are) for Lightning's restore (`get_optimizer_state_dict`); later calls find the state and return."""
    import torch.distributed.checkpoint.state_dict as dcp_state

    init = dcp_state._init_optim_state

    def spy(optim):
        if not optim.state and RUNNING:
            policy = RUNNING[-1].policy
            RESTORE_SAW.update(root_initialised=policy._get_fsdp_state()._is_root is True,
                               devices=sorted({str(p.to_local().device) for p in policy.parameters()}),
                               pinned=all(p.to_local().is_pinned() or p.to_local().numel() == 0
                                          for p in policy.parameters()))  # an empty shard has no storage to pin
        init(optim)

    dcp_state._init_optim_state = spy


_spy_on_optimizer_state_init()


class CountedPolicy(GRPOPolicy):
    def setup(self, stage: str) -> None:
        super().setup(stage)
        RUNNING.append(self)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        count_comms(self.policy, "policy")
        if self.reference is not None:
            count_comms(self.reference, "reference")
        self.step_comms: list[dict[str, int]] = []

    def training_step(self, batch, batch_idx):
        COMMS.clear()
        out = super().training_step(batch, batch_idx)
        self.step_comms.append(dict(COMMS))
        return out


class FakeEngine:
    """vLLM's seam on this rank: a copy of the model that only the sync fills; completions of speech ids."""

    def __init__(self, cfg) -> None:
        from lightning_grpo.tiny import build_tiny_llasa

        self.model, _ = build_tiny_llasa(seed=7)  # other weights than the policy's until synced
        self.device = cfg.device
        self.loaded: dict[str, torch.Tensor] = {}
        self.received_on: set[str] = set()  # the devices of the tensors the sync handed over
        self.most_alive = 0  # the most tensors handed over by the sync alive at once, once the engine has copied them

    def generate(self, prompts, request):
        out = []
        for i, _ in enumerate(prompts):
            group = []
            for j in range(request.n):
                ids = [270 + (i + j) % 7, 280 + j, 290 + i][: 1 + j % 3] + [request.stop_token_id]
                group.append(RawCompletion(ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop"))
            out.append(group)
        return out

    def prompt_logprobs(self, ids, start):
        return policy_logprobs(self.model, ids, start)

    def load_weights(self, weights):
        handed = []  # weak references: alive only while the sync itself still holds a tensor it handed over
        for name, tensor in weights:  # one at a time, as vLLM's in-place reload consumes them
            handed.append(weakref.ref(tensor))
            self.received_on.add(str(tensor.device))
            self.most_alive = max(self.most_alive, sum(r() is not None for r in handed))
            self.loaded[name] = tensor.detach().cpu().clone()
            del tensor  # copied: only the sync could keep it alive now
        self.model.load_state_dict(self.loaded)

    def reset_prefix_cache(self):
        pass

    def sleep(self, level):
        pass

    def wake_up(self, tags):
        pass

    def info(self):
        return {"device": self.device, "model_runner": "fake"}  # where the sampler checks the engine landed


class UnevenRandomness(L.Callback):
    """Rank r draws r + 1 extra random numbers per step (ranks whose completions stop at different lengths)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.rand(trainer.global_rank + 1)


TOKEN_MEANS = ("train/entropy", "train/neg_logp", "train/clip_fraction", "train/ratio_mean", "train/kl")


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.steps = out, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer = optimizer  # its state exists from the first step on

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = batch["rollout"]
        m = trainer.callback_metrics
        self.steps.append({
            "step": trainer.global_step,
            "texts": batch["text"],
            "completions": [list(map(int, ids)) for ids in r.completion_ids],
            "loss": float(m["train/loss"]),
            "kl": float(m["train/kl"]) if "train/kl" in m else None,
            "grad_norm": float(m["train/grad_norm"]),
            "is_weight_mean": float(m["train/is_weight_mean"]) if "train/is_weight_mean" in m else None,
            "token_means": {k: float(m[k]) for k in TOKEN_MEANS if k in m},
            "tokens": float(r.completion_mask.sum()),
            "sampler": {k: float(v) for k, v in r.sampler_metrics.items()},
        })

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        policy = pl_module.policy
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rank = trainer.global_rank
        record = {
            "steps": self.steps, "world": trainer.world_size,
            "comms": getattr(pl_module, "step_comms", None),
            "sharded": sorted({f"{type(p).__name__}:{p.dtype}" for p in policy.parameters()}),
            "sync_names": [name for name, _ in hf_weights(policy)],  # what a sync gathers, in order (collectives)
            "mp": {name: str(m._get_fsdp_state()._mp_policy.param_dtype) for name, m in policy.named_modules()
                   if isinstance(m, FSDPModule)},
            "offload": {label: offload_policies(model) for label, model in
                        (("policy", policy), ("reference", pl_module.reference)) if model is not None},
            "local_devices": sorted({str(p.to_local().device) for p in policy.parameters()}),
            "reference_local_devices": sorted({str(p.to_local().device) for p in pl_module.reference.parameters()})
                                       if pl_module.reference is not None else None,
            "pinned": any(p.to_local().is_pinned() for p in policy.parameters()),
            "buffer_devices": sorted({str(b.device) for b in policy.buffers()}),
            "optimizer_devices": sorted({str(v.device) for s in self.optimizer.state.values() for v in s.values()
                                         if torch.is_tensor(v) and v.dim() > 0}),
            "fused": self.optimizer.param_groups[0]["fused"],
            "restore_saw": dict(RESTORE_SAW),
        }
        sampler = getattr(trainer.callbacks[0], "sampler", None)
        if isinstance(sampler, VLLMSampler):
            engine = sampler.engine
            torch.save(engine.loaded, self.out / f"engine{rank}.pt")
            record["engine_most_alive"] = engine.most_alive
            record["engine_received_on"] = sorted(engine.received_on)
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            torch.save(full, self.out / "weights.pt")


def offload_policies(model: torch.nn.Module) -> list[str]:
    """The offload policy of every FSDP unit of `model`, as `CPUOffloadPolicy(pin_memory=False)`."""
    return sorted({repr(m._get_fsdp_state()._fsdp_param_group.offload_policy) for m in model.modules()
                   if isinstance(m, FSDPModule)})


def fit(out: Path, phase: str, tied_dir: str | None, accelerator: str = "cpu", devices: int = 2) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    RESTORE_SAW.clear()
    offload = phase.endswith("_offload")
    phase = phase.removesuffix("_offload")
    ckpt_dir = out / "ckpt"
    # FSDP2's CPU offload on GPUs clips the host-resident gradients' norm with a collective on CPU tensors
    backend = "cuda:nccl,cpu:gloo" if offload and accelerator == "gpu" else None
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1, process_group_backend=backend)
    policy_kw = dict(learning_rate=1e-2, micro_batch_size=3, fsdp_offload="cpu" if offload else "none")
    data_kw = dict(prompts_per_step=2, val_data=None)
    callbacks: list[L.Callback] = []
    resume, precision = False, "32-true"
    if phase in ("step", "step_ref") or offload and phase in ("full", "rest"):
        sampler = ScriptedSampler()
        policy_kw.update(scripted_policy_kwargs(beta=0.0 if phase == "step" else 0.1))
        max_steps, group = (1 if phase.startswith("step") else 2), 4
        if phase != "step":  # step_ref, and the offloaded resume test's runs of it
            policy_kw.update(model_name_or_path=tied_dir, gradient_checkpointing=True, load_on_rank0=True)
            if phase == "rest":  # on from step_ref_offload's checkpoint of step 1 (its own go to rest_offload/ckpt)
                resume = str(out.parent / "step_ref_offload" / "ckpt" / "last.ckpt")
            callbacks.append(StepCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1))
    elif phase == "sync":
        sampler = VLLMSampler(temperature=1.0, top_p=0.9, max_new_tokens=4, dtype="bfloat16", verify_every=1,
                              engine_factory=FakeEngine)
        policy_kw.update(importance_correction=True)  # top_p < 1: the no-grad sampler_logprobs pass, sharded
        max_steps, group, precision = 1, 2, "bf16-mixed"
    else:  # full / first / rest: real sampling with generate, per-rank RNG streams, a data epoch of 3 steps
        sampler = HFSampler(max_new_tokens=8)
        data_kw.update(prompts_per_step=4, max_train_samples=12)
        callbacks.append(UnevenRandomness())
        max_steps, group = (2 if phase == "first" else 4), 4
        if phase in ("first", "rest"):
            ckpt_dir = out.parent / "resume_ckpt"
            callbacks.append(StepCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1))
        resume = phase == "rest"
    rollout = GRPORollout(sampler, RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=group)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=any(isinstance(c, StepCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, precision=precision,
        callbacks=[rollout, Record(out), *callbacks],
    )
    ckpt_path = resume if isinstance(resume, str) else "last" if resume else None
    trainer.fit(CountedPolicy(**policy_kw), PromptDataModule(**data_kw), ckpt_path=ckpt_path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("phases", nargs="+", choices=["step", "step_ref", "sync", "full", "first", "rest", "step_offload",
                                                 "step_ref_offload", "sync_offload", "full_offload", "rest_offload"])
    p.add_argument("--tied_dir")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=2)
    args = p.parse_args()
    for phase in args.phases:
        fit(Path(args.out) / phase, phase, args.tied_dir, args.accelerator, args.devices)


if __name__ == "__main__":
    main()
