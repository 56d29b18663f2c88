"""Patterns from configs (issue 20): invalid ones name the field; none that passes can hang a matcher.

:mod:`functuner.core.patterns` is the one home: ``TunerConfig.__post_init__``
checks every pattern field of every config (so configs read from files and
configs built in code), the extra-states reader and the shim check
``extra_state_keys``.  The property test draws regular expressions from a
small, backtracking-prone alphabet and matches each accepted one against
adversarial names under an alarm (a hang detector, not a speed assertion).
"""

from __future__ import annotations

import re
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import functuner as ft
from functuner.core.patterns import MAX_PATTERN_CHARS, check_pattern, check_patterns
from functuner.errors import ConfigError

REFUSED = {
    "(.*.*)*X": "nests a repeat",
    "(a+)+": "nests a repeat",
    "(a*)*": "nests a repeat",
    "(a{1,3})*": "nests a repeat",
    "(?:x+y?)+z": "nests a repeat",
    "(a|a)*": "alternation",
    "(a|ab)+b": "alternation",
    r"(a)\1": "backreference",
    ".*.*.*.*X": "4 unbounded repeats",
    "((": "not a valid regular expression",
    "[": "not a valid regular expression",
    "x" * (MAX_PATTERN_CHARS + 1): "characters long",
}
ACCEPTED = [
    "q_proj",
    r".*\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    r"^(?!.*vision).*\.(q_proj|v_proj)$",
    r"(.*\.)?(q_proj)",
    r"(\d{1,3}\.){3}",
    r"model\.layers\.\d+\.(mlp|self_attn)\.\w+_proj",
    ".*.*.*X",
    "all-linear",
]


@pytest.mark.parametrize("pattern", sorted(REFUSED))
def test_refused_patterns_name_the_field_and_the_reason(pattern: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_pattern(pattern, "target_modules")
    assert "target_modules" in str(e.value) and REFUSED[pattern] in str(e.value)


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_real_patterns_pass(pattern: str) -> None:
    assert check_pattern(pattern, "target_modules").pattern == pattern


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("target_modules", "(.*.*)*X", "target_modules"),
        ("exclude_modules", "(a|a)*", "exclude_modules"),
        ("rank_pattern", {"(a+)+": 2}, "rank_pattern['(a+)+']"),
        ("alpha_pattern", {"((": 2.0}, "alpha_pattern['((']"),
        ("layers_pattern", "((", "layers_pattern"),
        ("target_modules", 5, "target_modules"),
        ("target_modules", ["q_proj", 3], "target_modules[1]"),
        ("modules_to_save", True, "modules_to_save"),
        ("rank_pattern", ["q_proj"], "rank_pattern"),
    ],
)
def test_every_config_checks_its_patterns(field: str, value: object, named: str) -> None:
    """Built in code or read from a file, a config refuses the pattern, naming the field."""
    with pytest.raises(ConfigError) as e:
        ft.LoRAConfig(**{"target_modules": ["q_proj"], field: value})  # type: ignore[arg-type]
    assert named in str(e.value)


def test_extra_state_keys_are_checked_by_the_shim() -> None:
    from rel_common import ModelSnapshot, tiny_llama

    model = tiny_llama()
    snap = ModelSnapshot(model)
    for bad, named in (("(a+)+", "extra_state_keys[0]"), ("((", "extra_state_keys[0]")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            ft.Swift.prepare_model(model, ft.LoRAConfig(target_modules=["q_proj"]), extra_state_keys=[bad])
    with pytest.raises(ConfigError, match="extra_state_keys"):
        ft.Swift.prepare_model(model, ft.LoRAConfig(target_modules=["q_proj"]), extra_state_keys=5)
    snap.assert_unchanged()


def test_lists_hold_names_unless_they_are_regex_lists() -> None:
    check_patterns(["((", "q_proj"], "target_modules")  # names (PEFT's suffix match): not regexes
    with pytest.raises(ConfigError, match=r"extra_state_keys\[0\]"):
        check_patterns(["(("], "extra_state_keys", list_is_regex=True)


TOKENS = [".", "*", "+", "?", "(", ")", "(?:", "|", "a", "b", r"\.", "{1,3}", "{2,}", ".*", "[ab]", r"\d"]
NAMES = ["a" * 60 + "!", "a." * 40 + "!", "ab" * 30 + "c", "model.layers.10.self_attn.q_proj.lora_A" * 2 + "!"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=14).map("".join))
def test_no_accepted_pattern_hangs(pattern: str) -> None:
    try:
        regex = check_pattern(pattern, "target_modules")
    except ConfigError:
        return

    def hang(*_: object) -> None:
        raise TimeoutError(f"{pattern!r} passed the check but took over 10 s to match")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        for name in NAMES:
            regex.fullmatch(name)
            re.fullmatch(rf"(.*\.)?({pattern})", name)  # as rank_pattern / alpha_pattern keys are matched
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
