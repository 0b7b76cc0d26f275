"""FSDP2 sharding of the policy and the frozen reference under Lightning's `ModelParallelStrategy`.

`shard_causal_lm` applies torch's `fully_shard` to an HF Llama causal LM in three kinds of unit:
- every decoder layer: gathered in forward, freed after it, gathered again in backward; under
  `--trainer.precision bf16-mixed` it computes in bf16 and reduce-scatters its gradient in fp32;
- the LM head when it is not tied to the embedding (LLaSA-8B), computing in fp32 whatever the precision:
  the log-prob head is fp32 by design (grpo.py), since the ratio, the KL and the importance weights are
  differences of log-probs;
- the root, the whole `LlamaForCausalLM`: the embedding, the final norm, and the head when it is tied to
  the embedding (LLaSA-1B/3B; then the root computes in fp32). FSDP keeps the root gathered from the
  start of a forward to the end of its backward.
Sharded parameters (the optimizer's master weights) stay fp32 in every unit.

The log-prob path (`logprob_forward`) runs the decoder and then a chunked function of the head's
weight (`grpo.token_logprobs(hidden, head.weight, ...)`), never the HF forward, so FSDP2's hooks,
which wrap `forward` only, would not fire: the embedding and the head would be shards. It therefore
runs as a forward method of the root unit, and the chunked function as a forward method of the head
unit (torch's `register_fsdp_forward_method`): the head is gathered once per call, whatever the number
of chunks, and its (V, H) gradient is reduce-scattered once after the backward of the call. A no-grad
pass (old and reference log-probs, importance weights, the vLLM check) frees the root and the head on
exit; after a backward FSDP frees them itself.

Loading (`configure`, from `GRPOPolicy.configure_model`): by default every rank has loaded the whole fp32
model in `__init__` and `fully_shard` keeps its shard. With `--model.load_on_rank0` the model is built on the
meta device, sharded, and filled by rank 0 alone (`load_from_rank0`); the reference copies the policy's shards.
Rank 0 first downloads a hub id's weights into the Hugging Face cache while the others wait under a timeout of hours
(`fetch_on_rank0`), so a cold cache is not read inside a broadcast that the process group's timeout would abort.

CPU offload (`--model.fsdp_offload cpu`): every unit of the policy and the reference gets FSDP2's own
`CPUOffloadPolicy`. The sharded parameters and gradients, hence AdamW's state, live in host RAM; FSDP copies a unit's
shards to the GPU before its all-gather and its reduce-scattered gradient back to the host, and the optimizer step
runs on the CPU. The shards are pinned on CUDA (asynchronous copies, overlapped with compute), and FSDP re-pins them
in host RAM after any `module.to(...)` or `to_empty(...)` (FSDPParam.reset_sharded_param): Lightning moving the
module to the GPU after `configure_model` costs one round trip of the shards at setup and leaves them on the host.
`GRPOPolicy.on_fit_start` then runs FSDP's lazy initialisation (`finish_lazy_init`), which would otherwise wait for the
first forward, so that a resume creates and loads AdamW's state beside shards already where training keeps them.
Gathering a shard for vLLM (`full_weight`) moves it to the mesh's device first, as torch's own state-dict gathering
does. On a CPU mesh (the tests) the copies are no-ops.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor

ROOT_METHOD = "lightning_grpo_forward"  # FSDP forward methods of the root and the untied head units
HEAD_METHOD = "lightning_grpo_call_with_weight"


def configure(module, load_full: Callable[[], torch.nn.Module], offload: str = "none",
              fetch: Callable[[], Any] | None = None) -> None:
    """GRPOPolicy.configure_model: under ModelParallelStrategy shard `module.policy` and `module.reference` (if any),
    with their shards in host RAM if `offload` is "cpu"; with `load_on_rank0` (the policy on the meta device) fill
    them from `load_full()`, which rank 0 alone calls, after rank 0 has run `fetch()` (the weights' download into the
    Hugging Face cache) while the others wait (`fetch_on_rank0`). A policy already sharded (fit, then validate) is
    left as it is; other strategies leave everything as it is (and refuse `offload`)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    on_meta = module.policy.device.type == "meta"
    if not isinstance(strategy, ModelParallelStrategy):
        name = type(strategy).__name__ if strategy else "none (load_from_checkpoint)"
        if offload != "none":
            raise ValueError(
                f"--model.fsdp_offload={offload} offloads FSDP2's shards to host RAM, but the strategy is {name}, which "
                "does not shard: set --trainer.strategy ModelParallelStrategy (configs/llasa8b_fsdp_offload.yaml) or "
                "--model.fsdp_offload none"
            )
        if on_meta:
            raise ValueError(
                "--model.load_on_rank0 builds the model without weights for ModelParallelStrategy to fill, but the "
                f"strategy is {name}: set --trainer.strategy ModelParallelStrategy or --model.load_on_rank0 false"
            )
        return
    if is_sharded(module.policy):
        return
    mesh = data_parallel_mesh(strategy)
    if on_meta and fetch is not None:
        fetch_on_rank0(fetch)
    param_dtype = param_dtype_for(trainer.precision)
    offload_policy = offload_policy_for(offload, strategy.root_device)
    for model in (module.policy, module.reference):
        if model is not None:
            shard_causal_lm(model, mesh, param_dtype, offload_policy)
    if on_meta:
        load_from_rank0(module.policy, load_full, strategy.root_device)
        if module.reference is not None:  # the same pretrained weights, copied shard by shard
            module.reference.to_empty(device=strategy.root_device)
            copy_shards(module.policy, module.reference)


