"""A vLLM logits processor that keeps only given token-id ranges (LLaSA: the speech tokens and the stop token).

Why not `SamplingParams.allowed_token_ids`: vLLM 0.32's V2 model runner, the default on CUDA with Triton
(`VllmConfig.use_v2_model_runner`), caps it at 1,024 ids (`v1/worker/gpu/sample/logit_bias.py`,
"Too many allowed token IDs"), and LLaSA needs 65,537. Here a request names its allowed set as a few
half-open ranges (`SamplingParams.extra_args[EXTRA_ARG] = ((128261, 128262), (128264, 193800))`), and one
cached (V,) boolean mask per distinct set sets every other logit to -inf, before temperature, top-k and
top-p, as `allowed_token_ids` would (V1: `non_argmax_invariant` processors run in
`Sampler.apply_logits_processors`, after the built-in allow-list; V2: custom processors run after bias,
penalties and bad words, before temperature and top-k/top-p).

One class implements both of vLLM's logits-processor interfaces, V1 (`vllm.v1.sample.logits_processor`,
constructed as `(vllm_config, device, is_pin_memory)`, told of the batch through `update_state`) and V2
(`vllm.v1.worker.gpu.sample.logits_processor`, constructed as `(vllm_config, req_states)`, told of each
request through `add_request`), so the engine does not have to predict which runner vLLM will pick. This module
imports vllm; only `vllm_engine.VLLMEngine` loads it, by name.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from .vllm_engine import ALLOWED_RANGES_ARG as EXTRA_ARG

Ranges = tuple[tuple[int, int], ...]


def ranges_of(params: Any) -> Ranges | None:
    """The allowed ranges a request's SamplingParams carry, or None; malformed ranges are a ValueError."""
    extra = getattr(params, "extra_args", None) or {}
    raw = extra.get(EXTRA_ARG)
    if raw is None:
        return None
    try:
        ranges = tuple((int(lo), int(hi)) for lo, hi in raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra_args[{EXTRA_ARG!r}] must be a sequence of (lo, hi) id pairs, got {raw!r}") from e
    if not ranges or any(lo < 0 or hi <= lo for lo, hi in ranges):
        raise ValueError(f"extra_args[{EXTRA_ARG!r}] must hold non-empty ranges 0 <= lo < hi, got {raw!r}")
    return ranges


class AllowedTokenRanges(V1LogitsProcessor, V2LogitsProcessor):
    """Masks every logit outside a request's allowed id ranges to -inf (V1 and V2 runners)."""

    def __init__(self, vllm_config, *args) -> None:  # V1: (device, is_pin_memory); V2: (req_states,)
        self.device = args[0] if len(args) == 2 else args[0].device
        self._by_slot: dict[int, Ranges] = {}  # V1: batch row; V2: persistent request slot
        self._masks: dict[tuple[Ranges, int], torch.Tensor] = {}  # (ranges, vocab width) -> (V,) bool, True = masked

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        ranges_of(sampling_params)

    # ---- V1 interface ------------------------------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        return False  # masking changes the argmax: it must also run for greedy requests

    def update_state(self, batch_update) -> None:
        process_dict_updates(self._by_slot, batch_update, lambda params, _, __: ranges_of(params))

    # ---- V2 interface ------------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        ranges = ranges_of(sampling_params)
        if ranges is None:
            self._by_slot.pop(req_idx, None)  # slots are recycled: drop the previous occupant's entry
            return False
        self._by_slot[req_idx] = ranges
        return True

    # ---- both ---------------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self._by_slot:
            return logits
        if ctx is None:  # V1: row i is the request at batch index i
            slots: Sequence[int] = range(logits.shape[0])
        else:  # V2: row i is batch position i (one logits row per request without speculative decoding)
            slots = ctx.idx_mapping_np.tolist()
            if len(slots) != logits.shape[0]:
                raise RuntimeError(
                    f"{type(self).__name__} got {logits.shape[0]} logits rows for {len(slots)} requests: "
                    "speculative decoding is not supported with the speech-token restriction"
                )
        rows_by_ranges: dict[Ranges, list[int]] = {}
        for row, slot in enumerate(slots):
            ranges = self._by_slot.get(slot)
            if ranges is not None:
                rows_by_ranges.setdefault(ranges, []).append(row)
        for ranges, rows in rows_by_ranges.items():
            mask = self._mask(ranges, logits.shape[1], logits.device)
            if len(rows) == logits.shape[0]:
                logits.masked_fill_(mask, float("-inf"))  # (R, V) with (V,) broadcast: no copy
            else:
                idx = torch.tensor(rows, device=logits.device)
                logits[idx] = logits[idx].masked_fill(mask, float("-inf"))
        return logits

    def _mask(self, ranges: Ranges, width: int, device: torch.device) -> torch.Tensor:
        key = (ranges, width)
        mask = self._masks.get(key)
        if mask is None or mask.device != device:
            mask = torch.ones(width, dtype=torch.bool, device=device)
            for lo, hi in ranges:
                if hi > width:
                    raise ValueError(f"allowed token range [{lo}, {hi}) exceeds the model's {width} logits")
                mask[lo:hi] = False
            self._masks[key] = mask
        return mask
