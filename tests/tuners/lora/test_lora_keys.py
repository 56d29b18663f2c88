"""LoRA tensor names are built and parsed in one place (functuner.tuners.lora.keys)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from functuner.tuners.lora import LORA_PARTS, LoraKey, param_names, parse_key

_segment = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(lambda s: s not in LORA_PARTS and s != "weight")


@given(
    module=st.lists(_segment, min_size=1, max_size=4).map(".".join),
    kind=st.sampled_from(["linear", "conv1d_gpt2", "embedding", "conv"]),
    adapter=_segment,
)
def test_parse_key_inverts_param_names(module: str, kind: str, adapter: str) -> None:
    a, b, m = param_names(module, kind, adapter)
    emb = kind == "embedding"
    assert parse_key(a) == LoraKey(module, "lora_embedding_A" if emb else "lora_A", adapter, not emb)
    assert parse_key(b) == LoraKey(module, "lora_embedding_B" if emb else "lora_B", adapter, not emb)
    assert parse_key(m) == LoraKey(module, "lora_magnitude_vector", adapter, True)
    assert parse_key(f"{module}.weight") is None
    assert parse_key(f"{module}.modules_to_save.{adapter}.weight") is None


def test_peft_file_spellings_have_no_adapter() -> None:
    assert parse_key("base_model.model.q.lora_A.weight") == LoraKey("base_model.model.q", "lora_A", None, True)
    assert parse_key("q.lora_embedding_B") == LoraKey("q", "lora_embedding_B", None, False)
    assert parse_key("q.lora_magnitude_vector") == LoraKey("q", "lora_magnitude_vector", None, False)
    assert parse_key("q.lora_A.x.y.weight") is None
