"""Prosody floor: a penalty when a sample's pitch movement falls below what the reference policy does for its text.

    spread = std of voiced-F0 in semitones (reward/prosody.py's f0_std_st: Praat-voiced frames of strength
             >= min_strength within voicing_db of the loud frames, so noise and breath add no frames)
    floor  = floor_scale * median spread of the reference policy's own samples of that text
    reward = min(1, spread / floor)

A GRPO run on CER/NLL alone drifts toward monotone speech (Shin et al., arXiv 2509.18531); this component
pays for pitch movement only up to the reference's own level, so exaggerating the contour gains nothing, and
it pays nothing for frames the tracker does not trust. Compose it with the Whisper reward in CompositeReward
under `normalize_then_sum`: a group whose samples all sit above the floor gets 0 from it (constant
component), a sample below the floor loses against its siblings.

Where floors come from, first match wins:
    reference_samples  an `evaluate` samples.jsonl of the reference policy (the warm start), whose rows carry
                       `text` and `prosody/f0_std_st`: `python -m lightning_grpo evaluate --config C.yaml
                       --out_dir runs/ref` then `reference_samples: runs/ref/samples.jsonl`
    learn_floors       a text without one takes it from the first group scored for it (the median of that group's
                       measured spreads, times floor_scale). Early in a run the policy is the reference up to a few
                       updates; floors learnt this way live in memory and are learnt again after a restart.
    floor_st           the fixed fallback, in semitones.

Guards, reward 0 with a reason: invalid_token / empty_speech (codes), and the prosody reasons nonfinite,
too_short (< 0.5 s), silent, unvoiced (fewer than 10 voiced frames or a voiced fraction below
`min_voiced_fraction`: noise or whisper).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from ..llasa import XCODEC2_CODEBOOK_SIZE
from .base import OK, RewardBase, RewardResult, SpeechSample, code_reason
from .codec import SpeechDecoder, XCodec2Decoder
from .prosody import prosody_stats

SPREAD_KEY = "prosody/f0_std_st"


def read_floors(path: str | Path, floor_scale: float) -> dict[str, float]:
    """text -> floor_scale * median `prosody/f0_std_st` over the rows of an evaluate samples.jsonl."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--reference_samples {path} does not exist; write it with "
                                "`python -m lightning_grpo evaluate ... --out_dir DIR` (DIR/samples.jsonl)")
    spreads: dict[str, list[float]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            value = row.get(SPREAD_KEY)
            if isinstance(value, (int, float)) and math.isfinite(value) and "text" in row:
                spreads[row["text"]].append(float(value))
    if not spreads:
        raise ValueError(f"--reference_samples {path} has no row with `text` and a finite {SPREAD_KEY!r}: evaluate with "
                         "a WhisperReward whose `prosody` is on")
    return {text: floor_scale * statistics.median(v) for text, v in spreads.items()}


class ProsodyFloorReward(torch.nn.Module, RewardBase):
    """Reward = min(1, voiced-F0 spread / the reference's floor for the text) (module docstring)."""

    def __init__(
        self,
        codec: SpeechDecoder | str | None = None,
        device: str = "cpu",
        reference_samples: str | None = None,
        learn_floors: bool = True,
        floor_st: float = 1.0,
        floor_scale: float = 0.8,
        min_voiced_fraction: float = 0.2,
        min_strength: float = 0.45,
        batch_size: int = 32,
        codebook_size: int = XCODEC2_CODEBOOK_SIZE,
    ) -> None:
        """
        Args:
            codec: an X-codec2 checkpoint, a SpeechDecoder, or None to share the codec of another reward in the
                same CompositeReward (the usual way: one decode serves all components).
            device: where an X-codec2 codec named by a string runs (pitch tracking runs on the CPU).
            reference_samples: an evaluate samples.jsonl of the reference policy (module docstring); None: none.
            learn_floors: texts without a floor from the file take one from their first scored group.
            floor_st: the floor, in semitones, of texts with no other; espeak-ng's flat `range="x-low"` reading
                measures about 0.35, its default reading about 1.4.
            floor_scale: a floor is this fraction of the reference's median spread (0.8: a 20% drop costs).
            min_voiced_fraction: below this share of voiced frames in the active span a sample is `unvoiced`.
            min_strength: the tracker's confidence (Praat voicing strength, 0..1) a frame needs to count; raise it
                to trust fewer, cleaner frames.
            batch_size: samples decoded per codec call.
            codebook_size: codes must be in [0, codebook_size) (X-codec2: 65,536).
        """
        super().__init__()
        if floor_st <= 0 or not 0 < floor_scale <= 2:
            raise ValueError(f"--floor_st={floor_st} must be > 0 and --floor_scale={floor_scale} in (0, 2]")
        if not 0 <= min_voiced_fraction < 1 or not 0 <= min_strength < 1 or batch_size < 1:
            raise ValueError(f"--min_voiced_fraction={min_voiced_fraction} and --min_strength={min_strength} must be in "
                             f"[0, 1), --batch_size={batch_size} >= 1")
        self.codec = XCodec2Decoder(codec, device=device) if isinstance(codec, str) else codec
        if self.codec is not None and not isinstance(self.codec, SpeechDecoder):
            raise TypeError(f"--codec must be a SpeechDecoder, a checkpoint string or null, got {type(codec)}")
        self.floors: dict[str, float] = read_floors(reference_samples, floor_scale) if reference_samples else {}
        self.learn_floors = learn_floors
        self.floor_st, self.floor_scale = floor_st, floor_scale
        self.min_voiced_fraction, self.min_strength = min_voiced_fraction, min_strength
        self.batch_size = batch_size
        self.codebook_size = codebook_size
        self.timings: dict[str, float] = defaultdict(float)

    def _decode(self, codes: list[list[int]]) -> list[torch.Tensor]:
        if self.codec is None:
            raise RuntimeError("ProsodyFloorReward has no codec: set its `codec:` or list it in a CompositeReward beside "
                               "a reward that has one (WhisperReward), which then shares its codec")
        out = []
        for start in range(0, len(codes), self.batch_size):
            out.extend(self.codec.decode(codes[start : start + self.batch_size]))
        return out

    def _learn(self, samples: Sequence[SpeechSample], spread: torch.Tensor) -> None:
        first: dict[str, list[float]] = defaultdict(list)
        group_of: dict[str, int | None] = {}
        for s, value in zip(samples, spread.tolist()):
            if s.text in self.floors or not math.isfinite(value):
                continue
            # the first group of a text in this call; behind a reward owner groups are None: all its samples here
            if group_of.setdefault(s.text, s.group) == s.group:
                first[s.text].append(value)
        for text, values in first.items():
            self.floors[text] = self.floor_scale * statistics.median(values)

    @torch.inference_mode()
    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        n = len(samples)
        reasons = [code_reason(s, self.codebook_size) for s in samples]
        spread, voiced = torch.full((n,), math.nan), torch.full((n,), math.nan)
        todo = [i for i in range(n) if reasons[i] == OK]
        if todo:
            t0 = time.perf_counter()
            audios = self._decode([list(samples[i].codes) for i in todo])
            t1 = time.perf_counter()
            stats = prosody_stats(audios, [samples[i].text for i in todo], self.codec.sample_rate,
                                  min_strength=self.min_strength)
            self.timings["decode"] += t1 - t0
            self.timings["prosody"] += time.perf_counter() - t1
            for j, i in enumerate(todo):
                reasons[i] = stats.reasons[j]
                voiced[i] = stats.values["voiced_fraction"][j]
                if reasons[i] == OK and voiced[i] < self.min_voiced_fraction:
                    reasons[i] = "unvoiced"
                if reasons[i] == OK:
                    spread[i] = stats.values["f0_std_st"][j]
        if self.learn_floors:
            self._learn(samples, spread)
        floor = torch.tensor([self.floors.get(s.text, self.floor_st) for s in samples])
        ratio = spread / floor
        rewards = torch.where(spread.isnan(), torch.zeros(n), ratio.clamp(max=1.0))
        return RewardResult(rewards=rewards.float(), reasons=reasons,
                            metrics={"prosody_floor/floor_st": floor.float(), "prosody_floor/ratio": ratio.float()})
