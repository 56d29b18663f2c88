"""Old import path of the LoRA interop builders: everything now lives in ``tests/models.py``.

Kept so ``from tiny_models import checksum, output_of`` (with ``tests/swift_interop`` on ``sys.path``)
still works; new code imports ``models`` (with ``tests`` on ``sys.path``).  ``checksum`` here is the
tensor form the LoRA interop fixtures recorded (:func:`models.checksum_tensor`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import BUILDERS, inputs, output_of, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402
from models import checksum_tensor as checksum  # noqa: E402

__all__ = ["BUILDERS", "checksum", "inputs", "output_of", "tiny_bert", "tiny_gpt2", "tiny_llama"]
