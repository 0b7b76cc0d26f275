"""Speaker encoders for the speaker-similarity reward: the `SpeakerEncoder` seam and a GE2E encoder with real weights.

`GE2EEncoder` is the d-vector model of Wan et al. 2018 (GE2E loss) as PyPI `resemblyzer` 0.1.4 ships it
(`resemblyzer/pretrained.pt`, 17 MB, Apache-2.0): a 3-layer LSTM (256 units) over 40-band mel frames at
16 kHz, a linear layer and a ReLU, L2-normalised. An utterance is cut into 1.6 s partials (1.3 per second,
the last kept when 75% covered), each partial embedded, the mean re-normalised. The package is installed
with `--no-deps` (scripts/setup.sh): only its weights file is read, by this module's own LSTM, mel frontend
and silence trimming, so librosa and scipy (resemblyzer's dependencies) are not needed; webrtcvad is.

How it departs from resemblyzer (measured against resemblyzer itself in BENCHMARKS.md, "Multi-reward" and
"Reward fidelity on real data"):
- the mel frontend (hann STFT, 25 ms / 10 ms, Slaney mel filterbank, power, no log) is librosa's, rebuilt in
  torch; on the same waveform the embedding matches resemblyzer's;
- long silences are found by resemblyzer's detector (webrtcvad, mode 3, on 30 ms windows), with its smoothing
  and dilation, so trimming equals resemblyzer's on clean and noisy clips alike; the int16 conversion clips
  where resemblyzer's would wrap. vad="energy" (windows within 40 dB of the loudest) needs no extra package but
  trims nothing over a noise floor of -50 dBFS or louder, which makes all voices more alike;
- all partials of all utterances go through the LSTM as one batch (resemblyzer embeds one utterance a call).

Other encoders (WavLM-large + x-vector head, ECAPA-TDNN) plug in through `SpeakerEncoder`: any class with
`sample_rate` and `embed(wavs) -> (N, D)` unit vectors, named by `class_path` in the reward's `encoder:`.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s
PARTIALS_PER_SECOND = 1.3
MIN_COVERAGE = 0.75
VAD_WINDOW = 480  # 30 ms
VAD_AVERAGE = 8  # windows in the moving average
VAD_MAX_SILENCE = 6  # windows of silence kept between voiced windows
TARGET_DBFS = -30.0
INT16_MAX = 2**15 - 1
Vad = Literal["webrtc", "energy"]


@runtime_checkable
class SpeakerEncoder(Protocol):
    """Waveforms -> speaker embeddings. Cosine similarity of two embeddings is the SIM score."""

    sample_rate: int

    def embed(self, wavs: Sequence[torch.Tensor]) -> torch.Tensor:
        """N 1-D float32 waveforms at `sample_rate` (any device) -> (N, D) L2-normalised embeddings."""
        ...


def resemblyzer_weights() -> Path:
    """The path of the pretrained.pt that PyPI resemblyzer 0.1.4 ships, found without importing the package."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the GE2E speaker encoder reads the weights PyPI resemblyzer ships: "
            "`pip install --no-deps resemblyzer==0.1.4` (scripts/setup.sh does), or pass --encoder.weights PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall resemblyzer==0.1.4`"
        )
    return path


