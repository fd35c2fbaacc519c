"""The docs stand alone: no file points outside the repo, every relative link resolves, the
README's code map names paths that exist, and every `docs/DESIGN.md §N` cited in the code has
that section."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    files = []
    for name in out:
        p = REPO / name
        if p.suffix in (".png", ".jpg", ".gz", ".bin", ".pt", ".safetensors") or not p.is_file():
            continue
        try:
            p.read_text()
        except UnicodeDecodeError:
            continue
        files.append(p)
    return files


OUTSIDE = re.compile(r"\.\./shared|/work/|https?://(?!127\\?\.0|www\.w3\.org|\{)")


def test_nothing_points_outside_the_repo():
    """Code, docs, configs and scripts (recorded benchmark results name the machine's paths: data,
    not links)."""
    bad = []
    for p in tracked_text_files():
        if p.suffix == ".jsonl" or p == Path(__file__).resolve():
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{p.relative_to(REPO)}:{i}: {line.strip()[:120]}")
    assert not bad, "\n".join(bad)


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_resolves_inside_the_repo():
    bad = []
    for md in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if target.startswith(("#", "http://127.0.0.1")):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(REPO) or not path.exists():
                bad.append(f"{md.relative_to(REPO)} -> {target}")
    assert not bad, bad


def test_the_readme_code_map_matches_the_tree():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Code map") : text.index("## Library use")]
    paths = [p for row in re.findall(r"^\| (.+?) \|", table, re.M) for p in re.findall(r"`([^`]+)`", row)]
    assert len(paths) >= 15
    missing = [p for p in paths if not (REPO / p.rstrip("/")).exists()]
    assert not missing, missing
    # and every package of clt/ is on the map
    packages = {f"clt/{d.name}/" for d in (REPO / "clt").iterdir() if (d / "__init__.py").exists()}
    assert packages <= set(paths), packages - set(paths)


def test_design_sections_cited_in_the_code_exist():
    design = (REPO / "docs" / "DESIGN.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", design, re.M)}
    cited = []
    for p in tracked_text_files():
        cited += [(p, int(n)) for n in re.findall(r"DESIGN\.md §(\d+)", p.read_text())]
    assert cited
    assert not [(str(p.relative_to(REPO)), n) for p, n in cited if n not in sections]
    assert (REPO / "README.md").read_text().count("\n") <= 150
