"""The Whisper reward with a shorter encoder window, so short utterances cost less compute.

Whisper pads every clip to a 30 s window (1,500 encoder frames); for short sentences (the 2-4 s of the
small world, examples/small_world/) that is ~90% padding and ~90% of the reward's CPU time. `ShortWindowWhisperReward` keeps the first
`window_s` seconds of the log-mel (still Whisper's own features) and the matching first rows of the
encoder's positional embedding, as whisper.cpp's `audio_ctx` option does. It is the same Whisper and
the same reward, guards and shaping; only the padding it attends to is shorter. Measured on the small world's
48 held-out sentences spoken with their correct codes (tiny.en): mean capped CER 0.088 with an 8 s window and
0.103 with 5 s, against about 0.12 with the full 30 s (measured with a different unit vocabulary), at about a
third of the encoder time with 8 s.
Audio longer than the window scores 0 with reason `too_long`, never silently cut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .whisper import WhisperReward

MEL_FRAMES_PER_SECOND = 100  # Whisper: hop 160 at 16 kHz
ENCODER_STRIDE = 2  # conv2 halves the frames


class CroppedEncoder(nn.Module):
    """Whisper's AudioEncoder on the first `n_ctx` encoder frames (= 2 * n_ctx mel frames)."""

    def __init__(self, encoder: nn.Module, n_ctx: int) -> None:
        super().__init__()
        if not 0 < n_ctx <= encoder.positional_embedding.shape[0]:
            raise ValueError(f"n_ctx={n_ctx} must be in 1..{encoder.positional_embedding.shape[0]}")
        self.inner = encoder
        self.n_ctx = n_ctx

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: (N, n_mels, >= 2 * n_ctx) -> (N, n_ctx, n_audio_state)."""
        e = self.inner
        x = mel[..., : ENCODER_STRIDE * self.n_ctx]
        x = F.gelu(e.conv2(F.gelu(e.conv1(x)))).permute(0, 2, 1)  # (N, n_ctx, D)
        x = (x + e.positional_embedding[: self.n_ctx]).to(x.dtype)
        for block in e.blocks:
            x = block(x)
        return e.ln_post(x)


class ShortWindowWhisperReward(WhisperReward):
    """WhisperReward whose Whisper encoder sees only the first `window_s` seconds (see module doc)."""

    def __init__(self, *args, window_s: float = 10.0, **kwargs) -> None:
        """
        Args:
            window_s: encoder window in seconds (Whisper: 30). Must exceed the longest audio the
                policy can produce (max_new_tokens x the longest unit); longer audio scores `too_long`.
            *args, **kwargs: WhisperReward's arguments.
        """
        super().__init__(*args, **kwargs)
        if not 0 < window_s <= 30:
            raise ValueError(f"--window_s={window_s} must be in (0, 30]")
        n_ctx = int(window_s * MEL_FRAMES_PER_SECOND) // ENCODER_STRIDE
        self.window_s = window_s
        self.whisper.encoder = CroppedEncoder(self.whisper.encoder, n_ctx)
        # whisper.decode treats inputs of shape (n_audio_ctx, n_audio_state) as encoded features.
        self.whisper.dims.n_audio_ctx = n_ctx

    def _guard_audio(self, audio: torch.Tensor) -> str:
        if audio.numel() > self.window_s * self.codec.sample_rate:
            return "too_long"
        return super()._guard_audio(audio)
