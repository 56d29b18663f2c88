"""LLaMA-Pro block expansion without changing the model: the new blocks are the params.

LLaMA-Pro (Wu et al. 2024, arXiv:2401.02415) interleaves new decoder blocks
with the original ones and trains only the new ones.  SWIFT's rule (with ``L``
layers and ``stride = L // num_groups``): after every original layer ``i`` with
``(i + 1) % stride == 0`` comes a copy of layer ``i`` whose attention output
projection and MLP down projection (weights and biases) are zero, so the
expanded model starts equal to the base model.  SWIFT names the new blocks by
their index in the expanded list: with 2 layers and 2 new blocks the list is
``[layer0, new, layer1, new]`` and SWIFT saves ``model.layers.1.*`` and
``model.layers.3.*``.  Those names are original layers' names in the
unexpanded model, so functuner's params name a new block after the layer it
follows: ``model.layers.<i>.llamapro_<adapter>.<param>``
(:func:`to_swift_keys` and :func:`from_swift_keys`, the disk layer's hooks, convert
to and from SWIFT's names; checkpoints use SWIFT's).

Functional form: the model keeps its layers.  A forward slot on each original
layer ``i`` that is followed by a new block runs that block on the layer's
output: a per-call clone of layer ``i`` whose parameters are replaced by the
params' tensors (nothing in the model is written).  The layer's own keyword
arguments (mask, position embeddings, cache...) are passed on.  With a KV
cache, the new blocks keep their keys/values in a private cache that belongs to
the caller's cache object, so generation works and never touches the original
layers' entries.

No merged form: the expansion adds layers, so there are no base weights to fold it into.
SWIFT's own form (real decoder layers inserted, ``num_hidden_layers`` updated)
is what ``Swift.prepare_model`` builds, through the :func:`restructure` hook (the
config then has ``inserted_layers``, and the params are those layers' own
parameters under SWIFT's names); for functional params, :func:`expand` gives the
expanded model's weights and its transformers config, so
``AutoModelForCausalLM.from_config(config)`` + ``load_state_dict(state)``
rebuilds a model whose outputs equal the adapted model's.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Replace, Routes, ensure_method_slot, ensure_slots
from ..core.targets import is_internal, own_named_parameters
from ..errors import CheckpointError, ConfigError, TargetError
from .base import CallContext, KeyNaming, Tuner, TunerConfig, check_exact_tensors, clone_module_tree

__all__ = [
    "LLaMAProConfig",
    "block_key",
    "expand",
    "expansion_plan",
    "from_swift_keys",
    "init",
    "restructure",
    "llamapro_from_swift_state_dict",
    "routes",
    "to_swift_keys",
    "tuner",
    "validate",
]

# SWIFT's model_type -> keys (module list, attention, o_proj, down_proj relative to a layer)
_LLAMA_LIKE = {
    "module_list": "model.layers",
    "attention": "self_attn",
    "o_proj": "self_attn.o_proj",
    "down_proj": "mlp.down_proj",
}
_ARCHS = {
    t: _LLAMA_LIKE
    for t in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "yi",
        "gemma",
        "gemma2",
        "deepseek",
        "openbuddy",
        "xverse",
        "orion",
        "bluelm",
        "ziya",
        "skywork",
        "minicpm",
        "mixtral",
    )
}


@dataclass(frozen=True, eq=False)
class LLaMAProConfig(TunerConfig):
    """SWIFT's ``LLaMAProConfig``.

    * ``model_type``: an architecture SWIFT maps (``'llama'``, ``'qwen2'``,
      ``'mistral'``...); or give ``model_key_mapping`` (SWIFT's ``ModelKeys``
      fields: ``module_list``, ``attention``, ``o_proj``, ``down_proj``, with
      ``{}`` standing for the layer index, e.g. ``'model.layers.{}.self_attn.o_proj'``).
    * ``num_new_blocks``: must divide the number of layers (SWIFT's rule).
    * ``num_groups``: how many places get new blocks (default ``num_new_blocks``).
    """

    model_type: str | None = None
    num_new_blocks: int | None = None
    num_groups: int | None = None
    model_key_mapping: Any = None
    swift_type: str = "LLAMAPRO"
    #: functuner's own, never saved (not in ``to_dict``): the indices at which the new blocks were inserted as
    #: real layers (:func:`restructure`, SWIFT's form); the params are then those layers' own parameters
    inserted_layers: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """SWIFT's fields (``inserted_layers`` is functuner's bookkeeping, never written)."""
        out = super().to_dict()
        out.pop("inserted_layers", None)
        return out

    def _canonical(self) -> str:
        return f"{super()._canonical()}{list(self.inserted_layers)}"  # equality tells the two forms apart

    def check(self, *, complete: bool = True) -> None:
        """Field checks (:meth:`TunerConfig.check`); unset required fields only when ``complete``."""
        bad = [i for i in self.inserted_layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise ConfigError(f"inserted_layers must be layer indices, got {list(self.inserted_layers)!r}")
        n = self.num_new_blocks
        if (complete or n is not None) and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ConfigError(f"num_new_blocks must be a positive integer, got {n!r}")
        g = self.num_groups
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
            raise ConfigError(f"num_groups must be a positive integer or None, got {g!r}")
        unset = self.model_type is None and self.model_key_mapping is None
        if (complete or not unset) and self.model_key_mapping is None and self.model_type not in _ARCHS:
            raise ConfigError(
                f"model_type={self.model_type!r} is not one LLaMA-Pro knows ({sorted(_ARCHS)}); pass model_key_mapping"
            )

    def keys(self) -> dict[str, str]:
        """module_list, attention, o_proj, down_proj (the last three relative to a layer)."""
        if self.model_key_mapping is None:
            return dict(_ARCHS[str(self.model_type)])
        m = dict(self.model_key_mapping)
        out = {"module_list": m.get("module_list")}
        for f in ("attention", "o_proj", "down_proj"):
            v = m.get(f)
            out[f] = v.split("{}.", 1)[1] if isinstance(v, str) and "{}." in v else v
        missing = [k for k, v in out.items() if not v]
        if missing:
            raise ConfigError(
                f"model_key_mapping lacks {missing}; LLaMA-Pro needs module_list, attention, o_proj, down_proj"
            )
        return {k: str(v) for k, v in out.items()}


class _Block(NamedTuple):
    source: int  # index of the original layer it follows and copies
    new_index: int  # its index in SWIFT's expanded layer list
    ordinal: int  # 0, 1, ... among new blocks


def expansion_plan(num_layers: int, num_new_blocks: int, num_groups: int | None = None) -> list[_Block]:
    """Where SWIFT puts the new blocks: ``[(source layer, index in the expanded list, ordinal)]``. Pure."""
    if num_layers % num_new_blocks != 0:
        raise ConfigError(f"the model has {num_layers} layers, which num_new_blocks={num_new_blocks} does not divide")
    stride = num_layers // (num_groups or num_new_blocks)
    if stride == 0:
        raise ConfigError(f"num_groups={num_groups} exceeds the number of layers {num_layers}")
    blocks: list[_Block] = []
    for idx in range(num_layers):
        if (idx + 1) % stride == 0:
            blocks.append(_Block(idx, idx + 1 + len(blocks), len(blocks)))
    return blocks


def _layers(model: nn.Module, cfg: LLaMAProConfig) -> tuple[str, nn.ModuleList, dict[str, str]]:
    keys = cfg.keys()
    try:
        layer_list = model.get_submodule(keys["module_list"])
    except AttributeError:
        raise TargetError(
            f"{type(model).__name__} has no {keys['module_list']!r} (model_type={cfg.model_type!r})"
        ) from None
    if not isinstance(layer_list, nn.ModuleList) or len(layer_list) == 0:
        raise TargetError(f"{keys['module_list']!r} is not a non-empty nn.ModuleList")
    for f in ("attention", "o_proj", "down_proj"):
        try:
            layer_list[0].get_submodule(keys[f])
        except AttributeError:
            raise TargetError(f"layer 0 of {keys['module_list']!r} has no {keys[f]!r} ({f})") from None
    return keys["module_list"], layer_list, keys


def _own_parameters(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The layer's own parameters: not those functuner placed on it (the stateful shim's marked holder modules)."""
    return list(own_named_parameters(layer))


