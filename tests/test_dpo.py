"""DPO rounds: the loss against hand-computed numbers and TRL's, the pairs file and its layout, and
`python -m lightning_grpo dpo fit` training the policy against its frozen starting model (full and LoRA)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lightning_grpo import dpo
from lightning_grpo.cli import main
from lightning_grpo.llasa import LlasaVocab
from lightning_grpo.preference_data import collate_pairs, load_pairs, pair_rollout
from lightning_grpo.tiny import build_tiny_tokenizer

ROOT = Path(__file__).parents[1]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dpo_loss_hand_numbers():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -2.5])
    t = dpo.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    # log-ratios: chosen (0.5, 0), rejected (-0.5, 0.5); delta (1, -0.5); loss = softplus(-beta * delta)
    assert t.losses.tolist() == pytest.approx([softplus(-0.5), softplus(0.25)], abs=1e-6)
    assert t.chosen_reward.tolist() == pytest.approx([0.25, 0.0])
    assert t.rejected_reward.tolist() == pytest.approx([-0.25, 0.25])
    assert t.margin.tolist() == pytest.approx([0.5, -0.25])


def test_cer_term_orders_the_pair_by_cer_and_weighs_by_the_gap():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -2.5])
    gap = torch.tensor([0.2, -0.1])  # pair 0: the chosen is also the more intelligible; pair 1: the other
    t = dpo.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5, cer_gap=gap, cer_weight=2.0)
    expected = [softplus(-0.5) + 2 * 0.2 * softplus(-0.5), softplus(0.25) + 2 * 0.1 * softplus(-0.25)]
    assert t.losses.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="cer_gap"):
        dpo.dpo_loss(chosen, rejected, ref_c, ref_r, 0.5, torch.tensor([0.1, math.nan]), cer_weight=1.0)
    with pytest.raises(ValueError, match="beta=0"):
        dpo.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.0)


def test_nll_term_adds_up_over_micro_batches_to_the_token_mean():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    whole = dpo.summed_nll(logp, mask, 3.0)
    parts = dpo.summed_nll(logp[:1], mask[:1], 3.0) + dpo.summed_nll(logp[1:], mask[1:], 3.0)
    assert whole.item() == pytest.approx(2.0) and parts.item() == pytest.approx(2.0)


def test_dpo_loss_with_nll_term_equals_trl_sigmoid_plus_sft():
    trl = pytest.importorskip("trl.trainer.dpo_trainer")
    torch.manual_seed(0)
    b, t, beta, alpha = 3, 5, 0.3, 0.7
    token_logp = -torch.rand(2 * b, t) * 3  # (2B, T): chosen rows, then rejected rows
    mask = (torch.arange(t) < torch.tensor([5, 3, 4, 2, 5, 1])[:, None]).float()
    token_logp = token_logp * mask
    ref = -torch.rand(2 * b) * 10

    seq = dpo.sequence_logprobs(token_logp, mask)
    ours = dpo.dpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], beta).losses.mean()
    ours = ours + alpha * dpo.summed_nll(token_logp[:b], mask[:b], float(mask[:b].sum()))

    # TRL 1.16 computes its loss inside DPOTrainer._compute_loss: run it on these log-probs with a stand-in trainer
    outputs = SimpleNamespace(log_probs=token_logp, entropy=torch.zeros(2 * b, t), mean_logits=torch.zeros(2 * b, t),
                              is_top1=torch.zeros(2 * b, t, dtype=torch.bool))
    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
                                                                          gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=beta, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, label_smoothing=0.0,
    )
    # TRL shifts its completion mask by one (its log-probs are of positions 1..); ours are already aligned
    inputs = {"input_ids": torch.zeros(2 * b, t + 1, dtype=torch.long), "attention_mask": torch.ones(2 * b, t + 1),
              "completion_mask": torch.cat([torch.zeros(2 * b, 1), mask], 1),
              "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
    theirs = trl.DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def write_pairs(path: Path, n: int = 24, cer: bool = True) -> Path:
    g = torch.Generator().manual_seed(0)
    texts = ["hello there", "a cat sat", "good morning", "blue sky", "red ball", "tea time"]
    rows = []
    for i in range(n):
        k1, k2 = (int(x) for x in torch.randint(4, 10, (2,), generator=g))
        rows.append({"text": texts[i % len(texts)],
                     "chosen": torch.randint(0, 16, (k1,), generator=g).tolist(),
                     "rejected": torch.randint(32, 64, (k2,), generator=g).tolist(),
                     **({"chosen_cer": 0.0, "rejected_cer": 0.25} if cer else {})})
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_load_pairs_names_the_bad_row_and_column(tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame([{"text": "hi", "chosen": [1, 2]}]).to_parquet(bad)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['rejected'\]"):
        load_pairs(str(bad))
    pd.DataFrame([{"text": "hi", "chosen": [1, 2], "rejected": []}]).to_parquet(bad)
    with pytest.raises(ValueError, match="row 0: rejected has no codes"):
        load_pairs(str(bad))
    pd.DataFrame([{"text": "hi", "chosen": [1.5], "rejected": [2]}]).to_parquet(bad)
    with pytest.raises(ValueError, match=r"row 0 \(chosen\)"):
        load_pairs(str(bad))
    with pytest.raises(FileNotFoundError, match="label export"):
        load_pairs(str(tmp_path / "missing.parquet"))


def test_pair_rollout_lays_out_chosen_then_rejected_with_stop_only_where_emitted():
    tok = build_tiny_tokenizer(64)
    vocab = LlasaVocab.from_tokenizer(tok)
    rows = [{"text": "hi", "chosen": [1, 2, 3], "rejected": [4], "chosen_stopped": True, "rejected_stopped": False,
             "chosen_cer": 0.0, "rejected_cer": 0.1},
            {"text": "a longer text", "chosen": [5], "rejected": [6, 7], "chosen_stopped": True,
             "rejected_stopped": True, "chosen_cer": 0.0, "rejected_cer": 0.1}]
    r = pair_rollout(collate_pairs(rows), tok, vocab, 128)
    w, s0 = r.prompt_width, vocab.speech_start_id
    assert r.input_ids.shape[0] == 4 and r.texts == ["hi", "hi", "a longer text", "a longer text"]
    # row 2i chosen, row 2i + 1 rejected; the stop token only where the sample emitted it
    assert r.input_ids[0, w:].tolist() == [s0 + 1, s0 + 2, s0 + 3, vocab.speech_gen_end_id]
    assert r.input_ids[1, w: w + 1].tolist() == [s0 + 4]
    assert r.input_ids[2, w: w + 2].tolist() == [s0 + 5, vocab.speech_gen_end_id]
    assert r.input_ids[3, w: w + 3].tolist() == [s0 + 6, s0 + 7, vocab.speech_gen_end_id]
    assert r.completion_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert torch.equal(r.input_ids[0, :w], r.input_ids[1, :w]) and r.attention_mask[0, 0] == 0  # left-padded
    lo, hi = r.vocab_range
    assert lo == vocab.speech_gen_end_id and hi == vocab.speech_end_id
    assert vocab.speech_gen_end_id not in r.disallowed and vocab.speech_start_id not in r.disallowed
    with pytest.raises(ValueError, match="more than --max_prompt_length=3"):
        pair_rollout(collate_pairs(rows[:1]), tok, vocab, 3)


def metrics(root: Path) -> list[dict]:
    with open(next(root.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def last(rows: list[dict], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


def run_dpo(tmp_path: Path, *extra: str) -> tuple[list[dict], Path]:
    pairs = write_pairs(tmp_path / "pairs.parquet")
    out = tmp_path / "run"
    main(["dpo", "fit", "--config", str(ROOT / "configs/tiny_dpo.yaml"), f"--data.train_pairs={pairs}",
          f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
          "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2", "--data.val_fraction=0.25",
          "--trainer.enable_checkpointing=true", *extra])
    return metrics(out), out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_fit_from_the_cli_learns_the_preference_against_its_starting_model(tmp_path, lora):
    extra = ["--model.lora.rank=8", "--model.learning_rate=3e-2", "--trainer.max_epochs=4"] if lora else []
    rows, out = run_dpo(tmp_path, *extra)
    first = rows[0]
    # the first update is at the reference: every log-ratio 0, loss log 2
    assert float(first["train/dpo_loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(first["train/chosen_logratio"]) == 0.0 and float(first["train/rejected_logratio"]) == 0.0
    # then the policy moves toward the chosen samples and away from the rejected, also on held-out pairs
    assert last(rows, "train/dpo_loss") < math.log(2) - 0.05
    assert last(rows, "val/dpo_accuracy") == 1.0
    assert last(rows, "val/chosen_logratio") > 0 > last(rows, "val/rejected_logratio")
    assert last(rows, "val/dpo_margin") > 0


def test_dpo_reference_stays_the_starting_model(tmp_path):
    from lightning_grpo.dpo_cli import build_dpo_cli

    pairs = write_pairs(tmp_path / "pairs.parquet")
    cli = build_dpo_cli(["--config", str(ROOT / "configs/tiny_dpo.yaml"), f"--data.train_pairs={pairs}",
                         f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                         "--trainer.enable_progress_bar=false", "--trainer.max_steps=2"], run=False)
    model = cli.model
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    ref = model.reference.state_dict()
    assert all(torch.equal(ref[k], before[k]) for k in before)
    assert any(not torch.equal(model.policy.state_dict()[k], before[k]) for k in before)


def test_nll_and_cer_terms_are_logged_and_cer_term_needs_cers(tmp_path):
    rows, _ = run_dpo(tmp_path, "--model.dpo_nll_weight=0.5", "--model.dpo_cer_weight=1.0", "--trainer.max_epochs=1")
    assert float(rows[0]["train/dpo_nll"]) > 0
    # the CER term orders every pair as the listener did (chosen CER 0 < rejected 0.25): loss > the DPO loss alone
    assert float(rows[0]["train/loss"]) > float(rows[0]["train/dpo_loss"])
    pairs = write_pairs(tmp_path / "nocer.parquet", cer=False)
    with pytest.raises(ValueError, match="dpo_cer_weight > 0 needs chosen_cer and rejected_cer"):
        main(["dpo", "fit", "--config", str(ROOT / "configs/tiny_dpo.yaml"), f"--data.train_pairs={pairs}",
              "--model.dpo_cer_weight=1.0", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"])


def test_dpo_needs_beta_and_pairs(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.parquet")
    common = ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
              "--trainer.enable_progress_bar=false"]
    with pytest.raises(ValueError, match="needs --model.beta > 0"):
        main(["dpo", "fit", "--config", str(ROOT / "configs/tiny_dpo.yaml"), f"--data.train_pairs={pairs}",
              "--model.beta=0", *common])
    with pytest.raises(ValueError, match="--model.objective must be dpo"):
        main(["dpo", "fit", "--config", str(ROOT / "configs/tiny_dpo.yaml"), f"--data.train_pairs={pairs}",
              "--model.objective=token", *common])
    with pytest.raises(RuntimeError, match="lightning_grpo dpo fit"):
        main(["fit", "--config", str(ROOT / "configs/tiny_cpu.yaml"), "--model.objective=dpo", "--model.beta=0.1",
              *common])


STRATEGIES = {
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp2": ["--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
              "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1"],
}


def dpo_cli_process(tmp_path: Path, pairs: Path, strategy: str | None, *extra: str) -> dict:
    """`python -m lightning_grpo dpo fit` as a user runs it, on one CPU process or two (DDP or FSDP2 over gloo); one
    epoch of one step of 8 pairs; returns the policy weights of the checkpoint it writes (shards read by export's
    loader)."""
    import os
    import subprocess
    import sys

    from lightning_grpo.export import load_policy

    out = tmp_path / (strategy or "single")
    devices = 2 if strategy else 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_grpo", "dpo", "fit", "--config", str(ROOT / "configs/tiny_dpo.yaml"),
         f"--data.train_pairs={pairs}", "--data.val_fraction=0", "--trainer.max_epochs=1", "--model.micro_batch_size=3",
         f"--trainer.devices={devices}", *STRATEGIES.get(strategy, []), f"--trainer.default_root_dir={out}",
         f"--trainer.logger.init_args.save_dir={out}", "--trainer.enable_progress_bar=false", *extra],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next(out.rglob("*.ckpt"))
    return {f"policy.{k}": v for k, v in load_policy(str(ckpt)).policy.state_dict().items()}


@pytest.mark.slow  # three CLI processes each: about a minute on 2 idle cores
@pytest.mark.parametrize("strategy,nll", [("ddp", 0.0), ("fsdp2", 0.0), ("ddp", 1.0)], ids=["ddp", "fsdp2", "ddp-nll"])
def test_dpo_on_two_processes_makes_the_single_process_update(tmp_path, strategy, nll):
    """2 ranks x 4 pairs (micro-batches of 3 and 1) give the update of 1 process x the same 8 pairs: each rank's mean
    over its pairs, averaged by DDP's all-reduce (or FSDP2's reduce-scatter), is the mean over all 8. With the NLL term,
    its token mean is over all 8 chosen samples' tokens, of which the two ranks hold unequal shares."""
    pairs = write_pairs(tmp_path / "pairs.parquet", n=8)
    nll_flag = f"--model.dpo_nll_weight={nll}"
    one, two = dpo_cli_process(tmp_path, pairs, None, nll_flag), dpo_cli_process(tmp_path, pairs, strategy, nll_flag)
    start = build_tiny()
    moved = [k for k in one if not torch.equal(one[k], start[f"policy.{k.removeprefix('policy.')}"])]
    assert moved  # the step changed the weights
    for k in one:
        # Adam's first step moves every weight by about lr (1e-3) whatever its gradient's size: 1e-5 is 1% of it
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-5)


