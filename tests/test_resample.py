"""The reference resampler in blocks: the same numbers as gathering every window at once, and a reference over
the duration cap refused from its header."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lightning_grpo.reward import audio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_resample_memory import gather_all  # noqa: E402  the baseline, kept verbatim in the benchmark


@pytest.mark.parametrize("rate", [8_000, 22_050, 24_000, 44_100, 48_000])
@pytest.mark.parametrize("block", [audio.RESAMPLE_BLOCK, 777])
def test_blocks_give_the_numbers_of_one_gather(rate, block):
    x = torch.randn(int(2.7 * rate), generator=torch.Generator().manual_seed(rate))
    expected = gather_all(x, rate, 16_000)
    got = audio.resample(x, rate, 16_000, block=block)
    # the same products, summed in another order by the matrix-vector kernel for other row counts: float32 rounding
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_short_inputs_and_upsampling():
    for n in (0, 1, 5):
        x = torch.randn(n)
        torch.testing.assert_close(audio.resample(x, 48_000, 16_000, block=2), gather_all(x, 48_000, 16_000))
    x = torch.randn(1000)
    torch.testing.assert_close(audio.resample(x, 16_000, 24_000, block=3), gather_all(x, 16_000, 24_000))


def test_a_reference_over_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(48_000 * 31, dtype=np.float32), 48_000)
    monkeypatch.setattr(sf, "read", lambda *a, **k: pytest.fail("the samples were read"))
    with pytest.raises(ValueError, match=r"long.wav \(column prompt_wav\) is 31.0 s long, more than the 30 s a reference may last"):
        audio.load_wav(path)
    from lightning_grpo.data import reference_problem

    assert reference_problem(path).startswith("is 31.0 s long")


def test_the_benchmark_runs(tmp_path):
    import json

    import bench_resample_memory

    text = bench_resample_memory.main(["--smoke", "--json", str(tmp_path / "r.json")])
    results = {r["variant"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(results) == {"gather-all", "blocks", "load_wav"} and results["load_wav"]["outcome"] == "read"
    assert "| blocks |" in text and all(v < 1e-4 for v in json.loads((tmp_path / "r.json").read_text())["agreement"].values())
