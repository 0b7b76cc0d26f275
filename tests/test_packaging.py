"""pyproject.toml declares what requirements*.txt pin (core and the gpu, bench, dev extras), so `pip install .`
and `pip install -r requirements.txt` install the same set, and scripts/setup.sh installs through the extras."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BASE = "requirements.txt"


def pinned(name: str) -> set[str]:
    """The requirement lines of a requirements file, normalised; `-r requirements.txt` lines left out."""
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    return {str(Requirement(line)) for line in lines if line and not line.startswith("-")}


def declared(requirements: list[str]) -> set[str]:
    return {str(Requirement(r)) for r in requirements}


@pytest.mark.parametrize("extra", [None, "gpu", "bench", "dev"])
def test_pyproject_declares_what_the_requirements_files_pin(extra):
    name = BASE if extra is None else f"requirements-{extra}.txt"
    wanted = declared(PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra])
    have = pinned(name)
    assert wanted == have, f"pyproject.toml and {name} differ: only in pyproject {sorted(wanted - have)}, only in {name} {sorted(have - wanted)}"
    if extra is not None:  # each extra file installs on top of the core set, as the extra does
        assert "-r requirements.txt" in (ROOT / name).read_text().splitlines()


def test_the_declared_set_resolves_in_the_test_environment():
    """pip's resolver accepts the core set and the dev extra (what setup.sh installs) against what is installed
    here (no index: nothing is downloaded), so the pins agree with each other and with the environment the tests
    run in."""
    args = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet",
            "--report", "-", f"{ROOT}[dev]"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the built package's metadata carries the declarations: what `pip install .[gpu]` acts on
    item = next(i for i in json.loads(proc.stdout)["install"] if i["metadata"]["name"] == "lightning_grpo")
    requires = set(item["metadata"]["requires_dist"])
    assert {"torch==2.13.0", "lightning==2.6.6", 'vllm==0.32.0; extra == "gpu"', 'pytest>=8; extra == "dev"'} <= requires


def test_setup_script_installs_the_package_with_its_extras():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'pip install -q --no-build-isolation -e ".[dev]"' in script
    assert '-e ".[dev,gpu]"' in script
    assert "-r requirements" not in script  # one source of truth for what setup installs: the extras
    for no_deps in ("xcodec2==0.1.5", "resemblyzer==0.1.4"):  # pins torch 2.5 / an old stack: not expressible
        assert f"--no-deps {no_deps}" in script
