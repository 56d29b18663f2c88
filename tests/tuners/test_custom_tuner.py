"""A tuner defined entirely in this file runs through the whole library: functional API, disk, and the shim.

``OutScale`` multiplies the output of chosen ``nn.Linear`` layers by ``1 + s`` (one learnable ``s`` per output
feature, zero at init, so a fresh adapter is the identity), like IA3 without PEFT's format.  Its config, its pure
functions and its :class:`~functuner.tuners.base.Tuner` value live here; ``functuner.register`` is the only
contact with the library.  If this file needs to touch any other module to work, the library special-cases
tuner types somewhere (the shim and io must only use the ``Tuner`` hooks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from models import tiny_llama
from torch import nn

import functuner as ft
from functuner.core.routing import Routes, ensure_slots
from functuner.errors import ConfigError, ParamsMismatchError, TargetError
from functuner.tuners.base import CallContext, KeyNaming, Tuner, check_exact_tensors

SWIFT_TYPE = "test_outscale"


# -- the tuner: a config dataclass and pure functions -------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class OutScaleConfig(ft.TunerConfig):
    """Scale the outputs of the ``nn.Linear`` layers whose last name component is in ``target_modules``."""

    target_modules: tuple[str, ...] | None = None
    swift_type: str = SWIFT_TYPE

    def check(self, *, complete: bool = True) -> None:
        if self.target_modules is None:
            if complete:
                raise ConfigError("OutScaleConfig.target_modules is required (e.g. ['q_proj'])")
            return
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"OutScaleConfig.target_modules must be non-empty names, got {self.target_modules!r}")


def _key(module_name: str, adapter_name: str) -> str:
    return f"{module_name}.outscale_{adapter_name}.scale"


def _targets(model: nn.Module, config: OutScaleConfig) -> dict[str, nn.Linear]:
    assert config.target_modules is not None
    found = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in config.target_modules
    }
    if not found:
        raise TargetError(f"OutScale target_modules={list(config.target_modules)} matched no nn.Linear")
    return found


def _by_module(model: nn.Module, params: ft.TunerParams) -> Iterator[tuple[str, nn.Linear, torch.Tensor]]:
    for name, module in _targets(model, params.config).items():
        yield name, module, params[_key(name, params.adapter_name)]


def init(model: nn.Module, config: OutScaleConfig, generator: torch.Generator, adapter_name: str = "default") -> Any:
    """Zero scales (the identity); reads the model, never changes it."""
    config.check()
    tensors = {_key(n, adapter_name): torch.zeros(m.out_features) for n, m in _targets(model, config).items()}
    return ft.TunerParams(tensors, config, adapter_name)


def validate(model: nn.Module, params: ft.TunerParams) -> None:
    expected = {_key(n, params.adapter_name): (m.out_features,) for n, m in _targets(model, params.config).items()}
    check_exact_tensors(params, expected, "OutScale params do not fit the model")


def routes(model: nn.Module, params: ft.TunerParams, ctx: CallContext) -> Routes:
    forward: dict[nn.Module, list[Any]] = {}
    for _, module, s in _by_module(model, params):

        def slot(mod: nn.Module, args: Any, kwargs: Any, out: torch.Tensor, s: torch.Tensor = s) -> torch.Tensor:
            return out * (1 + s)

        forward[module] = [slot]
    ensure_slots(list(forward))
    return Routes(forward=forward)


def _weights(model: nn.Module, base: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if base is None:
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return dict(base)


def merge(model: nn.Module, params: ft.TunerParams, base: Mapping[str, torch.Tensor] | None = None) -> Any:
    out = _weights(model, base)
    for name, module, s in _by_module(model, params):
        out[f"{name}.weight"] = out[f"{name}.weight"] * (1 + s)[:, None]
        if module.bias is not None:
            out[f"{name}.bias"] = out[f"{name}.bias"] * (1 + s)
    return out


def unmerge(model: nn.Module, params: ft.TunerParams, merged: Mapping[str, torch.Tensor]) -> Any:
    out = dict(merged)
    for name, module, s in _by_module(model, params):
        out[f"{name}.weight"] = out[f"{name}.weight"] / (1 + s)[:, None]
        if module.bias is not None:
            out[f"{name}.bias"] = out[f"{name}.bias"] / (1 + s)
    return out


OUTSCALE = Tuner(
    swift_type=SWIFT_TYPE,
    config_cls=OutScaleConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    key_naming=KeyNaming(glued=(("outscale_", ("scale",)),)),  # the adapter name is glued: outscale_<adapter>
)


@pytest.fixture(scope="module", autouse=True)
def _registered() -> Iterator[None]:
    """Registered for this module's tests only (the registry is global; other tests list its tuners)."""
    from functuner.tuners import REGISTRY

    assert SWIFT_TYPE not in REGISTRY
    ft.register(OUTSCALE)
    yield
    REGISTRY.pop(SWIFT_TYPE)


# -- the tests -----------------------------------------------------------------------------------------------------
CONFIG = OutScaleConfig(target_modules=["q_proj", "down_proj"])
X = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def _out(model: nn.Module, params: Any = None) -> torch.Tensor:
    with torch.no_grad():
        return (model(X) if params is None else ft.apply(model, params, (X,))).logits


