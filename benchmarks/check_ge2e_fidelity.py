"""How closely lightning_grpo's GE2E encoder reproduces resemblyzer's own embeddings and SIM scores.

Needs resemblyzer with its dependencies (librosa, webrtcvad, scipy), which the project does not install, so run it
in a throwaway environment that can also import torch and this repository, e.g.

    python3 -m venv /tmp/rz && /tmp/rz/bin/pip install librosa webrtcvad-wheels && \\
        /tmp/rz/bin/pip install --no-deps resemblyzer==0.1.4
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/rz/lib/python3.11/site-packages/zz_project.pth
    /tmp/rz/bin/python benchmarks/check_ge2e_fidelity.py

Inputs: espeak-ng sentences in four voices, each padded with 0.5 s of silence before and 0.75 s after and a
-60 dBFS noise floor (so silence trimming has work to do). Reported: the mel frontend against librosa's; the
embedding of the same preprocessed waveform (resemblyzer's preprocess_wav) through both models; the whole pipeline
(our volume normalisation and trimming, GE2EEncoder's default vad, vs resemblyzer's preprocess_wav) as the cosine between the two
embeddings; and what matters for the reward: every pairwise SIM under both pipelines.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
from reward_fixtures import SENTENCES, espeak  # noqa: E402

from lightning_grpo.reward.speaker_encoder import GE2EEncoder, slaney_mel_filterbank  # noqa: E402

VOICES = ("en-us", "en-us+f3", "en-us+klatt2", "en-gb+m3")


def main() -> None:
    try:
        import librosa
        from resemblyzer import VoiceEncoder, preprocess_wav
        from resemblyzer import audio as rz_audio
    except ImportError as err:
        sys.exit(f"needs resemblyzer with librosa and webrtcvad ({err}); see this script's docstring")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    keys = [(v, s) for v in VOICES for s in SENTENCES]
    clips = {}
    for k in keys:
        speech = espeak(k[1], k[0]).numpy()
        wav = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(12000, np.float32)])
        clips[k] = (wav + 1e-3 * rng.standard_normal(wav.size)).astype(np.float32)
    theirs, ours = VoiceEncoder(device="cpu", verbose=False), GE2EEncoder()
    same_wav_ours = GE2EEncoder(trim_silence=False)

    fb = np.abs(librosa.filters.mel(sr=16_000, n_fft=400, n_mels=40) - slaney_mel_filterbank().numpy()).max()
    mel_rel, same_abs, same_cos, full_cos = [], [], [], []
    e_theirs, e_ours = {}, {}
    for k in keys:
        pre = preprocess_wav(clips[k])
        mel_t = rz_audio.wav_to_mel_spectrogram(pre)
        mel_o = ours.mel(torch.from_numpy(pre)).numpy()
        mel_rel.append(np.abs(mel_t - mel_o).max() / mel_t.max())
        e_theirs[k] = theirs.embed_utterance(pre)
        same = same_wav_ours.embed([torch.from_numpy(pre)])[0].numpy()  # their preprocessing, our model
        same_abs.append(np.abs(same - e_theirs[k]).max())
        same_cos.append(float(same @ e_theirs[k]))
        e_ours[k] = ours.embed([torch.from_numpy(clips[k])])[0].numpy()
        full_cos.append(float(e_ours[k] @ e_theirs[k]))
    sim_diff = [abs(float(e_ours[a] @ e_ours[b]) - float(e_theirs[a] @ e_theirs[b])) for a, b in itertools.combinations(keys, 2)]

    def margins(emb):
        out = []
        for a, b in itertools.permutations(VOICES[:3], 2):
            for s1, s2 in itertools.permutations(SENTENCES[:3], 2):
                out.append(float(emb[a, s1] @ emb[a, s2]) - float(emb[a, s1] @ emb[b, s1]))
        return min(out)

    print("\n".join([
        f"{len(keys)} clips ({len(VOICES)} espeak-ng voices x {len(SENTENCES)} sentences, padded with silence and noise); "
        f"librosa {librosa.__version__}, torch {torch.__version__}",
        "",
        "| check | figure |",
        "|---|---|",
        f"| mel filterbank vs librosa.filters.mel, max abs difference | {fb:.1e} |",
        f"| mel spectrogram of the same waveform, max difference / max value | {max(mel_rel):.1e} |",
        f"| embedding of the same preprocessed waveform, max abs difference | {max(same_abs):.1e} (cosine >= {min(same_cos):.7f}) |",
        f"| whole pipeline (our preprocessing vs preprocess_wav), cosine of the two embeddings | min {min(full_cos):.4f}, mean {np.mean(full_cos):.4f} |",
        f"| pairwise SIM, ours vs resemblyzer's, over {len(sim_diff)} pairs | max abs difference {max(sim_diff):.4f}, mean {np.mean(sim_diff):.4f} |",
        f"| worst same-voice minus other-voice margin (3 voices x 3 sentences, as the test) | ours {margins(e_ours):.3f}, resemblyzer {margins(e_theirs):.3f} |",
    ]))


if __name__ == "__main__":
    main()
