"""FSDP2 (Lightning's ModelParallelStrategy) on CPU with 2 gloo processes: the same step as one process, the head
gathered once per pass, weight sync from shards, sharded checkpoints that resume exactly and export to HF; and the
same with FSDP2's CPU offload (--model.fsdp_offload cpu)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from fsdp_fixtures import ScriptedSampler, save_tied_tiny, scripted_policy_kwargs
from lightning_grpo.data import PromptDataModule
from lightning_grpo.grpo import token_logprobs
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout

# fp32 everywhere; the sharded run sums the same terms in another order (reduce-scatter of per-rank sums): the
# gradient differs by float rounding. AdamW's update is about lr * sign(g) where |g| is near its eps, so a rounding
# difference in such a tiny gradient moves that weight by up to ~1e-5: measured 8.1e-6 at most, for 395 of 117k
# weights more than 1e-7, after two updates that moved every weight by 2e-2 (lr 1e-2).
WEIGHT_ATOL = 2e-5  # 0.1% of the step
WEIGHT_CLOSE, CLOSE_FRACTION = 1e-7, 0.99


def launch(out: Path, *args: str) -> None:
    """tests/fsdp_worker.py: 2 processes (Lightning launches the second), every requested phase in order."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fsdp_worker.py")), str(out), *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def ranks(out: Path, world: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path]:
    """One launch (about a minute on 2 cores): the compared steps without and with a reference, the weight sync,
    and the three runs of the resume test; then the steps and the sync with CPU offload, and its resume test."""
    out = tmp_path_factory.mktemp("fsdp")
    tied = save_tied_tiny(out / "tied")
    launch(out, "step", "step_ref", "sync", "full", "first", "rest", "step_offload", "step_ref_offload", "sync_offload",
           "full_offload", "rest_offload", "--tied_dir", str(tied))
    return out, tied


