"""WhisperReward end to end: stored espeak-ng speech behind a fake codec, real tiny.en weights."""

import math

import pytest
import torch

from lightning_grpo.reward import Reward, SpeechSample
from lightning_grpo.reward.module import WhisperReward
from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak

torch.set_num_threads(2)

TEXT = SENTENCES[0]  # "The quick brown fox jumps over the lazy dog."
ONE_WORD = "The quick brown cat jumps over the lazy dog."
UNRELATED = SENTENCES[1]


@pytest.fixture(scope="module")
def decoder():
    return StoredAudioDecoder()


@pytest.fixture(scope="module")
def reward(decoder):
    return WhisperReward(whisper_model="tiny.en-ct2", codec=decoder, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def cases(decoder):
    """Samples whose ground truth is TEXT, with different speech, scored once in one batch."""
    torch.manual_seed(0)
    audio = {
        "correct": espeak(TEXT),
        "one_word": espeak(ONE_WORD),
        "unrelated": espeak(UNRELATED),
        "noise": 0.1 * torch.randn(3 * 16_000),
        "silence": torch.zeros(2 * 16_000),
    }
    return {name: SpeechSample(TEXT, decoder.add(a), language="en") for name, a in audio.items()}


@pytest.fixture(scope="module")
def scored(reward, cases):
    return dict(zip(cases, _split(reward.score(list(cases.values())))))


def _split(result):
    return [
        {"reward": result.rewards[i].item(), "reason": result.reasons[i], "transcript": result.transcripts[i],
         **{k: v[i].item() for k, v in result.metrics.items()}}
        for i in range(len(result.rewards))
    ]


def test_is_a_reward(reward):
    assert isinstance(reward, Reward)


def test_reward_orders_correct_over_one_word_over_unrelated(scored):
    correct, one_word, unrelated = scored["correct"], scored["one_word"], scored["unrelated"]
    assert correct["reason"] == one_word["reason"] == unrelated["reason"] == "ok"
    # measured: 0.84 / 0.63 / 0.0008 (CER 0.05 / 0.12 / 1.40; NLL 0.64 / 1.59 / 5.93)
    assert correct["reward"] > one_word["reward"] + 0.05
    assert one_word["reward"] > unrelated["reward"] + 0.2
    assert correct["cer"] < 0.1 and correct["nll"] < 1.0
    assert {"cer", "nll", "u_cer", "u_nll"} <= set(correct)
    assert "fox" in correct["transcript"]


def test_silence_and_noise_score_near_zero_with_cer_one(scored):
    assert scored["silence"]["reason"] == "silent" and scored["silence"]["reward"] == 0.0
    assert scored["silence"]["cer"] == 1.0 and math.isnan(scored["silence"]["nll"])
    # noise is transcribed; Whisper's no-speech probability empties the hallucinated transcript
    assert scored["noise"]["reason"] == "ok" and scored["noise"]["transcript"] == ""
    assert scored["noise"]["cer"] == 1.0 and scored["noise"]["reward"] < 0.02


def test_batched_results_equal_one_by_one(reward, cases, scored):
    for name, sample in cases.items():
        (one,) = _split(reward.score([sample]))
        assert one["transcript"] == scored[name]["transcript"], name
        assert one["reason"] == scored[name]["reason"], name
        assert one["reward"] == pytest.approx(scored[name]["reward"], abs=1e-4), name
        if not math.isnan(one["nll"]):
            assert one["nll"] == pytest.approx(scored[name]["nll"], abs=1e-4), name


def test_guards_give_defined_rewards_and_reasons(reward, decoder):
    loud = decoder.add(torch.clamp(20 * espeak(TEXT), -1.5, 1.5))
    samples = [
        SpeechSample(TEXT, [1, 2, 3], num_invalid=2),
        SpeechSample(TEXT, [70_000]),
        SpeechSample(TEXT, []),
        SpeechSample(TEXT, [0] * (30 * 50 + 1)),  # over 30 s at 50 codes/s: never decoded
        SpeechSample(TEXT, loud),
    ]
    r = reward.score(samples)
    assert r.reasons == ["invalid_token", "invalid_token", "empty_speech", "too_long", "clipping"]
    assert r.rewards[:4].tolist() == [0.0] * 4 and r.metrics["cer"][:4].tolist() == [1.0] * 4
    # clipped speech is still scored (it is intelligible), at half the reward
    assert 0 < r.rewards[4].item() <= 0.5 and r.metrics["cer"][4].item() < 0.3
    assert torch.isfinite(r.rewards).all()


def test_original_prefix_switch_changes_only_the_nll(reward, cases, scored):
    reward.nll_prefix = "original"
    try:
        (orig,) = _split(reward.score([cases["correct"]]))
    finally:
        reward.nll_prefix = "full"
    assert orig["transcript"] == scored["correct"]["transcript"]
    assert orig["nll"] > scored["correct"]["nll"] + 1.0  # measured: 2.69 vs 0.63


def test_time_breakdown_is_recorded(reward, scored):
    assert set(reward.timings) == {"decode", "encoder", "decoding", "nll"}
    assert all(t > 0 for t in reward.timings.values())


def test_configuration_errors_name_the_flag(decoder):
    with pytest.raises(ValueError, match="--language='ko'"):
        WhisperReward(whisper_model="tiny.en-ct2", codec=decoder, language="ko")
    with pytest.raises(ValueError, match="--batch_size"):
        WhisperReward(whisper_model="tiny.en-ct2", codec=decoder, batch_size=0)


def test_yaml_config_with_class_path_builds_the_reward():
    """How a LightningCLI config names the reward and its codec (init args become YAML keys)."""
    import yaml
    from jsonargparse import ArgumentParser

    from lightning_grpo.reward.codec import XCodec2Decoder

    config = yaml.safe_load(
        """
        reward:
          class_path: lightning_grpo.reward.module.WhisperReward
          init_args:
            whisper_model: tiny.en-ct2
            device: cpu
            batch_size: 8
            nll_prefix: original
            codec:
              class_path: lightning_grpo.reward.codec.XCodec2Decoder
              init_args: {checkpoint: null, hidden_dim: 64, depth: 2, heads: 4}
        """
    )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=WhisperReward)
    built = parser.instantiate(parser.parse_object(config)).reward
    assert isinstance(built, WhisperReward) and isinstance(built.codec, XCodec2Decoder)
    assert built.batch_size == 8 and built.nll_prefix == "original"
    # a plain string names an X-codec2 checkpoint (parsed here, not downloaded)
    config["reward"]["init_args"]["codec"] = "HKUSTAudio/xcodec2"
    assert parser.parse_object(config).reward.init_args.codec == "HKUSTAudio/xcodec2"
    config["reward"]["init_args"]["nll_prefix"] = "start_only"
    with pytest.raises(Exception, match="start_only"):
        parser.parse_object(config)
