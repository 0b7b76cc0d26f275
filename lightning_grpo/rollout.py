"""The rollout callback: before every training (and validation) step, sample and score.

For each batch of prompt texts it builds LLaSA prompts, asks the sampler for `group_size`
completions per prompt from the *current* policy weights, parses the speech span, scores it with
the reward, applies the truncation policy and attaches a `Rollout` (lightning_grpo/batch.py) to the
batch as `batch["rollout"]`. The policy's `training_step` only does the GRPO update.

It is a Lightning callback configured as its own top-level group, `rollout:` in YAML and
`--rollout.group_size 16`, `--rollout.sampler.temperature 0.9`, `--rollout.reward.beta_c 2` on the
command line (lightning_grpo/cli.py adds it to the trainer's callbacks).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .batch import Rollout
from .data import REFERENCE_COLUMNS
from .distributed import gather_from_ranks
from .llasa import InvalidTokenPolicy, LlasaVocab, encode_prompt, parse_completion
from .reward.base import Reward, SpeechSample
from .sampling import Sampler, check_sampler

TruncationPolicy = Literal["penalize", "mask", "keep"]


def _rng_state() -> dict[str, Any]:
    """This process's torch / Python / numpy (and CUDA) RNG states, as tensors and plain values only:
    checkpoints load with torch.load(weights_only=True)."""
    import random

    import numpy as np

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "numpy_rng": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    keys, pos, has_gauss, gauss = state["numpy_rng"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda_rng" in state:
        _set_cuda_rng_states(state["cuda_rng"])


def _set_cuda_rng_states(saved: list[torch.Tensor]) -> None:
    """One generator state per visible GPU, for as many GPUs as both the checkpoint and this process
    have (torch's set_rng_state_all indexes past the last visible GPU when the checkpoint saw more)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, gpu_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(gpu_state, i)
    if len(saved) != visible:
        rank_zero_warn(
            f"the checkpoint holds the CUDA RNG states of {len(saved)} GPU(s), this process sees {visible}: "
            f"restored {min(len(saved), visible)}; sampling on the others does not continue the "
            "uninterrupted run's random stream"
        )


class GRPORollout(L.Callback):
    def __init__(
        self,
        sampler: Sampler,
        reward: Reward,
        group_size: int = 4,
        val_group_size: int = 1,
        max_prompt_length: int = 512,
        truncation: TruncationPolicy = "penalize",
        truncation_reward: float = 0.0,
        restrict_to_speech: bool = True,
        on_invalid: InvalidTokenPolicy = "flag",
    ) -> None:
        """
        Args:
            sampler: who samples (lightning_grpo.sampling.HFSampler, lightning_grpo.vllm_sampler.VLLMSampler);
                anything with the `Sampler` Protocol's attributes and methods.
            reward: who scores (rule reward, Whisper reward module, the HTTP client, or several of them in a
                lightning_grpo.reward.composite.CompositeReward). Each sample carries its prompt's index as
                `group` and, for voice-cloning rows, the reference (prompt_text, prompt_codes, prompt_wav).
            group_size: G, completions per prompt (the original: 16). Samples per step (one
                rollout) = data.prompts_per_step x G.
            val_group_size: completions per prompt in validation.
            max_prompt_length: prompts with more tokens are an error naming the text (the original: 512).
            truncation: what to do with completions that hit max_new_tokens without the stop token.
                `penalize` (default) sets their reward to `truncation_reward` so runaway audio loses
                to audio that ends; `mask` keeps their reward in the group statistics but drops their
                tokens from the loss (TRL's mask_truncated_completions); `keep` scores them as is.
            truncation_reward: the reward of a truncated completion under `penalize`.
            restrict_to_speech: sample only speech tokens and the stop token (the trainer then
                scores log-probs over the same rows, about a third of LLaSA's 193,800-row head). Off:
                the full vocabulary, and non-speech ids become per-sample `invalid_token` reasons.
            on_invalid: `flag` scores a completion with non-speech ids inside its speech span through
                the reward's `invalid_token` reason; `error` stops training.
        """
        super().__init__()
        if group_size < 2:
            raise ValueError(f"--group_size={group_size}: GRPO compares samples of one prompt, use >= 2")
        if val_group_size < 1:
            raise ValueError(f"--val_group_size={val_group_size} must be >= 1")
        if truncation not in ("penalize", "mask", "keep"):
            raise ValueError(f"--truncation={truncation!r} is not one of penalize, mask, keep")
        if truncation == "penalize" and getattr(reward, "aggregation", None) == "normalize_then_sum":
            raise ValueError(
                "--rollout.truncation penalize sets a truncated completion's reward to truncation_reward, but the "
                "reward's aggregation normalize_then_sum centres rewards on each group's mean, where that is no "
                "penalty; use --rollout.truncation mask (drop them from the loss) or keep, or aggregation sum"
            )
        check_sampler(sampler)
        self.sampler = sampler
        self.reward = reward
        self.group_size = group_size
        self.val_group_size = val_group_size
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.truncation_reward = truncation_reward
        self.restrict_to_speech = restrict_to_speech
        self.on_invalid = on_invalid
        self.vocab: LlasaVocab | None = None
        self.last_rollout: Rollout | None = None
        self._sampler_ready = False
        self.train_rollouts = 0  # training rollouts made; in the checkpoint
        self._pending_rng: dict[str, Any] | None = None

    # -- checkpoint state: a resumed run samples what the uninterrupted run would have ------
    def state_dict(self) -> dict[str, Any]:
        """The rollout count and the RNG states sampling draws from (HF generate uses the global
        torch/CUDA generators), so resuming from a checkpoint continues the same random stream.
        Under DDP (Lightning saves rank 0's state only) every rank's RNG state is gathered into
        `rank_rng`, since ranks that generate different lengths consume their streams differently."""
        own = _rng_state()
        state = {"train_rollouts": self.train_rollouts, **own}
        gathered = gather_from_ranks(own)  # Lightning calls state_dict on every rank
        if len(gathered) > 1:
            state["rank_rng"] = gathered
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_rollouts = state_dict.get("train_rollouts", 0)
        # applied at the first training batch: creating the data iterator in between draws from the RNG
        self._pending_rng = state_dict if "torch_rng" in state_dict else None

    def _restore_rng(self, trainer: L.Trainer) -> None:
        state, self._pending_rng = self._pending_rng, None
        per_rank = state.get("rank_rng")
        if per_rank and len(per_rank) == trainer.world_size:
            state = per_rank[trainer.global_rank]
        elif per_rank or trainer.world_size > 1:
            rank_zero_warn(
                f"the checkpoint holds RNG states for {len(per_rank or [None])} process(es), this run has "
                f"{trainer.world_size}: every rank continues from rank 0's stream, so sampling is not the "
                "uninterrupted run's"
            )
        _set_rng_state(state)

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.vocab = LlasaVocab.from_tokenizer(pl_module.tokenizer)

    def _ensure_sampler(self, pl_module: L.LightningModule) -> None:
        if not self._sampler_ready:
            self.sampler.setup(pl_module)
            self._sampler_ready = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._ensure_sampler(pl_module)
        if self._pending_rng is not None:
            self._restore_rng(trainer)
        # the sampler's step: training rollouts made before this one (see Sampler.sample)
        batch["rollout"] = self.make_rollout(pl_module, batch, self.group_size, self.train_rollouts)
        self.train_rollouts += 1

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._ensure_sampler(pl_module)
        # validation samples from a fork of the RNG: the training stream (and so a resumed run) does
        # not depend on whether or how often validation ran
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # the same step as the next training rollout: both sample from the same weights
            batch["rollout"] = self.make_rollout(pl_module, batch, self.val_group_size, self.train_rollouts)

    # -- the work --------------------------------------------------------------------------
    def allowed_token_ids(self) -> list[int] | None:
        v = self.vocab
        if not self.restrict_to_speech:
            return None
        return [v.speech_gen_end_id, *range(v.speech_start_id, v.speech_end_id)]

    @torch.no_grad()
    def make_rollout(self, pl_module: L.LightningModule, batch: dict, group_size: int, step: int) -> Rollout:
        v = self.vocab
        texts, languages = batch["text"], batch.get("language") or [None] * len(batch["text"])
        # voice-cloning references (data.py): None for rows without; the reference codes go into the prompt
        ref_texts, ref_codes, ref_wavs = (batch.get(k) or [None] * len(texts) for k in REFERENCE_COLUMNS)
        prompts = [
            encode_prompt(pl_module.tokenizer, t, self.max_prompt_length, prompt_text=pt, prompt_codes=pc)
            for t, pt, pc in zip(texts, ref_texts, ref_codes)
        ]
        allowed = self.allowed_token_ids()
        kwargs = {"allowed_token_ids": allowed} if allowed else {}
        comps = self.sampler.sample(pl_module.policy, prompts, group_size, v.speech_gen_end_id, step, **kwargs)
        n = len(prompts) * group_size
        if len(comps.ids) != n:
            raise RuntimeError(f"sampler returned {len(comps.ids)} completions for {len(prompts)} prompts x {group_size}")

        samples = []
        for i, ids in enumerate(comps.ids):
            parsed = parse_completion(ids, v, self.on_invalid)
            p = i // group_size
            samples.append(
                SpeechSample(
                    text=texts[p],  # the target text only: the reference's transcript is prompt_text
                    codes=parsed.codes,  # the continuation only: the reference's codes are in the prompt
                    stopped=parsed.stopped,
                    truncated=comps.truncated[i],
                    num_invalid=parsed.num_invalid,
                    language=languages[p],
                    prompt_text=ref_texts[p],
                    prompt_codes=ref_codes[p],
                    prompt_wav=ref_wavs[p],
                    group=p,
                )
            )
        result = self.reward.score(samples)
        truncated = torch.tensor(comps.truncated, dtype=torch.bool)
        rewards = result.rewards.float().clone()
        if self.truncation == "penalize":
            rewards[truncated] = self.truncation_reward

        width = max(len(p) for p in prompts)
        clen = max(1, max(len(c) for c in comps.ids))
        input_ids = torch.full((n, width + clen), v.pad_id, dtype=torch.long)  # (B*G, P+C)
        attention_mask = torch.zeros_like(input_ids)
        completion_mask = torch.zeros(n, clen, dtype=torch.float32)  # (B*G, C)
        sampler_logprobs = torch.zeros(n, clen) if comps.logprobs is not None else None
        for i, ids in enumerate(comps.ids):
            p = prompts[i // group_size]
            input_ids[i, width - len(p) : width] = torch.tensor(p)
            input_ids[i, width : width + len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(p) : width + len(ids)] = 1
            completion_mask[i, : len(ids)] = 1.0
            if sampler_logprobs is not None:
                sampler_logprobs[i, : len(ids)] = torch.tensor(comps.logprobs[i])
        if self.truncation == "mask":
            completion_mask[truncated] = 0.0

        vocab_range, disallowed = None, ()
        if allowed:
            lo, hi = min(allowed), max(allowed) + 1
            vocab_range = (lo, hi)
            disallowed = tuple(sorted(set(range(lo, hi)) - set(allowed)))
        device = pl_module.device
        rollout = Rollout(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            completion_mask=completion_mask.to(device),
            prompt_width=width,
            rewards=rewards.to(device),
            truncated=truncated.to(device),
            group_size=group_size,
            temperature=float(self.sampler.temperature),
            max_new_tokens=int(self.sampler.max_new_tokens),
            texts=[s.text for s in samples],
            reward_result=result,
            sampler_logprobs=None if sampler_logprobs is None else sampler_logprobs.to(device),
            vocab_range=vocab_range,
            disallowed=disallowed,
            completion_ids=comps.ids,
            sampler_metrics=dict(getattr(self.sampler, "metrics", {}) or {}),
            top_p=float(self.sampler.top_p),
            top_k=int(self.sampler.top_k),
        )
        self.last_rollout = rollout
        return rollout
