"""Speaker similarity with real weights (resemblyzer's GE2E, read by our own encoder) on espeak-ng voices."""

from __future__ import annotations

import itertools
import math

import pytest
import soundfile as sf
import torch

from lightning_grpo.reward.audio import load_wav, resample
from lightning_grpo.reward.base import SpeechSample
from lightning_grpo.reward.composite import CompositeReward
from lightning_grpo.reward.speaker import SpeakerSimilarityReward
from lightning_grpo.reward.speaker_encoder import GE2EEncoder, SpeakerEncoder, partial_slices, trim_long_silences
from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak

# Three clearly different espeak-ng voices (male default, female variant, klatt synthesis); en-gb+m3, by contrast,
# is close enough to en-us that GE2E rates them as one speaker. Measured over the 36 cases: worst margin 0.082,
# mean 0.262 (same voice 0.85-0.93, other voice 0.49-0.77); BENCHMARKS.md section 12.
VOICES = ("en-us", "en-us+f3", "en-us+klatt2")


@pytest.fixture(scope="module")
def encoder():
    return GE2EEncoder()


@pytest.fixture(scope="module")
def clips():
    return {(v, s): espeak(s, v) for v in VOICES for s in SENTENCES[:3]}


def test_same_voice_scores_higher_than_same_sentence_in_another_voice(encoder, clips):
    """For every voice pair (A, B) and sentence pair (s1, s2): SIM(A:s1 vs reference A:s2) > SIM(A:s1 vs B:s1),
    scored through the reward (generated and reference audio both decoded from codes)."""
    codec = StoredAudioDecoder()
    codes = {k: codec.add(w) for k, w in clips.items()}
    reward = SpeakerSimilarityReward(encoder=encoder, codec=codec)
    cases, batch = [], []
    for a, b in itertools.permutations(VOICES, 2):
        for s1, s2 in itertools.permutations(SENTENCES[:3], 2):
            same = SpeechSample(s1, codes[a, s1], prompt_text=s2, prompt_codes=codes[a, s2])
            other = SpeechSample(s1, codes[a, s1], prompt_text=s1, prompt_codes=codes[b, s1])
            cases.append((a, b, s1, s2))
            batch += [same, other]
    out = reward.score(batch)
    sim = out.metrics["sim"].view(-1, 2)  # (cases, [same voice, other voice])
    assert out.reasons == ["ok"] * len(batch) and torch.isfinite(sim).all()
    margins = sim[:, 0] - sim[:, 1]
    worst = int(margins.argmin())
    assert margins.min() > 0.03, f"{cases[worst]}: same {sim[worst, 0]:.3f} vs other {sim[worst, 1]:.3f}"
    assert torch.equal(out.rewards, out.metrics["sim"].clamp(min=0))


def test_batched_embeddings_equal_one_at_a_time(encoder, clips):
    wavs = [clips[v, SENTENCES[i]] for i, v in enumerate(VOICES)]
    together = encoder.embed(wavs)
    alone = torch.cat([encoder.embed([w]) for w in wavs])
    assert together.shape == (3, 256) and torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(3), atol=1e-5)


def test_reference_from_a_wav_file_at_another_rate(encoder, clips, tmp_path):
    """prompt_wav is read and resampled (22.05 kHz -> 16 kHz) and scores like the same audio decoded from codes."""
    voice, text = VOICES[1], SENTENCES[1]
    ref = clips[voice, text]
    path = tmp_path / "ref.wav"
    sf.write(path, resample(ref, 16_000, 22_050).numpy(), 22_050)
    codec = StoredAudioDecoder()
    gen, ref_codes = codec.add(clips[voice, SENTENCES[0]]), codec.add(ref)
    reward = SpeakerSimilarityReward(encoder=encoder, codec=codec)
    out = reward.score([SpeechSample("x", gen, prompt_wav=str(path)), SpeechSample("x", gen, prompt_text=text, prompt_codes=ref_codes)])
    assert out.metrics["sim"][0].item() == pytest.approx(out.metrics["sim"][1].item(), abs=0.01)


