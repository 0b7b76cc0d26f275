"""lightning_grpo versus TRL's GRPOTrainer: wall time per optimisation step and peak RSS, on CPU.

Both frameworks train the same tiny LLaSA-shaped policy (`lightning_grpo.tiny.build_tiny_llasa`, saved
once to a temporary directory and loaded from it by both), on the same embedded prompts rendered with
the LLaSA template, with HF `generate`, the same group size, completion budget, sampling, optimiser and
the same rule reward (TRL gets `RuleReward` wrapped as a reward function that parses the completion ids
with `lightning_grpo.llasa.parse_completion`). Settings are aligned as follows (printed with the table):

    loss              ours token-mean        = TRL loss_type="dapo" (both: sum over tokens / tokens in the step)
    clip              eps 0.2 / 0.2, ours dual_clip=None (TRL has no dual clip)
    KL                beta = 0 in both (no reference model is loaded by either)
    num_iterations    1 (old log-probs = detached current ones in both)
    advantages        scale_rewards="group" in both
    truncation        ours truncation="keep" = TRL mask_truncated_completions=False
    optimiser         AdamW lr 1e-5, wd 0, betas (0.9, 0.999), grad-norm clip 1.0, constant LR
    batching          B prompts x G samples = one generate call of N rows; micro-batches of M rows;
                      one optimiser step (TRL: per_device_train_batch_size=M, gradient_accumulation_steps=N/M)
    sampling          TRL cannot restrict sampling to speech tokens, so the like-for-like row runs ours
                      with restrict_to_speech=False; ours' default (True) is a second row.

Each framework runs in a fresh subprocess; step time is the median gap between consecutive
end-of-step callbacks after the warm-up steps (so it includes data, generation, reward, update and
the framework's own bookkeeping), both in wall-clock seconds and in CPU seconds of the process
(`time.process_time`; with one torch thread this is the work done, and unlike wall time it does not
grow when other jobs share the cores); peak memory is the process's peak RSS (VmHWM, benchmarks/common.py), reported absolute and
as the growth over the RSS just before training starts (imports and model load excluded).

    python benchmarks/bench_trl.py            # the table in BENCHMARKS.md
    python benchmarks/bench_trl.py --smoke    # smallest size, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import current_rss_mib, emit, machine_info, markdown_table, median_after_warmup, peak_rss_mib, run_worker  # noqa: E402

SIZES = {
    # prompts/step, group, completion tokens, micro-batch, speech tokens, hidden, layers, warm-up, measured steps
    "full": dict(prompts=4, group=8, max_new_tokens=64, micro_batch=16, speech_tokens=8192, hidden=64, layers=2, warmup=2, steps=5),
    "smoke": dict(prompts=2, group=2, max_new_tokens=8, micro_batch=2, speech_tokens=64, hidden=32, layers=1, warmup=1, steps=2),
}
SAMPLING = dict(temperature=0.8, top_p=0.9, top_k=0)
OPTIM = dict(learning_rate=1e-5, max_grad_norm=1.0)
REWARD = dict(codes_per_char=0.5, band=(0, 16))


def save_policy(path: Path, s: dict) -> None:
    from lightning_grpo.tiny import build_tiny_llasa

    model, tokenizer = build_tiny_llasa(num_speech_tokens=s["speech_tokens"], hidden_size=s["hidden"], num_layers=s["layers"])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# -- workers (each in its own process) ----------------------------------------------------------
PROFILE_ENV = "LGRPO_BENCH_PROFILE"


def profiled(fn) -> None:
    """Run fn, under cProfile when $LGRPO_BENCH_PROFILE names a stats file (for --profile)."""
    import os

    path = os.environ.get(PROFILE_ENV)
    if not path:
        fn()
        return
    import cProfile

    prof = cProfile.Profile()
    prof.runcall(fn)
    prof.dump_stats(path)


def worker_ours(model_dir: str, s: dict, restrict: bool) -> dict:
    import lightning as L
    import torch

    from lightning_grpo.data import PromptDataModule
    from lightning_grpo.policy import GRPOPolicy
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import HFSampler

    stamps: list[float] = []
    cpu_stamps: list[float] = []
    lengths: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            lengths.append(float(batch["rollout"].completion_lengths.mean()))

    L.seed_everything(0, verbose=False)
    policy = GRPOPolicy(
        model_name_or_path=model_dir, learning_rate=OPTIM["learning_rate"], max_grad_norm=OPTIM["max_grad_norm"],
        beta=0.0, dual_clip=None, loss_aggregation="token-mean", scale_rewards="group", num_iterations=1,
        micro_batch_size=s["micro_batch"],
    )
    rollout = GRPORollout(
        sampler=HFSampler(max_new_tokens=s["max_new_tokens"], **SAMPLING),
        reward=RuleReward(**REWARD), group_size=s["group"], truncation="keep", restrict_to_speech=restrict,
    )
    data = PromptDataModule(train_data="builtin:en", val_data=None, prompts_per_step=s["prompts"])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=s["warmup"] + s["steps"], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[rollout, StepClock()],
    )
    rss_before = current_rss_mib()
    profiled(lambda: trainer.fit(policy, datamodule=data))
    median, durations = median_after_warmup(stamps, s["warmup"])
    cpu_median, _ = median_after_warmup(cpu_stamps, s["warmup"])
    return dict(step_s=median, cpu_step_s=cpu_median, durations=durations, peak_rss_mib=peak_rss_mib(), rss_before_mib=rss_before,
                mean_completion_len=sum(lengths) / len(lengths), threads=torch.get_num_threads())


def worker_trl(model_dir: str, s: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_grpo.data import load_prompts
    from lightning_grpo.llasa import LlasaVocab, encode_prompt, parse_completion, prompt_messages
    from lightning_grpo.reward.base import SpeechSample
    from lightning_grpo.reward.rule import RuleReward

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = LlasaVocab.from_tokenizer(tokenizer)
    texts = [r["text"] for r in load_prompts("builtin:en", "train")]
    rendered = [
        tokenizer.apply_chat_template(prompt_messages(t), tokenize=False, continue_final_message=True, add_generation_prompt=False)
        for t in texts
    ]
    # TRL tokenizes plain-string prompts itself: prove it sees exactly the ids our rollout builds.
    for t, r in zip(texts[:4], rendered[:4]):
        if tokenizer(text=r)["input_ids"] != encode_prompt(tokenizer, t):
            raise RuntimeError(f"TRL's tokenisation of the prompt for {t!r} differs from lightning_grpo's")
    # TRL stops at tokenizer.eos_token (+ generation_config.eos_token_id); LLaSA stops at SPEECH_GENERATION_END.
    tokenizer.eos_token = "<|SPEECH_GENERATION_END|>"
    reward = RuleReward(**REWARD)
    lengths: list[float] = []

    def rule_reward(prompts, completions, completion_ids, text, **kwargs):
        samples = []
        for ids, t in zip(completion_ids, text):
            parsed = parse_completion(ids, vocab, "flag")
            truncated = not parsed.stopped and len(ids) >= s["max_new_tokens"]
            samples.append(SpeechSample(text=t, codes=parsed.codes, stopped=parsed.stopped, truncated=truncated,
                                        num_invalid=parsed.num_invalid))
        lengths.extend(len(ids) for ids in completion_ids)
        return reward.score(samples).rewards.tolist()

    stamps: list[float] = []
    cpu_stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

    n = s["prompts"] * s["group"]
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, seed=0, report_to="none", save_strategy="no", logging_steps=1,
            max_steps=s["warmup"] + s["steps"], per_device_train_batch_size=s["micro_batch"],
            gradient_accumulation_steps=n // s["micro_batch"], num_generations=s["group"],
            max_completion_length=s["max_new_tokens"], **SAMPLING, beta=0.0, num_iterations=1, epsilon=0.2,
            loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
            learning_rate=OPTIM["learning_rate"], max_grad_norm=OPTIM["max_grad_norm"], weight_decay=0.0,
            lr_scheduler_type="constant", warmup_steps=0, log_completions=False, dataloader_num_workers=0,
            disable_tqdm=True,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        trainer = GRPOTrainer(
            model=model, reward_funcs=rule_reward, args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": r, "text": t} for r, t in zip(rendered, texts)]),
            callbacks=[StepClock()],
        )
        rss_before = current_rss_mib()
        profiled(trainer.train)
    median, durations = median_after_warmup(stamps, s["warmup"])
    cpu_median, _ = median_after_warmup(cpu_stamps, s["warmup"])
    return dict(step_s=median, cpu_step_s=cpu_median, durations=durations, peak_rss_mib=peak_rss_mib(), rss_before_mib=rss_before,
                mean_completion_len=sum(lengths) / len(lengths), threads=torch.get_num_threads(), trl=trl.__version__)


# -- parent -------------------------------------------------------------------------------------
def run(size: str, threads: int, profile_dir: str | None = None) -> tuple[str, dict]:
    s = SIZES[size]
    if profile_dir:  # the profiler's overhead lands in the timings: use these runs for where, not how long
        import os

        os.environ[PROFILE_ENV] = ""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "tiny-llasa")
        save_policy(Path(model_dir), s)
        common_args = ["--model-dir", model_dir, "--size", size, "--threads", str(threads)]
        runs = {
            "ours (restrict off)": ["--worker", "ours", "--no-restrict"],
            "TRL GRPOTrainer": ["--worker", "trl"],
            "ours (default: speech-only)": ["--worker", "ours"],
        }
        results = {}
        for i, (name, argv) in enumerate(runs.items()):
            if profile_dir:
                os.environ[PROFILE_ENV] = str(Path(profile_dir) / f"{i}_{argv[1]}.pstats")
            results[name] = run_worker(__file__, [*argv, *common_args], threads)
    trl_r = results["TRL GRPOTrainer"]
    rows = []
    for name, r in results.items():
        growth = r["peak_rss_mib"] - r["rss_before_mib"]
        rows.append([
            name, r["step_s"], r["step_s"] / trl_r["step_s"], r["cpu_step_s"], r["cpu_step_s"] / trl_r["cpu_step_s"],
            r["peak_rss_mib"],
            r["peak_rss_mib"] / trl_r["peak_rss_mib"], growth, growth / (trl_r["peak_rss_mib"] - trl_r["rss_before_mib"]),
            r["mean_completion_len"],
        ])
    table = markdown_table(
        ["run", "median step wall (s)", "wall / TRL", "median step CPU (s)", "CPU / TRL", "peak RSS (MiB)", "RSS / TRL", "RSS growth in fit (MiB)",
         "growth / TRL", "mean completion len"],
        rows,
    )
    n = s["prompts"] * s["group"]
    header = (
        f"settings: {s['prompts']} prompts x G={s['group']} = {n} completions/step, max_new_tokens={s['max_new_tokens']}, "
        f"micro-batch {s['micro_batch']}, tiny LLaSA (hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['speech_tokens']} speech tokens), sampling {SAMPLING}, {s['warmup']} warm-up + {s['steps']} measured steps, "
        f"{threads} torch thread(s) per run, TRL {trl_r.get('trl')}\nmachine: {json.dumps(machine_info())}"
    )
    return header + "\n\n" + table, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="smallest size (seconds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per framework run")
    p.add_argument("--json", type=str, default=None, help="also write raw results here")
    p.add_argument("--profile", default=None, help="write cProfile stats of each run into this directory")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--size", default="full", help=argparse.SUPPRESS)
    p.add_argument("--no-restrict", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        s = SIZES[a.size]
        emit(worker_ours(a.model_dir, s, not a.no_restrict) if a.worker == "ours" else worker_trl(a.model_dir, s))
        return
    table, results = run("smoke" if a.smoke else "full", a.threads, a.profile)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
