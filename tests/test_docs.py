"""The docs site builds offline with --strict, its CLI reference covers every command, the README links hold."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from fastcls.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _commands(cmd, path=()):
    """Every command path of the typer app, groups included."""
    yield " ".join(("fastcls", *path))
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra")
    pytest.importorskip("material", reason="mkdocs-material is in the dev extra")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def test_site_builds_with_cli_reference(site):
    page = (site / "reference" / "cli" / "index.html").read_text()
    for path in _commands(typer.main.get_command(app)):
        assert f"<code>{path}</code>" in page, f"{path} is missing from the CLI reference"
    assert "Usage: fastcls train [OPTIONS]" in page


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 13_000
    assert "./install.sh && .venv/bin/fastcls train digits resnet18" in readme
    assert ".venv/bin/python -m pytest -q" in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
