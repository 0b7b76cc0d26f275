"""Speech decoders: codec codes -> 16 kHz waveforms. The `SpeechDecoder` seam and X-codec2's decoder half.

X-codec2 (the LLaSA codec) decodes codes [B, T] as: FSQ `quantizer.get_output_from_indices`
(B, T, 2048) -> `fc_post_a` Linear 2048 -> 1024 -> `generator` (Vocos backbone: conv, 2 ResNet
blocks, 12 transformer blocks, 2 ResNet blocks; then an iSTFT head giving 320 samples per code).
`XCodec2Decoder` builds only that half from the xcodec2 package's own classes and reads only those
tensors from the checkpoint; the w2v-BERT encoder (600M parameters, downloaded by `XCodec2Model`'s
constructor) is never built.

Batching departs from xcodec2's `decode_code`, which decodes one unpadded sequence: a padded batch
through the unmodified generator would change every sample (GroupNorm statistics and attention span
the padding). Here the backbone runs on the padded batch with the padding masked out of GroupNorm
statistics, attention keys and convolution inputs, and the iSTFT head runs per sample on its own
frames, so a batched decode equals a one-by-one decode up to float rounding.

Install: `pip install --no-deps xcodec2==0.1.5` (it pins torch==2.5.0) plus einops,
vector-quantize-pytorch and torchtune from requirements.txt. Its `bs_roformer5` module imports
torchaudio without using it, and torchaudio has no wheel for torch 2.13, so `_import_xcodec2` puts an
empty placeholder module in its place for the duration of the import.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@runtime_checkable
class SpeechDecoder(Protocol):
    """Turns codec code sequences into waveforms."""

    sample_rate: int

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """N code sequences -> N 1-D float32 CPU waveforms at `sample_rate`."""
        ...


def _import_xcodec2():
    """Import xcodec2's decoder class; see the module docstring for the torchaudio placeholder."""
    placeholder = None
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        placeholder = sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        from xcodec2.vq.codec_decoder_vocos import CodecDecoderVocos
    except ImportError as err:
        raise ImportError(
            "X-codec2 decoding needs the xcodec2 package: `pip install --no-deps xcodec2==0.1.5` "
            "and `pip install -r requirements.txt` (einops, vector-quantize-pytorch, torchtune)"
        ) from err
    finally:
        if placeholder is not None and sys.modules.get("torchaudio") is placeholder:
            del sys.modules["torchaudio"]
    return CodecDecoderVocos


