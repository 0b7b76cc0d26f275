"""Speaker similarity with real weights (resemblyzer's GE2E, read by our own encoder) on espeak-ng voices."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import soundfile as sf
import torch

from lightning_grpo.reward.audio import load_wav, resample
from lightning_grpo.reward.base import SpeechSample
from lightning_grpo.reward.composite import CompositeReward
from lightning_grpo.reward.speaker import SpeakerSimilarityReward
from lightning_grpo.reward.speaker_encoder import (
    GE2EEncoder,
    SpeakerEncoder,
    normalize_volume,
    partial_slices,
    trim_long_silences,
)
from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak

# Three clearly different espeak-ng voices (male default, female variant, klatt synthesis); en-gb+m3, by contrast,
# is close enough to en-us that GE2E rates them as one speaker. Measured over the 36 cases: worst margin 0.082,
# mean 0.262 (same voice 0.85-0.93, other voice 0.49-0.77); BENCHMARKS.md, "Multi-reward".
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


def noisy(wav: torch.Tensor, floor_dbfs: float, pad: int = 16_000, seed: int = 0) -> torch.Tensor:
    """`wav` between `pad` samples of silence, all over white noise at `floor_dbfs` (RMS)."""
    out = torch.cat([torch.zeros(pad), wav, torch.zeros(pad)])
    return out + 10 ** (floor_dbfs / 20) * torch.randn(out.numel(), generator=torch.Generator().manual_seed(seed))


def test_silence_trimming_holds_on_a_noise_floor(clips):
    """1 s of noise at -45 dBFS before and after a sentence: the default detector (webrtc) cuts it as it cuts
    clean silence, to at most 0.21 s a side; the energy detector, which only compares with the loudest window,
    keeps it all."""
    speech = clips[VOICES[0], SENTENCES[0]]
    clean = trim_long_silences(normalize_volume(noisy(speech, -200)))
    trimmed = trim_long_silences(normalize_volume(noisy(speech, -45)))
    assert inspect.signature(GE2EEncoder).parameters["vad"].default == "webrtc"  # what the reward builds
    assert 0.8 * speech.numel() <= trimmed.numel() <= speech.numel() + 2 * 7 * 480
    assert abs(trimmed.numel() - clean.numel()) <= 4 * 480
    padded = normalize_volume(noisy(speech, -45))
    assert trim_long_silences(padded, vad="energy").numel() >= padded.numel() - 480


def test_a_noise_floor_inflates_other_voice_similarity_less_with_webrtc(encoder, clips):
    """The reward's target: over a -45 dBFS floor, other-voice SIM rises much less than with the energy detector,
    whose untrimmed noise makes all voices alike (per pair: webrtc +0.02..0.05, energy +0.10..0.18)."""
    wavs = [clips[v, SENTENCES[0]] for v in VOICES]
    pairs = list(itertools.combinations(range(len(VOICES)), 2))

    def rise(enc):
        clean, loud = enc.embed([noisy(w, -200) for w in wavs]), enc.embed([noisy(w, -45) for w in wavs])
        return torch.tensor([float(loud[i] @ loud[j] - clean[i] @ clean[j]) for i, j in pairs])

    webrtc, energy = rise(encoder), rise(GE2EEncoder(vad="energy"))
    assert (webrtc < energy).all() and webrtc.mean() < energy.mean() / 2, (webrtc, energy)


def test_non_finite_audio_is_a_reason_and_its_reference_is_not_cached(encoder, clips, tmp_path):
    """NaN / inf in generated audio or in a reference (codes or recording) scores 0 as non_finite; once the
    recording is fixed at the same path, the next call scores it (the NaN verdict was not cached)."""
    speech, ref = clips[VOICES[0], SENTENCES[0]], clips[VOICES[0], SENTENCES[1]]

    def spoiled(wav, value):
        out = wav.clone()
        out[1000] = value
        return out

    codec = StoredAudioDecoder()
    good, gen_nan, gen_inf = codec.add(speech), codec.add(spoiled(speech, math.nan)), codec.add(spoiled(speech, math.inf))
    ref_ok, ref_nan = codec.add(ref), codec.add(spoiled(ref, math.nan))
    path = tmp_path / "ref.wav"
    sf.write(path, spoiled(ref, math.nan).numpy(), 16_000, subtype="FLOAT")
    reward = SpeakerSimilarityReward(encoder=encoder, codec=codec)
    out = reward.score([
        SpeechSample("x", gen_nan, prompt_text="t", prompt_codes=ref_ok),
        SpeechSample("x", gen_inf, prompt_text="t", prompt_codes=ref_ok),  # clamping would have hidden the inf
        SpeechSample("x", good, prompt_text="t", prompt_codes=ref_nan),
        SpeechSample("x", good, prompt_wav=str(path)),
        SpeechSample("x", good, prompt_text="t", prompt_codes=ref_ok),
    ])
    assert out.reasons == ["non_finite"] * 4 + ["ok"]
    assert torch.equal(out.rewards[:4], torch.zeros(4)) and out.metrics["sim"][:4].isnan().all()
    assert out.rewards[4] > 0.5
    sf.write(path, ref.numpy(), 16_000, subtype="FLOAT")
    again = reward.score([SpeechSample("x", good, prompt_wav=str(path))])
    assert again.reasons == ["ok"] and again.rewards[0] > 0.5


def test_one_unreadable_reference_fails_only_its_row(encoder, clips, tmp_path):
    codec = StoredAudioDecoder()
    gen = codec.add(clips[VOICES[1], SENTENCES[0]])
    missing, not_audio, good = tmp_path / "missing.wav", tmp_path / "notes.wav", tmp_path / "good.wav"
    not_audio.write_text("not audio")
    sf.write(good, clips[VOICES[1], SENTENCES[1]].numpy(), 16_000)
    reward = SpeakerSimilarityReward(encoder=encoder, codec=codec)
    with pytest.warns(UserWarning, match="missing.wav.*bad_reference"):
        out = reward.score([SpeechSample("x", gen, prompt_wav=str(p)) for p in (missing, not_audio, good)])
    assert out.reasons == ["bad_reference", "bad_reference", "ok"]
    assert torch.equal(out.rewards[:2], torch.zeros(2)) and out.metrics["sim"][:2].isnan().all()
    assert out.rewards[2] > 0.5
    sf.write(missing, clips[VOICES[1], SENTENCES[2]].numpy(), 16_000)  # the file appears: read on the next call
    assert reward.score([SpeechSample("x", gen, prompt_wav=str(missing))]).reasons == ["ok"]


def test_a_short_reference_is_a_reason_with_a_configurable_minimum(encoder, clips):
    """0.8 s of the same voice is below the 1.5 s default (a d-vector of it no longer tells voices apart:
    BENCHMARKS.md); min_reference_seconds=0 scores it."""
    codec = StoredAudioDecoder()
    gen = codec.add(clips[VOICES[2], SENTENCES[0]])
    ref = clips[VOICES[2], SENTENCES[1]]
    short, full = codec.add(ref[: int(0.8 * 16_000)]), codec.add(ref)
    rows = [SpeechSample("x", gen, prompt_text="t", prompt_codes=c) for c in (short, full)]
    out = SpeakerSimilarityReward(encoder=encoder, codec=codec).score(rows)
    assert out.reasons == ["short_reference", "ok"] and out.rewards[0] == 0 and out.rewards[1] > 0.5
    assert SpeakerSimilarityReward(encoder=encoder, codec=codec, min_reference_seconds=0).score(rows).reasons == ["ok", "ok"]
    with pytest.raises(ValueError, match="--min_reference_seconds=-1"):
        SpeakerSimilarityReward(encoder=encoder, codec=codec, min_reference_seconds=-1)


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
    # the energy detector cuts a 2 s silence between two 1 s tones to at most 7 windows of 30 ms (0.21 s)
    tone = torch.sin(torch.arange(16_000) * 2 * math.pi * 220 / 16_000) * 0.3
    trimmed = trim_long_silences(torch.cat([tone, torch.zeros(32_000), tone]), vad="energy")  # a tone is no speech to webrtc
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
    ref = stored.add(clips[VOICES[0], SENTENCES[1]][:24_000])  # 1.5 s: the shortest reference scored by default
    out = reward.score([SpeechSample("x", g, prompt_text="t", prompt_codes=ref) for g in gen])
    assert out.reasons == ["ok"] * 3 and torch.isfinite(out.metrics["sim"]).all()
    emb = reward.encoder.embed([clips[VOICES[0], SENTENCES[0]], clips[VOICES[1], SENTENCES[1]], clips[VOICES[2], SENTENCES[2]]])
    assert emb.shape == (3, 24) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_speaker_robustness_benchmark_runs():
    """The measurement behind min_reference_seconds and the trimming cost stays reproducible (smallest size)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for part, row in (("length", "| whole sentence |"), ("cost", "| webrtc |")):
        proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_speaker_robustness.py"), part, "--smoke"],
                              capture_output=True, text=True, timeout=600, cwd=root)
        assert proc.returncode == 0 and row in proc.stdout, proc.stderr[-2000:]