def one_process(beta: float, model: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The same step on one process: what it logged and the updated weights."""
    L.seed_everything(0)
    kw = scripted_policy_kwargs(beta) | ({"model_name_or_path": model, "gradient_checkpointing": True} if model else {})
    policy = GRPOPolicy(**kw)
    logged = {}

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[GRPORollout(ScriptedSampler(), RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=4),
                         Keep()],
              ).fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
    return logged, {k: v.detach().clone() for k, v in policy.policy.state_dict().items()}


@pytest.mark.parametrize("phase,beta", [("step", 0.0), ("step_ref", 0.1)])
def test_sharded_step_equals_one_process(sharded, phase, beta):
    """Two ranks with half the rollout each (one prompt, 4 completions) take the step one process takes on the whole
    rollout: same loss, KL and (clipped) gradient norm, same weights after two updates. step_ref adds the KL
    reference (sharded too), gradient checkpointing and a head tied to the embedding (LLaSA-1B/3B's layout)."""
    out, tied = sharded
    got = ranks(out / phase)
    logged, expected = one_process(beta, str(tied) if phase == "step_ref" else None)
    for r in got:
        assert r["world"] == 2 and r["sharded"] == ["DTensor:torch.float32"]
        step = r["steps"][0]
        assert step["loss"] == pytest.approx(logged["train/loss"], rel=1e-5)
        assert step["grad_norm"] == pytest.approx(logged["train/grad_norm"], rel=1e-5)
        if beta:
            assert step["kl"] > 0 and logged["train/kl"] > 0
        # The logged token means are over every token of the step on both ranks, as on one process, although the
        # ranks hold different numbers of tokens (a mean of the ranks' means would differ)
        assert set(step["token_means"]) == {"train/entropy", "train/neg_logp", "train/clip_fraction",
                                            "train/ratio_mean"} | ({"train/kl"} if beta else set())
        for key, value in step["token_means"].items():
            assert value == pytest.approx(logged[key], rel=1e-5, abs=1e-7), key
    assert got[0]["steps"][0]["tokens"] != got[1]["steps"][0]["tokens"]
    assert got[0]["steps"][0]["token_means"]["train/clip_fraction"] > 0  # the clip acted: the comparison means something
    assert got[0]["steps"][0]["texts"] != got[1]["steps"][0]["texts"]  # each rank had its own prompt
    weights = torch.load(out / phase / "weights.pt")
    initial = GRPOPolicy(**({"model_name_or_path": str(tied)} if beta else {})).policy.state_dict()
    assert set(weights) <= set(expected)
    moved = close = total = 0
    for k, v in weights.items():
        assert torch.allclose(v, expected[k], rtol=0, atol=WEIGHT_ATOL), (k, (v - expected[k]).abs().max())
        close += int(((v - expected[k]).abs() <= WEIGHT_CLOSE).sum())
        total += v.numel()
        moved += not torch.equal(v, initial[k])
    assert close / total > CLOSE_FRACTION
    assert moved == len(weights)  # the step trained every tensor, so the comparison means something


def test_mixed_precision_units(sharded):
    """The units: the root, the untied head, one per decoder layer. Under bf16-mixed (the sync phase) the layers and
    the root compute in bf16, the head in fp32 (the log-prob head is fp32 by design), and the sharded master weights
    stay fp32; under 32-true everything is fp32. A tied head is the root's embedding, and the root then stays fp32."""
    out, _ = sharded
    bf16 = ranks(out / "sync")[0]
    assert bf16["mp"] == {"": "torch.bfloat16", "lm_head": "torch.float32", "model.layers.0": "torch.bfloat16",
                          "model.layers.1": "torch.bfloat16"}
    assert bf16["sharded"] == ["DTensor:torch.float32"]
    assert ranks(out / "step")[0]["mp"] == {"": "None", "lm_head": "torch.float32", "model.layers.0": "None",
                                            "model.layers.1": "None"}
    assert ranks(out / "step_ref")[0]["mp"] == {"": "torch.float32", "model.layers.0": "None", "model.layers.1": "None"}


def test_head_gathered_once_per_pass_not_per_chunk(sharded):
    """The chunked log-prob head (4-token chunks: several per micro-batch) all-gathers the sharded head once per
    pass: one per no-grad micro-batch of old log-probs, one per training micro-batch; and reduce-scatters its
    gradient once per training micro-batch. 4 rows per rank in micro-batches of 3: 2 micro-batches, 2 updates."""
    out, _ = sharded
    for r in ranks(out / "step"):
        (comms,) = r["comms"]
        micro, iters = 2, 2
        assert comms["policy/head/all_gather"] == micro + micro * iters  # old log-probs, then each training pass
        assert comms["policy/head/reduce_scatter"] == micro * iters
        assert comms["policy/root/all_gather"] == micro + micro * iters
        assert comms["policy/root/reduce_scatter"] == micro * iters
        assert comms["policy/layers/reduce_scatter"] == 2 * micro * iters  # 2 layers, one per micro-batch each
    for r in ranks(out / "step_ref"):
        (comms,) = r["comms"]
        assert comms["reference/root/all_gather"] == 2  # the reference's tied head comes with its root, per micro-batch
        assert not any(k.startswith("reference/") and "reduce_scatter" in k for k in comms)  # frozen: no gradients


def test_sync_from_shards_equals_the_unsharded_model(sharded):
    """Each rank's engine receives the whole of every tensor, gathered one at a time (cast to the engine's bf16 before
    the gather), equal to the unsharded policy's weights; the sync check (the engine's log-probs against the sharded
    policy's) passes, and only one gathered tensor was ever alive on a rank at once. The step then weighs tokens by
    importance weights from the sharded policy's top-p log-probs (a no-grad pass)."""
    out, _ = sharded
    unsharded = GRPOPolicy().policy.state_dict()  # the sync happens before the first update
    for rank, r in enumerate(ranks(out / "sync")):
        loaded = torch.load(out / "sync" / f"engine{rank}.pt")
        assert sorted(loaded) == sorted(unsharded)
        for k, v in loaded.items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, unsharded[k].to(torch.bfloat16)), k
        step = r["steps"][0]["sampler"]
        assert step["sync/ok"] == 1.0 and step["sync/logprob_mean_abs_diff"] < 0.05
        assert r["engine_most_alive"] == 1
        assert 0 < r["steps"][0]["is_weight_mean"] <= 2.0  # the sharded no-grad pass under the sampler's top-p
    # a tied head is the embedding's Parameter: gathered once, as the embedding (vLLM ignores a tied lm_head.weight)
    untied, tied = ranks(out / "step")[0]["sync_names"], ranks(out / "step_ref")[0]["sync_names"]
    assert "lm_head.weight" in untied and "lm_head.weight" not in tied
    assert sorted(tied + ["lm_head.weight"]) == sorted(untied)


@pytest.mark.parametrize("phase", ["step_ref", "step_ref_offload"])
def test_export_of_a_sharded_checkpoint_loads_with_from_pretrained(sharded, tmp_path, phase):
    """`export` reads the sharded directory in one process and writes an HF directory whose model has the trained
    weights (the tied head included) and gives the trained policy's log-probs; also when the run offloaded its shards
    to host RAM (--model.fsdp_offload cpu is in the checkpoint's hyper-parameters)."""
    from transformers import AutoModelForCausalLM

    from lightning_grpo.evaluate import trained_steps
    from lightning_grpo.export import export

    out, _ = sharded
    ckpt = out / phase / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    target = export(str(ckpt), str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trained = torch.load(out / phase / "weights.pt")
    reference = GRPOPolicy(model_name_or_path=str(target)).policy
    reference.load_state_dict(trained)
    reference.eval()
    assert json.loads((target / "lightning_grpo_export.json").read_text())["global_step"] == 1
    assert trained_steps(str(ckpt)) == 1  # evaluate reads the step of a directory of shards too
    ids = torch.tensor([[3, 40, 270, 281, 300, 299, 275, 320, 281]])
    with torch.no_grad():
        got = token_logprobs(model.model(ids).last_hidden_state[:, 3:-1], model.lm_head.weight, ids[:, 4:])
        want = token_logprobs(reference.model(ids).last_hidden_state[:, 3:-1], reference.lm_head.weight, ids[:, 4:])
    assert torch.equal(got, want)


def test_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(sharded):
    """12 prompts, 4 per step over 2 ranks (3-step epochs), sampled with generate under FSDP2. Stopped after step 2
    and resumed from the sharded checkpoint directory to step 4: every rank sees the prompts and samples the
    completions of the uninterrupted run, across the epoch boundary, and the final weights are equal."""
    out, _ = sharded
    full, first, rest = (ranks(out / p) for p in ("full", "first", "rest"))
    assert (out / "resume_ckpt" / "epoch=0-step=2.ckpt" / "meta.pt").is_file()  # a directory of shards
    for rank in (0, 1):
        assert [s["step"] for s in rest[rank]["steps"]] == [3, 4]
        resumed = first[rank]["steps"] + rest[rank]["steps"]
        assert [s["texts"] for s in resumed] == [s["texts"] for s in full[rank]["steps"]]
        assert [s["completions"] for s in resumed] == [s["completions"] for s in full[rank]["steps"]]
    lengths = {len(c) for s in full[0]["steps"] + full[1]["steps"] for c in s["completions"]}
    assert len(lengths) > 1  # ranks stopped generating at different lengths: generate stayed in step (synced_gpus)
    a, b = torch.load(out / "full" / "weights.pt"), torch.load(out / "rest" / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_last_sharded_checkpoint_is_the_newest_complete_one(tmp_path):
    """`--ckpt_path last` among directories: one without meta.pt (a save cut short) is skipped, and a last.ckpt/
    rewritten in place (its directory time unchanged) counts from its meta.pt, so a run killed while rewriting it
    resumes from the complete step=N.ckpt/ written before."""
    import time

    from lightning_grpo.checkpointing import StepCheckpoint

    class T:  # what _find_last_checkpoints reads of the trainer
        default_root_dir = str(tmp_path)

    ckpts = tmp_path / "checkpoints"
    for name in ("last.ckpt", "step=2.ckpt", "step=3.ckpt"):
        (ckpts / name).mkdir(parents=True)
    (ckpts / "last.ckpt" / "meta.pt").write_bytes(b"step 2")
    time.sleep(0.05)
    (ckpts / "step=2.ckpt" / "meta.pt").write_bytes(b"step 2")
    callback = StepCheckpoint()
    assert callback._find_last_checkpoints(T()) == {str(ckpts / "step=2.ckpt")}  # step=3 has no meta.pt yet
    time.sleep(0.05)
    (ckpts / "last.ckpt" / "meta.pt").write_bytes(b"step 3")  # rewritten in place, complete
    assert callback._find_last_checkpoints(T()) == {str(ckpts / "last.ckpt")}


# -- CPU offload (--model.fsdp_offload cpu) ---------------------------------------------------------------------
# On CPU processes FSDP2's copies between host and device are no-ops, so an offloaded step computes what the sharded
# step computes; what differs is the optimizer: AdamW's fused CPU kernel (what an offloaded policy steps with on a GPU
# machine) instead of torch's single-tensor loop, the same update rounded otherwise. Measured: 1.9e-7 (no reference)
# and 2.5e-7 (reference, tied head) at most, after two updates that moved every weight by about 1e-2.
OFFLOAD_ATOL = 1e-6


@pytest.mark.parametrize("phase", ["step", "step_ref"])
def test_offloaded_step_equals_the_sharded_step(sharded, phase):
    """The same GRPO step (2 updates, micro-batches, clipping; step_ref: a KL reference, offloaded too, gradient
    checkpointing, rank-0 loading, a tied head) with and without CPU offload: same loss, KL and gradient norm, the same
    weights after two updates to OFFLOAD_ATOL."""
    out, _ = sharded
    plain, offloaded = ranks(out / phase), ranks(out / f"{phase}_offload")
    for a, b in zip(plain, offloaded):
        x, y = a["steps"][0], b["steps"][0]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
        assert (y["kl"] is None) == (x["kl"] is None) and (x["kl"] is None or y["kl"] == pytest.approx(x["kl"], rel=1e-5))
        assert a["fused"] is None and b["fused"] is True  # the CPU default vs the fused CPU kernel: the only difference
    a, b = torch.load(out / phase / "weights.pt"), torch.load(out / f"{phase}_offload" / "weights.pt")
    initial = GRPOPolicy(**({"model_name_or_path": str(sharded[1])} if phase == "step_ref" else {})).policy.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=OFFLOAD_ATOL), (k, (a[k] - b[k]).abs().max())
        assert not torch.equal(b[k], initial[k])  # every tensor trained


def test_offloaded_shards_gradients_and_adamw_state_live_in_host_memory(sharded):
    """Every FSDP unit of the policy, and of the reference, has CPUOffloadPolicy, unpinned without an accelerator; the
    local shards and AdamW's state are on the CPU and AdamW is the fused CPU kernel. Without offload the units keep
    FSDP2's no-offload policy. (On a CPU mesh host and device are one: the GPU test shows the placement that matters.)"""
    out, _ = sharded
    for r in ranks(out / "step_ref_offload"):
        assert r["offload"] == {"policy": ["CPUOffloadPolicy(pin_memory=False)"],
                                "reference": ["CPUOffloadPolicy(pin_memory=False)"]}
        assert r["local_devices"] == r["reference_local_devices"] == r["optimizer_devices"] == ["cpu"]
        assert r["pinned"] is False and r["fused"] is True and r["sharded"] == ["DTensor:torch.float32"]
    assert ranks(out / "step_ref")[0]["offload"] == {"policy": ["OffloadPolicy()"], "reference": ["OffloadPolicy()"]}


def test_sync_from_offloaded_shards_equals_the_unsharded_model(sharded):
    """vLLM's weights gathered from offloaded shards (bf16 engine, bf16-mixed policy) are the unsharded policy's, one
    tensor alive at a time, on the mesh's device; the sync check passes."""
    out, _ = sharded
    unsharded = GRPOPolicy().policy.state_dict()
    for rank, r in enumerate(ranks(out / "sync_offload")):
        loaded = torch.load(out / "sync_offload" / f"engine{rank}.pt")
        assert sorted(loaded) == sorted(unsharded)
        assert all(torch.equal(v, unsharded[k].to(torch.bfloat16)) for k, v in loaded.items())
        assert r["steps"][0]["sampler"]["sync/ok"] == 1.0 and r["engine_most_alive"] == 1
        assert r["engine_received_on"] == ["cpu"] and r["offload"]["policy"] == ["CPUOffloadPolicy(pin_memory=False)"]


def test_resume_from_an_offloaded_sharded_checkpoint_equals_the_uninterrupted_run(sharded):
    """step_ref_offload saved a directory of shards after step 1 (weights, and AdamW's host-resident state); resumed
    from it to step 2, the weights are bit-identical to a 2-step run's, with the same prompts, loss and gradient norm
    (AdamW state lost or misplaced in the resume would change the second update)."""
    out, _ = sharded
    assert (out / "step_ref_offload" / "ckpt" / "last.ckpt" / "meta.pt").is_file()
    for full, rest in zip(ranks(out / "full_offload"), ranks(out / "rest_offload")):
        assert [s["step"] for s in rest["steps"]] == [2] and [s["step"] for s in full["steps"]] == [1, 2]
        assert rest["steps"][0]["texts"] == full["steps"][1]["texts"]
        assert rest["steps"][0]["loss"] == full["steps"][1]["loss"] and rest["steps"][0]["grad_norm"] == full["steps"][1]["grad_norm"]
        assert rest["optimizer_devices"] == ["cpu"] and rest["fused"] is True
    a, b = torch.load(out / "full_offload" / "weights.pt"), torch.load(out / "rest_offload" / "weights.pt")
    first = torch.load(out / "step_ref_offload" / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], first[k]) for k in a)  # step 2 trained every tensor


