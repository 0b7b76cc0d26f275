"""The rollout callback: before every training (and validation) step, sample and score.

For each batch of prompt texts it builds LLaSA prompts, asks the sampler for `group_size`
completions per prompt from the *current* policy weights, parses the speech span, scores it with
the reward, applies the truncation policy and attaches a `Rollout` (lightning_grpo/batch.py) to the
batch as `batch["rollout"]`. The policy's `training_step` only does the GRPO update.

It is a Lightning callback configured as its own top-level group, `rollout:` in YAML and
`--rollout.group_size 16`, `--rollout.sampler.temperature 0.9`, `--rollout.reward.beta_c 2` on the
command line (lightning_grpo/cli.py adds it to the trainer's callbacks).

Scoring overlaps generation (`overlap_reward`, on by default): the sampler streams finished pieces
(`sampling.CompletionChunk`), each is scored on a worker thread while the sampler goes on, and the
Rollout reaches `training_step` with its rewards pending; the policy computes old and reference log-probs
first and waits for them after (`scoring.py`). Off, every piece is scored as it comes, before the next is
generated; pieces and samples are the same either way. The callback also starts and stops a reward that
owns a process (`reward/owner.py`: one reward per node for every rank) and logs the step's timings
(`timing.py`) and what its sampling did (`train/frac_reward_zero_std`, `train/samples_generated`, ...).

One-step-off (`async_steps: 1`, async_rollout.py) hands each step the rollout generated while the step before it
trained, and launches the next one.

Dynamic sampling (`dynamic_sampling`, off by default; `dynamic_rollout`) waits for each round's rewards in the
callback, drops groups whose rewards are all equal and tops the step up with further rounds of prompts; its
decisions are dynamic_sampling.py's pure functions.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import timing
from .async_rollout import RolloutAhead
from .batch import Rollout, pad_right, pad_rows, select_groups
from .data import REFERENCE_COLUMNS, collate_prompts
from .distributed import gather_from_ranks
from .dynamic_sampling import TopUp, pick_groups, reduce_stats, topup_size, zero_spread
from .generator import GeneratorProcess
from .llasa import InvalidTokenPolicy, LlasaVocab, encode_prompt, parse_completion
from .reward.base import (Reward, RewardResult, SpeechSample, aggregation_of, close_reward, concurrent_calls,
                          start_reward)
from .reward.owner import check_reward_devices
from .reward.prosody import add_group_spreads
from .sampling import ChunkRows, Sampler, check_sampler, sample_stream
from .scoring import RewardScoring, stop_if_any_rank_failed

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


def _datamodule_method(trainer: L.Trainer, name: str, what: str, off: str):
    """The datamodule's method `name`, which `what` needs; an error naming the flag that turns it off."""
    method = getattr(trainer.datamodule, name, None)
    if not callable(method):
        raise ValueError(
            f"{what}, through the datamodule's {name}(); {type(trainer.datamodule).__name__} has none: use the `data:` "
            f"group (lightning_grpo.data.PromptDataModule), or {off}"
        )
    return method


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
        overlap_reward: bool = True,
        dynamic_sampling: bool = False,
        max_extra_rounds: int = 3,
        zero_std_tol: float = 1e-6,
        max_samples: int | None = None,
        async_steps: int = 0,
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
            overlap_reward: score finished pieces of the rollout while the sampler generates the rest, and
                let `training_step` compute old / reference log-probs before it waits for the rewards. The
                pieces are the sampler's (`HFSampler.prompts_per_chunk`; vLLM: the groups it finishes), the
                same with this on or off, so samples, rewards and updates are identical; off scores each
                piece before the next is generated. Hides reward time behind generation, most with a reward
                on another device or in its own process (`lightning_grpo.reward.owner.SharedReward`).
            dynamic_sampling: DAPO's dynamic sampling (Yu et al. 2025; lightning_grpo/dynamic_sampling.py). A group
                whose rewards all equal (std <= zero_std_tol) has zero advantage and teaches nothing; on, such
                groups are dropped and further prompts generated and scored, in up to `max_extra_rounds` extra
                rounds, until every rank holds its prompts_per_step / world_size informative groups. Each round
                draws the same number of prompts on every rank (the largest shortfall at the informative rate seen
                so far, at most a first round's), because every rank must take part in every generate call
                (FSDP2, tensor-parallel vLLM); a rank already full generates its round and discards it unscored.
                Top-up prompts are a draw from the training set seeded by the data seed and the step, leaving out
                the step's own prompts (PromptDataModule.topup_prompts), so resuming is exact. A step still short
                after the last round is filled with zero-spread groups (zero advantage: no policy gradient; every
                rank trains on the same number of rows). Costs: the trainer waits for each round's rewards before
                training (the overlap of scoring with the log-probs is lost), and extra rounds cost generation and
                reward time; `train/samples_generated` counts it. With vLLM and sync_every 1 each round copies the
                (unchanged) weights again (timing/weight_sync). Validation never samples dynamically.
            max_extra_rounds: at most this many extra generation rounds per step (dynamic_sampling; >= 0).
            zero_std_tol: a group whose reward std (unbiased, as the advantages use) is at most this has "zero
                spread": dropped by dynamic_sampling, and counted in `train/frac_reward_zero_std` (logged every
                step, on or off). The default absorbs float rounding of equal rewards.
            max_samples: stop training once this many completions have been generated (all ranks, every round,
                discarded ones included, counted across resumes: `train/samples_generated_total`), at the end of
                the step that reaches it; None: no budget. Compares runs at equal sample budgets, e.g. dynamic
                sampling against a baseline, with `--trainer.max_steps` set high enough.
            async_steps: how many updates the weights that generate a step's samples may lag the weights that train
                on them. 0: generate, then train (on-policy). 1: one-step-off (lightning_grpo/async_rollout.py): the
                next step's rollout is generated on a thread from a copy of the weights while this step trains, so
                generation and update overlap; every sample is one update stale (`rollout/staleness`), which
                `--model.importance_correction` weighs out when the sampler reports log-probs. Costs one more copy
                of the policy's weights, except with a sampler in its own process (lightning_grpo.generator.
                GeneratorProcess, sent the weights instead); needs the datamodule's train_batch() (PromptDataModule)
                to know the next batch; not with dynamic_sampling.
        """
        super().__init__()
        if group_size < 2:
            raise ValueError(f"--group_size={group_size}: GRPO compares samples of one prompt, use >= 2")
        if val_group_size < 1:
            raise ValueError(f"--val_group_size={val_group_size} must be >= 1")
        if truncation not in ("penalize", "mask", "keep"):
            raise ValueError(f"--truncation={truncation!r} is not one of penalize, mask, keep")
        if max_extra_rounds < 0:
            raise ValueError(f"--rollout.max_extra_rounds={max_extra_rounds} must be >= 0")
        if not zero_std_tol >= 0:
            raise ValueError(f"--rollout.zero_std_tol={zero_std_tol} must be >= 0 (0: only exactly equal rewards)")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"--rollout.max_samples={max_samples} must be >= 1, or null for no sample budget")
        if truncation == "penalize" and aggregation_of(reward) == "normalize_then_sum":
            raise ValueError(
                "--rollout.truncation penalize sets a truncated completion's reward to truncation_reward, but the "
                "reward's aggregation normalize_then_sum centres rewards on each group's mean, where that is no "
                "penalty; use --rollout.truncation mask (drop them from the loss) or keep, or aggregation sum"
            )
        if async_steps not in (0, 1):
            raise ValueError(f"--rollout.async_steps={async_steps} must be 0 (synchronous) or 1 (one-step-off)")
        if async_steps and dynamic_sampling:
            raise ValueError(
                "--rollout.async_steps 1 with --rollout.dynamic_sampling true: dynamic sampling's top-up rounds decide "
                "on the rewards inside the step; use one of them"
            )
        check_sampler(sampler)
        self.async_steps = async_steps
        push = sampler.send_weights if isinstance(sampler, GeneratorProcess) else None  # it keeps its own copy
        self._ahead = RolloutAhead(self._start_train_rollout, push) if async_steps else None
        self.sampler = sampler
        self.reward = reward
        self.group_size = group_size
        self.val_group_size = val_group_size
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.truncation_reward = truncation_reward
        self.restrict_to_speech = restrict_to_speech
        self.on_invalid = on_invalid
        self.overlap_reward = overlap_reward
        self.dynamic_sampling = dynamic_sampling
        self.max_extra_rounds = max_extra_rounds
        self.zero_std_tol = zero_std_tol
        self.max_samples = max_samples
        self.vocab: LlasaVocab | None = None
        self._executor: ThreadPoolExecutor | None = None  # overlapped scoring's worker threads
        self._step_start: float | None = None
        self.last_rollout: Rollout | None = None
        self._sampler_ready = False
        self.train_rollouts = 0  # training rollouts made; in the checkpoint
        self.samples_generated = 0  # completions generated for training, all ranks and rounds; in the checkpoint
        self.step_counts: dict[str, int] | None = None  # this rank's counts of the step under dynamic sampling (logged)
        self._pending_rng: dict[str, Any] | None = None

    # -- checkpoint state: a resumed run samples what the uninterrupted run would have ------
    def state_dict(self) -> dict[str, Any]:
        """The rollout count and the RNG states sampling draws from (HF generate uses the global
        torch/CUDA generators), so resuming from a checkpoint continues the same random stream.
        Under DDP (Lightning saves rank 0's state only) every rank's RNG state is gathered into
        `rank_rng`, since ranks that generate different lengths consume their streams differently."""
        in_flight = self._ahead.state_dict() if self._ahead is not None else None  # first: it waits for the generator
        own = _rng_state()
        state = {"train_rollouts": self.train_rollouts, "samples_generated": self.samples_generated, **own}
        gathered = gather_from_ranks(own)  # Lightning calls state_dict on every rank
        if len(gathered) > 1:
            state["rank_rng"] = gathered
        if in_flight is not None:
            state["in_flight"] = in_flight
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_rollouts = state_dict.get("train_rollouts", 0)
        self.samples_generated = state_dict.get("samples_generated", 0)
        if self._ahead is not None:
            self._ahead.load_state_dict(state_dict.get("in_flight"))
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
        check_rows = getattr(trainer.datamodule, "check_rows", None) if trainer is not None else None
        if callable(check_rows):  # every prompt fits max_prompt_length, checked before the first step
            check_rows(lambda row: self.encode_prompts(pl_module, collate_prompts([row])))
        if self.dynamic_sampling and stage == "fit" and trainer is not None:
            self._topup_source(trainer)  # fail before the first rollout
        if trainer is not None:
            check_reward_devices(self.reward, trainer)
        if self._ahead is not None and stage == "fit" and trainer is not None:
            self._next_batch_source(trainer)
        # a reward that owns a process or a connection starts it (reward/owner.py: every rank calls it); trainer is
        # None outside a Trainer (tests, scripts)
        start_reward(self.reward, trainer)
        if trainer is not None and trainer.world_size > 1 and isinstance(self.reward, torch.nn.Module):
            rank_zero_warn(
                f"each of the {trainer.world_size} ranks builds its own {type(self.reward).__name__}; wrap it in "
                "lightning_grpo.reward.owner.SharedReward to load one per node, shared by every rank "
                "(rollout.reward: {class_path: lightning_grpo.reward.owner.SharedReward, init_args: {reward: ...}})"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._shutdown()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._shutdown()  # Lightning skips teardown on an exception: the reward's owner process must stop anyway

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._ahead is not None:
            self._ahead.finish()  # validation samples from the RNG the generator thread holds while it runs

    def _shutdown(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
        if isinstance(self.sampler, GeneratorProcess):
            self.sampler.close()  # its process, like the reward's owner, ends with training
            self._sampler_ready = False  # a later fit or validate starts another
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        close_reward(self.reward)

    def _ensure_sampler(self, pl_module: L.LightningModule) -> None:
        if not self._sampler_ready:
            self.sampler.setup(pl_module)
            self._sampler_ready = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()
        timing.reset_peak_memory(pl_module.device)
        self._ensure_sampler(pl_module)
        if self._pending_rng is not None:
            self._restore_rng(trainer)
        # the sampler's step: training rollouts made before this one (see Sampler.sample); the rewards may
        # still be scoring when training_step starts (overlap_reward), except under dynamic sampling
        if self.dynamic_sampling:
            batch["rollout"], self.step_counts = self.dynamic_rollout(
                pl_module, batch, self.train_rollouts, self._topup_source(trainer))
        elif self._ahead is not None:
            batch["rollout"], self.step_counts = self._ahead.rollout_for(
                trainer, pl_module, batch, batch_idx, self.train_rollouts, self._next_batch_source(trainer)), None
        else:
            batch["rollout"], self.step_counts = self.start_rollout(pl_module, batch, self.group_size, self.train_rollouts), None
        # updates between the weights that drew these samples and the weights that train on them: 0 unless one-step-off
        batch["rollout"].sampler_metrics.setdefault("rollout/staleness", 0.0)
        self.train_rollouts += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        r: Rollout = batch["rollout"]
        r.wait_for_rewards()  # normally done by training_step
        device = pl_module.device
        r.timings["step"] = timing.elapsed(self._step_start, device) if self._step_start is not None else 0.0
        counts = self.step_counts
        if counts is None:  # one round, this step's whole sampling
            zero = zero_spread(r.rewards, r.group_size, self.zero_std_tol)
            counts = {"first_groups": len(zero), "first_zero_std": int(zero.sum()), "samples": len(r.completion_ids),
                      "tokens": sum(len(c) for c in r.completion_ids)}
        own = {"timings": r.timings, "samples": counts["samples"], "memory": timing.peak_memory(device),
               "tokens": counts["tokens"], "counts": counts}
        ranks = gather_from_ranks(own)  # a collective: every rank ends every step here
        stats = timing.reduce_step(ranks)
        stats.update(reduce_stats([x["counts"] for x in ranks], self.dynamic_sampling))
        self.samples_generated += int(stats["train/samples_generated"])
        stats["train/samples_generated_total"] = float(self.samples_generated)
        if self.max_samples is not None and self.samples_generated >= self.max_samples:
            trainer.should_stop = True  # the same on every rank: the counts were gathered
            rank_zero_info(f"stopping: {self.samples_generated} samples generated, --rollout.max_samples={self.max_samples}")
        # already reduced: every rank logs the same numbers; the step time also goes on the progress bar
        step = stats.pop("timing/step")
        pl_module.log_dict(stats, on_step=True, on_epoch=False, batch_size=len(r.completion_ids), rank_zero_only=False)
        pl_module.log("timing/step", step, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=len(r.completion_ids), rank_zero_only=False)

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

    def _scoring_executor(self) -> ThreadPoolExecutor | None:
        if not self.overlap_reward:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(concurrent_calls(self.reward), thread_name_prefix="reward-scoring")
        return self._executor

    def make_rollout(self, pl_module: L.LightningModule, batch: dict, group_size: int, step: int) -> Rollout:
        """Sample and score one rollout; returns it with its rewards (waited for)."""
        rollout = self.start_rollout(pl_module, batch, group_size, step)
        rollout.wait_for_rewards()
        return rollout

    def encode_prompts(self, pl_module: L.LightningModule, batch: dict) -> list[list[int]]:
        """The LLaSA prompt ids of a batch's rows (llasa.encode_prompt), references included."""
        texts = batch["text"]
        # voice-cloning references (data.py): None for rows without; the reference codes go into the prompt
        ref_texts, ref_codes = (batch.get(k) or [None] * len(texts) for k in REFERENCE_COLUMNS[:2])
        return [
            encode_prompt(pl_module.tokenizer, t, self.max_prompt_length, prompt_text=pt, prompt_codes=pc)
            for t, pt, pc in zip(texts, ref_texts, ref_codes)
        ]

    def _topup_source(self, trainer: L.Trainer) -> TopUp:
        return _datamodule_method(trainer, "topup_prompts", "--rollout.dynamic_sampling draws further prompts from the "
                                  "training data", "--rollout.dynamic_sampling false")

    def _next_batch_source(self, trainer: L.Trainer):
        return _datamodule_method(trainer, "train_batch", "--rollout.async_steps 1 generates the next step's prompts "
                                  "ahead", "--rollout.async_steps 0")

    def _start_train_rollout(self, pl_module: L.LightningModule, batch: dict, step: int, model: torch.nn.Module) -> Rollout:
        return self.start_rollout(pl_module, batch, self.group_size, step, model)

    @torch.no_grad()
    def dynamic_rollout(self, pl_module: L.LightningModule, batch: dict, step: int, topup: TopUp
                        ) -> tuple[Rollout, dict[str, int]]:
        """The batch's round, then extra rounds of `topup(count, step, start, exclude)` prompts while any rank is
        short of informative groups, at most `max_extra_rounds`; returns the Rollout of this rank's
        len(batch["text"]) groups, its rewards waited for, and this rank's counts for `reduce_stats`. Every rank
        must call it: the rounds are agreed with one all_gather each, and each round's scoring ends in a collective."""
        g, tol, target = self.group_size, self.zero_std_tol, len(batch["text"])
        rollout = self.make_rollout(pl_module, batch, g, step)  # a reward failing on any rank stops every rank here
        first_zero = zero_spread(rollout.rewards, g, tol)
        rounds, flags = [rollout], [(~first_zero).tolist()]  # the rounds this rank scored; informative per group
        samples, tokens = len(rollout.completion_ids), sum(len(c) for c in rollout.completion_ids)
        unscored: dict[str, float] = {}  # timings of rounds this rank generated only
        drawn, extra, exclude = 0, 0, set()
        while True:
            informative, scored = sum(map(sum, flags)), sum(map(len, flags))
            short = max(0, target - informative)
            ranks = gather_from_ranks({"short": short, "informative": informative, "scored": scored,
                                       "texts": list(batch["text"]) if extra == 0 else None})
            if extra == 0:  # top-ups leave out the step's prompts on every rank
                exclude = {t for r in ranks for t in r["texts"]}
            if extra == self.max_extra_rounds or not any(r["short"] for r in ranks):
                break
            count = topup_size([r["short"] for r in ranks], sum(r["informative"] for r in ranks),
                               sum(r["scored"] for r in ranks), cap=target)
            more = topup(count, step, drawn, exclude)
            drawn, extra = drawn + count, extra + 1
            if short:
                rollout = self.make_rollout(pl_module, more, g, step)
                rounds.append(rollout)
                flags.append((~zero_spread(rollout.rewards, g, tol)).tolist())
                samples += len(rollout.completion_ids)
                tokens += sum(len(c) for c in rollout.completion_ids)
            else:  # this rank is full: it generates with the others (FSDP2 / tensor-parallel vLLM), then discards
                seconds, n, t = self._generate_unscored(pl_module, more, g, step)
                for key, value in seconds.items():
                    unscored[key] = unscored.get(key, 0.0) + value
                samples, tokens = samples + n, tokens + t
        picks = pick_groups(flags, target)
        out = select_groups(rounds, picks, self.vocab.pad_id)
        for key, value in unscored.items():
            out.timings[key] = out.timings.get(key, 0.0) + value
        self.last_rollout = out
        counts = {"first_groups": target, "first_zero_std": int(first_zero.sum()), "samples": samples,
                  "tokens": tokens, "extra_rounds": extra, "prompts_drawn": drawn, "groups_generated": target + drawn,
                  "groups_trained": target, "informative_trained": sum(flags[k][b] for k, b in picks)}
        return out, counts

    def _generate_unscored(self, pl_module: L.LightningModule, batch: dict, group_size: int, step: int
                           ) -> tuple[dict[str, float], int, int]:
        """Generate a round this rank does not need: its timings, completions and tokens (nothing is scored)."""
        prompts, device = self.encode_prompts(pl_module, batch), pl_module.device
        start, samples, tokens = time.perf_counter(), 0, 0
        for chunk in sample_stream(self.sampler, pl_module.policy, prompts, group_size, self.vocab.speech_gen_end_id,
                                   step, self.allowed_token_ids()):
            samples += len(chunk.completions.ids)
            tokens += sum(len(c) for c in chunk.completions.ids)
        seconds = timing.sampling_timings(timing.elapsed(start, device), dict(getattr(self.sampler, "metrics", {}) or {}))
        stop_if_any_rank_failed(None)  # the collective the other ranks reach when they wait for this round's rewards
        return seconds, samples, tokens

    @torch.no_grad()
    def start_rollout(self, pl_module: L.LightningModule, batch: dict, group_size: int, step: int,
                      model: torch.nn.Module | None = None) -> Rollout:
        """Sample one rollout from `model` (default: the policy), scoring its pieces as the sampler finishes them;
        with `overlap_reward` the returned Rollout may still be scoring (reading its rewards waits)."""
        v = self.vocab
        texts, languages = batch["text"], batch.get("language") or [None] * len(batch["text"])
        ref_texts, ref_codes, ref_wavs = (batch.get(k) or [None] * len(texts) for k in REFERENCE_COLUMNS)
        prompts = self.encode_prompts(pl_module, batch)
        allowed = self.allowed_token_ids()
        n = len(prompts) * group_size
        placed = ChunkRows(len(prompts), group_size)
        device = pl_module.device

        def finalize(result: RewardResult) -> torch.Tensor:
            add_group_spreads(result.metrics, group_size)  # prosody/<stat>_group_std: rows are in group order here
            rewards = result.rewards.float().clone()
            if self.truncation == "penalize":
                rewards[torch.tensor(placed.truncated, dtype=torch.bool)] = self.truncation_reward
            return rewards.to(device)

        scoring = RewardScoring(self.reward, self._scoring_executor(), finalize)
        model = pl_module.policy if model is None else model
        stream = sample_stream(self.sampler, model, prompts, group_size, v.speech_gen_end_id, step, allowed)
        sampling_s = 0.0
        while True:
            start = time.perf_counter()
            chunk = next(stream, None)  # the sampler generates (and syncs weights) here
            sampling_s += timing.elapsed(start, device)
            if chunk is None:
                break
            rows, samples = placed.add(chunk), []
            for row in rows:
                prompt = row // group_size
                parsed = parse_completion(placed.ids[row], v, self.on_invalid)
                samples.append(SpeechSample(
                    text=texts[prompt], codes=parsed.codes, stopped=parsed.stopped, truncated=placed.truncated[row],
                    num_invalid=parsed.num_invalid, language=languages[prompt],
                    # voice cloning: text and codes are the target and the continuation only; the
                    # reference's transcript and codes are in the prompt
                    prompt_text=ref_texts[prompt], prompt_codes=ref_codes[prompt], prompt_wav=ref_wavs[prompt],
                    group=prompt,
                ))
            scoring.submit(rows, samples)  # inline, or on a worker while the sampler goes on
        comps = placed.completions()
        ids, row_logprobs = comps.ids, comps.logprobs

        sampler_metrics = dict(getattr(self.sampler, "metrics", {}) or {})
        timings = timing.sampling_timings(sampling_s, sampler_metrics)
        truncated = torch.tensor(comps.truncated, dtype=torch.bool)

        input_ids, attention_mask, width = pad_rows([prompts[i // group_size] for i in range(n)], ids, v.pad_id)  # (B*G, P+C)
        clen = input_ids.shape[1] - width
        completion_mask = pad_right([[1.0] * len(c) for c in ids], clen)  # (B*G, C)
        sampler_logprobs = pad_right(row_logprobs, clen) if row_logprobs is not None else None
        if self.truncation == "mask":
            completion_mask[truncated] = 0.0

        vocab_range, disallowed = None, ()
        if allowed:
            lo, hi = min(allowed), max(allowed) + 1
            vocab_range = (lo, hi)
            disallowed = tuple(sorted(set(range(lo, hi)) - set(allowed)))
        rollout = Rollout(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            completion_mask=completion_mask.to(device),
            prompt_width=width,
            truncated=truncated.to(device),
            group_size=group_size,
            temperature=float(self.sampler.temperature),
            max_new_tokens=int(self.sampler.max_new_tokens),
            texts=[texts[i // group_size] for i in range(n)],
            pending=scoring,
            sampler_logprobs=None if sampler_logprobs is None else sampler_logprobs.to(device),
            vocab_range=vocab_range,
            disallowed=disallowed,
            completion_ids=ids,  # type: ignore[arg-type]
            sampler_metrics=sampler_metrics,
            top_p=float(self.sampler.top_p),
            top_k=int(self.sampler.top_k),
            timings=timings,
        )
        if not self.overlap_reward:
            rollout.wait_for_rewards()  # every piece is already scored: this only collects them
        self.last_rollout = rollout
        return rollout