def data_parallel_mesh(strategy) -> Any:
    """The 1-D mesh to shard over: Lightning's `data_parallel` dimension, which must span every rank.

    ModelParallelStrategy's defaults (`tensor_parallel_size: auto`) make the ranks of a node one tensor-parallel
    group; with FSDP2 only, "auto" means data parallel over every rank, so that layout is re-meshed here (before
    the data loaders read the mesh for their samplers). Tensor-parallel sizes of another layout are refused."""
    mesh = strategy.device_mesh
    tp = mesh["tensor_parallel"].size()
    if tp > 1 and tp == strategy.num_processes and mesh["data_parallel"].size() == strategy.num_nodes:
        from lightning.fabric.strategies.model_parallel import _setup_device_mesh
        from lightning.pytorch.utilities import rank_zero_info

        strategy._data_parallel_size, strategy._tensor_parallel_size = strategy.world_size, 1
        mesh = strategy._device_mesh = _setup_device_mesh(strategy.world_size, 1, strategy.world_size, strategy.root_device)
        strategy.lightning_module._device_mesh = mesh
        rank_zero_info(f"ModelParallelStrategy's tensor_parallel_size auto: FSDP2 data parallel over all {strategy.world_size} ranks")
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"ModelParallelStrategy with tensor_parallel_size={mesh['tensor_parallel'].size()}: lightning_grpo shards "
            "with FSDP2 only (no tensor parallelism), and the data would repeat over the tensor-parallel ranks. Set "
            f"--trainer.strategy.data_parallel_size={mesh.size()} --trainer.strategy.tensor_parallel_size=1 "
            "(the configs/llasa*_fsdp.yaml layouts)"
        )
    return mesh["data_parallel"]


def param_dtype_for(precision: str) -> torch.dtype | None:
    """The decoder layers' compute dtype for a Lightning precision flag (None: the fp32 weights themselves)."""
    if precision == "bf16-mixed":
        return torch.bfloat16
    if precision in ("32-true", "32"):
        return None
    raise ValueError(
        f"--trainer.precision={precision} with ModelParallelStrategy: use bf16-mixed (bf16 compute, fp32 weights, "
        "fp32 gradient reduction) or 32-true. 16-mixed needs a gradient scaler that works on sharded gradients, and "
        "-true precisions train low-precision weights (refused, see --model.dtype)"
    )


