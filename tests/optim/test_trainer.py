"""GaLore and LISA inside a real ``transformers.Trainer`` (CPU).

GaLore: transformers' own ``optim="galore_adamw"`` path (which builds ``galore_torch.GaLoreAdamW``) and
our optimizer passed as ``optimizers=(opt, None)`` train the same tiny Llama on the same data to the same
weights, and so does our per-parameter mode.  LISA: the callback trains exactly the scheduled layers.
"""

from __future__ import annotations

import copy

import galore_torch  # noqa: F401  (in the test extra: a missing reference fails, never skips)
import torch
import transformers
from conftest import tiny_llama

from functuner.optim import GaLoreConfig, LISACallback, LISAConfig, create_galore_optimizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 6


class _Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 12) -> None:
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _train(model, args, **kw) -> dict[str, torch.Tensor]:
    transformers.Trainer(model=model, args=args, train_dataset=_Data(), **kw).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _trainable() -> torch.nn.Module:
    m = tiny_llama().train()
    m.requires_grad_(True)
    return m


def test_galore_matches_transformers_galore_adamw(tmp_path) -> None:
    base = _trainable()
    ref_args = _args(
        tmp_path / "ref",
        optim="galore_adamw",
        optim_target_modules=TARGETS,
        optim_args="rank=4, update_proj_gap=2, scale=0.25, proj_type=std",
    )
    want = _train(copy.deepcopy(base), ref_args)

    cfg = GaLoreConfig(rank=4, update_proj_gap=2, galore_scale=0.25, target_modules=TARGETS)
    model = copy.deepcopy(base)
    # transformers' galore path passes only lr to GaLoreAdamW (its defaults: eps=1e-6, weight_decay=0)
    opt = create_galore_optimizer(model, cfg, lr=1e-2)
    got = _train(model, _args(tmp_path / "ours"), optimizers=(opt, None))
    assert any(not torch.equal(want[n], base.state_dict()[n]) for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")

    # per-parameter mode in the Trainer (no clipping: every parameter steps during backward)
    per_model = copy.deepcopy(base)
    per_cfg = GaLoreConfig(
        rank=4, update_proj_gap=2, galore_scale=0.25, target_modules=TARGETS, optim_per_parameter=True
    )
    per_opt = create_galore_optimizer(per_model, per_cfg, lr=1e-2)
    grouped_model = copy.deepcopy(base)
    grouped_opt = create_galore_optimizer(grouped_model, cfg, lr=1e-2)
    per = _train(per_model, _args(tmp_path / "per", max_grad_norm=0.0), optimizers=(per_opt, None))
    grouped = _train(grouped_model, _args(tmp_path / "grp", max_grad_norm=0.0), optimizers=(grouped_opt, None))
    for n in grouped:
        torch.testing.assert_close(per[n], grouped[n], rtol=1e-5, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_lisa_callback_trains_only_scheduled_layers(tmp_path) -> None:
    model = tiny_llama(num_hidden_layers=4).train()
    model.requires_grad_(True)
    cfg = LISAConfig(n_layers=1, step_interval=2, seed=3)
    cb = LISACallback(model, cfg)
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snap(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    final = _train(model, _args(tmp_path, weight_decay=0.1), callbacks=[cb, Snap()])
    snapshots.append(final)
    assert [s for s, _ in cb.history] == list(range(0, STEPS, 2))
    for step in range(STEPS):
        before, after = snapshots[step], snapshots[step + 1]
        active = cb.schedule.active_layers(step)
        for i in range(4):
            moved = any(not torch.equal(before[n], after[n]) for n in before if n.startswith(f"model.layers.{i}."))
            assert moved == (i in active), (step, i, active)
        for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            assert not torch.equal(before[n], after[n])  # always trained, as LISA does
