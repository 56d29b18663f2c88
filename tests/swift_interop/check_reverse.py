"""Load functuner-written checkpoints with the REAL ms-swift and compare outputs (the reverse interop check).

    python tests/swift_interop/write_functuner_ckpt.py /tmp/ft_rev
    /opt/swiftvenv/bin/python tests/swift_interop/check_reverse.py /tmp/ft_rev

Needs ms-swift 4.6 with ``peft<0.19`` (with peft 0.19/0.20, ms-swift's LoRA
injection fails: ``Linear.__init__() missing 1 required positional argument:
'config'``).  Exits 1 and names the case on any mismatch; prints
``N passed, M failed`` at the end.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: shared builders

from models import BUILDERS, output_of  # noqa: E402
from models import checksum_tensor as checksum  # noqa: E402

ARCH = {"llama_two": "llama", "bert_mts": "bert", "bert_bias": "bert", "gpt2_dora": "gpt2"}


def main(root: str) -> int:
    from swift.tuners import Swift

    passed = failed = 0
    for case, arch in ARCH.items():
        ref = load_file(os.path.join(root, f"{case}.ref.safetensors"))
        model = BUILDERS[arch]()
        if not torch.equal(checksum(model), ref["base_checksum"]):
            print(f"FAIL {case}: base model differs between venvs")
            failed += 1
            continue
        sm = Swift.from_pretrained(model, os.path.join(root, case))
        sm.eval()
        x = ref["input_ids"]
        names = sorted(k[4:] for k in ref if k.startswith("out_") and k != "out_all")
        checks = [("all", names)] + [(n, [n]) for n in names]
        for label, active in checks:
            sm.set_active_adapters(active)
            with torch.no_grad():
                got = output_of(sm, x)
            want = ref["out_all" if label == "all" else f"out_{label}"]
            err = (got - want).abs().max().item()
            ok = err <= 1e-5
            print(f"{'ok  ' if ok else 'FAIL'} {case} [{label}] max abs diff {err:.3g}")
            passed, failed = passed + ok, failed + (not ok)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
