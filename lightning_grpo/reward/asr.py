"""Batched Whisper: log-mel, one encoder pass, greedy transcripts, teacher-forced NLL of the ground truth.

All functions take an openai-whisper `Whisper` model and a batch; the encoder runs once per batch and
both the transcription and the NLL reuse its output. Audio is padded or trimmed to Whisper's 30 s
window (`whisper.pad_or_trim`), as in the original.

Departures from the original server, on purpose:
  - Transcription is greedy (temperature 0, no fallback), so the same audio always gets the same
    transcript and reward; the original used `transcribe` with temperature fallback (random).
  - The NLL prefix is Whisper's full prompt: <|startoftranscript|> <|lang|> <|transcribe|>
    <|notimestamps|> (English-only models: <|startoftranscript|> <|notimestamps|>); the loss covers the
    text tokens and <|endoftext|>. `nll_prefix="original"` reproduces the original's
    [sot] + text + [eot], which asks Whisper to score text in a context it never saw in training.
  - A transcript Whisper itself marks as "no speech" (no-speech probability above
    `no_speech_threshold`; by default without `transcribe`'s extra mean-log-prob condition, because
    tiny models hallucinate a confident "you" on silence) is returned empty, so it scores CER 1
    instead of a hallucinated sentence.
  - Where `transcribe` detects a loop after the fact (compression ratio > 2.4) and decodes again at a
    higher temperature, `RepetitionGuard` stops a looping row during greedy decoding and marks it
    (`Transcript.repetition`); the batch's other rows go on, and no step is spent past the loop.
The model may be float16/bfloat16 (weights cast, features in the same dtype): `_GreedyTask` takes encoded
features of any float dtype, which openai-whisper's own DecodingTask refuses for bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
import whisper
from whisper.decoding import DecodingTask, LogitFilter
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer
from whisper.utils import compression_ratio

NllPrefix = Literal["full", "original"]


def tokenizer_for(model: Whisper, language: str | None) -> Tokenizer:
    """The transcribe tokenizer of `model` for `language` (ignored by English-only models)."""
    if not model.is_multilingual:
        return get_tokenizer(False)
    return get_tokenizer(True, num_languages=model.num_languages, language=language, task="transcribe")


def log_mel_batch(audios: Sequence[torch.Tensor], model: Whisper) -> torch.Tensor:
    """audios: N 1-D float32 16 kHz waveforms -> log-mel (N, n_mels, 3000) on the model's device.

    Same as `whisper.log_mel_spectrogram` per sample. Not that function on the batch: it floors the
    log-mel at (max - 8) with the max taken over the whole batch, so a sample's features (and reward)
    would depend on the loudest other sample in its batch.
    """
    device = next(model.parameters()).device
    padded = torch.stack([whisper.pad_or_trim(a.to(device=device, dtype=torch.float32)) for a in audios])
    window = torch.hann_window(whisper.audio.N_FFT, device=device)
    stft = torch.stft(padded, whisper.audio.N_FFT, whisper.audio.HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (N, 201, 3000)
    mel = whisper.audio.mel_filters(device, model.dims.n_mels) @ power  # (N, n_mels, 3000)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)  # per sample
    return (log_spec + 4.0) / 4.0


@dataclass
class Transcript:
    """One greedy transcript.

    steps: decoder steps this row used (its tokens plus <|endoftext|>; the cap if it never ended);
    repetition: decoding was stopped because the text so far compressed better than its threshold
    (a loop such as "5,5,5,5,..."); `text` is then what was decoded up to that point.
    """

    text: str
    language: str
    no_speech_prob: float
    avg_logprob: float
    compression_ratio: float = 0.0
    repetition: bool = False
    steps: int = 0


class RepetitionGuard(LogitFilter):
    """Ends a row's greedy decoding, by forcing <|endoftext|>, once its text loops.

    A loop is detected as openai-whisper's `transcribe` does it, by the gzip compression ratio of the
    text (`whisper.utils.compression_ratio`, utf-8 bytes / zlib bytes) rising above a threshold (2.4
    there); but it is checked during decoding, on the text decoded so far, every `check_every` steps
    (a loop shows at most that many tokens late; checking every step costs ~5x more host time), so
    the row stops as soon as the loop shows instead of running to the token cap, and the other rows
    of the batch go on undisturbed.
    """

    def __init__(self, tokenizer: Tokenizer, sample_begin: int, thresholds: Sequence[float], check_every: int = 4) -> None:
        self.tokenizer, self.sample_begin, self.thresholds = tokenizer, sample_begin, list(thresholds)
        self.check_every = check_every
        self.stopped: set[int] = set()  # rows whose decoding this guard ended
        self._calls = 0

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """logits: (B, V), modified in place; tokens: (B, L) decoded so far (prompt included)."""
        self._calls += 1
        if self._calls % self.check_every:
            return
        eot = self.tokenizer.eot
        for row, ids in enumerate(tokens[:, self.sample_begin :].tolist()):  # one device->host copy
            if row in self.stopped or (ids and ids[-1] == eot):
                continue
            if compression_ratio(self.tokenizer.decode(ids)) > self.thresholds[row]:
                self.stopped.add(row)
                logits[row] = -torch.inf
                logits[row, eot] = 0.0


class _GreedyTask(DecodingTask):
    """openai-whisper's DecodingTask on already-encoded audio of any float dtype, with an optional guard.

    `_get_audio_features` is replaced because the original insists on float16 or float32 features (and
    returns, instead of raising, a TypeError for bfloat16); `_main_loop` records how many steps ran.
    """

    def __init__(self, model: Whisper, options: whisper.DecodingOptions, thresholds: Sequence[float] | None) -> None:
        super().__init__(model, options)
        self.guard = RepetitionGuard(self.tokenizer, self.sample_begin, thresholds) if thresholds is not None else None
        if self.guard is not None:
            self.logit_filters.append(self.guard)
        self.steps = 0

    def _get_audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        return mel

    def _main_loop(self, audio_features: torch.Tensor, tokens: torch.Tensor):
        tokens, sum_logprobs, no_speech_probs = super()._main_loop(audio_features, tokens)
        self.steps = tokens.shape[-1] - len(self.initial_tokens)
        return tokens, sum_logprobs, no_speech_probs


def transcribe(
    model: Whisper,
    audio_features: torch.Tensor,
    language: str | None,
    max_tokens: int = 224,
    no_speech_threshold: float = 0.6,
    logprob_threshold: float | None = None,
    compression_ratio_threshold: float | Sequence[float] | None = None,
) -> list[Transcript]:
    """Greedy transcripts of encoded audio (N, n_audio_ctx, n_audio_state); language None = detect.

    A transcript becomes "" when its no-speech probability exceeds `no_speech_threshold` (and, if
    `logprob_threshold` is set, its mean token log-prob is below it: Whisper's own two-part gate).
    compression_ratio_threshold: one value or one per row; a row whose text so far compresses better
    stops decoding there and is marked `repetition` (see `RepetitionGuard`); None = no guard.
    """
    n = audio_features.shape[0]
    thresholds = compression_ratio_threshold
    if isinstance(thresholds, (int, float)):
        thresholds = [float(thresholds)] * n
    if thresholds is not None and len(thresholds) != n:
        raise ValueError(f"{len(thresholds)} compression-ratio thresholds for {n} rows")
    options = whisper.DecodingOptions(
        task="transcribe",
        language="en" if not model.is_multilingual else language,
        temperature=0.0,
        sample_len=max_tokens,
        without_timestamps=True,
        fp16=False,
    )
    task = _GreedyTask(model, options, thresholds)
    results = task.run(audio_features)
    stopped = task.guard.stopped if task.guard is not None else set()
    out = []
    for row, r in enumerate(results):
        silent = r.no_speech_prob > no_speech_threshold and (
            logprob_threshold is None or r.avg_logprob < logprob_threshold
        )
        # A text that ended by itself between two checks but compresses like a loop counts too, as in transcribe.
        looped = row in stopped or (thresholds is not None and r.compression_ratio > thresholds[row])
        out.append(Transcript(
            text="" if silent else r.text.strip(), language=r.language, no_speech_prob=r.no_speech_prob,
            avg_logprob=r.avg_logprob, compression_ratio=r.compression_ratio,
            repetition=looped and not silent, steps=min(len(r.tokens) + 1, task.steps),
        ))
    return out


def nll_tokens(
    model: Whisper, text: str, language: str | None, prefix: NllPrefix
) -> tuple[list[int], int]:
    """Decoder input ids for scoring `text` and how many of them are prefix (not scored).

    Returns (ids, n_prefix): ids = prefix + text tokens + [eot], truncated to the text context.
    """
    tokenizer = tokenizer_for(model, language)
    text_ids = tokenizer.encode(" " + text.strip())
    if prefix == "full":
        head = list(tokenizer.sot_sequence_including_notimestamps)
    elif prefix == "original":
        head = [tokenizer.sot]
    else:
        raise ValueError(f"--nll_prefix={prefix!r} must be 'full' or 'original'")
    ids = head + text_ids[: model.dims.n_text_ctx - len(head) - 1] + [tokenizer.eot]
    return ids, len(head)


def teacher_forced_nll(
    model: Whisper,
    audio_features: torch.Tensor,
    texts: Sequence[str],
    languages: Sequence[str | None],
    prefix: NllPrefix = "full",
) -> torch.Tensor:
    """Mean per-token NLL (nats) of each ground-truth text + <|endoftext|> given its audio.

    audio_features: (N, n_audio_ctx, n_audio_state); texts, languages: N each -> (N,) float32 on CPU.
    One batched decoder pass; sequences are right-padded and padded positions are masked out.
    """
    seqs = [nll_tokens(model, t, lang, prefix) for t, lang in zip(texts, languages)]
    n, length = len(seqs), max(len(ids) for ids, _ in seqs)
    device = audio_features.device
    tokens = torch.zeros(n, length, dtype=torch.long)  # (N, L)
    scored = torch.zeros(n, length, dtype=torch.bool)  # (N, L): True where ids[t] is a target
    for i, (ids, n_prefix) in enumerate(seqs):
        tokens[i, : len(ids)] = torch.tensor(ids)
        scored[i, n_prefix : len(ids)] = True
    tokens, scored = tokens.to(device), scored.to(device)
    logits = model.decoder(tokens[:, :-1], audio_features).float()  # (N, L-1, V)
    logp = F.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]  # (N, L-1)
    mask = scored[:, 1:].float()
    return (-(logp * mask).sum(-1) / mask.sum(-1)).cpu()
