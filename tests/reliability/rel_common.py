"""Shared helpers of the reliability tests: tiny models, bitwise snapshots of models and directories.

(Not a conftest: ``crash_worker.py`` imports it outside pytest.  The tiny models come from ``tests/models.py``.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny-model builders
from models import tiny_llama  # noqa: E402

from functuner import LoRAConfig, Swift, SwiftModel  # noqa: E402

__all__ = ["DirSnapshot", "ModelSnapshot", "X", "lora_llama", "out_of", "tiny_llama"]

X = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def lora_llama(seed: int = 0, names: tuple[str, ...] = ("default",)) -> SwiftModel:
    """A tiny Llama with trained-looking (non-zero B) LoRA adapters ``names`` on q/v (r=4)."""
    model = tiny_llama()  # (seeds torch's RNG with 0 itself)
    torch.manual_seed(seed)  # the shim draws adapter inits from torch's global RNG, as SWIFT does
    cfgs = {
        n: LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False) for n in names
    }
    return Swift.prepare_model(model, cfgs)


def out_of(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


class ModelSnapshot:
    """Bitwise copy of everything a failed call must leave alone in a (Swift)model.

    Parameters and buffers (values, storage pointers, identity, requires_grad),
    the module tree, hook counts, and for a SwiftModel its adapters, active set,
    merge state and offload state.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        inner = model.model if isinstance(model, SwiftModel) else model
        self.inner = inner
        self.tensors = self._tensors()
        self.modules = [(n, type(m), id(m)) for n, m in inner.named_modules()]
        self.hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in inner.modules()]
        self.swift = self._swift_state()

    def _tensors(self) -> dict[str, tuple[int, torch.Tensor, int, str, bool]]:
        out = {}
        for k, v in self.inner.state_dict(keep_vars=True).items():
            data = v.detach()
            copy = data.clone() if data.device.type != "meta" else data
            out[k] = (
                id(v),
                copy,
                data.data_ptr() if data.device.type != "meta" else 0,
                str(data.device),
                bool(v.requires_grad),
            )
        return out

    def _swift_state(self) -> object:
        m = self.model
        if not isinstance(m, SwiftModel):
            return None
        st = m._state
        return (
            sorted(st.adapters),
            sorted(m.active_adapters),
            list(st.merged),
            len(st.originals),
            {
                n: (a.offload, sorted(a.tensors), {k: id(p) for k, p in a.tensors.items()})
                for n, a in st.adapters.items()
            },
        )

    def assert_unchanged(self) -> None:
        now = self.inner.state_dict(keep_vars=True)
        assert set(now) == set(self.tensors), set(now) ^ set(self.tensors)
        for k, (ident, value, ptr, dev, grad) in self.tensors.items():
            v = now[k]
            assert id(v) == ident, f"{k}: a different tensor object now"
            assert str(v.device) == dev, f"{k}: moved from {dev} to {v.device}"
            assert bool(v.requires_grad) == grad, f"{k}: requires_grad changed"
            if dev != "meta":
                assert v.data_ptr() == ptr, f"{k}: storage replaced"
                assert v.dtype == value.dtype and torch.equal(v.detach(), value), f"{k}: values changed"
        assert [(n, type(m), id(m)) for n, m in self.inner.named_modules()] == self.modules
        assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in self.inner.modules()] == self.hooks
        assert self._swift_state() == self.swift


class DirSnapshot:
    """Every file under a directory (relative path -> bytes), and the directory's listing."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files = self._read()

    def _read(self) -> dict[str, bytes]:
        out = {}
        for p in sorted(self.root.rglob("*")):
            rel = str(p.relative_to(self.root))
            if p.is_symlink():
                out[rel] = b"->" + str(p.readlink()).encode()
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = b"<dir>"
        return out

    def assert_unchanged(self) -> None:
        now = self._read()
        assert set(now) == set(self.files), set(now) ^ set(self.files)
        for k, v in self.files.items():
            assert now[k] == v, f"{k} changed"
