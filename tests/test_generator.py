"""The generator process (the disaggregated layout): weights over a pair process group, checked; loud failure; the CLI."""

from __future__ import annotations

import csv
import os
import signal
import types

import pytest
import torch
from test_async_rollout import FailsAt
from test_checkpoint import cli_fit

from lightning_grpo import generator
from lightning_grpo.generator import GeneratorProcess
from lightning_grpo.policy import BUILTIN_TINY, load_model_and_tokenizer
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler


def fake_module():
    return types.SimpleNamespace(hparams=types.SimpleNamespace(model_name_or_path=BUILTIN_TINY, dtype="float32"),
                                 device=torch.device("cpu"), _trainer=None)


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A generator process for the builtin tiny LLaSA, and a trained-looking policy (its weights moved)."""
    gen = GeneratorProcess(HFSampler(max_new_tokens=6, temperature=1.0, return_logprobs=True),
                           log_dir=str(tmp_path_factory.mktemp("generator")))
    gen.setup(fake_module())
    model, tok = load_model_and_tokenizer(BUILTIN_TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    yield gen, model, tok
    gen.close()


def test_the_generator_samples_from_the_weights_it_was_sent(started):
    """Its log-probs of what it sampled are the sent policy's own teacher-forced log-probs (not its initial
    weights'), and the transfer's sums were checked."""
    from lightning_grpo.vllm_sampler import policy_logprobs

    gen, model, tok = started
    prompt = tok("<|TEXT_UNDERSTANDING_START|>hi")["input_ids"]
    stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    comps = gen.sample(model, [prompt], 2, stop, 0)
    assert gen.metrics["sync/transferred_tensors"] > 0
    for ids, lps in zip(comps.ids, comps.logprobs):
        assert torch.allclose(torch.tensor(lps), torch.tensor(policy_logprobs(model, prompt + ids, len(prompt))), atol=1e-4)
    fresh, _ = load_model_and_tokenizer(BUILTIN_TINY)
    ids, lps = comps.ids[0], comps.logprobs[0]
    assert not torch.allclose(torch.tensor(lps), torch.tensor(policy_logprobs(fresh, prompt + ids, len(prompt))), atol=1e-2)


def test_a_corrupted_transfer_stops_training_naming_the_tensor(started, monkeypatch):
    gen, model, _ = started
    first = []

    def corrupting(group, tensor):  # the trainer's side sends something other than what it sums
        sent = tensor + 1 if not first else tensor
        first.append(1)
        group.broadcast([sent], generator.dist.BroadcastOptions()).wait()

    monkeypatch.setattr(generator, "_broadcast", corrupting)
    with pytest.raises(RuntimeError, match="weights differ from the policy's after the transfer.*model.embed_tokens"):
        gen.send_weights(model)


def test_a_killed_generator_stops_training_naming_it_and_its_log(started):
    gen, model, tok = started
    os.kill(gen.process.pid, signal.SIGKILL)
    gen.process.join(timeout=10)
    died = r"generator process generator-rank0 \(pid \d+.*died with exit code -9; its log: .*generator_rank0.log"
    with pytest.raises(RuntimeError, match=died):
        gen.sample(model, [[1, 2]], 2, 3, 0)


def test_a_generator_that_raises_is_reported_with_its_traceback(tmp_path):
    gen = GeneratorProcess(FailsAt(0, max_new_tokens=4), log_dir=str(tmp_path))
    gen.setup(fake_module())
    try:
        model, _ = load_model_and_tokenizer(BUILTIN_TINY)
        with pytest.raises(RuntimeError, match="(?s)generator process generator-rank0.*raised.*out of memory"):
            gen.sample(model, [[1, 2]], 2, 3, 5)
        assert "out of memory" in (tmp_path / "generator_rank0.log").read_text()
    finally:
        gen.close()


def test_cli_disaggregated_one_step_off_trains_from_the_generator_process(tmp_path):
    """tiny_cpu.yaml with the sampler in a generator process: step 0's samples are exactly the policy's (importance
    weight 1: the transfer worked), later ones one update stale."""
    cli = cli_fit(tmp_path, "--trainer.max_steps=3", "--rollout.async_steps=1",
                  "--rollout.sampler=lightning_grpo.generator.GeneratorProcess",
                  "--rollout.sampler.sampler=lightning_grpo.sampling.HFSampler",
                  "--rollout.sampler.sampler.max_new_tokens=8", "--rollout.sampler.sampler.temperature=1.0",
                  "--rollout.sampler.sampler.return_logprobs=true", "--model.importance_correction=true")
    assert cli.trainer.global_step == 3
    with next((tmp_path / "lightning_logs").glob("version_*/metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("rollout/staleness")]
    assert [float(r["rollout/staleness"]) for r in rows] == [0.0, 1.0, 1.0]
    weights = [float(r["train/is_weight_mean"]) for r in rows]
    assert weights[0] == pytest.approx(1.0, abs=1e-5) and all(abs(w - 1.0) > 1e-5 for w in weights[1:])
    assert all(float(r["sync/transferred_tensors"]) > 0 for r in rows)
    # step 0 is generated in place (its sample() sends the weights); later rollouts get them pushed at their launch,
    # from the policy itself: no copy of the weights in the trainer
    assert float(rows[0]["timing/weight_sync"]) > 0 and float(rows[0]["timing/weight_push"]) == 0
    assert all(float(r["timing/weight_push"]) > 0 and float(r["timing/weight_sync"]) == 0 for r in rows[1:])
    assert next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout))._ahead._snapshot is None
    assert "generator ready on cpu (gloo)" in (tmp_path / "generator" / "generator_rank0.log").read_text()


@pytest.mark.parametrize("name, trainers, generators, reward", [
    ("llasa1b_disaggregated.yaml", [0], ["cuda:1"], "cuda:2"),
    ("llasa1b_disaggregated_fsdp.yaml", [0, 1], ["cuda:2", "cuda:3"], "cuda:3"),
])
def test_disaggregated_configs_put_training_and_generation_on_different_gpus(name, trainers, generators, reward):
    from test_configs import ROOT, parse

    cfg = parse(ROOT / "configs" / name)
    gen = cfg.rollout.sampler
    assert cfg.rollout.async_steps == 1 and gen.class_path == "lightning_grpo.generator.GeneratorProcess"
    assert cfg.model.importance_correction  # the lag is weighed out
    assert (gen.init_args.devices or [gen.init_args.device]) == generators
    assert list(cfg.trainer.devices) == trainers
    assert not {f"cuda:{d}" for d in trainers} & set(generators)
    assert gen.init_args.sampler.init_args.enable_sleep_mode is False  # the engine keeps its own GPU
    assert cfg.rollout.reward.init_args.reward.init_args.device == reward
    header = (ROOT / "configs" / name).read_text().split("seed_everything")[0]
    assert "Memory plan per GPU, computed" in header and all(g in header for g in generators)


@pytest.mark.slow
def test_killed_disaggregated_run_resumed_trains_on_the_samples_of_the_uninterrupted_run(tmp_path):
    """The one-step-off resume test with the sampler in a generator process (three runs, each starting one).
    Measured: 4.4 min on 2 shared cores under load."""
    from test_async_rollout import run

    def gen():
        return GeneratorProcess(HFSampler(max_new_tokens=8, temperature=1.0, return_logprobs=True), log_dir=str(tmp_path))

    _, full, full_rec = run(tmp_path / "full", 4, 2, sampler=gen())
    killed, _, first = run(tmp_path / "part", 4, 2, kill_at=2, sampler=gen())
    assert killed.global_step == 2
    _, resumed, second = run(tmp_path / "part", 4, 2, ckpt_path="last", sampler=gen())
    assert first.samples + second.samples == full_rec.samples
    assert first.rewards + second.rewards == full_rec.rewards
    assert second.staleness == [1.0, 1.0]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_config_built_engine_factory_ships_to_the_generator_as_a_plain_class(tmp_path):
    """`engine_factory:` given as a class_path is the config library's factory, which holds the parsed command line
    and, once the model is built, its hooks: it cannot be pickled into the generator process. What is shipped is
    partial(Class) itself."""
    import pickle
    import textwrap
    from pathlib import Path

    from lightning_grpo.cli import build_cli
    from lightning_grpo.rehearse import RehearsalEngine

    extra = tmp_path / "generator.yaml"
    extra.write_text(textwrap.dedent("""
        model: {gradient_checkpointing: true}
        rollout:
          sampler:
            class_path: lightning_grpo.generator.GeneratorProcess
            init_args:
              device: cpu
              sampler:
                class_path: lightning_grpo.vllm_sampler.VLLMSampler
                init_args: {max_new_tokens: 8, engine_factory: lightning_grpo.rehearse.RehearsalEngine}
    """))
    root = Path(__file__).resolve().parents[1]
    cli = build_cli(["--config", str(root / "configs/tiny_cpu.yaml"), "--config", str(extra),
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    cli.model.configure_model()
    inner = next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout)).sampler.inner
    with pytest.raises(Exception):
        pickle.dumps(inner)
    shipped = pickle.loads(pickle.dumps(generator.shippable(inner)))
    assert shipped.engine_factory.func is RehearsalEngine and inner.engine_factory is not shipped.engine_factory


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL pair group needs two GPUs (trainer on cuda:0, "
                    "generator on cuda:1); NCCL refuses two ranks on one device")
def test_nccl_transfer_between_two_gpus_samples_from_the_sent_weights(tmp_path):
    """The disaggregated layout on GPUs: the weights go over NCCL (not gloo), the per-tensor check passes, and the
    generator's log-probs of what it sampled are the sent policy's own."""
    from lightning_grpo.vllm_sampler import policy_logprobs

    module = fake_module()
    module.device = torch.device("cuda:0")
    gen = GeneratorProcess(HFSampler(max_new_tokens=6, temperature=1.0, return_logprobs=True), device="cuda:1",
                           log_dir=str(tmp_path))
    gen.setup(module)
    try:
        assert gen._backend == "nccl"
        model, tok = load_model_and_tokenizer(BUILTIN_TINY)
        model = model.to("cuda:0")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        prompt = tok("<|TEXT_UNDERSTANDING_START|>hi")["input_ids"]
        stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
        comps = gen.sample(model, [prompt], 2, stop, 0)
        assert gen.metrics["sync/transferred_tensors"] > 0
        for ids, lps in zip(comps.ids, comps.logprobs):
            want = policy_logprobs(model, prompt + ids, len(prompt))
            assert torch.allclose(torch.tensor(lps), torch.tensor(want), atol=1e-3)
    finally:
        gen.close()
