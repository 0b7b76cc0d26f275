"""ProsodyFloorReward on espeak-ng speech: flat speech loses, noise cannot buy pitch movement, floors come from the
reference's samples, and it composes with other rewards under normalize_then_sum."""

import json
import math

import pytest
import torch

from lightning_grpo.reward import SpeechSample
from lightning_grpo.reward.composite import CompositeReward
from lightning_grpo.reward.prosody_reward import ProsodyFloorReward, read_floors
from lightning_grpo.reward.rule import RuleReward
from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak, espeak_ng

pytest.importorskip("parselmouth", reason="prosody statistics need praat-parselmouth (requirements.txt)")
torch.set_num_threads(2)

TEXT = SENTENCES[1]


def ranged(level: str, text: str = TEXT) -> torch.Tensor:
    return espeak_ng(f'<speak><prosody range="{level}">{text}</prosody></speak>', extra=("-m",))


@pytest.fixture(scope="module")
def decoder():
    return StoredAudioDecoder()


def test_flat_speech_is_penalised_and_exaggeration_gains_nothing(decoder):
    reward = ProsodyFloorReward(codec=decoder, learn_floors=False, floor_st=1.2)
    wavs = {"flat": ranged("x-low"), "natural": espeak(TEXT), "wide": ranged("x-high")}
    result = reward.score([SpeechSample(TEXT, decoder.add(w), group=0) for w in wavs.values()])
    flat, natural, wide = result.rewards.tolist()
    assert flat < 0.5 and natural == 1.0 and wide == 1.0
    assert result.reasons == ["ok"] * 3


@pytest.mark.parametrize("snr_db", [20, 10, 5, 0])
def test_noise_added_to_flat_speech_does_not_raise_its_reward(decoder, snr_db):
    reward = ProsodyFloorReward(codec=decoder, learn_floors=False, floor_st=1.2)
    flat = ranged("x-low")
    torch.manual_seed(snr_db)
    noise = torch.randn_like(flat) * flat.square().mean().sqrt() / 10 ** (snr_db / 20)
    result = reward.score([SpeechSample(TEXT, decoder.add(flat)), SpeechSample(TEXT, decoder.add(flat + noise))])
    clean_r, noisy_r = result.rewards.tolist()
    assert noisy_r <= clean_r + 0.1, f"noise at {snr_db} dB raised the prosody reward {clean_r:.3f} -> {noisy_r:.3f}"


def test_bad_inputs_score_zero_with_a_reason(decoder):
    reward = ProsodyFloorReward(codec=decoder, learn_floors=False)
    torch.manual_seed(0)
    wavs = [torch.zeros(16_000), 0.2 * torch.randn(32_000), espeak(TEXT)[:4000],
            espeak(TEXT).index_fill(0, torch.tensor([3]), math.inf)]
    samples = [SpeechSample(TEXT, decoder.add(w)) for w in wavs] + [SpeechSample(TEXT, []),
                                                                      SpeechSample(TEXT, [70_000])]
    result = reward.score(samples)
    assert result.reasons == ["silent", "unvoiced", "too_short", "nonfinite", "empty_speech", "invalid_token"]
    assert result.rewards.tolist() == [0.0] * 6


def test_floors_come_from_the_reference_samples_file(decoder, tmp_path):
    rows = [{"text": TEXT, "prosody/f0_std_st": v} for v in (1.0, 2.0, 4.0)]
    rows += [{"text": "other", "prosody/f0_std_st": None}, {"text": "other", "reward": 1.0}]
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_floors(path, 0.5) == {TEXT: 1.0}  # half the median 2.0; rows without a spread ignored
    reward = ProsodyFloorReward(codec=decoder, reference_samples=str(path), floor_scale=0.5, floor_st=99.0,
                                learn_floors=False)
    natural = espeak(TEXT)
    result = reward.score([SpeechSample(TEXT, decoder.add(natural)), SpeechSample(SENTENCES[0], decoder.add(espeak(SENTENCES[0])))])
    assert result.metrics["prosody_floor/floor_st"].tolist() == [1.0, 99.0]
    assert result.rewards[0] == 1.0 and result.rewards[1] < 0.1
    with pytest.raises(FileNotFoundError, match="reference_samples"):
        ProsodyFloorReward(codec=decoder, reference_samples=str(tmp_path / "missing.jsonl"))


def test_learnt_floor_is_the_first_groups_median(decoder):
    reward = ProsodyFloorReward(codec=decoder, floor_scale=0.8)
    first = [SpeechSample(TEXT, decoder.add(w), group=0) for w in (espeak(TEXT), ranged("x-high"), ranged("high"))]
    result = reward.score(first)
    spreads = result.metrics["prosody_floor/ratio"] * result.metrics["prosody_floor/floor_st"]
    assert reward.floors[TEXT] == pytest.approx(0.8 * spreads.median().item(), rel=1e-5)
    flat = reward.score([SpeechSample(TEXT, decoder.add(ranged("x-low")), group=0)])
    assert reward.floors[TEXT] == pytest.approx(0.8 * spreads.median().item(), rel=1e-5)  # not re-learnt
    assert flat.rewards[0] < 0.5


def test_composes_with_another_reward_under_normalize_then_sum(decoder):
    prosody = ProsodyFloorReward(codec=decoder, learn_floors=False, floor_st=1.2)
    composite = CompositeReward({"prosody": prosody, "rule": RuleReward()},
                                weights={"prosody": 1.0, "rule": 0.0}, aggregation="normalize_then_sum")
    wavs = [ranged("x-low"), espeak(TEXT), ranged("x-high")]
    result = composite.score([SpeechSample(TEXT, decoder.add(w), group=0) for w in wavs])
    raw = result.metrics["reward/prosody"]
    assert raw[0] < raw[1] == raw[2] == 1.0
    assert result.rewards[0] < 0 < result.rewards[1] == result.rewards[2]  # the flat sample loses within its group
    assert abs(result.rewards.sum()) < 1e-5


def test_configuration_errors_name_the_flag():
    with pytest.raises(ValueError, match="--floor_st"):
        ProsodyFloorReward(floor_st=0.0)
    with pytest.raises(ValueError, match="--min_strength"):
        ProsodyFloorReward(min_strength=1.5)
    with pytest.raises(RuntimeError, match="no codec"):
        ProsodyFloorReward().score([SpeechSample(TEXT, [1, 2, 3])])
