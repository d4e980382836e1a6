"""The documentation site builds with ``mkdocs build --strict`` (broken links, pages missing
from the nav and unresolvable ``:::`` API references are errors), and it documents every
subcommand the command line has."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [
    name
    for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
    if importlib.util.find_spec(name) is None
]


@pytest.mark.skipif(
    bool(MISSING),
    reason=f"docs toolchain not installed ({', '.join(MISSING)}); pip install -e '.[dev]'",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    cmd += ["-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the config names its paths relative to itself, not to the cwd
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("mmgpt.registry.Registry", "mmgpt.model.GPT", "mmgpt.testing.check_encoder"):
        assert f'id="{name}"' in api, name


def test_docs_and_readme_name_every_subcommand() -> None:
    from mmgpt.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for command in sub.choices:
        assert f"mmgpt {command} " in index, command
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("demo", "train", "generate", "plugins list"):
        assert f"mmgpt {command}" in readme, command
