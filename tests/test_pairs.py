"""`python -m lightning_grpo pairs`: the intelligibility gate, the pairing, the audio and manifest it writes; the
prosody statistics in the manifest; the tone world's codec and reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import soundfile
import torch

from lightning_grpo.cli import main
from lightning_grpo.pairs import PairCollector
from lightning_grpo.prosody import prosody_stats
from lightning_grpo.reward.base import SpeechSample
from lightning_grpo.reward.tone import ToneCodec, ToneReward

ROOT = Path(__file__).parents[1]
SR = 16_000


def tone(freqs: torch.Tensor) -> torch.Tensor:
    """A sine whose frequency follows `freqs` (Hz per sample), with a second harmonic."""
    phase = torch.cumsum(2 * math.pi * freqs / SR, 0)
    return 0.3 * torch.sin(phase) + 0.1 * torch.sin(2 * phase)


def test_prosody_of_a_steady_tone_two_pitches_and_silence():
    steady = prosody_stats(tone(torch.full((SR,), 200.0)), SR)
    # the harmonic's and the sub-period's peaks do not pull f0 an octave off
    assert steady["f0_mean_hz"] == pytest.approx(200.0, rel=0.01)
    assert steady["f0_std_semitones"] < 0.1 and steady["voiced_fraction"] == 1.0
    jump = prosody_stats(tone(torch.where(torch.arange(SR) < SR // 2, 100.0, 200.0)), SR)
    assert jump["f0_std_semitones"] == pytest.approx(6.0, abs=0.3)  # half at -6, half at +6 semitones of the mean
    assert jump["f0_range_semitones"] == pytest.approx(12.0, abs=0.3)
    silent = prosody_stats(torch.zeros(SR), SR)
    assert silent["voiced_fraction"] == 0.0 and math.isnan(silent["f0_std_semitones"])
    assert prosody_stats(torch.randn(SR, generator=torch.Generator().manual_seed(0)) * 0.1, SR)["voiced_fraction"] < 0.1


def test_tone_codec_pitch_follows_codes_and_reward_counts_noise_frames():
    codec = ToneCodec()
    flat, moving = codec.decode([[28] * 8, [0, 55] * 4])
    assert flat.numel() == 8 * int(0.08 * SR)
    assert prosody_stats(flat, SR)["f0_mean_hz"] == pytest.approx(200.0, rel=0.02)
    assert prosody_stats(moving, SR)["f0_std_semitones"] > 10 > prosody_stats(flat, SR)["f0_std_semitones"] + 9
    res = ToneReward().score([SpeechSample("t", [1, 2, 60, 61]), SpeechSample("t", []),
                              SpeechSample("t", [1], num_invalid=1)])
    assert res.metrics["cer"].tolist() == [0.5, 1.0, 1.0]
    assert res.reasons == ["ok", "empty_speech", "invalid_token"]
    with pytest.raises(ValueError, match="decodes codes 0..63"):
        codec.decode([[64]])


def sample(codes, cer=0.0, reason="ok", truncated=False):
    return {"codes": codes, "stopped": not truncated, "cer": cer, "reward": 1 - (cer or 0), "reason": reason,
            "truncated": truncated, "transcript": None}


def test_gate_and_pairing():
    c = PairCollector(max_cer=0.2, pairs_per_prompt=2)
    c.groups = [
        {"text": "x", "language": "en", "samples": [
            sample([1]), sample([2], cer=0.5), sample([1]),  # too many errors; a duplicate of the first
            sample([3], reason="empty_speech"), sample([4], truncated=True), sample([5], cer=None),
            sample([6], cer=math.nan), sample([7], cer=0.2), sample([8]), sample([9])]},
        {"text": "y", "language": "en", "samples": [sample([1]), sample([2], cer=0.3)]},  # one passes: no pair
    ]
    pairs = c.pairs()
    assert [(p["pair_id"], p["a"]["codes"], p["b"]["codes"]) for p in pairs] == [("00000-0", [1], [7]),
                                                                                  ("00000-1", [8], [9])]
    assert PairCollector(max_cer=None, keep_truncated=True).passes(sample([4], cer=None, truncated=True))


def run_pairs(out: Path, *extra: str) -> list[dict]:
    main(["pairs", "--config", str(ROOT / "configs/tiny_preference.yaml"), "--data", "builtin:en", "--out", str(out),
          "--data.max_val_samples=8", *extra])
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_pairs_from_the_cli_pass_the_gate_with_audio_and_prosody(tmp_path):
    out = tmp_path / "pairs"
    pairs = run_pairs(out, "--k", "4", "--max_cer", "0.15", "--keep_truncated")
    meta = json.loads((out / "pairs.json").read_text())
    assert meta["prompts"] == 8 and meta["samples"] == 32 and meta["pairs"] == len(pairs) > 0
    assert meta["round_id"] and meta["max_cer"] == 0.15
    for p in pairs:
        assert p["a"]["codes"] != p["b"]["codes"]
        for side in "ab":
            s = p[side]
            assert s["cer"] <= 0.15
            assert s["cer"] == pytest.approx(sum(c >= 56 for c in s["codes"]) / len(s["codes"]))
            wave, rate = soundfile.read(out / s["wav"])
            assert rate == SR and len(wave) == len(s["codes"]) * int(0.08 * SR)
            assert s["prosody"]["duration_s"] == pytest.approx(len(wave) / SR)
            assert s["prosody"]["f0_std_semitones"] is not None
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_pairs(out)


def test_pairs_refuses_a_reward_without_codec_and_bad_k(tmp_path):
    with pytest.raises(ValueError, match="has no codec"):
        main(["pairs", "--config", str(ROOT / "configs/tiny_cpu.yaml"), "--data", "builtin:en",
              "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="--k=1"):
        main(["pairs", "--data", "builtin:en", "--out", str(tmp_path / "p"), "--k", "1"])
