"""The documentation's shape: a README that fits on a screen and links every docs/ page, links that resolve, and
BENCHMARKS.md sections named by subject and cited by name."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def local_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if "://" not in t]


def test_readme_fits_on_a_screen_and_keeps_its_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) < 300, "README.md grew past 300 lines: move the detail into a docs/ page"
    assert "bash scripts/setup.sh && .venv/bin/python -m lightning_grpo fit --config configs/small_world.yaml" in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in text


def test_readme_links_every_docs_page_and_every_link_exists():
    linked = local_links(README.read_text())
    missing = [t for t in linked if not (ROOT / t).exists()]
    assert not missing, f"README.md links files that do not exist: {missing}"
    pages = {p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md")}
    assert pages, "no docs/*.md pages"
    unlinked = sorted(pages - set(linked))
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


def test_links_inside_docs_pages_resolve():
    broken = [(p.name, t) for p in DOCS.glob("*.md") for t in local_links(p.read_text()) if not (p.parent / t).exists()]
    assert not broken, broken


def test_benchmarks_sections_are_named_by_subject_and_cited_by_name():
    headings = re.findall(r"^##+ (.+)$", (ROOT / "BENCHMARKS.md").read_text(), flags=re.M)
    numbered = [h for h in headings if re.match(r"\d", h) or re.search(r"issue \d|#\d", h)]
    assert not numbered, f"BENCHMARKS.md headings carry numbers: {numbered}"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    cited, by_number = [], []
    for name in files:
        if not name.endswith((".md", ".py", ".yaml", ".sh", ".ipynb")) or not (ROOT / name).is_file():
            continue
        text = (ROOT / name).read_text(errors="replace")
        by_number += [name for _ in re.finditer(r"BENCHMARKS\.md(?:\]\([^)]*\))?,?\s+(?:section|§)\s*\d", text)]
        for c in re.findall(r'BENCHMARKS\.md(?:\]\([^)]*\))?,\s+"([^"]+)"', text):
            cited.append((name, " ".join(re.sub(r"\n\s*#", " ", c).split())))  # a citation may wrap a comment line
    assert not by_number, f"BENCHMARKS.md cited by section number in: {sorted(set(by_number))}"
    assert cited, "no citation of BENCHMARKS.md by name found"
    unknown = [(f, c) for f, c in cited if not any(h.startswith(c) for h in headings)]
    assert not unknown, f"citations naming no BENCHMARKS.md heading: {unknown}"


def test_docs_name_no_paths_of_the_machine_they_were_written_on():
    for page in [README, ROOT / "BENCHMARKS.md", *DOCS.glob("*.md")]:
        assert "/work/" not in page.read_text(), page.name
