"""Shared pytest fixtures: the tiny models of ``tests/models.py`` as fixtures, and a grad-mode leak check.

The builders live in ``tests/models.py`` (also used by scripts outside pytest); they are re-exported here
because test files import them as ``from conftest import tiny_llama``.
"""

from __future__ import annotations

import os

import pytest
import torch
from models import tiny_bert, tiny_gpt2, tiny_llama, tiny_toy, tiny_vit

__all__ = ["tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_toy", "tiny_vit"]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """Every test must leave torch's global grad mode as it found it (a leak silently breaks later tests)."""
    before = torch.is_grad_enabled()
    yield
    after = torch.is_grad_enabled()
    if after != before:
        torch.set_grad_enabled(before)
        pytest.fail(f"test changed torch's global grad mode from {before} to {after} and did not restore it")
