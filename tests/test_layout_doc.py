"""The README's Layout section and docs/architecture.md's runtime table match the tree:
every module of ``dualpipe`` and ``overlap`` (and their subpackages) is named, and every
file they name exists, so the map cannot drift from the code silently."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _layout_sections() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    block = text[text.index("```", start) + 3:]
    block = block[:block.index("```")]
    sections: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        m = re.match(r"^(\w+)/\s", line)
        if m:
            current = m.group(1)
            sections[current] = ""
        if current is not None:
            sections[current] += line + "\n"
    return sections


def _modules(pkg: Path) -> set[str]:
    return {p.name for p in pkg.rglob("*.py") if p.name != "__init__.py"
            and "__pycache__" not in p.parts}


@pytest.mark.parametrize("pkg", ["dualpipe", "overlap"])
def test_readme_layout_names_every_module_and_nothing_else(pkg):
    section = _layout_sections()[pkg]
    named = set(re.findall(r"\b(\w+\.py)\b", section))
    have = _modules(ROOT / pkg)
    assert have - named == set(), f"README Layout does not name {sorted(have - named)}"
    assert named - have == set(), f"README Layout names missing files {sorted(named - have)}"
    for sub in (p for p in (ROOT / pkg).iterdir() if (p / "__init__.py").is_file()):
        assert f"{sub.name}/" in section, f"README Layout does not name {pkg}/{sub.name}/"


def test_readme_layout_top_level_folders_exist():
    for name in _layout_sections():
        assert (ROOT / name).is_dir(), f"README Layout names {name}/, which does not exist"


def test_architecture_runtime_table_names_every_runtime_file():
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = set(re.findall(r"^\| `(\w+\.py)` \|", text, flags=re.M))
    have = _modules(ROOT / "dualpipe" / "runtime")
    assert rows == have, (f"docs/architecture.md's runtime table: missing {sorted(have - rows)}, "
                          f"extra {sorted(rows - have)}")