def offload_policy_for(offload: str, device: torch.device) -> OffloadPolicy:
    """FSDP2's offload policy for `--model.fsdp_offload` on a mesh of `device`s. Host memory is pinned only on CUDA:
    pinning needs an accelerator, and on a CPU mesh there is nothing to copy. A CUDA run must also be able to run
    collectives on CPU tensors: clipping the global norm of the gradients, which then live in host RAM, reduces
    their partial norms where they are."""
    if offload == "none":
        return OffloadPolicy()
    if offload != "cpu":
        raise ValueError(f"--model.fsdp_offload={offload!r} must be none or cpu")
    if device.type != "cpu":
        backends = torch.distributed.get_backend_config()  # e.g. "cuda:nccl", or "cuda:nccl,cpu:gloo"
        if "cpu:" not in backends:
            raise ValueError(
                f"--model.fsdp_offload=cpu keeps the gradients in host RAM, and clipping their global norm runs a "
                f"collective on CPU tensors, which this process group ({backends}) cannot: set "
                f"--trainer.strategy.init_args.process_group_backend cuda:nccl,cpu:gloo (as in "
                "configs/llasa8b_fsdp_offload.yaml; torchtitan does the same for CPU offload)"
            )
    return CPUOffloadPolicy(pin_memory=device.type == "cuda")


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def finish_lazy_init(model: torch.nn.Module) -> None:
    """Run FSDP2's lazy initialisation of a sharded model now rather than at its first forward (a no-op if it has run,
    or for a model that is not sharded). It makes `model` the root, and with CPU offload it (re)places every shard in
    (pinned) host RAM and checks that it is there. Lightning restores a checkpoint's AdamW state after `on_fit_start`
    and before any forward: torch's `get_optimizer_state_dict` creates the state with a zero step where the parameters
    are, so the restore must see them where training keeps them, or 8B's state (~34 GB a rank) would land on the GPU
    and the fused CPU step would mix devices."""
    if isinstance(model, FSDPModule):
        model._get_fsdp_state()._lazy_init()  # torch has no public call; idempotent (returns once the root is set)


def _head_and_tied(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    head = model.get_output_embeddings()
    return head, head.weight is model.get_input_embeddings().weight


def _call_with_weight(self, fn: Callable, hidden: torch.Tensor, *args, **kwargs):
    return _not_a_view(fn(hidden, self.weight, *args, **kwargs))


def _call_as_forward(self, body: Callable, *args, **kwargs):
    return _not_a_view(body(self, *args, **kwargs))


def _not_a_view(out):
    """FSDP hangs its pre-backward hook on a unit's outputs, which an in-place op on a view would drop: (B, T)
    log-probs are copied (cheap) rather than returned as views of their flat buffer."""
    return out.clone() if isinstance(out, torch.Tensor) and out._base is not None and out.requires_grad else out


def _add_forward_method(module: torch.nn.Module, name: str, method: Callable) -> None:
    setattr(module, name, types.MethodType(method, module))
    register_fsdp_forward_method(module, name)


def shard_causal_lm(model: torch.nn.Module, mesh, param_dtype: torch.dtype | None,
                    offload_policy: OffloadPolicy | None = None) -> None:
    """`fully_shard` the units of an HF causal LM in place (module docstring), every unit with the same
    `offload_policy` (default: none). Parameters may be on the meta device (materialise them afterwards with
    `to_empty`)."""
    offload = {"offload_policy": offload_policy or OffloadPolicy()}
    head, tied = _head_and_tied(model)
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no decoder `layers` to shard; ModelParallelStrategy supports "
                        "Llama-style HF causal LMs (LLaSA)")
    layer_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # The head's units compute in the weights' own dtype (fp32 for the policy) and cast their floating inputs to it:
    # HF generate, outside autocast, hands the head bf16 states from the bf16 layers.
    own_mp = MixedPrecisionPolicy(param_dtype=head.weight.dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=layer_mp, reshard_after_forward=True, **offload)
    if not tied:
        # kept gathered between the forward and the backward of a call: one gather per micro-batch, and the
        # head's backward comes first in the backward pass, when the forward's peak has not been freed yet
        fully_shard(head, mesh=mesh, mp_policy=own_mp, reshard_after_forward=False, **offload)
        _add_forward_method(head, HEAD_METHOD, _call_with_weight)
    fully_shard(model, mesh=mesh, mp_policy=own_mp if tied else layer_mp, **offload)
    _add_forward_method(model, ROOT_METHOD, _call_as_forward)


