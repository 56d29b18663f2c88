"""Lint, format and type checks run as tests, so CI enforces them.

* ``ruff check`` and ``ruff format --check`` over the package, tests, benchmarks and
  examples (settings: ``[tool.ruff]`` in pyproject.toml);
* ``mypy functuner`` with the settings in ``[tool.mypy]`` (strict);
* the package ships ``py.typed`` and lists it as package data, so users' type checkers
  read our annotations.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PATHS = ["functuner", "tests", "benchmarks", "examples", "mkdocs_hooks.py"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_check_is_clean() -> None:
    proc = _run("ruff", "check", *PATHS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_clean() -> None:
    proc = _run("ruff", "format", "--check", *PATHS)
    assert proc.returncode == 0, "run `ruff format " + " ".join(PATHS) + "`:\n" + proc.stdout + proc.stderr


def test_mypy_strict_is_clean() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config.get("strict") is True, "[tool.mypy] must keep strict = true"
    proc = _run("mypy", "functuner")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


def test_package_ships_py_typed() -> None:
    assert (ROOT / "functuner" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["functuner"]