def _masked_group_norm(norm: nn.GroupNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GroupNorm over valid frames only. x: (B, C, T), m: (B, 1, T) 0/1 -> (B, C, T), padding zeroed."""
    b, c, t = x.shape
    g = norm.num_groups
    xg, mg = x.view(b, g, c // g, t), m.view(b, 1, 1, t)
    count = mg.sum(dim=(2, 3), keepdim=True) * (c // g)
    mean = (xg * mg).sum(dim=(2, 3), keepdim=True) / count
    var = ((xg - mean).square() * mg).sum(dim=(2, 3), keepdim=True) / count
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).view(b, c, t)
    return (y * norm.weight[None, :, None] + norm.bias[None, :, None]) * m


def _masked_resnet(block: nn.Module, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """xcodec2 ResnetBlock (no time embedding, eval) with padding kept at zero before each conv."""
    h = _masked_group_norm(block.norm1, x, m)
    h = block.conv1(F.silu(h) * m) * m
    h = _masked_group_norm(block.norm2, h, m)
    h = block.conv2(F.silu(h) * m) * m
    return x + h


def _masked_transformer(block: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """xcodec2 TransformerBlock with padded keys masked. x: (B, T, C), keep: (B, T) bool."""
    att = block.att
    q, k, v = rearrange(att.c_attn(block.att_norm(x)), "b t (r h d) -> r b h t d", r=3, h=att.n_heads)
    # Same (b, h, t, d) layout xcodec2 feeds its rotary embedding, so the weights see what they learnt.
    q, k = att.rotary_embed(q), att.rotary_embed(k)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    x = x + att.c_proj(rearrange(y, "b h t d -> b t (h d)"))
    return x + block.mlp(block.ffn_norm(x))


class XCodec2Decoder(nn.Module):
    """The decoder half of X-codec2: codes (65,536-code FSQ, 50 per second) -> 16 kHz waveforms."""

    sample_rate: int = 16_000

    def __init__(
        self,
        checkpoint: str | None = "HKUSTAudio/xcodec2",
        device: str = "cpu",
        hidden_dim: int = 1024,
        depth: int = 12,
        heads: int = 16,
    ) -> None:
        """
        Args:
            checkpoint: a Hugging Face repo id (downloads only `model.safetensors`), a local
                directory holding `model.safetensors` or a `.ckpt`, a file path, or None for random
                weights (tests). Only `generator.*` and `fc_post_a.*` tensors are read.
            device: where the decoder runs ("cpu", "cuda:2"); waveforms are returned on the CPU.
            hidden_dim, depth, heads: generator size; the released X-codec2 is 1024 / 12 / 16.
                Smaller values give the same architecture for fast tests (random weights only).
        """
        super().__init__()
        if hidden_dim % heads or hidden_dim % 32:
            raise ValueError(f"hidden_dim={hidden_dim} must be divisible by heads={heads} and by 32")
        decoder_cls = _import_xcodec2()
        self.generator = decoder_cls(
            hidden_dim=hidden_dim, depth=depth, heads=heads, pos_meb_dim=hidden_dim // heads
        )
        self.fc_post_a = nn.Linear(2048, hidden_dim)
        self.hop_length = self.generator.hop_length  # 320 samples per code
        self.codebook_size = math.prod(self.generator.quantizer.layers[0]._levels.tolist())
        if checkpoint is not None:
            result = self.load_state_dict(_read_decoder_state(checkpoint), strict=False)
            if result.missing_keys:
                raise ValueError(
                    f"--codec={checkpoint} lacks decoder tensors {result.missing_keys[:5]}...; "
                    "is it an X-codec2 checkpoint of the released size (hidden_dim 1024, depth 12)?"
                )
            # Unexpected keys can only be buffers an older vector-quantize-pytorch saved (FSQ levels);
            # every parameter the decoder needs was found above.
            self.unexpected_keys = result.unexpected_keys
        self.requires_grad_(False).eval().to(device)

    @property
    def device(self) -> torch.device:
        return self.fc_post_a.weight.device

    @torch.inference_mode()
    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """N code sequences (each non-empty, codes in [0, 65536)) -> N waveforms of 320 * len samples."""
        if not codes:
            return []
        lengths = [len(c) for c in codes]
        for i, c in enumerate(codes):
            if not c:
                raise ValueError(f"code sequence {i} is empty; the reward guards empty speech before decoding")
            lo, hi = min(c), max(c)
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"code sequence {i} holds code {lo if lo < 0 else hi}, outside 0..{self.codebook_size - 1}"
                )
        t = max(lengths)
        ids = torch.zeros(len(codes), t, dtype=torch.long)  # (B, T), padded with code 0
        for i, c in enumerate(codes):
            ids[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        ids = ids.to(self.device)
        keep = torch.arange(t, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        emb = self.generator.quantizer.get_output_from_indices(ids[:, :, None])  # (B, T, 2048)
        x = self.fc_post_a(emb)  # (B, T, H)
        x = self._backbone(x, keep)  # (B, T, H)
        out = []
        for i, n in enumerate(lengths):
            audio, _ = self.generator.head(x[i : i + 1, :n])  # (1, 1, 320 * n)
            out.append(audio[0, 0].float().cpu())
        return out

    def _backbone(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """xcodec2 VocosBackbone.forward with padding masked. x: (B, T, H), keep: (B, T) -> (B, T, H)."""
        backbone = self.generator.backbone
        m = keep[:, None, :].to(x.dtype)  # (B, 1, T)
        x = backbone.embed(x.transpose(1, 2) * m) * m  # (B, H, T)
        for block in backbone.prior_net:
            x = _masked_resnet(block, x, m)
        x = x.transpose(1, 2)  # (B, T, H)
        for block in backbone.transformers:
            x = _masked_transformer(block, x, keep)
        x = x.transpose(1, 2) * m
        for block in backbone.post_net:
            x = _masked_resnet(block, x, m)
        return backbone.final_layer_norm(x.transpose(1, 2))


_DECODER_PREFIXES = ("generator.", "fc_post_a.")


def _read_decoder_state(checkpoint: str) -> dict[str, torch.Tensor]:
    """Only the decoder tensors of an X-codec2 checkpoint (safetensors read lazily, key by key)."""
    path = Path(checkpoint)
    if path.is_dir():
        candidates = [path / "model.safetensors", *sorted(path.glob("**/*.ckpt"))]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"--codec={checkpoint} holds neither model.safetensors nor a .ckpt file")
        path = found[0]
    elif not path.exists():
        if checkpoint.count("/") != 1:
            raise FileNotFoundError(f"--codec={checkpoint} is neither a file, a directory nor a repo id")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(checkpoint, "model.safetensors"))
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(_DECODER_PREFIXES)}
    else:
        raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        raw = raw.get("state_dict", raw)
        state = {k: v for k, v in raw.items() if k.startswith(_DECODER_PREFIXES)}
    if not state:
        raise ValueError(f"--codec={checkpoint}: no generator.* / fc_post_a.* tensors in {path}")
    return {k: v.float() for k, v in state.items()}
