"""What the GPU machine's Python has, for the CPU dry run of scripts/gpu_check.sh: imports outside it fail here too.

The GPU image (the device tool's KINDS.md, read 2026-11-17) holds the distributions in IMAGE below; the run adds
the wheels scripts/gpu_wheels.sh pins (parsed from that script, so the two never disagree). `write_blocked(path)`
lists, as JSON, the top-level modules of every distribution installed HERE that is neither in the image (nor a
requirement of an image distribution, as installed here: a newer version here may need more) nor carried.
scripts/gpu_image_site/sitecustomize.py, put on PYTHONPATH by `gpu_check.sh --dry-run`, makes importing any of
them raise ModuleNotFoundError naming the fix, in every process of the dry run. So a new import that the GPU
machine cannot satisfy fails the default test suite here instead of the first lent GPU's 10 minutes.
Only presence is checked, not versions (the GPU's torch is 2.11, here 2.13).

    python scripts/gpu_image.py OUT.json      # write the blocked modules
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried() -> set[str]:
    """The distributions scripts/gpu_wheels.sh pins (its WHEELS and BUILT arrays)."""
    text = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    names = set()
    for array in ("WHEELS", "BUILT"):
        body = re.search(rf"^{array}=\((.*?)\)", text, re.S | re.M)
        if body is None:
            raise RuntimeError(f"scripts/gpu_wheels.sh has no {array}=(...) array")
        names |= {norm(spec.split("==")[0]) for spec in re.findall(r"[A-Za-z0-9_.-]+==[^\s)]+", body.group(1))}
    return names


def installed() -> dict[str, md.Distribution]:
    return {norm(d.metadata["Name"]): d for d in md.distributions() if d.metadata["Name"]}


def requirements(dist: md.Distribution) -> set[str]:
    """Names of `dist`'s unconditional requirements (no extras; platform markers taken as met)."""
    out = set()
    for req in dist.requires or []:
        if "extra ==" in req or "extra==" in req:
            continue
        out.add(norm(re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0]))
    return out


def allowed(dists: dict[str, md.Distribution]) -> set[str]:
    """The image's distributions with their requirements (transitively, as installed here), plus the carried ones."""
    todo, seen = [norm(n) for n in IMAGE], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in dists:
            todo.extend(requirements(dists[name]) - seen)
    return seen | carried() | {"lightning-grpo"}


def blocked_modules() -> dict[str, str]:
    """Top-level module -> the distribution it comes from, for modules the GPU machine would not have."""
    dists = installed()
    ok = allowed(dists)
    providers: dict[str, set[str]] = {}
    for module, names in md.packages_distributions().items():
        providers.setdefault(module, set()).update(norm(n) for n in names)
    return {module: sorted(names)[0] for module, names in providers.items() if not names & ok}


def write_blocked(path: str | Path) -> int:
    blocked = blocked_modules()
    Path(path).write_text(json.dumps(blocked, indent=0, sort_keys=True))
    return len(blocked)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/gpu_image.py OUT.json")
    print(f"gpu_image: {write_blocked(sys.argv[1])} modules installed here are not on the GPU machine: imports fail")
