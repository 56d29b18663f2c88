"""Property tests (hypothesis) of LoRA's functional core over kinds, shapes, ranks, alphas, dtypes and adapter counts.

Layer kinds: ``nn.Linear`` (with/without bias), GPT-2 ``Conv1D``, ``nn.Embedding``,
``nn.Conv1d``, ``nn.Conv2d`` (random kernel/stride/padding); 1-3 adapters;
rsLoRA and DoRA where the property holds for them; adapters in the model's
dtype or (SWIFT's ``lora_dtype='fp32'``) in fp32 on a half-precision model.

Tolerances established here.  ``eps`` is the dtype's machine epsilon (fp32
1.2e-7, bf16 7.8e-3, fp16 9.8e-4); ``scale`` is the largest magnitude of the
tensor compared, over the whole tensor; ``n`` the number of adapters.  The
"measured" figures are the worst seen over three runs of 300-600 random
examples per property (kinds, shapes, ranks, alphas, rsLoRA/DoRA, lora_dtype,
1-3 adapters).

* ``apply(model, p)`` vs the model run on ``merge(model, p)``:
  ``max|diff| <= TOL_APPLY_MERGE[dtype] * scale`` with ``scale`` the largest
  absolute output.  Asserted: fp32 ``32 eps`` (3.8e-6), bf16 and fp16 ``4 eps``
  (3.1e-2, 3.9e-3).  Measured: fp32 7.8 eps, bf16 2.1 eps, fp16 2.1 eps.  In
  half precision the adapter path rounds the base output and the LoRA term
  separately while the merged path rounds ``W + s B A`` once, so a few eps of
  the output's scale is the honest bound, not bitwise equality.
* ``unmerge(merge(W, p), p)`` vs ``W``, elementwise:
  ``|diff| <= UNMERGE_ULPS[dtype] * n * eps * (|W| + sum |s B A|)``.  bf16/fp16:
  factor 1, the bound for two roundings (merge, unmerge) of values no larger
  than ``|W| + |s B A|``; measured 0.5 (half an ulp of the merged weight: the
  fp32 work is exact at half precision, so only the merge's rounding
  survives).  fp32: factor 4; measured 1.65, because merge and unmerge each
  run one fused fp32 ``addmm`` whose internal roundings differ between the two.
  50 merge/unmerge cycles stay inside the same one-cycle bound (measured 0.5
  in bf16/fp16, 0.85 in fp32; in 200 examples the weights were a fixed point
  after the first cycle): no drift, unlike PEFT's (design notes).  DoRA has no
  unmerge from merged weights (it raises).
* merging ``n`` adapters vs merging one adapter whose delta is their sum
  (A stacked along the rank, each B scaled by its ``s_i``): ``TOL_SUM * n *
  scale`` with ``scale`` the largest merged weight: fp32 ``8 eps`` (measured
  1.6 n eps: the fp32 products ``B_i A_i`` round differently from the stacked
  one), bf16/fp16 ``2 eps`` (measured 0.47 n eps).  The adapter forward of
  ``n`` adapters vs their sum: ``n * TOL_APPLY_MERGE``.
* every pure function leaves its inputs (model tensors, params, base/merged
  mappings, call inputs) bitwise unchanged, never draws from torch's global
  RNG (dropout uses the explicit generator), and ``init`` is determined by its
  seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import functuner as ft

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = {k: torch.finfo(v).eps for k, v in DTYPES.items()}
TOL_APPLY_MERGE = {"fp32": 32 * EPS["fp32"], "bf16": 4 * EPS["bf16"], "fp16": 4 * EPS["fp16"]}
UNMERGE_ULPS = {"fp32": 4.0, "bf16": 1.0, "fp16": 1.0}
TOL_SUM = {"fp32": 8 * EPS["fp32"], "bf16": 2 * EPS["bf16"], "fp16": 2 * EPS["fp16"]}

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass
class Case:
    """One drawn model (an ``nn.Sequential`` whose module ``"0"`` is adapted), its input and LoRA configs."""

    kind: str
    model: nn.Module
    x: torch.Tensor
    configs: list[ft.LoRAConfig]
    dtype_name: str
    seed: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def params(self) -> list[ft.TunerParams]:
        return [
            ft.init(self.model, c, generator=self.seed + i, adapter_name=f"a{i}") for i, c in enumerate(self.configs)
        ]


def _layer(kind: str, fan_in: int, fan_out: int, k: tuple[int, int], stride: int, pad: int, bias: bool) -> nn.Module:
    if kind == "linear":
        return nn.Linear(fan_in, fan_out, bias=bias)
    if kind == "conv1d_gpt2":
        return Conv1D(fan_out, fan_in)
    if kind == "embedding":
        return nn.Embedding(fan_in, fan_out)
    if kind == "conv1d":
        return nn.Conv1d(fan_in, fan_out, k[0], stride=stride, padding=pad, bias=bias)
    return nn.Conv2d(fan_in, fan_out, k, stride=stride, padding=pad, bias=bias)


def _input(kind: str, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "embedding":
        return torch.randint(0, fan_in, (2, 5), generator=gen)
    if kind in ("linear", "conv1d_gpt2"):
        return torch.randn(2, 3, fan_in, generator=gen)
    if kind == "conv1d":
        return torch.randn(2, fan_in, 7, generator=gen)
    return torch.randn(2, fan_in, 6, 5, generator=gen)


@st.composite
def cases(
    draw: Any,
    kinds=("linear", "conv1d_gpt2", "embedding", "conv1d", "conv2d"),
    dtypes=tuple(DTYPES),
    max_adapters: int = 3,
    dora: bool = True,
) -> Case:
    kind = draw(st.sampled_from(kinds))
    fan_in, fan_out = draw(st.integers(2, 12)), draw(st.integers(1, 12))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride, pad = draw(st.integers(1, 2)), draw(st.integers(0, 1))
    bias = draw(st.booleans())
    dtype_name = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    n = draw(st.integers(1, max_adapters))
    use_dora = dora and draw(st.booleans())
    lora_dtype = draw(st.sampled_from([None, "fp32"]))  # SWIFT's lora_dtype: fp32 adapters on a half model
    configs = []
    for _ in range(n):
        configs.append(
            ft.LoRAConfig(
                r=draw(st.integers(1, 6)),
                lora_alpha=draw(st.floats(0.5, 32.0)),
                use_rslora=draw(st.booleans()),
                use_dora=use_dora,
                lora_dtype=lora_dtype,
                target_modules=["0"],
                init_lora_weights=False,  # B != 0: the adapter really changes the output
            )
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(_layer(kind, fan_in, fan_out, k, stride, pad, bias)).eval()
    model = model.to(DTYPES[dtype_name])
    x = _input(kind, fan_in, gen)
    if x.is_floating_point():
        x = x.to(DTYPES[dtype_name])
    return Case(kind, model, x, configs, dtype_name, seed)


def _merged_forward(case: Case, merged: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.func.functional_call(case.model, merged, (case.x,))


def _scale(t: torch.Tensor) -> float:
    return float(t.detach().float().abs().max()) + 1e-6


# ---------------------------------------------------------------------------
# apply == forward on merged weights
# ---------------------------------------------------------------------------
@SETTINGS
@given(case=cases(), bias=st.sampled_from(["none", "lora_only"]))
def test_apply_equals_merged_forward(case: Case, bias: str) -> None:
    """Also with trainable biases (moved by a different amount per adapter, so they matter)."""
    case.configs = [dataclasses.replace(c, bias=bias) for c in case.configs]
    ps = [
        p.replace({k: v + 0.25 * (i + 1) for k, v in p.items() if k.endswith(".bias")})
        for i, p in enumerate(case.params())
    ]
    want = torch.float32 if case.configs[0].lora_dtype == "fp32" else case.dtype
    assert all(t.dtype == want for p in ps for k, t in p.items() if ".lora_" in k)
    assert all(t.dtype == case.dtype for p in ps for k, t in p.items() if k.endswith(".bias"))  # the model's own
    with torch.no_grad():
        y_apply = ft.apply(case.model, ps, case.x)
        y_merged = _merged_forward(case, ft.merge(case.model, ps))
        y_base = case.model(case.x)
    assert y_apply.dtype == y_merged.dtype == case.dtype
    assert y_apply.shape == y_merged.shape == y_base.shape
    err = float((y_apply.float() - y_merged.float()).abs().max())
    assert err <= TOL_APPLY_MERGE[case.dtype_name] * _scale(y_apply), (err, _scale(y_apply))


# ---------------------------------------------------------------------------
# unmerge(merge(W)) == W
# ---------------------------------------------------------------------------
def _delta_bound(case: Case, ps: list[ft.TunerParams]) -> torch.Tensor:
    """Elementwise |W| + sum |s B A| (fp32) for the adapted weight."""
    w = case.model[0].weight.detach().float()
    bound = w.abs()
    kind = "conv" if case.kind.startswith("conv") and case.kind != "conv1d_gpt2" else case.kind
    for p in ps:
        a, b = (k for k in p if "lora_A" in k or "lora_embedding_A" in k), (k for k in p if "_B" in k)
        delta = ft.lora_delta(p[next(a)], p[next(b)], p.config.scaling_for("0"), kind)
        bound = bound + delta.abs()
    return bound


@SETTINGS
@given(case=cases(dora=False))
def test_unmerge_inverts_merge_within_two_roundings(case: Case) -> None:
    ps = case.params()
    base = dict(case.model.state_dict())
    merged = ft.merge(case.model, ps, base)
    restored = ft.unmerge(case.model, ps, merged)
    assert set(restored) == set(base)
    w, w_back = base["0.weight"], restored["0.weight"]
    assert w_back.dtype == w.dtype
    assert not torch.equal(merged["0.weight"], w)  # the merge did something
    bound = UNMERGE_ULPS[case.dtype_name] * EPS[case.dtype_name] * _delta_bound(case, ps) * len(ps)
    err = (w_back.float() - w.float()).abs()
    assert bool((err <= bound + torch.finfo(case.dtype).smallest_normal).all()), float((err - bound).max())
    for k in base:
        if k != "0.weight":
            assert restored[k] is base[k]


@settings(max_examples=10, deadline=None)
@given(case=cases(dora=False, max_adapters=1, dtypes=("bf16", "fp16")))
def test_merge_unmerge_cycles_do_not_drift(case: Case) -> None:
    ps = case.params()
    state = dict(case.model.state_dict())
    w = state["0.weight"]
    for _ in range(50):
        state = ft.unmerge(case.model, ps, ft.merge(case.model, ps, state))
    bound = UNMERGE_ULPS[case.dtype_name] * EPS[case.dtype_name] * _delta_bound(case, ps)  # one cycle's bound
    err = (state["0.weight"].float() - w.float()).abs()
    assert bool((err <= bound + torch.finfo(case.dtype).smallest_normal).all()), float((err - bound).max())


# ---------------------------------------------------------------------------
# two adapters == one adapter holding their sum
# ---------------------------------------------------------------------------
def _sum_adapter(case: Case, ps: list[ft.TunerParams]) -> ft.TunerParams:
    """One adapter with delta s1 B1 A1 + s2 B2 A2: A stacked along the rank, B scaled by s_i / s and stacked."""
    r = sum(p.config.r for p in ps)
    cfg = ft.LoRAConfig(r=r, lora_alpha=float(r), target_modules=["0"])  # scaling 1
    names = (
        ("0.lora_embedding_A.sum", "0.lora_embedding_B.sum")
        if case.kind == "embedding"
        else ("0.lora_A.sum.weight", "0.lora_B.sum.weight")
    )
    As, Bs = [], []
    for p in ps:
        a_key = next(k for k in p if ".lora_A." in k or ".lora_embedding_A." in k)
        b_key = next(k for k in p if ".lora_B." in k or ".lora_embedding_B." in k)
        As.append(p[a_key].float())
        Bs.append(p[b_key].float() * p.config.scaling_for("0"))
    return ft.TunerParams({names[0]: torch.cat(As, 0), names[1]: torch.cat(Bs, 1)}, cfg, "sum")


@SETTINGS
@given(case=cases(dora=False, max_adapters=3))
def test_merging_adapters_equals_merging_their_sum(case: Case) -> None:
    ps = case.params()
    summed = _sum_adapter(case, ps)
    merged_each = ft.merge(case.model, ps)["0.weight"]
    merged_sum = ft.merge(case.model, summed)["0.weight"]
    assert merged_sum.dtype == merged_each.dtype == case.dtype
    tol = TOL_SUM[case.dtype_name] * len(ps) * _scale(merged_sum)
    err = float((merged_each.detach().float() - merged_sum.detach().float()).abs().max())
    assert err <= tol, (err, tol)
    # and the adapter forward is additive too
    with torch.no_grad():
        y_each = ft.apply(case.model, ps, case.x)
        y_sum = ft.apply(case.model, summed.to(case.dtype), case.x)
    tol_fwd = TOL_APPLY_MERGE[case.dtype_name] * len(ps) * _scale(y_sum)
    assert float((y_each.float() - y_sum.float()).abs().max()) <= tol_fwd


@settings(max_examples=15, deadline=None)
@given(case=cases(dtypes=("fp32",), max_adapters=1, dora=False), w=st.floats(-3.0, 3.0))
def test_merge_is_linear_in_b(case: Case, w: float) -> None:
    """Scaling B by w scales the merged delta by w (fp32)."""
    (p,) = case.params()
    b_key = next(k for k in p if "_B" in k)
    base = case.model[0].weight.detach()
    d1 = ft.merge(case.model, p)["0.weight"] - base
    dw = ft.merge(case.model, p.replace({b_key: p[b_key] * w}))["0.weight"] - base
    torch.testing.assert_close(dw, d1 * w, atol=1e-5 * (1 + float(base.abs().max())) * max(1.0, abs(w)), rtol=1e-4)


# ---------------------------------------------------------------------------
# purity: inputs unchanged, bitwise
# ---------------------------------------------------------------------------
def _fingerprint(obj: Any) -> Any:
    """A deep, bitwise copy of every tensor reachable in ``obj`` (dicts, params, sequences, modules)."""
    if isinstance(obj, torch.Tensor):
        return ("t", obj.detach().clone(), obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.requires_grad)
    if isinstance(obj, nn.Module):
        return (
            "m",
            _fingerprint(dict(obj.state_dict(keep_vars=True))),
            obj.training,
            [sorted(m._parameters) for m in obj.modules()],
        )
    if isinstance(obj, ft.TunerParams):
        return ("p", _fingerprint(dict(obj)), obj.config, obj.adapter_name)
    if isinstance(obj, dict):
        return ("d", [(k, _fingerprint(v)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return ("l", [_fingerprint(v) for v in obj])
    return ("o", obj)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return a == b


def _unchanged(*objs: Any):
    before = [_fingerprint(o) for o in objs]

    def check() -> None:
        for o, f in zip(objs, before, strict=True):
            assert _same(_fingerprint(o), f), type(o).__name__

    return check


@SETTINGS
@given(case=cases(), bias=st.sampled_from(["none", "all"]), train=st.booleans())
def test_pure_functions_leave_inputs_unchanged(case: Case, bias: str, train: bool) -> None:
    configs = [dataclasses.replace(c, bias=bias, lora_dropout=0.25) for c in case.configs]
    case.model.train(train)
    check_model = _unchanged(case.model, case.x)
    global_rng = torch.get_rng_state()
    ps = [ft.init(case.model, c, generator=case.seed + i, adapter_name=f"a{i}") for i, c in enumerate(configs)]
    check_model()
    check_params = _unchanged(ps)

    gen = torch.Generator().manual_seed(0)
    y = ft.apply(case.model, ps, case.x, generator=gen)
    assert y.shape == case.model(case.x).shape
    ft.validate(case.model, ps)
    base = dict(case.model.state_dict())
    check_base = _unchanged(base)
    merged = ft.merge(case.model, ps, base)
    ft.merge(case.model, ps)
    check_merged = _unchanged(merged)
    if not configs[0].use_dora:
        ft.unmerge(case.model, ps, merged)
    for p in ps:
        sd = ft.to_peft_state_dict(p, p.adapter_name)
        check_sd = _unchanged(sd)
        ft.from_peft_state_dict(sd, p.adapter_name)
        ft.rename_adapter(dict(p), p.adapter_name, "other")
        check_sd()
    check_model()
    check_params()
    check_base()
    check_merged()
    # randomness came only from the explicit generators: the global RNG was never drawn from
    assert torch.equal(torch.get_rng_state(), global_rng)
    # and init is a function of its generator: the same seed gives the same params
    assert ft.init(case.model, configs[0], generator=case.seed, adapter_name="a0") == ps[0]


def test_two_adapters_carrying_biases_apply_equals_merge() -> None:
    """Biases of an adapted module carried by two adapters add up as deltas (apply and merge agree);
    biases of non-adapted modules (bias='all') are replaced, the last adapter winning, in both."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).eval()
    ps = []
    for i in range(2):
        p = ft.init(
            model,
            ft.LoRAConfig(r=2, target_modules=["0"], bias="all", init_lora_weights=False),
            generator=i,
            adapter_name=f"a{i}",
        )
        ps.append(p.replace({k: v + (i + 1) for k, v in p.items() if k.endswith(".bias")}))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    merged = ft.merge(model, ps)
    b0 = model[0].bias.detach()
    torch.testing.assert_close(merged["0.bias"], b0 + (ps[0]["0.bias"] - b0) + (ps[1]["0.bias"] - b0))
    assert torch.equal(merged["1.bias"], ps[1]["1.bias"])
    with torch.no_grad():
        torch.testing.assert_close(
            ft.apply(model, ps, x), torch.func.functional_call(model, merged, (x,)), atol=1e-6, rtol=0
        )