def build_tiny() -> dict:
    from lightning_grpo.tiny import build_tiny_llasa

    return {f"policy.{k}": v for k, v in build_tiny_llasa()[0].state_dict().items()}


OWNER = """
rollout:
  reward:
    class_path: lightning_grpo.reward.owner.SharedReward
    init_args:
      mode: process
      reward:
        class_path: lightning_grpo.reward.tone.ToneReward
        init_args: {prosody: true}
"""


@pytest.mark.parametrize("owner", [False, True], ids=["in_rank", "owner"])
def test_dpo_fit_samples_held_out_prompts_and_logs_cer_and_prosody_as_grpo_validation(tmp_path, owner):
    """configs/tiny_dpo.yaml's rollout: the tone world's reward with prosody, in the rank or behind a reward owner
    process (SharedReward, built there from its description, as GRPO's fit does)."""
    extra = []
    if owner:
        (tmp_path / "owner.yaml").write_text(OWNER)
        extra = ["--config", str(tmp_path / "owner.yaml")]
    rows, out = run_dpo(tmp_path, *extra)
    if owner:
        assert "ToneReward" in (out / "reward_owner" / "node0.log").read_text()
    validations = [r for r in rows if r.get("val/cer_mean")]
    assert len(validations) == 2  # one per epoch, beside the held-out pairs' statistics
    for r in validations:
        for key in ("val/cer_mean", "val/reward_mean", "val/prosody/f0_std_st_mean", "val/prosody/voiced_fraction_mean",
                    "val/prosody/f0_std_st_group_std_mean", "val/entropy", "val/completion_length_mean"):
            assert math.isfinite(float(r[key])), key
        assert float(r["val/completion_length_mean"]) <= 16
        assert float(r["val/prosody/f0_std_st_mean"]) > 0  # the tone world's samples move in pitch
    assert last(rows, "val/dpo_accuracy") == 1.0  # the pairs' statistics are still there, under their own names
    assert not any("dataloader_idx" in key for key in rows[0])


def test_dpo_sampled_validation_config_errors_name_the_key(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.parquet")
    common = ["dpo", "fit", "--config", str(ROOT / "configs/tiny_dpo.yaml"), f"--data.train_pairs={pairs}",
              "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
              "--trainer.enable_progress_bar=false"]
    with pytest.raises(ValueError, match="rollout.reward is set but rollout.sampler is not"):
        main([*common, "--rollout.sampler=null"])
    with pytest.raises(ValueError, match="--data.val_prompts is not set"):
        main([*common, "--data.val_prompts=null"])
    with pytest.raises(ValueError, match="--data.val_prompts=builtin:en are sampled .* set rollout.sampler and "
                                         "rollout.reward"):
        main([*common, "--rollout.sampler=null", "--rollout.reward=null"])
    # neither: a round validates on its held-out pairs only
    main([*common, "--rollout.sampler=null", "--rollout.reward=null", "--data.val_prompts=null"])
