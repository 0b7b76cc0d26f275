import pytest
import torch
from safetensors.torch import save_file

from lightning_grpo.reward.codec import SpeechDecoder, XCodec2Decoder

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def small():
    """The real X-codec2 decoder architecture at a small width, random weights."""
    torch.manual_seed(0)
    return XCodec2Decoder(None, hidden_dim=64, depth=2, heads=4)


def _unbatched_reference(dec: XCodec2Decoder, codes: list[int]) -> torch.Tensor:
    """xcodec2's own decode_code path (one unpadded sequence through the unmodified generator)."""
    with torch.no_grad():
        vq = torch.tensor(codes)[None, :, None]  # (1, T, 1)
        emb = dec.generator.quantizer.get_output_from_indices(vq)
        return dec.generator(dec.fc_post_a(emb), vq=False)[0][0, 0]


def test_is_a_speech_decoder(small):
    assert isinstance(small, SpeechDecoder) and small.sample_rate == 16_000
    assert small.codebook_size == 65_536 and small.hop_length == 320


def test_batched_decode_of_ragged_sequences_equals_xcodec2_unbatched(small):
    codes = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [100, 200, 300], [65_535] * 7]
    batched = small.decode(codes)
    for c, wav in zip(codes, batched):
        ref = _unbatched_reference(small, c)
        assert wav.dtype == torch.float32 and wav.device.type == "cpu" and wav.ndim == 1
        assert wav.shape == (320 * len(c),) == ref.shape
        assert ref.abs().max() > 1e-3  # not trivially zero
        torch.testing.assert_close(wav, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(wav, small.decode([c])[0], atol=1e-5, rtol=1e-4)


def test_padding_would_change_the_output_without_masking(small):
    """Guards the reason for the masked backbone: plain padding changes a short sequence's audio."""
    short = [100, 200, 300]
    with torch.no_grad():
        padded = torch.tensor([short + [0] * 7])[:, :, None]
        emb = small.generator.quantizer.get_output_from_indices(padded)
        naive = small.generator(small.fc_post_a(emb), vq=False)[0][0, 0, : 320 * 3]
    assert (naive - _unbatched_reference(small, short)).abs().max() > 1e-4


def test_out_of_range_and_empty_codes_are_rejected(small):
    with pytest.raises(ValueError, match="65536"):
        small.decode([[1, 65_536]])
    with pytest.raises(ValueError, match="empty"):
        small.decode([[1], []])


def test_loads_only_decoder_tensors_from_a_local_checkpoint(small, tmp_path):
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    # an encoder tensor that must not be read (the real file holds the 600M w2v-BERT here)
    state["semantic_model.encoder.weight"] = torch.zeros(3, 3)
    state["CodecEnc.conv.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = XCodec2Decoder(str(tmp_path), hidden_dim=64, depth=2, heads=4)
    assert not hasattr(loaded, "semantic_model")
    codes = [[5, 6, 7, 8]]
    torch.testing.assert_close(loaded.decode(codes)[0], small.decode(codes)[0])


def test_missing_checkpoint_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--codec"):
        XCodec2Decoder(str(tmp_path), hidden_dim=64, depth=2, heads=4)


def test_real_size_decoder_builds_and_decodes():
    """The released configuration (1024 wide, 12 transformer blocks, ~187M parameters), random weights."""
    torch.manual_seed(0)
    dec = XCodec2Decoder(None)
    n_params = sum(p.numel() for p in dec.parameters())
    assert 180e6 < n_params < 195e6
    wavs = dec.decode([[1, 2, 3, 4, 5], [9, 9]])
    assert [w.shape for w in wavs] == [(1600,), (640,)]
    assert all(torch.isfinite(w).all() for w in wavs)


def test_checkpoint_missing_decoder_tensors_is_an_error(small, tmp_path):
    state = {k: v.contiguous() for k, v in small.state_dict().items() if not k.startswith("fc_post_a")}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="fc_post_a"):
        XCodec2Decoder(str(tmp_path), hidden_dim=64, depth=2, heads=4)


def test_decode_under_bfloat16_autocast_stays_close_to_float32(small):
    """What WhisperReward(dtype="bfloat16") does to the codec: matmuls in bf16 (8 significant bits), norms
    and the iSTFT in float32. Measured relative L2 error 1.5% on this random small decoder; bound 5%."""
    codes = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 5, [100, 200, 300] * 4]
    full = small.decode(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = small.decode(codes)
    for a, b in zip(full, low):
        assert b.dtype == torch.float32 and b.shape == a.shape
        assert ((a - b).norm() / a.norm()).item() < 0.05