def logprob_forward(model: torch.nn.Module, fn: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None, start: int, *args, **kwargs):
    """fn(hidden[:, start - 1 : -1], W, *args, **kwargs): the decoder's last hidden states that predict tokens
    start.. of `input_ids` (B, L), and W the full (V, H) weight of the LM head, for a plain or a sharded model.

    Sharded, the call is one forward of the root unit (the embedding, norm and a tied head gathered once) and fn
    one forward of the head unit (gathered once, its gradient reduce-scattered once); without grad both are freed
    on return."""
    method = getattr(model, ROOT_METHOD, None)
    inputs = (fn, input_ids, attention_mask, position_ids, start, *args)
    if method is not None:  # the root unit's forward method: _call_as_forward(model, _decode_and_score, ...)
        out = method(_decode_and_score, *inputs, **kwargs)
    else:
        out = _decode_and_score(model, *inputs, **kwargs)
    if not torch.is_grad_enabled():
        reshard(model)
    return out


def _decode_and_score(model, fn, input_ids, attention_mask, position_ids, start, *args, **kwargs):
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, L, H)
    states = hidden[:, start - 1 : -1]  # (B, L - start, H): the states that predict tokens start..
    head, _ = _head_and_tied(model)
    method = getattr(head, HEAD_METHOD, None)
    return method(fn, states, *args, **kwargs) if method is not None else fn(states, head.weight, *args, **kwargs)


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered unit of a sharded model (a no-op for other models)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def copy_shards(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst's parameters and buffers := src's, shard by shard (both sharded alike, e.g. the reference from the
    policy): no communication, no full tensor; casts to dst's dtype."""
    pairs = list(zip(src.parameters(), dst.parameters())) + list(zip(src.buffers(), dst.buffers()))
    with torch.no_grad():
        for s, d in pairs:
            if s.shape != d.shape:
                raise ValueError(f"copy_shards: shapes differ ({tuple(s.shape)} vs {tuple(d.shape)})")
            local = d.to_local() if isinstance(d, DTensor) else d
            local.copy_(s.to_local() if isinstance(s, DTensor) else s)


FETCH_TIMEOUT_S = 6 * 3600.0  # LLaSA-8B is 16 GB in bf16 safetensors: hours on a slow link, never 30 minutes


def fetch_on_rank0(fetch: Callable[[], Any], timeout_s: float = FETCH_TIMEOUT_S) -> None:
    """Rank 0 runs `fetch()` (downloads the weights `load_from_rank0` will read) while every other rank waits in a
    gloo group of its own whose timeout is `timeout_s`, not the process group's (30 minutes by default, after which
    NCCL's watchdog would kill the ranks waiting in `load_from_rank0`'s first broadcast while a cold cache downloads
    LLaSA-8B). A download that fails stops every rank with rank 0's error. Every rank must call it (it creates the
    group); without a process group it just runs `fetch()`."""
    from datetime import timedelta

    from .distributed import raise_on_every_rank

    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        fetch()
        return
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    error = None
    if dist.get_rank() == 0:
        try:
            fetch()
        except Exception as e:  # every rank stops with it, rather than waiting in the broadcast
            error = e
    try:
        raise_on_every_rank(error, "fetching the model's weights", group=group)  # the waiting ranks' barrier
    finally:
        dist.destroy_process_group(group)


def load_from_rank0(model: torch.nn.Module, load_full: Callable[[], torch.nn.Module], device: torch.device) -> None:
    """Materialise a sharded model built on the meta device with the weights of `load_full()`, which only rank 0
    calls: it broadcasts one tensor at a time and every rank keeps its own shard, so no other rank ever holds the
    whole model. Buffers that checkpoints do not hold (rotary frequencies) are broadcast from rank 0's model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    dist = torch.distributed
    model.to_empty(device=device)
    full = load_full() if dist.get_rank() == 0 else None
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    src_buffers = dict(full.named_buffers()) if full is not None else {}
    del state, full
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if dist.get_rank() == 0:
                buf.copy_(src_buffers[name])
            dist.broadcast(buf, src=0)


def full_weight(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) parameter, on the mesh's device, cast to `dtype` before the
    gather (half the bytes moved and held for a bf16 engine). A collective for a DTensor: every rank of its mesh must
    call it. An offloaded shard (host RAM, CUDA mesh) is cast on the host, then copied to the GPU: NCCL gathers
    device tensors, and the engine wants its weights there."""
    if isinstance(tensor, DTensor):
        local = tensor if dtype is None else tensor.to(dtype)
        mesh_device = tensor.device_mesh.device_type
        if local.device.type != mesh_device:
            local = local.to(mesh_device)  # the current device of this rank (Lightning sets it)
        return local.full_tensor()
    return tensor
