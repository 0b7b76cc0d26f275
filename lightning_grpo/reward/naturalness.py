"""Naturalness: Microsoft's DNSMOS P.835 (reference-free MOS of speech quality) as a reward component.

    reward = (OVRL - 1) / 4, clipped to [0, 1]       OVRL: DNSMOS's overall-quality MOS, 1..5
    metrics: dnsmos_ovrl, dnsmos_sig (speech signal), dnsmos_bak (background noise), per sample

The weights are the ONNX files the PyPI package speechmos 0.0.1.1 ships (`dnsmos_models/sig_bak_ovr.onnx`, the
P.835 model of the DNS challenge); they run on onnxruntime, so nothing is downloaded. The input handling is
speechmos's own: audio shorter than 9.01 s is tiled until it is that long, longer audio is cut into 9.01 s
windows every second and the scores averaged, raw scores mapped through DNSMOS's polynomial calibration. Here
every window of every sample goes through the model in one batched call per `batch_size` samples.

Chosen by measurement over DistillMOS and DNSMOS P.808 (`benchmarks/bench_mos.py`; BENCHMARKS.md "Prosody
statistics and naturalness: pitch tracker, cost, MOS models"): it ordered clean > band-limited > noisy > clipped
espeak-ng speech best of the candidates (Kendall tau 0.67, DistillMOS 0.42; P.808 tied but needs librosa) and
needs only onnxruntime.

Limits, measured there and worth knowing before weighting it:
- It judges signal quality (noise, distortion, band-limiting), not prosody: on average no candidate rated
  espeak-ng's monotone reading below its natural one (DNSMOS OVRL 3.17 monotone vs 3.05 natural). Pair it with
  ProsodyFloorReward (reward/prosody_reward.py) to keep pitch movement.
- Trained on real recordings; synthetic speech (espeak-ng scores about 3.0 clean) sits mid-scale.
- Cost: about 0.4 CPU seconds per second of audio on one core, several times the prosody statistics; a clip
  under 9 s is doubled until it is that long (1 s becomes 16 s: 7 windows), as speechmos does. On CUDA,
  install onnxruntime-gpu (same version) and set `device: cuda`.

Guards, reward 0 with a reason: invalid_token / empty_speech (codes), nonfinite, too_short (< `min_duration_s`),
silent (RMS < `silence_rms`). Clipped audio is scored clamped to [-1, 1] (DNSMOS hears the distortion).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from importlib import resources
from typing import Sequence

import numpy as np
import torch

from ..llasa import XCODEC2_CODEBOOK_SIZE
from .audio import resample
from .base import OK, RewardBase, RewardResult, SpeechSample, code_reason
from .codec import SpeechDecoder, XCodec2Decoder

SAMPLE_RATE = 16_000
WINDOW_S = 9.01
INSTALL = "pip install onnxruntime==1.32.0 speechmos==0.0.1.1 (requirements.txt)"
# DNSMOS P.835's calibration of the raw network outputs (non-personalised), as speechmos applies it
CALIBRATION = {"sig": (-0.08397278, 1.22083953, 0.0052439), "bak": (-0.13166888, 1.60915514, -0.39604546),
               "ovr": (-0.06766283, 1.11546468, 0.04602535)}


def _session(device: str, threads: int):
    try:
        import onnxruntime as ort

        model = resources.files("speechmos") / "dnsmos_models" / "sig_bak_ovr.onnx"
        if not model.is_file():
            raise ImportError(f"{model} is missing from the speechmos package")
    except ImportError as err:
        raise ImportError(f"DNSMOSReward needs onnxruntime and the DNSMOS weights speechmos ships: {INSTALL}") from err
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"--device={device} but onnxruntime has no CUDA provider: pip install "
                               f"onnxruntime-gpu=={ort.__version__} in place of onnxruntime, or use device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), sess_options=options, providers=providers)


def windows(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """speechmos's DNSMOS input: (W, 9.01 s) windows; audio tiled up to 9.01 s, then one window per second."""
    length = int(WINDOW_S * sample_rate)
    while audio.size < length:
        audio = np.concatenate([audio, audio])
    hops = int(np.floor(audio.size / sample_rate) - WINDOW_S) + 1
    return np.stack([audio[i * sample_rate : i * sample_rate + length] for i in range(hops)
                     if audio[i * sample_rate : i * sample_rate + length].size == length]).astype(np.float32)


