"""Prosody statistics on real espeak-ng speech with known settings, on bad input, and inside WhisperReward."""

import math

import pytest
import torch

from lightning_grpo.reward import SpeechSample
from lightning_grpo.reward.whisper import WhisperReward
from lightning_grpo.reward.prosody import REASONS, STATS, add_group_spreads, group_spread, prosody_metrics, prosody_stats
from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak, espeak_ng

pytest.importorskip("parselmouth", reason="prosody statistics need praat-parselmouth (requirements.txt)")
torch.set_num_threads(2)

TEXT = SENTENCES[1]  # "Please call Stella and ask her to bring these things with her from the store."


def ranged(level: str) -> torch.Tensor:
    return espeak_ng(f'<speak><prosody range="{level}">{TEXT}</prosody></speak>', extra=("-m",))


def one(wav: torch.Tensor, text: str = TEXT) -> tuple[dict[str, float], str]:
    stats = prosody_stats([wav], [text])
    return {k: v[0].item() for k, v in stats.values.items()}, stats.reasons[0]


def test_pitch_spread_orders_monotone_below_default_below_wide_range():
    flat, default, wide = (one(w)[0] for w in (ranged("x-low"), espeak(TEXT), ranged("x-high")))
    assert flat["f0_std_st"] < 0.5 * default["f0_std_st"] < default["f0_std_st"] < wide["f0_std_st"]
    assert flat["f0_range_st"] < default["f0_range_st"] < wide["f0_range_st"]


def test_speaking_rate_follows_espeak_speed():
    slow, _ = one(espeak(TEXT, speed=100))
    fast, _ = one(espeak(TEXT, speed=200))
    assert 1.5 < fast["speaking_rate"] / slow["speaking_rate"] < 2.5
    assert 8 < slow["speaking_rate"] < 20  # characters per second of plain read speech


def test_pause_fraction_sees_an_inserted_break():
    plain, _ = one(espeak(TEXT))
    broken_wav = espeak_ng(f'<speak>Please call Stella. <break time="900ms"/> Ask her to bring these things with her '
                           f'from the store.</speak>', extra=("-m",))
    broken, _ = one(broken_wav)
    assert plain["pause_fraction"] < 0.1
    expected = 0.9 / (broken_wav.numel() / 16_000)
    assert broken["pause_fraction"] > 0.7 * expected


def test_bad_inputs_get_a_reason_and_no_nan_in_logged_means():
    speech = espeak(TEXT)
    torch.manual_seed(0)
    cases = {
        "nan": speech.clone().index_fill_(0, torch.tensor([100]), math.nan),
        "inf": speech.clone().index_fill_(0, torch.tensor([100]), math.inf),
        "short": speech[:4000],
        "silence": torch.zeros(32_000),
        "noise": 0.1 * torch.randn(32_000),
        "clipped": 20 * speech,
    }
    stats = prosody_stats(list(cases.values()), [TEXT] * len(cases))
    reasons = dict(zip(cases, stats.reasons))
    assert reasons == {"nan": "nonfinite", "inf": "nonfinite", "short": "too_short", "silence": "silent",
                       "noise": "unvoiced", "clipped": "ok"}
    noise = {k: v[4].item() for k, v in stats.values.items()}
    assert math.isnan(noise["f0_std_st"]) and noise["voiced_fraction"] < 0.05 and math.isfinite(noise["energy_std_db"])
    assert all(math.isfinite(v[5].item()) for v in stats.values.values())  # clipped speech is measured
    for name, value in prosody_metrics(stats).items():
        assert not torch.isinf(value).any(), name  # NaN = not measured (skipped by the logged means); inf never


def test_group_spread_is_each_groups_std_over_measured_members():
    values = torch.tensor([1.0, 3.0, math.nan, 10.0, 10.0, 7.0])
    spread = group_spread(values, [0, 0, 0, 1, 1, None])
    assert spread[:3].tolist() == pytest.approx([math.sqrt(2)] * 3)
    assert spread[3:5].tolist() == [0.0, 0.0]
    assert math.isnan(spread[5])  # no group