def block_key(module_list: str, source: int, adapter_name: str, param: str) -> str:
    """functuner's name of a new block's parameter: ``<module_list>.<source>.llamapro_<adapter>.<param>``."""
    return f"{module_list}.{source}.llamapro_{adapter_name}.{param}"


def _plan(model: nn.Module, cfg: LLaMAProConfig) -> tuple[str, nn.ModuleList, dict[str, str], list[_Block]]:
    prefix, layer_list, keys = _layers(model, cfg)
    return prefix, layer_list, keys, expansion_plan(len(layer_list), int(cfg.num_new_blocks or 0), cfg.num_groups)


def init(
    model: nn.Module, config: LLaMAProConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """The new blocks' weights: copies of their source layers, o_proj/down_proj zeroed. Pure (no randomness)."""
    if not isinstance(config, LLaMAProConfig):
        raise ConfigError(f"llamapro.init needs a LLaMAProConfig, got {type(config).__name__}")
    config.check()
    if config.inserted_layers:  # SWIFT's form: the new blocks are layers of the model, their parameters the params
        prefix, layer_list, _keys = _layers(model, config)
        return TunerParams(
            {k: p.detach() for k, p in _inserted_params(prefix, layer_list, config)}, config, adapter_name
        )
    prefix, layer_list, keys, plan = _plan(model, config)
    zeroed = (f"{keys['o_proj']}.", f"{keys['down_proj']}.")
    tensors: dict[str, torch.Tensor] = {}
    for b in plan:
        for name, p in _own_parameters(layer_list[b.source]):
            t = p.detach().clone()
            if name.startswith(zeroed):
                t = torch.zeros_like(t)
            tensors[block_key(prefix, b.source, adapter_name, name)] = t
    if config.num_groups is None:  # as SWIFT's prepare_model: the checkpoint names the groups it used
        config = dataclasses.replace(config, num_groups=config.num_new_blocks)
    return TunerParams(tensors, config, adapter_name)


def _inserted_params(prefix: str, layer_list: nn.ModuleList, config: LLaMAProConfig) -> list[tuple[str, nn.Parameter]]:
    """The inserted layers' own parameters under their names in the model (SWIFT's names)."""
    out: list[tuple[str, nn.Parameter]] = []
    for j in config.inserted_layers:
        if j >= len(layer_list):
            raise TargetError(f"{prefix!r} has {len(layer_list)} layers, so no inserted layer {j}")
        out += [(f"{prefix}.{j}.{name}", p) for name, p in _own_parameters(layer_list[j])]
    return out


def _check_inserted(model: nn.Module, params: TunerParams) -> None:
    prefix, layer_list, _keys = _layers(model, params.config)
    expected = {k: tuple(p.shape) for k, p in _inserted_params(prefix, layer_list, params.config)}
    what = f"LLaMA-Pro params do not fit the layers inserted at {list(params.config.inserted_layers)} of {prefix!r}"
    check_exact_tensors(params, expected, what)


def _check(model: nn.Module, params: TunerParams) -> tuple[nn.ModuleList, dict[str, str], list[_Block], str]:
    prefix, layer_list, keys, plan = _plan(model, params.config)
    expected: dict[str, tuple[int, ...]] = {}
    for b in plan:
        for name, p in _own_parameters(layer_list[b.source]):
            expected[block_key(prefix, b.source, params.adapter_name, name)] = tuple(p.shape)
    check_exact_tensors(
        params,
        expected,
        f"LLaMA-Pro params do not fit the new blocks after layers {[b.source for b in plan]} of {prefix!r}",
    )
    return layer_list, keys, plan, prefix


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` if ``params`` are not the new blocks this config gives ``model``. Pure."""
    if params.config.inserted_layers:
        _check_inserted(model, params)
        return
    _check(model, params)


def _run_block(
    layer: nn.Module,
    attention_path: str,
    tensors: dict[str, torch.Tensor],
    ordinal: int,
    private: weakref.WeakKeyDictionary[Any, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
) -> Any:
    hidden = output[0] if isinstance(output, tuple) else output
    block = clone_module_tree(layer)
    for name, t in tensors.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = block.get_submodule(owner_path) if owner_path else block
        owner.__dict__["_parameters"][leaf] = t
    kwargs = dict(kwargs)
    for cache_key in ("cache", "past_key_values", "past_key_value"):
        cache = kwargs.get(cache_key)
        if cache is not None:
            if cache not in private:
                private[cache] = type(cache)()
            kwargs[cache_key] = private[cache]
            attn = block.get_submodule(attention_path)
            for attr in ("layer_idx", "layer_number", "block_idx"):
                if attr in attn.__dict__:
                    attn.__dict__[attr] = ordinal
    if args:
        new = block(hidden, *args[1:], **kwargs)
    else:
        kwargs["hidden_states"] = hidden
        new = block(**kwargs)
    if isinstance(output, tuple) and not isinstance(new, tuple):
        return (new, *output[1:])
    return new


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A forward slot on each original layer followed by a new block, running that block on its output.

    Where the blocks are real layers (``inserted_layers``): a slot on each inserted layer's ``forward``
    that runs the layer (outside the adapter's routes it passes its input through: :func:`restructure`)."""
    if params.config.inserted_layers:
        _check_inserted(model, params)
        prefix, layer_list, _keys = _layers(model, params.config)
        run: dict[Any, list[Any]] = {
            ensure_method_slot(layer_list[j], "forward"): [_RUN_LAYER] for j in params.config.inserted_layers
        }
        return Routes(forward=run)
    layer_list, keys, plan, prefix = _check(model, params)
    private: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # caller's cache -> new blocks' cache
    fwd: dict[nn.Module, list[Any]] = {}
    for b in plan:
        head = block_key(prefix, b.source, params.adapter_name, "")
        tensors = {k[len(head) :]: v for k, v in params.items() if k.startswith(head)}
        layer = layer_list[b.source]
        fwd.setdefault(layer, []).append(
            lambda m, a, k, o, _t=tensors, _b=b: _run_block(m, keys["attention"], _t, _b.ordinal, private, a, k, o)
        )
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def expand(model: nn.Module, params: TunerParams) -> tuple[dict[str, torch.Tensor], Any]:
    """SWIFT's form of the adapted model: ``(state_dict, config)`` of the model with the new blocks as real layers.

    The layer list gets the new blocks at SWIFT's indices (2 layers + 2 new
    blocks: ``[layer0, new, layer1, new]``), the original layers' weights move
    to their new indices, and the returned config is a copy of ``model.config``
    with ``num_hidden_layers`` (and ``layer_types``, where the model has them)
    updated.  ``type(model)(config)`` or ``AutoModelForCausalLM.from_config(config)``
    followed by ``load_state_dict(state)`` (strict) gives a model whose outputs
    equal ``functuner.apply(model, params, ...)``'s.  Tensors are shared with
    the model and the params, not copied.  Pure: the model is not changed.
    """
    if params.config.inserted_layers:
        raise ConfigError(
            "llamapro.expand: these params are already SWIFT's form (inserted_layers); the model is the expanded"
            " model: use its state_dict() and config"
        )
    layer_list, _keys, plan, prefix = _check(model, params)
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        raise ConfigError(
            f"llamapro.expand needs a transformers model whose .config has num_hidden_layers;"
            f" {type(model).__name__} has none (use the side-block form: functuner.apply)"
        )
    internal = [n + "." for n, m in model.named_modules() if n and is_internal(m)]
    base = {k: v for k, v in model.state_dict().items() if not any(k.startswith(h) for h in internal)}
    head = prefix + "."
    new_index = {b.source: b.new_index for b in plan}
    shift = {i: i + sum(1 for b in plan if b.source < i) for i in range(len(layer_list))}
    out: dict[str, torch.Tensor] = {}
    for key, value in base.items():
        idx, _, rest = key[len(head) :].partition(".") if key.startswith(head) else ("", "", "")
        if not idx.isdigit():
            out[key] = value
            continue
        out[f"{prefix}.{shift[int(idx)]}.{rest}"] = value
        if int(idx) in new_index:  # the new block: the params' tensors, the source layer's buffers
            marker = block_key(prefix, int(idx), params.adapter_name, rest)
            out[f"{prefix}.{new_index[int(idx)]}.{rest}"] = params[marker] if marker in params else value
    config = copy.deepcopy(cfg)
    config.num_hidden_layers = len(layer_list) + len(plan)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(layer_list):
        expanded: list[Any] = []
        for i, t in enumerate(layer_types):
            expanded += [t, t] if i in new_index else [t]
        config.layer_types = expanded
    return out, config


# -- SWIFT's form in place: what Swift.prepare_model does (the shim's ``restructure`` hook) -----------------------
_LAYER_INDEX_ATTRS = ("layer_idx", "layer_number", "block_idx")
_RUN_LAYER = Replace(lambda m, a, k: type(m).forward(m, *a, **k))  # the inserted layer's own forward


def _pass_through(*args: Any, **kwargs: Any) -> Any:
    """An inserted layer's ``forward`` while its adapter is inactive: the hidden states unchanged (SWIFT puts the
    original layer list back instead), so deactivating the adapter gives the base model's output."""
    return args[0] if args else kwargs["hidden_states"]


def restructure(model: nn.Module, config: Any, adapter_name: str) -> tuple[LLaMAProConfig, Callable[[], None]]:
    """Insert the new blocks into ``model`` as real layers, as ms-swift 4.6's ``LLaMAPro.prepare_model`` does.

    The inserted layers run while their adapter is active (its routes, as every tuner's) and pass their
    input through otherwise, so deactivating the adapter gives the base model's output, as in SWIFT.

    Each new block is a deep copy of the layer it follows with the attention output and MLP down
    projections (weights and biases) zeroed; the attention modules' ``layer_idx`` (``layer_number``,
    ``block_idx``) become their indices in the new list; ``config.num_hidden_layers`` (and
    ``layer_types``) are updated.  Returns the config with ``inserted_layers`` (and ``num_groups``) set,
    and a function that puts the model back as it was.  Everything is checked and built before the
    model changes.  A layer list already holding functuner's tensors (another adapter) is refused:
    copying it would copy that adapter into the new blocks.
    """
    if not isinstance(config, LLaMAProConfig):
        raise ConfigError(f"llamapro.restructure needs a LLaMAProConfig, got {type(config).__name__}")
    config.check()
    if config.inserted_layers:
        raise ConfigError(f"LLaMA-Pro adapter {adapter_name!r}: its blocks are already inserted (inserted_layers)")
    hf_config: Any = getattr(model, "config", None)
    if getattr(hf_config, "num_hidden_layers", None) is None:
        raise ConfigError(
            f"LLaMA-Pro inserts layers into a model whose .config has num_hidden_layers; {type(model).__name__}"
            " has none (the functional API's side blocks need no config: functuner.init + functuner.apply)"
        )
    prefix, layer_list, keys, plan = _plan(model, config)
    held = [n for n, m in layer_list.named_modules() if n and is_internal(m)]
    if held:
        raise ConfigError(
            f"LLaMA-Pro copies whole layers of {prefix!r}, and {prefix}.{held[0]} holds another adapter's tensors;"
            " add the LLaMA-Pro adapter first"
        )
    parent_path, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    sources = {b.source for b in plan}
    new_list = nn.ModuleList()
    for idx, layer in enumerate(layer_list):
        new_list.append(layer)
        if idx in sources:
            block = copy.deepcopy(layer)
            for path in (keys["o_proj"], keys["down_proj"]):
                proj = block.get_submodule(path)
                for leaf in ("weight", "bias"):
                    t = getattr(proj, leaf, None)
                    if isinstance(t, torch.Tensor):
                        t.data = torch.zeros_like(t.data)
            block.__dict__["forward"] = _pass_through
            ensure_method_slot(block, "forward")  # the adapter's routes run the layer (see routes)
            new_list.append(block)
    attns = [(i, m.get_submodule(keys["attention"])) for i, m in enumerate(new_list)]
    indexed = [(a, n, getattr(a, n)) for _i, a in attns for n in _LAYER_INDEX_ATTRS if hasattr(a, n)]
    old_layers, old_types = hf_config.num_hidden_layers, getattr(hf_config, "layer_types", None)
    new_types = None
    if isinstance(old_types, (list, tuple)) and len(old_types) == len(layer_list):
        new_types = [t for i, t in enumerate(old_types) for t in ([t, t] if i in sources else [t])]

    def undo() -> None:
        setattr(parent, attr, layer_list)
        for attn, name, value in indexed:
            setattr(attn, name, value)
        hf_config.num_hidden_layers = old_layers
        if new_types is not None:
            hf_config.layer_types = old_types

    for i, attn in attns:
        for name in _LAYER_INDEX_ATTRS:
            if hasattr(attn, name):
                setattr(attn, name, i)
    hf_config.num_hidden_layers = len(new_list)
    if new_types is not None:
        hf_config.layer_types = new_types
    setattr(parent, attr, new_list)
    groups = config.num_groups or config.num_new_blocks
    return dataclasses.replace(config, num_groups=groups, inserted_layers=tuple(b.new_index for b in plan)), undo


# -- on disk: SWIFT saves the new blocks at their indices in the expanded layer list ---------------------
def to_swift_keys(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """LLaMA-Pro params -> SWIFT's keys: ``<list>.<i>.llamapro_<adapter>.<param>`` -> ``<list>.<j>.<param>``. Pure.

    ``j = i + 1 + k``, with ``k`` the number of new blocks before this one (the
    rank of ``i`` among the saved source layers): the new block's index in
    SWIFT's expanded layer list.  Other keys pass through unchanged (``config``
    is not needed).
    """
    marker = f".llamapro_{adapter_name}."
    sources: dict[str, set[int]] = {}
    for key in state:
        if marker in key:
            prefix, _, idx = key.partition(marker)[0].rpartition(".")
            sources.setdefault(prefix, set()).add(int(idx))
    rank = {p: {i: r for r, i in enumerate(sorted(s))} for p, s in sources.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker in key:
            head, _, rest = key.partition(marker)
            prefix, _, idx = head.rpartition(".")
            key = f"{prefix}.{int(idx) + 1 + rank[prefix][int(idx)]}.{rest}"
        out[key] = value
    return out


def from_swift_keys(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """SWIFT's LLaMA-Pro keys -> functuner's, with the layer list named by ``config`` (inverse of :func:`to_swift_keys`).

    With ``inserted_layers`` (SWIFT's form) functuner's names are SWIFT's: the keys pass through."""
    if config is not None and config.inserted_layers:
        return dict(state)
    return llamapro_from_swift_state_dict(state, config.keys()["module_list"], adapter_name)


def llamapro_from_swift_state_dict(
    state: Mapping[str, torch.Tensor], module_list: str, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """SWIFT's LLaMA-Pro keys ``<module_list>.<j>.<param>`` -> ``<module_list>.<j - 1 - k>.llamapro_<adapter>.<param>``.

    ``k`` is the rank of ``j`` among the saved block indices (inverse of
    :func:`to_swift_keys`).  Keys already in functuner's naming pass through; a
    key outside ``module_list`` is an error naming it. Pure.
    """
    marker = f".llamapro_{adapter_name}."
    head = module_list + "."
    indices: set[int] = set()
    for key in state:
        if marker in key:
            continue
        idx = key[len(head) :].split(".", 1)[0] if key.startswith(head) else ""
        if not idx.isdigit():
            raise CheckpointError(f"LLaMA-Pro key {key!r} is not a parameter of a block in {module_list!r}")
        indices.add(int(idx))
    rank = {j: r for r, j in enumerate(sorted(indices))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker not in key:
            idx, _, rest = key[len(head) :].partition(".")
            key = f"{module_list}.{int(idx) - 1 - rank[int(idx)]}{marker}{rest}"
        out[key] = value
    return out


tuner = Tuner(
    swift_type="LLAMAPRO",
    config_cls=LLaMAProConfig,
    init=init,
    routes=routes,
    validate=validate,
    to_swift_keys=to_swift_keys,
    from_swift_keys=from_swift_keys,
    key_naming=KeyNaming(glued=(("llamapro_", None),)),
    restructure=restructure,
)
