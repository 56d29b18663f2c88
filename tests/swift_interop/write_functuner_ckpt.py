"""Write functuner checkpoints (SWIFT layout) plus reference outputs, for check_reverse.py to load with real ms-swift.

    python tests/swift_interop/write_functuner_ckpt.py OUT_DIR

For each case: ``OUT_DIR/<case>/`` (``SwiftModel.save_pretrained``) and
``OUT_DIR/<case>.ref.safetensors`` (input ids, base checksum, functuner's
outputs with all adapters and with each adapter alone).
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: shared builders

from models import BUILDERS, inputs, output_of  # noqa: E402
from models import checksum_tensor as checksum  # noqa: E402

from functuner import LoRAConfig, Swift  # noqa: E402

CASES = {
    "llama_two": (
        "llama",
        lambda: {
            "default": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            # not embed_tokens: ms-swift 4.6 cannot load embedding LoRA from ANY checkpoint, its own included
            # (SwiftModel.load_state_dict rewrites 'lora_embedding_A.<name>' to 'lora_embedding_A.<name>.<name>')
            "other": LoRAConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
        },
    ),
    "bert_mts": (
        "bert",
        lambda: {
            "default": LoRAConfig(
                r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["pooler"], use_rslora=True
            ),
        },
    ),
    "bert_bias": (
        "bert",
        lambda: {
            "default": LoRAConfig(r=2, lora_alpha=4, target_modules=["query"], bias="all"),
        },
    ),
    "gpt2_dora": (
        "gpt2",
        lambda: {
            "adapter": LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True),
        },
    ),
}


def write_all(out_root: str) -> None:
    os.makedirs(out_root, exist_ok=True)
    for case, (arch, make) in CASES.items():
        model = BUILDERS[arch]()
        ref = {"input_ids": inputs(), "base_checksum": checksum(model)}
        configs = make()
        torch.manual_seed(3)
        sm = Swift.prepare_model(model, configs)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _, p in sorted(sm.named_parameters()):
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        sm.eval()
        x = ref["input_ids"]
        with torch.no_grad():
            ref["out_all"] = output_of(sm, x)
            for name in configs:
                sm.set_active_adapters([name])
                ref[f"out_{name}"] = output_of(sm, x)
            sm.set_active_adapters(list(configs))
        sm.save_pretrained(os.path.join(out_root, case))
        save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out_root, f"{case}.ref.safetensors"))


if __name__ == "__main__":
    write_all(sys.argv[1])
    print("wrote", sorted(os.listdir(sys.argv[1])))
