"""Native BOFT with ``boft_n_butterfly_factor`` 2 and 3 against real PEFT, whole model.

PEFT builds the butterfly's block-diagonal matrices with a CUDA extension (``peft/tuners/boft/fbd``), compiled at
first use; where it cannot be compiled (any machine without CUDA and ninja, such as CI's) PEFT warns and *sets the
factor to 1* (``BOFTLayer.update_layer``: ``if not get_fbd_cuda(): boft_n_butterfly_factor = 1``), because its
pure-torch path (``torch.block_diag`` after ``squeeze(0)``) handles one factor only.  :func:`test_peft_without_its_kernel_uses_one_factor`
shows that on this machine.  To compare the whole model for factors 2 and 3 anyway, the other tests give PEFT its
kernel's two functions ported to torch (:class:`PortedFbd`: the index formulas of ``fbd_cuda_kernel.cu``, quoted),
installed as PEFT's loaded extension (``peft.tuners.boft.layer._FBD_CUDA``) for the test only; every other line
that runs is PEFT's own (its permutations, products, merge, save and load).

Rows: PEFT's BOFT rows with a factor above 1 of ``tests/test_custom_models.py``
(huggingface/peft@5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40: "Vanilla MLP 6", "MLP2 1/2", both "Conv2d2 1"; models
``MLP``, ``MLP2``, ``ModelConv2D2`` as defined there), plus a transformers Llama built from a config; forward,
gradients, merged forward and unmerge (``assert_parity``), and checkpoints both ways.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any

import peft
import peft.tuners.boft.layer as peft_boft
import pytest
import torch
from native_peft_helpers import MODELS, assert_parity, check_peft_round_trip, make_pair
from torch import nn

import functuner as ft
from functuner.errors import ParamsMismatchError
from functuner.tuners.boft import BOFTConfig


class PortedFbd:
    """PEFT's ``fbd_cuda`` extension in torch: both kernels of ``peft/tuners/boft/fbd/fbd_cuda_kernel.cu``.

    forward:  ``output[zi*N*b*N*b + (Ni*b+x)*N*b + Ni*b + y] = input[zi*N*b*b + Ni*b*b + x*b + y]``, i.e.
    ``out[z, Ni*b + x, Ni*b + y] = inp[z, Ni, x, y]`` on a zeroed ``(z, N*b, N*b)`` output;
    backward: ``grad_input[z, Ni, x, y] = grad_output[z, Ni*b + x, Ni*b + y]``.  Both return one-element lists,
    as the extension's functions do.
    """

    @staticmethod
    def _index(n: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ni = torch.arange(n, device=device).view(n, 1, 1)
        x = torch.arange(b, device=device).view(1, b, 1)
        y = torch.arange(b, device=device).view(1, 1, b)
        return ni * b + x, ni * b + y

    @classmethod
    def forward(cls, inp: torch.Tensor) -> list[torch.Tensor]:
        z, n, b, _ = inp.shape
        rows, cols = cls._index(n, b, inp.device)
        out = inp.new_zeros(z, n * b, n * b)
        out[:, rows, cols] = inp
        return [out]

    @classmethod
    def backward(cls, grad_output: torch.Tensor, inp: torch.Tensor) -> list[torch.Tensor]:
        _, n, b, _ = inp.shape
        rows, cols = cls._index(n, b, inp.device)
        return [grad_output[:, rows, cols].contiguous()]


@pytest.fixture
def peft_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", PortedFbd)


class MLP2(nn.Module):
    """PEFT's ``MLP2`` (same file and commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 32)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(32, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 - PEFT's argument name
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class Conv2D2(nn.Module):
    """PEFT's ``ModelConv2D2`` (same file and commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 40)
        self.conv2d = nn.Conv2d(8, 32, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(32, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 - PEFT's argument name
        h = self.relu(self.lin0(X.float())).reshape(-1, 8, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(h)))))


def _seeded(cls: type[nn.Module]) -> Any:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls().eval()

    return build


def _x(n: int, seed: int) -> Any:
    return lambda: {"X": torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))}


BUILDS = {**MODELS, "mlp2": (_seeded(MLP2), _x(6, 8)), "conv2d2": (_seeded(Conv2D2), _x(9, 9))}
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "peft-mlp-6": ("peft_mlp", {"target_modules": ["lin1"], "boft_block_size": 10, "boft_n_butterfly_factor": 2}),
    "peft-mlp2-1": ("mlp2", {"target_modules": ["lin1"], "boft_block_size": 2, "boft_n_butterfly_factor": 3}),
    "peft-mlp2-2": (
        "mlp2",
        {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3},
    ),
    "peft-conv2d2-1-f2": (
        "conv2d2",
        {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_n_butterfly_factor": 2},
    ),
    "peft-conv2d2-1-f3": (
        "conv2d2",
        {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_n_butterfly_factor": 3},
    ),
    **{
        f"llama-f{f}": (
            "llama",
            {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": f},
        )
        for f in (2, 3)
    },
}


def test_ported_kernel_is_block_diag() -> None:
    blocks = torch.randn(3, 4, 2, 2)
    (out,) = PortedFbd.forward(blocks)
    torch.testing.assert_close(out, torch.stack([torch.block_diag(*m.unbind(0)) for m in blocks]), atol=0, rtol=0)
    (back,) = PortedFbd.backward(out, blocks)
    torch.testing.assert_close(back, blocks, atol=0, rtol=0)


@pytest.mark.usefixtures("peft_kernel")
@pytest.mark.parametrize("row", list(ROWS))
def test_boft_more_factors_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = BUILDS[model_name]
    model = build()
    cfg = {"init_weights": False, **kwargs}
    p, pm = make_pair(model, BOFTConfig(**cfg), peft.BOFTConfig(**cfg))
    assert next(t for k, t in p.items() if ".boft_R." in k).shape[0] == kwargs["boft_n_butterfly_factor"]
    assert_parity(model, inputs(), p, pm)


@pytest.mark.usefixtures("peft_kernel")
@pytest.mark.parametrize("factor", [2, 3])
def test_more_factors_checkpoints_both_ways(factor: int, tmp_path) -> None:
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = {"boft_block_size": 4, "boft_n_butterfly_factor": factor, "target_modules": ["q_proj", "v_proj"]}
    p = ft.init(model, BOFTConfig(init_weights=False, **cfg), generator=3)
    back = check_peft_round_trip(tmp_path, model, x, p, peft.BOFTConfig(init_weights=False, **cfg), "BOFT")
    assert back.config.boft_n_butterfly_factor == factor
    assert all(t.shape[0] == factor for k, t in back.items() if ".boft_R." in k)


def test_peft_without_its_kernel_uses_one_factor() -> None:
    # PEFT's own loader, as every BOFT layer calls it: on a machine without CUDA (CI) the build fails and PEFT warns
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kernel = peft_boft.get_fbd_cuda()
        pm = peft.get_peft_model(
            BUILDS["mlp2"][0](), peft.BOFTConfig(target_modules=["lin1"], boft_block_size=2, boft_n_butterfly_factor=3)
        )
    layer = pm.base_model.model.lin1
    if kernel is not None:  # a CUDA machine where PEFT compiled its kernel: the factor is kept
        assert layer.boft_R["default"].shape[0] == 3
        return
    assert any("Setting boft_n_butterfly_factor to 1" in str(w.message) for w in seen)
    assert layer.fbd_cuda_available is False and layer.boft_R["default"].shape[0] == 1
    assert pm.peft_config["default"].boft_n_butterfly_factor == 3  # the config (and a saved one) still says 3
    cfg = BOFTConfig(target_modules=["lin1"], boft_block_size=2, boft_n_butterfly_factor=3)
    ours = ft.init(BUILDS["mlp2"][0](), cfg, generator=0)
    assert ours["lin1.boft_R.default"].shape[0] == 3  # functuner keeps the configured factor everywhere


def test_peft_cpu_save_with_more_factors_names_the_fix(tmp_path) -> None:
    if peft_boft.get_fbd_cuda() is not None:
        return  # a CUDA machine where PEFT compiled its kernel saves the factors its config names
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = peft.BOFTConfig(target_modules=["q_proj"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's two warnings: no extension, factor set to 1
        pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.save_pretrained(tmp_path)
    with pytest.raises(ParamsMismatchError, match=r'holds 1 butterfly factor.*set "boft_n_butterfly_factor": 1'):
        ft.load(tmp_path, model)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "boft_n_butterfly_factor": 1}))
    back = ft.load(tmp_path, model)
    torch.testing.assert_close(ft.apply(model, back, kwargs=x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)