def test_group_spreads_are_added_beside_every_prosody_statistic_in_row_order():
    x = torch.tensor([1.0, 3.0, 5.0, 5.0])
    metrics = {"prosody/f0_std_st": x, "whisper/prosody/speaking_rate": x, "prosody/reason_silent": x, "cer": x}
    add_group_spreads(metrics, group_size=2)
    assert metrics["prosody/f0_std_st_group_std"].tolist() == pytest.approx([math.sqrt(2)] * 2 + [0.0] * 2)
    assert "whisper/prosody/speaking_rate_group_std" in metrics
    assert set(metrics) == {"prosody/f0_std_st", "whisper/prosody/speaking_rate", "prosody/reason_silent", "cer",
                            "prosody/f0_std_st_group_std", "whisper/prosody/speaking_rate_group_std"}


class CountingDecoder(StoredAudioDecoder):
    def __init__(self) -> None:
        super().__init__()
        self.decoded = 0

    def decode(self, codes):
        self.decoded += len(codes)
        return super().decode(codes)


@pytest.fixture(scope="module")
def whisper_case():
    decoder = CountingDecoder()
    reward = WhisperReward(whisper_model="tiny.en-ct2", codec=decoder, device="cpu", batch_size=4)
    wavs = [espeak(TEXT), ranged("x-high"), ranged("x-low"), espeak(SENTENCES[0]),
            espeak(TEXT).index_fill(0, torch.tensor([5]), math.nan)]
    texts = [TEXT, TEXT, TEXT, SENTENCES[0], TEXT]
    samples = [SpeechSample(t, decoder.add(w), language="en", group=g) for t, w, g in zip(texts, wavs, [0, 0, 0, 1, 1])]
    samples.append(SpeechSample(TEXT, [], language="en", group=1))  # not decoded: empty_speech
    result = reward.score(samples)
    return decoder, reward, wavs, texts, result


def test_whisper_reward_reports_the_statistics_of_the_audio_it_decoded_once(whisper_case):
    decoder, reward, wavs, texts, result = whisper_case
    assert decoder.decoded == 5  # the empty sample is never decoded; prosody adds no decode
    expected = prosody_stats(wavs, texts)
    for name in STATS:
        got = result.metrics[f"prosody/{name}"]
        torch.testing.assert_close(got[:5], expected.values[name], equal_nan=True)
        assert math.isnan(got[5])
    assert result.metrics["prosody/f0_std_st"][1] > result.metrics["prosody/f0_std_st"][2]
    assert result.metrics["prosody/reason_nonfinite"].tolist()[:5] == [0, 0, 0, 0, 1]
    assert math.isnan(result.metrics["prosody/reason_nonfinite"][5])
    assert reward.timings["prosody"] > 0


def test_nonfinite_audio_scores_zero_with_a_reason(whisper_case):
    _, _, _, _, result = whisper_case
    assert result.reasons[4] == "nonfinite" and result.rewards[4] == 0.0
    assert result.reasons[:4] == ["ok"] * 4 and (result.rewards[:4] > 0.3).all()


def test_prosody_off_reports_no_prosody_metrics(whisper_case):
    decoder, reward, wavs, texts, _ = whisper_case
    reward.prosody = False
    try:
        result = reward.score([SpeechSample(texts[0], decoder.add(wavs[0]), language="en")])
    finally:
        reward.prosody = True
    assert not any(k.startswith("prosody/") for k in result.metrics)
    assert set(REASONS) == {"nonfinite", "too_short", "silent", "unvoiced"}


def test_pitch_benchmark_smoke_runs_the_shipped_tracker():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_pitch

    table = bench_pitch.main(["--smoke"])
    assert "| parselmouth (shipped) | 0.0 |" in table  # exact on the known contour, as the published table says


def test_audio_shorter_than_the_pitch_window_is_too_short_even_when_allowed():
    tone = 0.3 * torch.sin(2 * math.pi * 150 * torch.arange(400) / 16_000)  # 25 ms: under Praat's 50 ms window
    stats = prosody_stats([tone], [TEXT], min_duration_s=0.0)
    assert stats.reasons == ["too_short"] and all(math.isnan(v[0]) for v in stats.values.values())
