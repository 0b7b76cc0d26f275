"""DNSMOSReward: speechmos's DNSMOS P.835 on espeak-ng speech, batched, with bad inputs and a missing package."""

import math
import sys

import numpy as np
import pytest
import torch

from lightning_grpo.reward import SpeechSample
from lightning_grpo.reward.naturalness import DNSMOSReward
from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak

pytest.importorskip("onnxruntime", reason="DNSMOSReward needs onnxruntime and speechmos (requirements.txt)")


@pytest.fixture(scope="module")
def decoder():
    return StoredAudioDecoder()


@pytest.fixture(scope="module")
def reward(decoder):
    return DNSMOSReward(codec=decoder, batch_size=8)


def degraded(text: str) -> dict[str, torch.Tensor]:
    clean = espeak(text)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=g) * clean.square().mean().sqrt() / 10 ** (5 / 20)  # 5 dB SNR
    return {"clean": clean, "noisy": (clean + noise).clamp(-1, 1), "clipped": (30 * clean).clamp(-1, 1)}


def test_clean_speech_beats_noisy_and_clipped_speech(reward, decoder):
    for text in SENTENCES[:2]:
        wavs = degraded(text)
        result = reward.score([SpeechSample(text, decoder.add(w)) for w in wavs.values()])
        clean, noisy, clipped = result.rewards.tolist()
        assert clean > noisy + 0.1 and clean > clipped + 0.05, (text, result.metrics["dnsmos_ovrl"].tolist())
        assert result.metrics["dnsmos_bak"][0] > result.metrics["dnsmos_bak"][1]  # the noise is heard as background
        assert result.rewards.tolist() == pytest.approx(((result.metrics["dnsmos_ovrl"] - 1) / 4).tolist())


def test_matches_speechmos_own_pipeline(reward):
    librosa = pytest.importorskip("librosa", reason="speechmos.dnsmos imports librosa (benchmark-only here)")
    from speechmos import dnsmos

    wav = espeak(SENTENCES[0]).numpy()
    expected = dnsmos.run(wav, 16_000)
    got = reward.mos([wav])[0]
    assert got.tolist() == pytest.approx([expected["sig_mos"], expected["bak_mos"], expected["ovrl_mos"]], abs=1e-4)
    assert librosa is not None


def test_batched_equals_one_by_one(reward, decoder):
    wavs = [espeak(s) for s in SENTENCES[:3]]
    samples = [SpeechSample(t, decoder.add(w)) for t, w in zip(SENTENCES, wavs)]
    batched = reward.score(samples).rewards
    single = torch.cat([reward.score([s]).rewards for s in samples])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_bad_inputs_score_zero_with_a_reason(reward, decoder):
    speech = espeak(SENTENCES[0])
    wavs = [speech.index_fill(0, torch.tensor([7]), math.nan), speech[:4000], torch.zeros(32_000)]
    samples = [SpeechSample("x", decoder.add(w)) for w in wavs] + [SpeechSample("x", []), SpeechSample("x", [70_000])]
    result = reward.score(samples)
    assert result.reasons == ["nonfinite", "too_short", "silent", "empty_speech", "invalid_token"]
    assert result.rewards.tolist() == [0.0] * 5
    assert all(math.isnan(v) for v in result.metrics["dnsmos_ovrl"].tolist())


def test_a_missing_package_stops_at_start_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime==.* speechmos=="):
        DNSMOSReward()


def test_cuda_without_the_gpu_runtime_names_the_package():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        DNSMOSReward(device="cuda:0")


def test_windows_tile_short_audio_and_hop_long_audio():
    from lightning_grpo.reward.naturalness import windows

    assert windows(np.ones(16_000, dtype=np.float32)).shape == (7, 144_160)  # doubled to 16 s, as speechmos does
    assert windows(np.ones(16_000 * 12, dtype=np.float32)).shape == (3, 144_160)  # 9.01 s windows every second