class DNSMOSReward(RewardBase):
    """Reward = DNSMOS P.835 overall MOS mapped to [0, 1] (module docstring)."""

    def __init__(
        self,
        codec: SpeechDecoder | str | None = None,
        device: str = "cpu",
        batch_size: int = 16,
        threads: int = 1,
        codebook_size: int = XCODEC2_CODEBOOK_SIZE,
        min_duration_s: float = 0.5,
        silence_rms: float = 1e-3,
    ) -> None:
        """
        Args:
            codec: an X-codec2 checkpoint, a SpeechDecoder, or None to share the codec of another reward in the
                same CompositeReward (one decode serves all components).
            device: "cpu", or "cuda" / "cuda:N" with onnxruntime-gpu installed.
            batch_size: samples decoded and scored per model call (all their 9 s windows at once).
            threads: onnxruntime intra-op threads (1 leaves the other cores to generation).
            codebook_size: codes must be in [0, codebook_size) (X-codec2: 65,536).
            min_duration_s: shorter audio scores 0 as too_short (DNSMOS would tile it into a 9 s loop).
            silence_rms: quieter audio scores 0 as silent.
        """
        if batch_size < 1 or threads < 0:
            raise ValueError(f"--batch_size={batch_size} must be >= 1 and --threads={threads} >= 0")
        self.session = _session(device, threads)
        self.codec = XCodec2Decoder(codec, device=device) if isinstance(codec, str) else codec
        if self.codec is not None and not isinstance(self.codec, SpeechDecoder):
            raise TypeError(f"--codec must be a SpeechDecoder, a checkpoint string or null, got {type(codec)}")
        self.device_name, self.threads = device, threads
        self.batch_size, self.codebook_size = batch_size, codebook_size
        self.min_duration_s, self.silence_rms = min_duration_s, silence_rms
        self.timings: dict[str, float] = defaultdict(float)

    # an onnxruntime session does not pickle (rewards travel to DDP-spawned workers by pickle)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = _session(self.device_name, self.threads)

    def _guard(self, audio: torch.Tensor, sample_rate: int) -> str:
        if not torch.isfinite(audio).all():
            return "nonfinite"
        if audio.numel() < self.min_duration_s * sample_rate:
            return "too_short"
        if audio.float().square().mean().sqrt().item() < self.silence_rms:
            return "silent"
        return OK

    def mos(self, wavs: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 3) calibrated SIG, BAK, OVRL of N 16 kHz waveforms in [-1, 1], all windows in one model call."""
        parts = [windows(w) for w in wavs]
        raw = self.session.run(None, {"input_1": np.concatenate(parts)})[0]  # (W_total, 3): sig, bak, ovr
        out = np.empty((len(parts), 3))
        start = 0
        for i, p in enumerate(parts):
            seg = raw[start : start + len(p)]
            start += len(p)
            for j, key in enumerate(("sig", "bak", "ovr")):
                out[i, j] = np.polyval(CALIBRATION[key], seg[:, j]).mean()
        return out

    @torch.inference_mode()
    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        n = len(samples)
        reasons = [code_reason(s, self.codebook_size) for s in samples]
        scores = torch.full((n, 3), math.nan)
        todo = [i for i in range(n) if reasons[i] == OK]
        if todo and self.codec is None:
            raise RuntimeError("DNSMOSReward has no codec: set its `codec:` or list it in a CompositeReward beside a "
                               "reward that has one (WhisperReward), which then shares its codec")
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            t0 = time.perf_counter()
            audios = self.codec.decode([list(samples[i].codes) for i in idx])
            t1 = time.perf_counter()
            keep, wavs = [], []
            for i, audio in zip(idx, audios):
                reasons[i] = self._guard(audio, self.codec.sample_rate)
                if reasons[i] == OK:
                    keep.append(i)
                    wav = resample(audio.float().clamp(-1.0, 1.0), self.codec.sample_rate, SAMPLE_RATE)
                    wavs.append(wav.cpu().numpy())
            if keep:
                scores[keep] = torch.from_numpy(self.mos(wavs)).float()
            self.timings["decode"] += t1 - t0
            self.timings["dnsmos"] += time.perf_counter() - t1
        ovrl = scores[:, 2]
        rewards = torch.where(ovrl.isnan(), torch.zeros(n), ((ovrl - 1) / 4).clamp(0.0, 1.0))
        return RewardResult(rewards=rewards.float(), reasons=reasons, metrics={
            "dnsmos_sig": scores[:, 0], "dnsmos_bak": scores[:, 1], "dnsmos_ovrl": ovrl})
