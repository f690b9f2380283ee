"""The docs' code blocks run, and the API reference matches the docstrings."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks(path: Path) -> list[str]:
    """Python blocks of a Markdown file, except those whose first line says ``# not-run``."""
    return [b for b in BLOCK.findall(path.read_text()) if not b.lstrip().startswith("# not-run")]


@pytest.mark.parametrize("path", [p for p in DOCS if p.name != "api.md"], ids=lambda p: p.name)
def test_code_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for code in blocks(path):
        exec(compile(code, str(path), "exec"), namespace)  # noqa: S102 - our own docs


def test_every_doc_has_runnable_code_or_says_why():
    for path in DOCS:
        if path.name == "api.md":
            continue
        text = path.read_text()
        assert "```python" in text, path.name
        skipped = [b for b in BLOCK.findall(text) if b.lstrip().startswith("# not-run")]
        assert all(re.match(r"\s*# not-run: \S", b) for b in skipped), path.name


def test_api_reference_is_current():
    generated = runpy.run_path(str(ROOT / "docs" / "gen_api.py"))["render"]()
    assert (ROOT / "docs" / "api.md").read_text() == generated, "run python docs/gen_api.py"
