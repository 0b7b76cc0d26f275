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
from lightning_grpo.reward.prosody import prosody_stats
from lightning_grpo.reward.base import SpeechSample
from lightning_grpo.reward.tone import ToneCodec, ToneReward

ROOT = Path(__file__).parents[1]
SR = 16_000


def test_tone_codec_glides_through_each_codes_pitch_and_praat_reads_its_movement():
    codec = ToneCodec()
    half = codec.frame // 2
    contour = codec.contour([0, 28, 60, 14])
    assert contour[half].item() == pytest.approx(100.0) and contour[codec.frame + half].item() == pytest.approx(200.0)
    # up from 100 Hz to 200 Hz, then down toward the next voiced code's 141 Hz across the noise frame
    assert 100.0 < contour[codec.frame + half - 10] < 200.0 and 141.0 < contour[codec.frame + half + 10] < 200.0
    assert (contour[2 * codec.frame: 3 * codec.frame] == 0).all()  # the noise frame
    torch.testing.assert_close(contour[3 * codec.frame + half:], torch.full((half,), 100 * 2 ** 0.5))  # held after the last centre
    # the project's pitch tracker (Praat) reads the movement of alternating codes, an octave and two octaves apart
    waves = codec.decode([[28] * 16, [0, 28] * 8, [0, 55] * 8])
    stats = prosody_stats(waves, ["x"] * 3)
    for i, codes in enumerate([[28] * 16, [0, 28] * 8, [0, 55] * 8]):
        track = stats.tracks[i]  # the contour's own movement over the frames Praat voiced
        truth = 12 * torch.log2(codec.contour(codes)[(track.times[track.voiced] * SR).long()].double())
        assert track.voiced.float().mean() > 0.9
        assert stats.values["f0_std_st"][i].item() == pytest.approx(truth.std().item(), abs=0.2), codes
    assert stats.values["f0_std_st"][0] < 0.05 < 3 < stats.values["f0_std_st"][1] < 6 < stats.values["f0_std_st"][2]
    assert stats.tracks[0].f0[stats.tracks[0].voiced].median().item() == pytest.approx(200.0, rel=0.01)


def test_tone_reward_counts_noise_frames():
    codec = ToneCodec()
    assert codec.decode([[28] * 8])[0].numel() == 8 * int(0.08 * SR)
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
            if len(wave) >= SR // 2:
                assert s["prosody"]["reason"] == "ok" and s["prosody"]["voiced_fraction"] > 0.5
                assert s["prosody"]["f0_std_st"] > 0
            else:  # under reward/prosody.py's min_duration_s: not measured
                assert s["prosody"]["reason"] == "too_short" and s["prosody"]["f0_std_st"] is None
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_pairs(out)


def test_pairs_refuses_a_reward_without_codec_and_bad_k(tmp_path):
    with pytest.raises(ValueError, match="has no codec"):
        main(["pairs", "--config", str(ROOT / "configs/tiny_cpu.yaml"), "--data", "builtin:en",
              "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="--k=1"):
        main(["pairs", "--data", "builtin:en", "--out", str(tmp_path / "p"), "--k", "1"])