def test_guards_and_reference_cache(encoder, clips):
    codec = StoredAudioDecoder()
    speech, silence = codec.add(clips[VOICES[0], SENTENCES[0]]), codec.add(torch.zeros(16_000))
    ref = codec.add(clips[VOICES[0], SENTENCES[1]])
    reward = SpeakerSimilarityReward(encoder=encoder, codec=codec)
    with_ref = dict(prompt_text="t", prompt_codes=ref)
    out = reward.score([
        SpeechSample("x", speech, **with_ref),
        SpeechSample("x", speech),  # no reference
        SpeechSample("x", silence, **with_ref),
        SpeechSample("x", [], **with_ref),
        SpeechSample("x", speech, num_invalid=2, **with_ref),
    ])
    assert out.reasons == ["ok", "no_reference", "silent", "empty_speech", "invalid_token"]
    assert out.rewards[0] > 0.5 and torch.equal(out.rewards[1:], torch.zeros(4))
    assert not math.isnan(out.metrics["sim"][0].item()) and out.metrics["sim"][1:].isnan().all()
    embedded = reward.timings["reference_embed"]
    reward.score([SpeechSample("x", speech, **with_ref)])
    assert reward.timings["reference_embed"] == embedded  # the reference came from the cache


def test_a_silent_reference_is_a_reason_not_a_similarity(encoder, clips, tmp_path):
    """Any voice would match an embedding of silence: a silent reference (codes or recording) scores 0 with its
    reason, is never embedded, and leaves the other rows of the call scored."""
    codec = StoredAudioDecoder()
    speech, quiet, ref = (codec.add(clips[VOICES[0], SENTENCES[0]]), codec.add(torch.zeros(16_000)),
                          codec.add(clips[VOICES[0], SENTENCES[1]]))
    wav = tmp_path / "silent.wav"
    sf.write(wav, torch.zeros(16_000).numpy(), 16_000)
    reward = SpeakerSimilarityReward(encoder=encoder, codec=codec)
    out = reward.score([
        SpeechSample("x", speech, prompt_text="t", prompt_codes=quiet),
        SpeechSample("x", speech, prompt_wav=str(wav)),
        SpeechSample("x", speech, prompt_text="t", prompt_codes=ref),
    ])
    assert out.reasons == ["silent_reference", "silent_reference", "ok"]
    assert torch.equal(out.rewards[:2], torch.zeros(2)) and out.metrics["sim"][:2].isnan().all()
    assert out.rewards[2] > 0.5


def test_without_a_codec_it_says_where_to_get_one(encoder):
    with pytest.raises(RuntimeError, match="no codec.*CompositeReward"):
        SpeakerSimilarityReward(encoder=encoder).score([SpeechSample("x", [1], prompt_text="t", prompt_codes=[1])])


class LoudnessEncoder:
    """A stand-in encoder with another embedding size: proves the seam, not speaker identity."""

    sample_rate = 8_000

    def __init__(self) -> None:
        self.seen_rates = []

    def embed(self, wavs):
        self.seen_rates.append(len(wavs))
        feats = torch.stack([torch.stack([w.abs().mean(), w.std(), torch.tensor(1.0)]) for w in wavs])
        return feats / feats.norm(dim=1, keepdim=True)


def test_a_custom_encoder_plugs_in_and_gets_its_own_sample_rate(clips):
    enc = LoudnessEncoder()
    assert isinstance(enc, SpeakerEncoder)
    codec = StoredAudioDecoder()
    gen, ref = codec.add(clips[VOICES[0], SENTENCES[0]]), codec.add(clips[VOICES[0], SENTENCES[1]])
    out = SpeakerSimilarityReward(encoder=enc, codec=codec).score([SpeechSample("x", gen, prompt_text="t", prompt_codes=ref)])
    assert out.reasons == ["ok"] and 0.9 < out.metrics["sim"].item() <= 1.0