def test_resume_restores_adamw_after_fsdp_placed_the_offloaded_shards(sharded):
    """Lightning restores AdamW's state (torch creates it where the parameters are, then loads into it) before any
    forward: FSDP2's lazy initialisation, which places offloaded shards in host RAM, has already run then
    (GRPOPolicy.on_fit_start), so the state is created beside shards where training keeps them. On a CPU mesh host and
    device are one; test_offloaded_step_and_sync_on_gpus checks the devices on CUDA."""
    out, _ = sharded
    for r in ranks(out / "rest_offload"):
        assert r["restore_saw"] == {"root_initialised": True, "devices": ["cpu"], "pinned": False}
    assert all(r["restore_saw"] == {} for r in ranks(out / "step_ref_offload"))  # no resume, no restore


def test_offload_refused_without_fsdp2_and_with_lora():
    """--model.fsdp_offload offloads FSDP2's shards: under another strategy (one CPU device here) configure_model stops
    naming the flag and the fix; with LoRA (no FSDP2 there) the constructor stops."""
    from lightning_grpo.lora import LoRAConfig

    policy = GRPOPolicy(fsdp_offload="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[GRPORollout(ScriptedSampler(), RuleReward(), group_size=2)])
    with pytest.raises(ValueError, match=r"--model.fsdp_offload=cpu .* SingleDeviceStrategy.*--trainer.strategy "
                                         r"ModelParallelStrategy .* or --model.fsdp_offload none"):
        trainer.fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
    with pytest.raises(ValueError, match=r"--model.fsdp_offload=cpu .* --model.lora .* drop --model.fsdp_offload"):
        GRPOPolicy(lora=LoRAConfig(rank=4), fsdp_offload="cpu")


def test_offload_policy_on_cuda_pins_and_needs_a_cpu_backend(monkeypatch):
    """On a CUDA mesh the offload policy pins host memory and needs a process group that runs collectives on CPU
    tensors (the host-resident gradients' norm): NCCL alone is refused naming --trainer.strategy's
    process_group_backend; on a CPU mesh nothing is pinned and gloo is the backend anyway."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from lightning_grpo.sharding import offload_policy_for

    monkeypatch.setattr(torch.distributed, "get_backend_config", lambda: "cuda:nccl")
    with pytest.raises(ValueError, match=r"process group \(cuda:nccl\) .*process_group_backend cuda:nccl,cpu:gloo"):
        offload_policy_for("cpu", torch.device("cuda", 0))
    monkeypatch.setattr(torch.distributed, "get_backend_config", lambda: "cuda:nccl,cpu:gloo")
    assert offload_policy_for("cpu", torch.device("cuda", 0)) == CPUOffloadPolicy(pin_memory=True)
    assert offload_policy_for("cpu", torch.device("cpu")) == CPUOffloadPolicy(pin_memory=False)
    assert type(offload_policy_for("none", torch.device("cuda", 0))) is OffloadPolicy


FSDP_CONFIGS = ["llasa1b_original.yaml", "llasa3b_fsdp.yaml", "llasa8b_fsdp.yaml", "llasa8b_fsdp_2nodes.yaml",
                "llasa8b_fsdp_offload.yaml"]


@pytest.mark.parametrize("name", FSDP_CONFIGS)
def test_fsdp_configs_shard_over_every_training_gpu(name):
    """Each FSDP2 layout shards over all its ranks (no tensor parallelism, which sharding.py refuses), and its prompts
    per step (and per validation batch) divide over them."""
    from test_configs import ROOT, parse

    cfg = parse(ROOT / "configs" / name)
    t = cfg.trainer
    world = t.devices * (t.num_nodes or 1)
    assert t.strategy.class_path == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert (t.strategy.init_args.data_parallel_size, t.strategy.init_args.tensor_parallel_size) == (world, 1)
    assert t.precision == "bf16-mixed" and cfg.model.dtype == "float32" and cfg.model.gradient_checkpointing
    assert cfg.data.prompts_per_step % world == 0 and cfg.data.val_prompts_per_step % world == 0


def test_original_layout_moved_to_fsdp2_at_the_original_engine_share():
    """llasa1b_original: the original's FSDP actor over 2 GPUs with vLLM at 0.6 (DDP at 0.6 does not fit 48 GB)."""
    from test_configs import ROOT, parse

    cfg = parse(ROOT / "configs" / "llasa1b_original.yaml")
    assert cfg.rollout.sampler.init_args.gpu_memory_utilization == 0.6 and cfg.trainer.devices == 2
    assert cfg.trainer.strategy.class_path.endswith("ModelParallelStrategy")
    reward = cfg.rollout.reward  # one owner process for both ranks, its Whisper on the third GPU
    assert reward.class_path == "lightning_grpo.reward.owner.SharedReward"
    assert reward.init_args.reward.init_args.device == "cuda:2"  # outside the two training ranks


def test_two_node_layout():
    """2 nodes x 4 training GPUs: 8 ranks, one prompt each; the reward is each node's own scoring server (localhost),
    so the 4 ranks of a node share it and nothing crosses nodes but the collectives."""
    from test_configs import ROOT, parse

    cfg = parse(ROOT / "configs" / "llasa8b_fsdp_2nodes.yaml")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)
    assert cfg.data.prompts_per_step // 8 == 1 and cfg.model.load_on_rank0
    reward = cfg.rollout.reward
    assert reward.class_path == "lightning_grpo.reward.client.RemoteReward"
    assert reward.init_args.url.startswith(("http://127.0.0.1:", "http://localhost:"))


