"""Every shipped config parses against the code's signatures, each of its keys lands on the object it
names, renamed keys fail naming the new key, and the CPU default runs with its whole config in the logger."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lightning_grpo.rehearse import ranks as rehearsal_ranks
from lightning_grpo.cli import GRPOCLI, build_cli, flatten_config
from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.rollout import GRPORollout

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the small world's config names small_world.unit_codec.UnitCodec
CONFIGS = [*sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "sweep.yaml" and not p.stem.endswith("_dpo")),
           ROOT / "examples" / "small_world" / "config.yaml"]


class ParseOnly(GRPOCLI):
    """Parses and type-checks a config (class_path init_args included) without building anything."""

    def instantiate_classes(self) -> None:
        pass


def parse_args(*args: str):
    cli = ParseOnly(GRPOPolicy, PromptDataModule, args=list(args), run=False, parser_kwargs={"parser_mode": "omegaconf"})
    return cli.config


def parse(path: Path, *overrides: str):
    return parse_args("--config", str(path), *overrides)


def lookup(cfg, key: str):
    """The parsed value of a dotted key as the command line spells it (`rollout.reward.beta_c`: no init_args)."""
    node = cfg
    for part in key.split("."):
        if part not in node and "init_args" in node:
            node = node.init_args
        node = node[part]
    return node


def object_at(cli, key: str):
    """(object, attribute) that a config key of the model, data or rollout group sets on the built run."""
    group, *path = key.split(".")
    if group == "model":
        return cli.model.hparams, path[0]
    obj = {"data": cli.datamodule, "rollout": next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout))}[group]
    for part in path[:-1]:
        obj = getattr(obj, part)
    return obj, path[-1]


def as_plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_into_the_four_groups(path):
    cfg = parse(path)
    assert cfg.rollout.group_size >= 2 and cfg.rollout.sampler.class_path and cfg.rollout.reward.class_path
    assert not any(c.class_path.endswith("GRPORollout") for c in cfg.trainer.callbacks or [])
    # every key the file sets is the parsed value (nothing dropped or shadowed by a default)
    raw = yaml.safe_load(path.read_text())
    for key, value in flatten_config(raw).items():
        if key.startswith(("rollout.", "model.", "data.")) and not key.endswith("class_path"):
            assert as_plain(lookup(cfg, key)) == as_plain(value), key


def test_every_key_of_the_cpu_default_lands_on_its_object(tmp_path):
    """Built for real: each model / data / rollout key of configs/tiny_cpu.yaml is the attribute of the
    object it names, and the command-line spellings of the rollout group reach the same objects."""
    path = ROOT / "configs" / "tiny_cpu.yaml"
    cli = build_cli(["--config", str(path), "--rollout.group_size", "16", "--rollout.sampler.temperature", "0.9",
                     "--rollout.reward.codes_per_char", "0.25", f"--trainer.default_root_dir={tmp_path}"], run=False)
    overrides = {"rollout.group_size": 16, "rollout.sampler.temperature": 0.9, "rollout.reward.codes_per_char": 0.25}
    keys = {k: v for k, v in flatten_config(yaml.safe_load(path.read_text())).items()
            if k.startswith(("model.", "data.", "rollout.")) and not k.endswith("class_path")}
    assert len(keys) >= 15  # not vacuous
    for key, value in {**keys, **overrides}.items():
        obj, attr = object_at(cli, key)
        got = as_plain(obj[attr] if hasattr(obj, "keys") else getattr(obj, attr))
        assert got == (pytest.approx(value) if isinstance(value, float) else as_plain(value)), key
    rollouts = [c for c in cli.trainer.callbacks if isinstance(c, GRPORollout)]
    assert len(rollouts) == 1  # added once from the `rollout:` group, whatever trainer.callbacks lists


def test_original_recipe_values():
    cfg = parse(ROOT / "configs" / "llasa1b_original.yaml")
    r = cfg.rollout
    assert (cfg.data.prompts_per_step, r.group_size) == (8, 16)
    assert cfg.data.val_prompts_per_step == 16 and cfg.trainer.devices == 2  # 8 per GPU, as before
    assert cfg.model.learning_rate == 1e-6 and cfg.model.beta == 0.0
    assert (cfg.model.epsilon_low, cfg.model.epsilon_high, cfg.model.dual_clip) == (0.2, 0.2, 3.0)
    assert cfg.model.loss_aggregation == "token-mean"
    s = r.sampler.init_args
    assert (s.temperature, s.top_p, s.max_new_tokens) == (0.8, 0.9, 2048)
    # one Whisper for both training ranks, in an owner process on the third GPU, scored while vLLM generates
    assert r.reward.class_path == "lightning_grpo.reward.owner.SharedReward" and r.overlap_reward
    whisper = r.reward.init_args.reward
    assert whisper.class_path.endswith("WhisperReward") and whisper.init_args.device == "cuda:2"


def test_llasa8b_lora_fits_one_48gb_gpu_by_its_budget():
    """The LoRA config trains LLaSA-8B's adapters on one GPU over a frozen bf16 base, and the computed budget of
    that GPU (benchmarks/bench_lora_memory.py, a layer's saved tensors counted on a real 8B-wide layer) fits 48 GB in
    both phases at the config's gpu_memory_utilization."""
    cfg = parse(ROOT / "configs" / "llasa8b_lora.yaml")
    m, s = cfg.model, cfg.rollout.sampler.init_args
    assert m.model_name_or_path == "HKUSTAudio/Llasa-8B" and m.dtype == "bfloat16"
    assert (m.lora.rank, m.lora.alpha, m.lora.train_embeddings) == (16, 32.0, False)
    assert cfg.trainer.devices == 1 and cfg.trainer.precision == "bf16-mixed" and m.gradient_checkpointing
    assert s.enable_sleep_mode and cfg.rollout.reward.init_args.device == "cuda:1"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_lora_memory import llasa8b_budget

    _, budget = llasa8b_budget(gpu_gb=48.0, engine_fraction=s.gpu_memory_utilization)
    assert budget["totals"]["rollout"] < 47e9 and budget["totals"]["update"] < 47e9, budget["totals"]


def test_bad_override_is_rejected_with_the_key(capsys):
    with pytest.raises(SystemExit):
        parse(CONFIGS[0], "--model.loss_aggregation", "sum")
    assert "loss_aggregation" in capsys.readouterr().err


@pytest.mark.parametrize("old, new", [
    ("--trainer.callbacks.init_args.group_size=16", "--rollout.group_size"),
    ("--trainer.callbacks.init_args.sampler.init_args.temperature=0.9", "--rollout.sampler.temperature"),
    ("--trainer.callbacks.init_args.reward.init_args.beta_c=2", "--rollout.reward.beta_c"),
    ("--trainer.callbacks+=lightning_grpo.rollout.GRPORollout", "--rollout.group_size"),
    ("--data.val_batch_size=8", "--data.val_prompts_per_step"),
    ("--rollout.reward=lightning_grpo.reward.module.WhisperReward", "lightning_grpo.reward.whisper.WhisperReward"),
])
def test_an_old_key_on_the_command_line_names_the_new_one(old, new):
    with pytest.raises(ValueError, match=new.replace(".", r"\.")):
        parse(ROOT / "configs" / "tiny_cpu.yaml", old)


def test_an_old_config_file_names_the_new_keys(tmp_path):
    old = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    rollout = old.pop("rollout")
    old["trainer"]["callbacks"].append({"class_path": "lightning_grpo.rollout.GRPORollout", "init_args": rollout})
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ValueError, match=r"top-level config group\. .*`rollout:`.*rollout\.group_size"):
        build_cli(["fit", "--config", str(tmp_path / "old.yaml")])
    old = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    old["data"]["val_batch_size"] = old["data"].pop("val_prompts_per_step")
    (tmp_path / "old_data.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ValueError, match="data.val_batch_size was renamed data.val_prompts_per_step.*all ranks"):
        build_cli(["fit", "--config", str(tmp_path / "old_data.yaml")])


def test_a_config_naming_the_renamed_whisper_module_names_the_new_class_path(tmp_path):
    text = (ROOT / "configs" / "llasa1b_multireward.yaml").read_text()
    (tmp_path / "old.yaml").write_text(text.replace("lightning_grpo.reward.whisper.", "lightning_grpo.reward.module."))
    with pytest.raises(ValueError, match=r"old\.yaml rollout\.reward\.init_args\.rewards\.whisper\.init_args\.reward\.class_path: "
                       r"'lightning_grpo\.reward\.module\.WhisperReward' names the module "
                       r"lightning_grpo\.reward\.module, which was renamed lightning_grpo\.reward\.whisper; "
                       r"use 'lightning_grpo\.reward\.whisper\.WhisperReward'"):
        build_cli(["fit", "--config", str(tmp_path / "old.yaml")], run=False)


def test_help_and_print_config_show_the_rollout_group(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"])
    help_text = capsys.readouterr().out
    for key in ("--rollout.group_size", "--rollout.sampler", "--rollout.reward", "--rollout.truncation"):
        assert key in help_text, key
    assert "--optimizer" not in help_text  # GRPOPolicy configures its own optimiser: no dead keys
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--rollout.sampler.temperature", "0.9",
                   "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rollout"]["sampler"]["init_args"]["temperature"] == 0.9 and printed["rollout"]["group_size"] == 8


def test_cpu_default_runs_from_the_cli_and_logs_its_whole_config(tmp_path):
    """The README's main command, shortened to 2 steps; the CSV logger's hparams hold every nested knob."""
    cli = build_cli(["fit", "--config", "configs/tiny_cpu.yaml", "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
                     "--rollout.reward.codes_per_char", "0.4",
                     f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    for key in ("train/reward_mean", "train/loss", "train/kl", "train/clip_fraction",
                "train/completion_length_mean", "train/truncation_rate", "val/reward"):
        assert key in metrics, key
    assert list(tmp_path.rglob("metrics.csv"))
    hparams = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert hparams["rollout.reward.codes_per_char"] == 0.4 and hparams["rollout.reward.band"] == [0, 16]
    assert hparams["rollout.sampler.temperature"] == 1.0 and hparams["rollout.group_size"] == 8
    assert hparams["model.learning_rate"] == 3e-3 and hparams["data.prompts_per_step"] == 4
    assert hparams["trainer.callbacks.StepCheckpoint.every_n_train_steps"] == 25
    assert "learning_rate" not in hparams  # one key per knob: the policy's own hparams are not logged twice


def test_the_whole_config_reaches_tensorboard_and_csv_hparams(tmp_path):
    """LogRunConfig logs the same flat keys to every logger of the trainer (here TensorBoard and CSV at once)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning_grpo.cli import LogRunConfig

    cli = ParseOnly(GRPOPolicy, PromptDataModule, args=["--config", str(CONFIGS[-1]), "--rollout.reward.beta_c", "2"],
                    run=False, parser_kwargs={"parser_mode": "omegaconf"})
    loggers = [TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "csv")]
    trainer = L.Trainer(logger=loggers, default_root_dir=tmp_path, enable_checkpointing=False)
    LogRunConfig(cli.parser, cli.config).save_config(trainer, None, "fit")
    for logger in loggers:
        logger.save()
        logged = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
        assert logged["rollout.reward.beta_c"] == 2.0 and logged["rollout.reward.codec.class_path"] == "small_world.unit_codec.UnitCodec"
        assert logged["rollout.sampler.max_new_tokens"] == 8 and logged["model.num_iterations"] == 2
        assert logged["trainer.callbacks.CappedCER.class_path"] == "lightning_grpo.reward.capped_cer.CappedCER"


def test_a_plain_model_parallel_strategy_is_data_parallel_over_every_rank(tmp_path):
    """`tensor_parallel_size: auto` (the strategy's default) on 2 CPU ranks through the CLI: FSDP2 over both ranks,
    each rank scoring its own prompts (a tensor-parallel pair would repeat the same data on both)."""
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_grpo", "fit", "--config", "configs/tiny_cpu.yaml",
         "--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy", "--trainer.devices=2",
         "--trainer.max_steps=1", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path}", "--rollout.reward=owner_rewards.CountingRuleReward",
         f"--rollout.reward.record_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data parallel over all 2 ranks" in proc.stdout + proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    texts = {}
    for call in calls:
        texts.setdefault(call["pid"], set()).update(call["texts"])
    assert len(texts) == 2 and not set.intersection(*texts.values())  # two ranks, different prompts


def test_a_reward_on_a_training_gpu_stops_at_start_naming_both():
    """llasa1b_original.yaml's Whisper is on cuda:2: fine beside 2 training GPUs, an error beside 4."""
    import types

    import torch

    from lightning_grpo.reward.owner import SharedReward, check_reward_devices

    raw = yaml.safe_load((ROOT / "configs" / "llasa1b_original.yaml").read_text())
    shared = SharedReward(raw["rollout"]["reward"]["init_args"]["reward"])

    def trainer(n: int):
        return types.SimpleNamespace(strategy=types.SimpleNamespace(parallel_devices=[torch.device(f"cuda:{i}") for i in range(n)]))

    check_reward_devices(shared, trainer(2))
    with pytest.raises(ValueError, match=r"rollout\.reward\.reward\.device=cuda:2 is the GPU of training rank 2 "
                                         r"\(trainer\.devices=4 .*cuda:0, cuda:1, cuda:2, cuda:3\).*cuda:4"):
        check_reward_devices(shared, trainer(4))
    cpu = types.SimpleNamespace(strategy=types.SimpleNamespace(parallel_devices=[torch.device("cpu")] * 2))
    check_reward_devices(SharedReward({"class_path": "x.Y", "init_args": {"device": "cpu"}}), cpu)  # CPU is shared


def rewards_built_per_rank(node, inside_owner=False, key="rollout.reward"):
    """Config keys of the model-holding rewards (torch modules) that every rank would build: not inside a SharedReward
    that runs an owner process."""
    import importlib

    import torch

    if not isinstance(node, dict):
        return []
    found = []
    if isinstance(node.get("class_path"), str):
        module, _, name = node["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        init = node.get("init_args") or {}
        if cls.__name__ == "SharedReward":
            inside_owner = init.get("mode", "auto") != "in_process"
        elif isinstance(cls, type) and issubclass(cls, torch.nn.Module) and not inside_owner:
            found.append(key)
        node = init
    for k, v in node.items():
        found += rewards_built_per_rank(v, inside_owner, f"{key}.{k}")
    return found


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_multi_rank_config_builds_its_model_rewards_once_per_node(path):
    """One Whisper (or speaker encoder) per node, in a SharedReward owner or behind a server: never one per rank."""
    raw = yaml.safe_load(path.read_text())
    ranks = rehearsal_ranks(raw["trainer"])
    per_rank = rewards_built_per_rank(raw["rollout"]["reward"])
    assert ranks == 1 or not per_rank, f"{path.name} trains on {ranks} ranks and builds {per_rank} in each"


def test_the_per_rank_check_sees_a_plain_and_a_composed_model_reward():
    whisper = {"class_path": "lightning_grpo.reward.whisper.WhisperReward", "init_args": {"device": "cuda:2"}}
    assert rewards_built_per_rank(whisper) == ["rollout.reward"]
    composite = {"class_path": "lightning_grpo.reward.composite.CompositeReward",
                 "init_args": {"rewards": {"whisper": whisper, "d": {"class_path": "lightning_grpo.reward.duration.DurationReward"}}}}
    assert rewards_built_per_rank(composite) == ["rollout.reward.rewards.whisper"]
    shared = {"class_path": "lightning_grpo.reward.owner.SharedReward", "init_args": {"reward": composite}}
    assert rewards_built_per_rank(shared) == []
    shared["init_args"]["mode"] = "in_process"
    assert rewards_built_per_rank(shared) == ["rollout.reward.reward.rewards.whisper"]