def test_sim_in_a_composite_shares_the_codec_of_its_neighbour(encoder, clips):
    class CodecOwner:
        def __init__(self, codec):
            self.codec = codec

        def score(self, samples):
            from lightning_grpo.reward.base import RewardResult

            self.codec.decode([s.codes for s in samples])
            return RewardResult(rewards=torch.zeros(len(samples)))

    codec = StoredAudioDecoder()
    gen, ref = codec.add(clips[VOICES[2], SENTENCES[0]]), codec.add(clips[VOICES[2], SENTENCES[2]])
    sim = SpeakerSimilarityReward(encoder=encoder)  # no codec of its own
    composite = CompositeReward({"owner": CodecOwner(codec), "sim": sim})
    out = composite.score([SpeechSample("x", gen, prompt_text="t", prompt_codes=ref, group=0)] * 2)
    assert composite.codec.decoded == 2  # the generated sequence once (shared), the reference once
    assert out.reasons == ["ok", "ok"] and (out.metrics["sim"] > 0.5).all()


def test_frontend_pieces():
    # resemblyzer's partial rule (values from its compute_partial_slices): 1.6 s windows every 77 frames,
    # the last kept when 75% covered (3 s: the third covers 91%; 1.875 s: the second covers 42%, dropped)
    assert partial_slices(16_000) == [(0, 160)] and partial_slices(30_000) == [(0, 160)]
    assert partial_slices(3 * 16_000) == [(0, 160), (77, 237), (154, 314)]
    # a 2 s silence between two 1 s tones is cut to at most 7 windows of 30 ms (0.21 s); the tones stay
    tone = torch.sin(torch.arange(16_000) * 2 * math.pi * 220 / 16_000) * 0.3
    trimmed = trim_long_silences(torch.cat([tone, torch.zeros(32_000), tone]))
    assert 32_000 - 480 <= trimmed.numel() <= 32_000 + 7 * 480
    # resampling keeps a tone a tone
    t = torch.arange(22_050) / 22_050
    out = resample(torch.sin(2 * math.pi * 440 * t), 22_050, 16_000)
    ref = torch.sin(2 * math.pi * 440 * torch.arange(16_000) / 16_000)
    assert out.numel() == 16_000 and (out[200:-200] - ref[200:-200]).abs().max() < 1e-2


def test_load_wav_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt_wav"):
        load_wav(tmp_path / "missing.wav")


def test_hf_xvector_encoder_plugs_in_by_class_path(tmp_path, clips):
    """The documented class_path for WavLM-style x-vector models loads a (tiny, random) model from a directory and
    serves the reward; with hub access the same line takes microsoft/wavlm-base-plus-sv."""
    from jsonargparse import ArgumentParser
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    from lightning_grpo.reward.base import Reward

    config = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, tdnn_dim=(32, 32), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1),
                         xvector_output_dim=24, feat_extract_norm="layer")
    torch.manual_seed(0)
    WavLMForXVector(config).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(sampling_rate=16_000, return_attention_mask=True).save_pretrained(tmp_path)
    parser = ArgumentParser()
    parser.add_argument("--reward", type=Reward)
    cfg = parser.parse_object({"reward": {
        "class_path": "lightning_grpo.reward.speaker.SpeakerSimilarityReward",
        "init_args": {"encoder": {"class_path": "lightning_grpo.reward.speaker_encoder.HFXVectorEncoder",
                                  "init_args": {"model": str(tmp_path), "batch_size": 2}},
                      "codec": {"class_path": "reward_fixtures.StoredAudioDecoder"}}}})
    reward = parser.instantiate(cfg).reward
    stored = reward.codec
    gen = [stored.add(clips[v, SENTENCES[0]][:24_000]) for v in VOICES]
    ref = stored.add(clips[VOICES[0], SENTENCES[1]][:20_000])
    out = reward.score([SpeechSample("x", g, prompt_text="t", prompt_codes=ref) for g in gen])
    assert out.reasons == ["ok"] * 3 and torch.isfinite(out.metrics["sim"]).all()
    emb = reward.encoder.embed([clips[VOICES[0], SENTENCES[0]], clips[VOICES[1], SENTENCES[1]], clips[VOICES[2], SENTENCES[2]]])
    assert emb.shape == (3, 24) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