def slaney_mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Slaney mel scale, area-normalised (librosa's default)."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0

    def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
        return torch.where(f >= min_log_hz, min_log_mel + torch.log(f.clamp(min=1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = torch.tensor([0.0, sample_rate / 2], dtype=torch.float64)
    mel_f = mel_to_hz(torch.linspace(*hz_to_mel(edges).tolist(), n_mels + 2, dtype=torch.float64))
    fdiff = mel_f.diff()
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.float()


def partial_slices(n_samples: int) -> list[tuple[int, int]]:
    """Mel-frame ranges [start, stop) of the 1.6 s partials of an utterance of n_samples (resemblyzer's rule)."""
    n_frames = math.ceil((n_samples + 1) / HOP)
    step = round(SAMPLE_RATE / PARTIALS_PER_SECOND / HOP)  # 77 frames
    steps = max(1, n_frames - PARTIAL_FRAMES + step + 1)
    slices = [(i, i + PARTIAL_FRAMES) for i in range(0, steps, step)]
    start = slices[-1][0] * HOP
    coverage = (n_samples - start) / (PARTIAL_FRAMES * HOP)
    if coverage < MIN_COVERAGE and len(slices) > 1:
        slices = slices[:-1]
    return slices


def normalize_volume(wav: torch.Tensor, target_dbfs: float = TARGET_DBFS) -> torch.Tensor:
    """Raise (never lower) the waveform's RMS level to target_dbfs, as resemblyzer does."""
    rms = (wav * INT16_MAX).square().mean().sqrt()
    if rms <= 0:
        return wav
    change = target_dbfs - 20 * torch.log10(rms / INT16_MAX)
    return wav * 10 ** (change / 20) if change > 0 else wav


def energy_flags(wav: torch.Tensor, threshold_db: float = 40.0) -> torch.Tensor:
    """(n_windows,) bool: 30 ms windows louder than `threshold_db` below the loudest one. A noise floor within
    `threshold_db` of the speech counts as voiced, so on noisy recordings nothing is trimmed."""
    windows = wav[: wav.numel() - wav.numel() % VAD_WINDOW].view(-1, VAD_WINDOW)
    level = 10 * torch.log10(windows.square().mean(dim=1) + 1e-12)  # (W,) dB
    return level > level.max() - threshold_db


def webrtc_flags(wav: torch.Tensor, mode: int = 3) -> torch.Tensor:
    """(n_windows,) bool: 30 ms windows that WebRTC's voice-activity detector (most aggressive `mode`, as
    resemblyzer) calls speech. It models speech against the noise it sees, so it holds on a noise floor."""
    try:
        import webrtcvad
    except ImportError as err:
        raise ImportError(
            "GE2EEncoder(vad='webrtc') needs the webrtcvad module: `pip install webrtcvad-wheels==2.0.14.post1` "
            "(requirements.txt), or set --encoder.init_args.vad energy"
        ) from err
    n = wav.numel() // VAD_WINDOW
    # resemblyzer's int16 conversion, clipped where its astype would wrap
    pcm = (wav[: n * VAD_WINDOW] * INT16_MAX).round().clamp(-INT16_MAX - 1, INT16_MAX).to(torch.int16)
    data, step = pcm.cpu().numpy().tobytes(), 2 * VAD_WINDOW
    vad = webrtcvad.Vad(mode)
    flags = [vad.is_speech(data[i * step : (i + 1) * step], SAMPLE_RATE) for i in range(n)]
    return torch.tensor(flags, dtype=torch.bool)


def smooth_and_dilate(flags: torch.Tensor) -> torch.Tensor:
    """Per-window voice flags -> the kept windows: an 8-window moving average (rounded half to even), then
    dilated by 3 windows each side (resemblyzer's steps)."""
    padded = F.pad(flags.float()[None, None], ((VAD_AVERAGE - 1) // 2, VAD_AVERAGE // 2))
    mask = torch.round(F.avg_pool1d(padded, VAD_AVERAGE, stride=1)[0, 0])
    k = VAD_MAX_SILENCE + 1
    return F.max_pool1d(mask[None, None], k, stride=1, padding=k // 2)[0, 0].bool()


def trim_long_silences(wav: torch.Tensor, vad: Vad = "webrtc", threshold_db: float = 40.0) -> torch.Tensor:
    """The waveform without silences longer than ~0.2 s (trailing partial 30 ms window dropped, as resemblyzer);
    unchanged when nothing counts as voiced. `vad`: "webrtc" (resemblyzer's detector) or "energy"
    (`energy_flags` with `threshold_db`)."""
    if wav.numel() < VAD_WINDOW:
        return wav
    flags = webrtc_flags(wav) if vad == "webrtc" else energy_flags(wav, threshold_db)
    mask = smooth_and_dilate(flags.to(wav.device))
    if not mask.any():
        return wav
    keep = mask.repeat_interleave(VAD_WINDOW)
    return wav[: keep.numel()][keep]


class GE2EEncoder(nn.Module):
    """GE2E d-vectors with resemblyzer's pretrained weights (see the module docstring). Embeddings are (N, 256)."""

    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        weights: str | None = None,
        device: str = "cpu",
        trim_silence: bool = True,
        vad: Vad = "webrtc",
        silence_threshold_db: float = 40.0,
        max_partials_per_batch: int = 512,
    ) -> None:
        """
        Args:
            weights: a resemblyzer-format checkpoint (`{"model_state": {lstm.*, linear.*}}`); None reads the
                pretrained.pt of PyPI `resemblyzer` 0.1.4 (install it with --no-deps).
            device: where the frontend and the LSTM run ("cpu", "cuda:2").
            trim_silence: drop silences longer than ~0.2 s before embedding, as resemblyzer does.
            vad: what finds them: "webrtc", resemblyzer's own detector (webrtcvad, PyPI webrtcvad-wheels), which
                holds on noisy recordings; "energy", windows within `silence_threshold_db` of the loudest, no
                extra package, equal on clean audio but trims nothing over a noise floor of -50 dBFS or louder
                (BENCHMARKS.md, "Reward fidelity on real data").
            silence_threshold_db: for vad="energy": a 30 ms window is voiced within this many dB of the loudest.
            max_partials_per_batch: 1.6 s partials per LSTM call; bounds activation memory on long batches.
        """
        super().__init__()
        if silence_threshold_db <= 0 or max_partials_per_batch < 1:
            raise ValueError("--silence_threshold_db must be > 0 and --max_partials_per_batch >= 1")
        if vad not in ("webrtc", "energy"):
            raise ValueError(f"--vad={vad!r} must be 'webrtc' or 'energy'")
        self.lstm = nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        path = Path(weights).expanduser() if weights else resemblyzer_weights()
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model_state", state)
        self.load_state_dict({k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))})
        self.register_buffer("mel_basis", slaney_mel_filterbank(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)
        self.trim_silence = trim_silence
        self.vad = vad
        self.silence_threshold_db = silence_threshold_db
        self.max_partials_per_batch = max_partials_per_batch
        self.requires_grad_(False).eval().to(device)

    @property
    def device(self) -> torch.device:
        return self.linear.weight.device

    def preprocess(self, wav: torch.Tensor) -> torch.Tensor:
        """Volume normalisation, then silence trimming: what resemblyzer's preprocess_wav does at 16 kHz."""
        wav = normalize_volume(wav.float())
        return trim_long_silences(wav, self.vad, self.silence_threshold_db) if self.trim_silence else wav

    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        """1-D waveform -> (frames, 40) power mel spectrogram (librosa.feature.melspectrogram's defaults)."""
        spec = torch.stft(wav, N_FFT, HOP, window=self.window, center=True, pad_mode="constant", return_complex=True)
        return (self.mel_basis @ spec.abs().square()).T

    def partials(self, wav: torch.Tensor) -> torch.Tensor:
        """A preprocessed waveform -> (P, 160, 40) mel partials, zero-padded to cover the last one."""
        slices = partial_slices(wav.numel())
        need = slices[-1][1] * HOP
        if need >= wav.numel():
            wav = F.pad(wav, (0, need - wav.numel()))
        mel = self.mel(wav)
        return torch.stack([mel[a:b] for a, b in slices])

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(P, 160, 40) partials -> (P, 256) unit embeddings."""
        _, (hidden, _) = self.lstm(mels)
        raw = F.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp(min=1e-12)

    @torch.inference_mode()
    def embed(self, wavs: Sequence[torch.Tensor]) -> torch.Tensor:
        """N waveforms at 16 kHz -> (N, 256) unit embeddings on this encoder's device; all partials in one batch."""
        if not wavs:
            return torch.empty(0, 256, device=self.device)
        parts = [self.partials(self.preprocess(w.to(self.device))) for w in wavs]
        counts = [p.shape[0] for p in parts]
        mels = torch.cat(parts)  # (P_total, 160, 40)
        out = torch.cat([self(chunk) for chunk in mels.split(self.max_partials_per_batch)])  # (P_total, 256)
        means = torch.stack([e.mean(dim=0) for e in out.split(counts)])  # (N, 256)
        return means / means.norm(dim=1, keepdim=True).clamp(min=1e-12)


class HFXVectorEncoder(nn.Module):
    """A Hugging Face x-vector speaker-verification model (`AutoModelForAudioXVector`), e.g. WavLM-base-plus-sv.

    For SIM on a scale closer to published tables than GE2E's, where the hub (or a local copy) is reachable:

        encoder:
          class_path: lightning_grpo.reward.speaker_encoder.HFXVectorEncoder
          init_args: {model: microsoft/wavlm-base-plus-sv, device: cuda:2}

    Published SIM (Seed-TTS-eval) uses WavLM-large fine-tuned for verification with UniSpeech's ECAPA-TDNN head, a
    checkpoint outside transformers: wrap it the same way (a class with `sample_rate` and `embed`) to reproduce it.
    """

    sample_rate: int = SAMPLE_RATE

    def __init__(self, model: str = "microsoft/wavlm-base-plus-sv", device: str = "cpu", batch_size: int = 16) -> None:
        """
        Args:
            model: HF repo id or local directory of an x-vector model and its feature extractor.
            device: where the model runs.
            batch_size: waveforms per forward pass (padded to the longest, masked).
        """
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

        if batch_size < 1:
            raise ValueError(f"--batch_size={batch_size} must be >= 1")
        self.features = AutoFeatureExtractor.from_pretrained(model)
        self.sample_rate = int(getattr(self.features, "sampling_rate", SAMPLE_RATE))
        self.model = AutoModelForAudioXVector.from_pretrained(model).requires_grad_(False).eval().to(device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, wavs: Sequence[torch.Tensor]) -> torch.Tensor:
        """N waveforms at `sample_rate` -> (N, D) unit x-vectors."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(wavs), self.batch_size):
            chunk = [w.float().cpu().numpy() for w in wavs[start : start + self.batch_size]]
            inputs = self.features(chunk, sampling_rate=self.sample_rate, padding=True, return_attention_mask=True,
                                   return_tensors="pt")
            out.append(self.model(**{k: v.to(device) for k, v in inputs.items()}).embeddings.float())
        if not out:
            return torch.empty(0, self.model.config.xvector_output_dim, device=device)
        return F.normalize(torch.cat(out), dim=-1)
