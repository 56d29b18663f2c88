"""LoRA's config: :class:`LoRAConfig` (SWIFT's field names, a superset of PEFT's ``LoraConfig``) and its checks.

Every check a config can fail runs in ``__post_init__``, so a bad value fails
where the config is built (a :class:`~functuner.errors.ConfigError` naming the
field), not at the first forward.  Per-module rank, alpha and scaling
(``rank_pattern`` / ``alpha_pattern`` / rsLoRA) are answered here too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ...core.targets import pattern_value
from ...errors import ConfigError
from ..base import TunerConfig, resolve_dtype
from .inits.loftq import loftq_options
from .tokens import check_indices
from .variants import normalize_config as normalize_variants

__all__ = ["LoRAConfig", "LoraConfig", "check_init_choice", "check_merged_linear", "pissa_niter"]

_INIT_CHOICES = (
    True,
    False,
    "gaussian",
    "pissa",
    "pissa_niter_<n>",
    "olora",
    "orthogonal",
    "eva",
    "corda",
    "loftq",
    "mica",
)
_BIAS_CHOICES = ("none", "all", "lora_only")


def pissa_niter(init: Any) -> int | None:
    """The ``N`` of ``init_lora_weights="pissa_niter_N"`` (PiSSA by fast randomized SVD), else ``None``."""
    if isinstance(init, str):
        m = re.fullmatch(r"pissa_niter_(\d+)", init)
        if m:
            return int(m.group(1))
    return None


def check_init_choice(init: Any) -> None:
    """Refuse an ``init_lora_weights`` functuner does not implement (:class:`ConfigError` naming the field)."""
    if init in (True, False) and isinstance(init, bool):
        return
    if init in ("gaussian", "pissa", "olora", "orthogonal", "eva", "corda", "loftq", "mica"):
        return
    if pissa_niter(init) is not None:
        return
    raise ConfigError(f"init_lora_weights={init!r} is not supported; use one of {_INIT_CHOICES}")


# MergedLinear LoRA (use_merged_linear=True, .merged_linear): LoRA fields SWIFT's MergedLinear layer ignores or
# cannot take, refused rather than silently differing: (field, the only accepted value, what SWIFT does)
_MERGED_LINEAR_REFUSED: tuple[tuple[str, Any, str], ...] = (
    ("use_dora", False, "SWIFT's MergedLinear has no DoRA and ignores it"),
    ("use_rslora", False, "SWIFT's MergedLinear scales by lora_alpha / r and ignores it"),
    ("init_lora_weights", True, "SWIFT's MergedLinear always draws A kaiming-uniform and B zero"),
    ("lora_bias", False, "SWIFT's MergedLinear has no lora_B bias"),
    ("bias", "none", "SWIFT's MergedLinear saves biases under two names and no LoRA tensor"),
    ("fan_in_fan_out", False, "SWIFT transposes the base nn.Linear's weight in place; it changes no output"),
    ("modules_to_save", None, "not supported together with MergedLinear by functuner"),
    ("target_parameters", None, "MergedLinear adapts nn.Linear modules only"),
    ("trainable_token_indices", None, "not supported together with MergedLinear by functuner"),
    ("kasa_config", None, "a PEFT LoRA variant; MergedLinear is SWIFT's own layer"),
    ("velora_config", None, "a PEFT LoRA variant; MergedLinear is SWIFT's own layer"),
    ("use_bdlora", None, "a PEFT LoRA variant; MergedLinear is SWIFT's own layer"),
    ("monteclora_config", None, "a PEFT LoRA variant; MergedLinear is SWIFT's own layer"),
)


def check_merged_linear(config: Any, *, complete: bool = True) -> None:
    """Refuse ``enable_lora`` without MergedLinear, a bad ``enable_lora`` and the fields MergedLinear ignores.

    ``complete=False`` (at construction) lets ``enable_lora`` stay unset; ``init`` demands it.
    """
    enable = config.enable_lora
    if not config.use_merged_linear:
        if enable is not None:
            raise ConfigError(
                f"enable_lora={list(enable)!r} is only read with use_merged_linear=True (SWIFT ignores it otherwise);"
                " set use_merged_linear=True for MergedLinear LoRA, or drop enable_lora"
            )
        return
    if enable is None:
        if complete:
            raise ConfigError(
                "use_merged_linear=True needs enable_lora: one bool per chunk of the fused layer's outputs,"
                " e.g. enable_lora=[True, False, True] for q and v of a query_key_value layer"
            )
    elif (
        not isinstance(enable, (list, tuple))
        or not enable
        or not all(isinstance(e, bool) for e in enable)
        or not any(enable)
    ):
        raise ConfigError(
            f"enable_lora={enable!r}: expected a non-empty list of bools with at least one True"
            " (one per output chunk of the fused layer), e.g. [True, False, True]"
        )
    for name, accepted, why in _MERGED_LINEAR_REFUSED:
        value = getattr(config, name, accepted)
        if value != accepted and not (accepted is None and not value):
            raise ConfigError(
                f"{name}={value!r} is not supported with use_merged_linear=True ({why}); set {name}={accepted!r}"
            )


@dataclass(frozen=True, eq=False)
class LoRAConfig(TunerConfig):
    """LoRA config with SWIFT's ``LoRAConfig`` field names (a superset of PEFT's ``LoraConfig``).

    Fields PEFT has and functuner does not implement (``megatron_config``, ``layer_replication``...) are accepted only at their
    neutral defaults; a non-default value raises :class:`ConfigError` naming it.
    """

    r: int = 8
    target_modules: Any = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Any = None
    init_lora_weights: Any = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    rank_pattern: Any = field(default_factory=dict)
    alpha_pattern: Any = field(default_factory=dict)
    use_dora: bool = False
    exclude_modules: Any = None
    lora_bias: bool = False
    target_parameters: Any = None  # PEFT's: LoRA on raw nn.Parameters (2-D, or 3-D fused MoE experts)
    trainable_token_indices: Any = None  # PEFT's: train a few embedding rows ([ids] or {module: [ids]})
    eva_config: Any = None  # PEFT's EvaConfig fields as a dict (init_lora_weights="eva"); None: PEFT's defaults
    corda_config: Any = None  # PEFT's CordaConfig fields as a dict (init_lora_weights="corda"); None: defaults
    loftq_config: Any = field(default_factory=dict)  # PEFT's LoftQConfig fields as a dict (init_lora_weights="loftq")
    # functuner's: PiSSA/OLoRA/CorDA base fingerprints {state key: {"original"|"residual": [floats]}} that merges
    # check (.inits.guard); set by init, kept out of PEFT's format and of the JSON while None
    base_fingerprint: Any = None
    # PEFT's LoRA variants (functuner.tuners.lora.variants): its sub-config objects or their dicts, kept as dicts
    kasa_config: Any = None  # KaSA: {"beta", "gamma"}
    velora_config: Any = None  # VeLoRA: {"num_groups", "scale", "init_type"}
    use_bdlora: Any = None  # BD-LoRA: {"target_modules_bd_a", "target_modules_bd_b", "nblocks", "match_strict"}
    monteclora_config: Any = None  # MonteCLoRA: refused (ConfigError)
    # SWIFT's extra fields
    lora_dtype: Any = None
    lorap_lr_ratio: float | None = 16.0  # SWIFT's default (2**4); None: no LoRA+ groups of its own
    lorap_emb_lr: float = 1e-6
    use_qa_lora: bool = False
    use_merged_linear: bool = False
    enable_lora: Any = None
    # bookkeeping fields that PEFT/SWIFT write into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    swift_type: str = "LORA"
    peft_type: str = "LORA"
    # SwiftConfig's field: the model's layer names for tuners that need them (kept and written back; LoRA ignores it)
    model_key_mapping: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank_pattern, dict) is False or isinstance(self.alpha_pattern, dict) is False:
            raise ConfigError("rank_pattern and alpha_pattern must be dicts {module-name regex: value}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got r={self.r!r}")
        for name, val in self.rank_pattern.items():
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ConfigError(f"rank_pattern[{name!r}] must be a positive integer, got {val!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ConfigError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        check_init_choice(self.init_lora_weights)
        if self.init_lora_weights == "loftq":  # PEFT keeps LoftQConfig as a dict too
            object.__setattr__(self, "loftq_config", loftq_options(self.loftq_config))
        elif self.loftq_config:
            raise ConfigError(
                f"loftq_config={self.loftq_config!r} is only read with init_lora_weights='loftq' (PEFT ignores it with"
                " a warning); drop it or set init_lora_weights='loftq'"
            )
        check_indices(self.trainable_token_indices)
        if self.use_qa_lora:
            raise ConfigError("use_qa_lora=True is not supported by functuner's LoRA (SWIFT deprecated QA-LoRA)")
        if self.lora_bias and self.use_dora:  # PEFT refuses the same pair
            raise ConfigError("lora_bias=True is not supported with DoRA (use_dora=True), as in PEFT; drop one")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"lora_bias=True needs init_lora_weights True or False (as PEFT), got {self.init_lora_weights!r}"
            )
        if self.target_parameters:
            if isinstance(self.target_parameters, str):
                raise ConfigError("target_parameters must be a list of parameter names, not a string (as in PEFT)")
            for name, bad in (
                ("lora_dropout", self.lora_dropout),
                ("fan_in_fan_out", self.fan_in_fan_out),
                ("lora_bias", self.lora_bias),
                ("use_dora", self.use_dora),
            ):
                if bad:
                    raise ConfigError(f"target_parameters does not work with {name}={bad!r} (PEFT refuses it too)")
        normalize_variants(self)
        resolve_dtype(self.lora_dtype, "lora_dtype")
        if self.lorap_lr_ratio is not None and self.lorap_lr_ratio <= 0:
            raise ConfigError(f"lorap_lr_ratio must be positive, got {self.lorap_lr_ratio!r}")

    def check(self, *, complete: bool = True) -> None:
        """MergedLinear's fields (``use_merged_linear`` / ``enable_lora``, :mod:`.merged_linear`); ``init`` demands them."""
        super().check(complete=complete)
        check_merged_linear(self, complete=complete)

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(module_name, self.rank_pattern, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(pattern_value(module_name, self.alpha_pattern, self.lora_alpha))

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


LoraConfig = LoRAConfig  # PEFT's spelling
