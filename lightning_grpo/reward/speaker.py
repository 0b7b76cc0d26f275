"""Speaker similarity (SIM): does the continuation keep the voice of the voice-cloning prompt's reference?

    sim    = cos(encoder(generated audio), encoder(reference audio))       logged per sample as `sim`
    reward = max(sim, 0)

The reference audio is the row's recording (`prompt_wav`) when it names one, else its reference codes
(`prompt_codes`) decoded with this reward's codec. Published SIM numbers (Seed-TTS-eval, arXiv 2511.21270)
use WavLM-large fine-tuned for speaker verification; the default encoder here is the GE2E d-vector model
PyPI resemblyzer ships (reward/speaker_encoder.py), which runs offline on a CPU. Its cosine is on another
scale (same espeak-ng voice 0.85-0.93, other voices 0.49-0.77; BENCHMARKS.md, "Multi-reward") and not comparable
with papers' figures; bring a WavLM or ECAPA encoder through the `SpeakerEncoder` seam for those (`encoder:`
class_path, e.g. speaker_encoder.HFXVectorEncoder).

Batched: one codec decode per `batch_size` generated samples, every generated and every new reference
waveform through the encoder in one call, reference embeddings cached across calls (a data set's references
repeat every epoch). Guards, each reward 0 with a reason and `sim` not measured (NaN):
    invalid_token  non-speech ids in the speech span or codes outside the codebook
    empty_speech   no codes
    no_reference   the row has neither prompt_codes nor prompt_wav (SIM has nothing to compare with)
    silent         generated audio with RMS below `silence_rms`
    non_finite     NaN or inf samples in the generated audio or the reference clip, or in an embedding
    silent_reference  the reference clip (recording or decoded codes) is below `silence_rms`: any voice would
                   "match" an embedding of silence, so there is nothing to compare with
    short_reference   the reference clip is shorter than `min_reference_seconds` (1.5 s): a GE2E d-vector of
                   less speech no longer tells voices apart (measured in BENCHMARKS.md, "Reward fidelity on real data")
    bad_reference  the reference recording cannot be read (missing, not audio); a warning names it once, and
                   only its rows fail: the other rows of the call are scored
All G completions of a prompt share its reference, so `no_reference` and the reference's own reasons
(silent_reference, short_reference, bad_reference) are constant within a group and leave its advantages unchanged.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, defaultdict
from typing import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..llasa import XCODEC2_CODEBOOK_SIZE
from .audio import load_wav, resample
from .base import OK, RewardBase, RewardResult, SpeechSample, code_reason
from .codec import SpeechDecoder, XCodec2Decoder
from .speaker_encoder import GE2EEncoder, SpeakerEncoder

ReferenceKey = tuple[str, tuple[int, ...] | str]
# From 1.25 s on, no same-voice reference scored below a whole-sentence other voice (GE2E, 3 espeak-ng voices x
# 4 sentences; at 1.0 s, 7 of 36 did); 1.5 s keeps one measured step of margin (BENCHMARKS.md, "Reward fidelity on real data").
MIN_REFERENCE_SECONDS = 1.5
# Verdicts on a reference clip that hold until it changes, so they are cached like embeddings.
CACHED_REASONS = ("silent_reference", "short_reference")


def reference_key(s: SpeechSample) -> ReferenceKey | None:
    """What identifies a sample's reference voice: its recording's path, else its codes; None without one."""
    if s.prompt_wav:
        return ("wav", s.prompt_wav)
    if s.prompt_codes:
        return ("codes", tuple(int(c) for c in s.prompt_codes))
    return None


class SpeakerSimilarityReward(torch.nn.Module, RewardBase):
    """Reward = cosine similarity of speaker embeddings of the generated and the reference speech (module doc)."""

    def __init__(
        self,
        encoder: SpeakerEncoder | None = None,
        codec: SpeechDecoder | str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        codebook_size: int = XCODEC2_CODEBOOK_SIZE,
        silence_rms: float = 1e-3,
        min_reference_seconds: float = MIN_REFERENCE_SECONDS,
        reference_cache_size: int = 4096,
    ) -> None:
        """
        Args:
            encoder: a SpeakerEncoder (`class_path` in YAML: WavLM / ECAPA wrappers of your own); None builds the
                GE2E encoder with resemblyzer's pretrained weights on `device`.
            codec: decodes the generated codes and the reference codes: a SpeechDecoder, an X-codec2 checkpoint
                (HF id or dir), or None to share the codec of another reward in the same CompositeReward (one
                decode serves both; see reward/composite.py). Standalone, None is an error at the first score.
            device: where the default encoder (and an X-codec2 codec named by a string) runs.
            batch_size: generated samples decoded per codec call.
            codebook_size: codes must be in [0, codebook_size) (X-codec2: 65,536).
            silence_rms: generated audio quieter than this RMS scores 0 as `silent`; a reference as quiet, as `silent_reference`.
            min_reference_seconds: a reference clip shorter than this scores 0 as `short_reference`: too little
                speech for a d-vector (module doc); 0 turns the check off.
            reference_cache_size: reference embeddings kept between calls (least recently used dropped).
        """
        super().__init__()
        if batch_size < 1 or reference_cache_size < 0 or min_reference_seconds < 0:
            raise ValueError(f"--batch_size={batch_size} must be >= 1, --reference_cache_size={reference_cache_size} "
                             f"and --min_reference_seconds={min_reference_seconds} >= 0")
        self.encoder = encoder if encoder is not None else GE2EEncoder(device=device)
        if not isinstance(self.encoder, SpeakerEncoder):
            raise TypeError(f"--encoder must be a SpeakerEncoder (sample_rate, embed(wavs)), got {type(encoder)}")
        self.codec = XCodec2Decoder(codec, device=device) if isinstance(codec, str) else codec
        if self.codec is not None and not isinstance(self.codec, SpeechDecoder):
            raise TypeError(f"--codec must be a SpeechDecoder, a checkpoint string or null, got {type(codec)}")
        self.batch_size = batch_size
        self.codebook_size = codebook_size
        self.silence_rms = silence_rms
        self.min_reference_seconds = min_reference_seconds
        self.reference_cache_size = reference_cache_size
        # key -> (D,) CPU embedding, or the verdict on the clip (silent_reference, short_reference), so that
        # the reference is not read or decoded again
        self._references: OrderedDict[ReferenceKey, torch.Tensor | str] = OrderedDict()
        self.timings: dict[str, float] = defaultdict(float)  # seconds per stage, summed over calls
        self._warned_no_reference = False
        self._warned: set[ReferenceKey] = set()

    def _decoder(self) -> SpeechDecoder:
        if self.codec is None:
            raise RuntimeError(
                "SpeakerSimilarityReward has no codec to turn codes into audio: set its `codec:` (an X-codec2 "
                "checkpoint or a SpeechDecoder class_path), or list it in a CompositeReward beside a reward that has "
                "one (WhisperReward), which then shares its codec"
            )
        return self.codec

    def _decode(self, codes: list[list[int]]) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(codes), self.batch_size):
            out.extend(self._decoder().decode(codes[start : start + self.batch_size]))
        return out

    def _resampled(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        return resample(wav.float(), sample_rate, self.encoder.sample_rate)

    def reference_embeddings(self, keys: Sequence[ReferenceKey]) -> dict[ReferenceKey, torch.Tensor | str]:
        """Embeddings of the given references, or the reason a reference cannot be compared with (module doc).

        Cached ones are reused, the others decoded / read and embedded together. Embeddings and the verdicts
        that belong to the clip itself (silent_reference, short_reference) are cached; bad_reference and
        non_finite are not: a file can be fixed and a decode can go right the next time.
        """
        todo = [k for k in dict.fromkeys(keys) if k not in self._references]
        fresh: dict[ReferenceKey, torch.Tensor | str] = {}
        if todo:
            t0 = time.perf_counter()
            wavs: dict[ReferenceKey, torch.Tensor] = {}
            for k in todo:
                if k[0] == "wav":
                    try:
                        wavs[k] = load_wav(k[1], self.encoder.sample_rate)
                    except (OSError, RuntimeError, ValueError) as err:  # soundfile's errors are RuntimeErrors
                        fresh[k] = "bad_reference"
                        self._warn_once(k, f"SpeakerSimilarityReward: reference {k[1]} is unreadable ({err}); its rows "
                                           "score 0 with reason bad_reference")
            codes = [k for k in todo if k[0] == "codes"]
            if codes:
                rate = self._decoder().sample_rate
                for k, wav in zip(codes, self._decode([list(k[1]) for k in codes])):
                    wavs[k] = self._resampled(wav, rate)
            t1 = time.perf_counter()
            for k, wav in wavs.items():
                fresh[k] = self._audio_reason(wav, reference=True)
            audible = [k for k in wavs if fresh[k] == OK]
            embeddings = self.encoder.embed([wavs[k] for k in audible]).float().cpu() if audible else []
            for k, e in zip(audible, embeddings):
                fresh[k] = e if torch.isfinite(e).all() else "non_finite"
            self.timings["reference_decode"] += t1 - t0
            self.timings["reference_embed"] += time.perf_counter() - t1
            self._references.update({k: v for k, v in fresh.items() if not isinstance(v, str) or v in CACHED_REASONS})
        found = {}
        for k in dict.fromkeys(keys):
            if k in self._references:
                self._references.move_to_end(k)
            found[k] = self._references[k] if k in self._references else fresh[k]
        while len(self._references) > max(self.reference_cache_size, len(found)):
            self._references.popitem(last=False)
        return found

    def _warn_once(self, key: ReferenceKey, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _silent(self, audio: torch.Tensor) -> bool:
        return audio.numel() == 0 or audio.float().square().mean().sqrt().item() < self.silence_rms

    def _audio_reason(self, audio: torch.Tensor, reference: bool) -> str:
        """Why a waveform (at the encoder's rate when a reference) cannot be embedded; OK when it can."""
        if not torch.isfinite(audio).all():
            return "non_finite"
        if self._silent(audio):
            return "silent_reference" if reference else "silent"
        if reference and audio.numel() < self.min_reference_seconds * self.encoder.sample_rate:
            return "short_reference"
        return OK

    def _guard(self, s: SpeechSample) -> str:
        reason = code_reason(s, self.codebook_size)
        if reason == OK and not s.has_reference:
            return "no_reference"
        return reason

    @torch.inference_mode()
    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        n = len(samples)
        reasons = [self._guard(s) for s in samples]
        sim = torch.full((n,), math.nan)
        todo = [i for i in range(n) if reasons[i] == OK]
        if "no_reference" in reasons and not self._warned_no_reference:
            rank_zero_warn(
                "SpeakerSimilarityReward: some samples have no reference voice (neither prompt_codes nor prompt_wav "
                "in their data rows); they score 0 with reason no_reference"
            )
            self._warned_no_reference = True
        if todo:
            t0 = time.perf_counter()
            rate = self._decoder().sample_rate
            audios = self._decode([list(samples[i].codes) for i in todo])
            t1 = time.perf_counter()
            self.timings["decode"] += t1 - t0
            keep, wavs = [], []
            for i, audio in zip(todo, audios):
                reasons[i] = self._audio_reason(audio, reference=False)
                if reasons[i] == OK:
                    keep.append(i)
                    wavs.append(self._resampled(audio.clamp(-1.0, 1.0), rate))
            if keep:
                t2 = time.perf_counter()
                generated = self.encoder.embed(wavs).float().cpu()  # (K, D)
                self.timings["embed"] += time.perf_counter() - t2
                keys = [reference_key(samples[i]) for i in keep]
                refs = self.reference_embeddings(keys)
                for j, (i, k) in enumerate(zip(keep, keys)):
                    if isinstance(refs[k], str):
                        reasons[i] = refs[k]
                    elif not torch.isfinite(generated[j]).all():
                        reasons[i] = "non_finite"
                heard = [j for j, i in enumerate(keep) if reasons[i] == OK]
                if heard:
                    reference = torch.stack([refs[keys[j]] for j in heard])  # (K', D)
                    sim[[keep[j] for j in heard]] = torch.nn.functional.cosine_similarity(generated[heard], reference, dim=1)
        rewards = torch.where(sim.isnan(), torch.zeros(n), sim.clamp(min=0.0))
        return RewardResult(rewards=rewards.float(), metrics={"sim": sim.float()}, reasons=reasons)
