"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes with gloo:
6 steps straight, then 3 steps + save + resume to 6 from the distributed checkpoint. Writes, per rank,
a digest of the final weights of both runs, the resumed run's step and its losses to OUT/rankN.txt.
Run by tests/test_distributed.py."""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import tiny_model  # noqa: E402

architecture, out = sys.argv[1], Path(sys.argv[2])
windows = torch.randint(0, 97, (24, 17), generator=torch.Generator().manual_seed(0))


def trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=out, num_sanity_val_steps=0,
                     strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


def digest(model) -> float:
    model.reshard()  # the root stays unsharded after a forward without backward (validation)
    plain = [n for n, p in model.named_parameters() if not hasattr(p, "full_tensor")]
    assert not plain, f"parameters not sharded: {plain}"
    return sum(p.full_tensor().double().square().sum().item() for p in model.parameters())


def fit(max_steps: int, ckpt_path=None):
    torch.manual_seed(0)
    model = tiny_model(architecture, learning_rate=1e-2, warmup_steps=2, lr_decay_steps=6)  # schedule independent of max_steps
    t = trainer(max_steps)
    loader = torch.utils.data.DataLoader(list(windows), batch_size=4)
    t.fit(model, loader, loader, ckpt_path=ckpt_path)
    return t, model


straight_trainer, straight = fit(6)
first_trainer, _ = fit(3)
first_trainer.save_checkpoint(out / "step3")
resumed_trainer, resumed = fit(6, ckpt_path=out / "step3")
metrics = {k: round(float(v), 6) for k, v in resumed_trainer.callback_metrics.items()}
# one file per rank: the ranks' stdout lines interleave
(out / f"rank{straight_trainer.global_rank}.txt").write_text(
    f"RANK {straight_trainer.global_rank} STRAIGHT {digest(straight):.12e} RESUMED {digest(resumed):.12e} "
    f"STEP {resumed_trainer.global_step} TRAIN_LOSS {metrics['train/loss']} VAL_LOSS {metrics['val/loss']}")
