"""`python -m lightning_grpo rehearse`: every shipped config (and the small world) runs on this CPU as `fit` launches
it, on 2 processes where it has more than one rank; what cannot exist here is substituted and said; a config that
would stop on a GPU node stops the rehearsal with a non-zero exit."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_grpo.rehearse import (ENGINE, TINY_MODEL, TINY_WHISPER, RehearsalEngine, Substitutions,
                                     is_preference_config, memory_plan, parsed_config, ranks, warnings_in)
from lightning_grpo.vllm_engine import EngineConfig, SampleRequest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [*sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "sweep.yaml" and not is_preference_config(p)),
           ROOT / "examples" / "small_world" / "config.yaml"]


def rehearse(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_grpo", "rehearse", "--rehearse_dir", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


# Each config takes 25 s to 2 min of CPU (an owner process, FSDP2, a resume ...): they run with `-m slow`, which
# `.ci/run` runs after the default suite, so CI rehearses every shipped config.
@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name if p.name == "config.yaml" else p.stem)
def test_every_config_rehearses_on_this_cpu(path, tmp_path):
    proc = rehearse(tmp_path, "--config", str(path))
    report = proc.stdout
    assert proc.returncode == 0, report[-6000:] + proc.stderr[-3000:]
    assert "rehearsal passed" in report and "FAILED" not in report
    ran = report.split("ran:")[1].split("memory plan")[0]
    assert f"fit: 2 steps on {min(2, _ranks(path))} process(es), validation at step 2: ok" in ran
    config = yaml.safe_load((tmp_path / "rehearsal.yaml").read_text())
    if any(c["class_path"].endswith("StepCheckpoint") for c in config["trainer"].get("callbacks") or []):
        assert "resume from the step-2 checkpoint (--ckpt_path last) for one more step: ok" in ran
        assert list((tmp_path / "run" / "checkpoints").glob("*step=3*")), "the resumed run did not reach step 3"
    if any(c["class_path"].endswith("AudioSampleLogger") for c in config["trainer"].get("callbacks") or []):
        tables = [t.read_text() for t in tmp_path.rglob("samples/train_*.table.json")]  # W&B offline
        assert list(tmp_path.rglob("samples/train/*/*.wav")) or any('"Audio"' in t for t in tables), "no audio logged"


def _ranks(path: Path) -> int:
    return ranks(yaml.safe_load(path.read_text())["trainer"])


def test_a_config_that_would_stop_on_the_gpu_node_stops_the_rehearsal(tmp_path):
    """Lightning's own ModelCheckpoint keeping 3 checkpoints without a monitored quantity: Lightning refuses it when
    the callbacks are built, on a GPU node as here."""
    config = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": {"save_top_k": 3, "every_n_train_steps": 1}})
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(config))
    proc = rehearse(tmp_path / "out", "--config", str(tmp_path / "broken.yaml"))
    assert proc.returncode != 0 and "REHEARSAL FAILED" in proc.stdout
    assert "No quantity for top_k to track" in proc.stdout  # the failing run's own error is quoted


def test_substitutions_are_only_what_cannot_exist_here_and_each_is_said(tmp_path):
    real = parsed_config(["--config", str(ROOT / "configs" / "llasa8b_fsdp_2nodes.yaml")])
    subs = Substitutions(copy.deepcopy(real), tmp_path, max_processes=2)
    subs.apply()
    cfg, said = subs.config, "\n".join(subs.notes)
    assert cfg["model"]["model_name_or_path"] == TINY_MODEL and "'HKUSTAudio/Llasa-8B' -> 'builtin:tiny-llasa'" in said
    assert (cfg["trainer"]["devices"], cfg["trainer"]["num_nodes"], cfg["trainer"]["accelerator"]) == (2, 1, "cpu")
    assert "trainer.num_nodes: 2 -> 1" in said and "trainer.devices: 4 -> 2" in said
    assert cfg["trainer"]["strategy"]["init_args"]["data_parallel_size"] == 2
    assert cfg["rollout"]["sampler"]["init_args"]["engine_factory"] == ENGINE
    assert cfg["rollout"]["reward"]["init_args"]["url"] == "{server}" and subs.server_reward["init_args"]["whisper_model"] == TINY_WHISPER
    assert cfg["trainer"]["logger"]["init_args"]["offline"] is True
    # everything else is as written: the GRPO settings, the sampler's sync and verification, the strategy
    for key in ("learning_rate", "epsilon_low", "epsilon_high", "dual_clip", "loss_aggregation", "load_on_rank0"):
        assert cfg["model"][key] == real["model"][key], key
    for key in ("sync_every", "verify_every", "enable_sleep_mode", "sleep_level", "temperature", "top_p"):
        assert cfg["rollout"]["sampler"]["init_args"][key] == real["rollout"]["sampler"]["init_args"][key], key
    assert cfg["trainer"]["strategy"]["class_path"] == real["trainer"]["strategy"]["class_path"]
    assert len(subs.notes) == len(set(subs.notes)) and all(" -> " in n and n.endswith(")") for n in subs.notes)


def test_the_memory_plan_is_the_real_configs():
    plan = "\n".join(memory_plan(parsed_config(["--config", str(ROOT / "configs" / "llasa1b_original.yaml")])))
    assert "LLaSA-1B, FSDP2 over 2 GPUs" in plan and "vLLM at 0.6" in plan
    assert "on a 48 GB card: rollout 39.6 GB, update 18.1 GB: fits" in plan  # with the vLLM sync term
    assert "no memory model" in memory_plan(parsed_config(["--config", str(ROOT / "configs" / "tiny_cpu.yaml")]))[0]


def test_the_rehearsal_engine_samples_as_asked_after_a_sync(tiny, tmp_path):
    model, tokenizer = tiny
    model.config.save_pretrained(tmp_path)
    cfg = EngineConfig(model_path=str(tmp_path), load_format="dummy", device=torch.device("cpu"), dtype="float32",
                       gpu_memory_utilization=0.3, tensor_parallel_size=1, max_model_len=512, seed=0,
                       enable_sleep_mode=True, enforce_eager=True, logprobs_mode="processed_logprobs",
                       distributed_executor_backend=None, extra={})
    engine = RehearsalEngine(cfg)
    request = SampleRequest(n=3, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=6, stop_token_id=5,
                            allowed_token_ids=(5, 300, 301, 302), seeds=(7,))
    with pytest.raises(RuntimeError, match="before any load_weights"):
        engine.generate([[1, 2, 3]], request)
    engine.load_weights(model.state_dict().items())
    (group,) = engine.generate([[1, 2, 3]], request)
    assert len(group) == 3
    for c in group:
        assert set(c.ids) <= {5, 300, 301, 302} and 1 <= len(c.ids) <= 6 and len(c.logprobs) == len(c.ids)
        assert (c.finish_reason == "stop") == (c.ids[-1] == 5) and all(lp <= 0 for lp in c.logprobs)
    assert engine.generate([[1, 2, 3]], request)[0][0].ids == group[0].ids  # the per-prompt seed fixes the sample
    assert engine.prompt_logprobs([1, 2, 3, 300], 3) == pytest.approx(
        torch.log_softmax(model(torch.tensor([[1, 2, 3]])).logits[0, -1].float(), -1)[300:301].tolist(), abs=1e-4)


def test_warnings_are_collected_once_per_source_line():
    text = ("/a/x.py:3: UserWarning: first\n  warnings.warn(\n[rank1]: /a/x.py:3: UserWarning: first\n"
            "/a/j.py:9: JsonargparseWarning: \n    Unable to serialize\nwandb: WARNING offline\n"
            "/a/result.py:433: It is recommended to use `self.log('val/a', ..., sync_dist=True)`\n"
            "/a/result.py:433: It is recommended to use `self.log('val/b', ..., sync_dist=True)`\n"
            '  File "/a/x.py", line 3, in f\n')
    assert warnings_in(text) == ["UserWarning: first (x2)", "JsonargparseWarning: Unable to serialize",
                                 "wandb: WARNING offline", "It is recommended to use `self.log('val/a', ..., sync_dist=True)` (x2)"]


def test_a_preference_config_is_named_as_one_for_dpo_fit(tmp_path):
    """`rehearse` covers GRPO configs; a DPO round's config (model.objective: dpo) stops with the command that runs it."""
    dpo = sorted(p for p in (ROOT / "configs").glob("*.yaml") if is_preference_config(p))
    assert dpo, "configs/ ships a DPO round config"
    proc = rehearse(tmp_path, "--config", str(dpo[0]))
    assert proc.returncode != 0 and "dpo fit" in proc.stderr and dpo[0].name in proc.stderr