def test_offload_layout_two_gpus_and_a_reward_gpu():
    """llasa8b_fsdp_offload: LLaSA-8B over 2 GPUs with CPU offload, a process group with gloo for the host-resident
    gradients, larger micro-batches (fewer host round trips), vLLM at 0.6, one Whisper on the third GPU."""
    from test_configs import ROOT, parse

    cfg = parse(ROOT / "configs" / "llasa8b_fsdp_offload.yaml")
    assert cfg.model.model_name_or_path == "HKUSTAudio/Llasa-8B" and cfg.model.fsdp_offload == "cpu"
    assert cfg.trainer.devices == 2 and cfg.model.load_on_rank0 and cfg.model.micro_batch_size == 16
    assert "cpu:gloo" in cfg.trainer.strategy.init_args.process_group_backend
    assert (cfg.data.prompts_per_step * cfg.rollout.group_size // 2) % cfg.model.micro_batch_size == 0  # 4 per update
    assert cfg.rollout.sampler.init_args.gpu_memory_utilization == 0.6
    assert cfg.rollout.reward.init_args.reward.init_args.device == "cuda:2"  # outside the two training ranks


@pytest.mark.gpu
def test_sharded_step_and_sync_on_gpus(tmp_path):
    """On every visible GPU (NCCL, bf16-mixed, fused AdamW on the shards): a step with a tied, checkpointed reference
    and rank-0 loading, then a step with a bf16 engine's sync from shards and its check."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    world = torch.cuda.device_count()
    tied = save_tied_tiny(tmp_path / "tied")
    launch(tmp_path, "step_ref", "sync", "--tied_dir", str(tied), "--accelerator", "gpu", "--devices", str(world))
    for r in ranks(tmp_path / "step_ref", world):
        assert r["sharded"] == ["DTensor:torch.float32"] and math.isfinite(r["steps"][0]["loss"])
    for r in ranks(tmp_path / "sync", world):
        assert r["steps"][0]["sampler"]["sync/ok"] == 1.0 and r["engine_most_alive"] == 1
        assert r["mp"]["lm_head"] == "torch.float32" and r["mp"]["model.layers.0"] == "torch.bfloat16"


@pytest.mark.gpu
def test_offloaded_step_and_sync_on_gpus(tmp_path):
    """On every visible GPU with CPU offload (NCCL + gloo): the shards (pinned) and AdamW's state stay in host RAM
    after Lightning moved the module to the GPU, the buffers are on the GPU, AdamW is the fused CPU kernel, clipping
    works on the host-resident gradients; the vLLM sync hands the engine tensors on the GPU, and its check passes;
    a resume from the offloaded checkpoint restores AdamW's state in host RAM and equals the uninterrupted run."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    world = torch.cuda.device_count()
    tied = save_tied_tiny(tmp_path / "tied")
    launch(tmp_path, "step_ref_offload", "sync_offload", "full_offload", "rest_offload", "--tied_dir", str(tied),
           "--accelerator", "gpu", "--devices", str(world))
    for r in ranks(tmp_path / "step_ref_offload", world):
        assert r["local_devices"] == r["reference_local_devices"] == r["optimizer_devices"] == ["cpu"] and r["pinned"]
        assert all(d.startswith("cuda") for d in r["buffer_devices"]) and r["fused"] is True
        assert r["offload"]["policy"] == ["CPUOffloadPolicy(pin_memory=True)"]
        assert math.isfinite(r["steps"][0]["loss"]) and r["steps"][0]["grad_norm"] > 0
    for r in ranks(tmp_path / "sync_offload", world):
        assert r["steps"][0]["sampler"]["sync/ok"] == 1.0 and r["engine_most_alive"] == 1
        assert all(d.startswith("cuda") for d in r["engine_received_on"])
    for r in ranks(tmp_path / "rest_offload", world):  # the resume created AdamW's state beside pinned host shards
        assert r["restore_saw"] == {"root_initialised": True, "devices": ["cpu"], "pinned": True}
        assert r["optimizer_devices"] == ["cpu"] and math.isfinite(r["steps"][0]["loss"])
    # CUDA's attention backward may sum in another order from run to run: equal to rounding, not bit for bit
    a, b = torch.load(tmp_path / "full_offload" / "weights.pt"), torch.load(tmp_path / "rest_offload" / "weights.pt")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=OFFLOAD_ATOL) for k in a)


def test_load_on_rank0_fetches_a_hub_id_before_loading(monkeypatch, tmp_path):
    """What rank 0 downloads before load_from_rank0 (sharding.fetch_on_rank0): a hub id's weights, configs and
    tokenizer; nothing for a local directory or the builtin model."""
    import huggingface_hub

    from lightning_grpo.policy import fetch_weights

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)))
    fetch_weights("HKUSTAudio/Llasa-8B")
    fetch_weights(str(tmp_path))
    fetch_weights("builtin:tiny-llasa")
    assert calls == [("HKUSTAudio/Llasa-8B", {"allow_patterns": ["*.json", "*.safetensors", "*.model", "*.txt"]})]