def _trained(model: nn.Module, adapter_name: str = "default") -> ft.TunerParams:
    params = ft.init(model, CONFIG, generator=0, adapter_name=adapter_name)
    g = torch.Generator().manual_seed(1)
    return params.map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g))


def _fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_init_apply_validate_and_the_model_is_never_changed():
    model = tiny_llama()
    before = _fingerprint(model)
    base = _out(model)
    params = ft.init(model, CONFIG, generator=0)
    assert set(params) == {
        _key(f"model.layers.{i}.{m}", "default") for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")
    }
    ft.validate(model, params)
    assert torch.equal(_out(model, params), base)  # zero scales: the identity
    trained = _trained(model)
    out = _out(model, trained)
    assert not torch.allclose(out, base)
    assert torch.equal(_out(model), base)  # deactivated: the base model exactly
    assert torch.equal(_out(model, trained), out)
    # the slot computes exactly the tuner's formula at its module
    seen: dict[str, torch.Tensor] = {}
    q = model.model.layers[0].self_attn.q_proj
    handle = q.register_forward_hook(lambda m, a, o: seen.setdefault("plain", o.detach()))
    try:
        _out(model)
    finally:
        handle.remove()
    handle = q.register_forward_hook(lambda m, a, o: seen.setdefault("scaled", o.detach()), prepend=False)
    try:
        _out(model, trained)
    finally:
        handle.remove()
    s = trained[_key("model.layers.0.self_attn.q_proj", "default")]
    torch.testing.assert_close(seen["scaled"], seen["plain"] * (1 + s))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_config_and_params_raise_typed_errors():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="target_modules"):
        ft.init(model, OutScaleConfig(), generator=0)
    with pytest.raises(TargetError, match="matched no nn.Linear"):
        ft.init(model, OutScaleConfig(target_modules=["nothing"]), generator=0)
    params = ft.init(model, CONFIG, generator=0)
    with pytest.raises(ParamsMismatchError, match="do not fit"):
        ft.validate(model, ft.TunerParams(dict(list(params.items())[1:]), CONFIG))


def test_grads_reach_only_the_scales():
    model = tiny_llama()
    trained = _trained(model)
    grads = torch.func.grad(lambda p: ft.apply(model, p, (X,), {"labels": X}).loss)(trained)
    assert set(grads) == set(trained) and all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())


def test_merge_computes_what_apply_computes_and_unmerge_restores():
    model = tiny_llama()
    trained = _trained(model)
    merged = ft.merge(model, trained)
    with torch.no_grad():
        via_merge = torch.func.functional_call(model, merged, (X,)).logits
    torch.testing.assert_close(via_merge, _out(model, trained), rtol=1e-5, atol=1e-6)
    restored = ft.unmerge(model, trained, merged)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(restored[k], v, rtol=1e-6, atol=1e-7)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_llama()
    trained = _trained(model)
    ft.save(trained, tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "default" / "adapter_config.json").read_text())
    assert written["swift_type"] == SWIFT_TYPE and written["target_modules"] == ["q_proj", "down_proj"]
    loaded = ft.load(tmp_path / "ckpt", tiny_llama())
    assert isinstance(loaded.config, OutScaleConfig) and loaded.config == trained.config
    assert loaded.adapter_name == "default" and set(loaded) == set(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert torch.equal(_out(model, loaded), _out(model, trained))


def test_load_of_save_equals_the_params(tmp_path):
    trained = _trained(tiny_llama())
    ft.save(trained, tmp_path / "ckpt")
    assert ft.load(tmp_path / "ckpt", tiny_llama()) == trained


def test_shim_prepare_forward_save_and_from_pretrained(tmp_path):
    model = tiny_llama()
    base = _out(model)
    trained = _trained(model)
    want = _out(model, trained)
    sm = ft.Swift.prepare_model(model, {"default": CONFIG})
    assert torch.equal(_out(sm), base)  # a fresh adapter is the identity
    sm.load_state_dict(dict(trained), adapter_name="default")
    assert set(sm.state_dict()) == set(trained)
    assert torch.equal(_out(sm), want)
    assert all(p.requires_grad == (n.endswith(".scale")) for n, p in sm.named_parameters())
    sm.deactivate_adapter("default")
    assert torch.equal(_out(sm), base)
    sm.activate_adapter("default")
    sm.save_pretrained(str(tmp_path / "shim"))
    on_disk = json.loads((tmp_path / "shim" / "default" / "adapter_config.json").read_text())
    assert on_disk["swift_type"] == SWIFT_TYPE
    fresh = ft.Swift.from_pretrained(tiny_llama(), str(tmp_path / "shim"))
    assert torch.equal(_out(fresh), want)
    got, expected = fresh.state_dict(), sm.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # a second adapter under another name: its keys carry that name (the glued key naming hook)
    sm2 = ft.Swift.from_pretrained(tiny_llama(), str(tmp_path / "shim"), adapter_name={"default": "other"})
    assert set(sm2.state_dict()) == {k.replace("outscale_default", "outscale_other") for k in trained}
    assert torch.equal(_out(sm2), want)
