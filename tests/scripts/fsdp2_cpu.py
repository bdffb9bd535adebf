"""Sharded training (FSDP2 through llmzoo's FSDP2Strategy) on 2 CPU processes with gloo: 6 steps straight, then
3 steps (the Checkpoint callback saving a distributed checkpoint at step 3) and a resume to 6 from it. Writes,
per rank, a digest of the final weights of both runs, the resumed run's step and its losses to OUT/rankN.txt.
Run by tests/test_distributed.py."""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import tiny_model  # noqa: E402

from llmzoo.callbacks import Checkpoint, StepSeed  # noqa: E402
from llmzoo.data import TextDataModule  # noqa: E402
from llmzoo.strategies import FSDP2Strategy  # noqa: E402

architecture, out = sys.argv[1], Path(sys.argv[2])
corpus = out / "corpus.txt"
corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(12)))


def trainer(max_steps: int, name: str) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=out, num_sanity_val_steps=0,
                     val_check_interval=3, check_val_every_n_epoch=None,
                     callbacks=[StepSeed(0), Checkpoint(dirpath=out / name, every_n_train_steps=3)],
                     strategy=FSDP2Strategy())


def digest(model) -> float:
    model.reshard()  # the root stays unsharded after a forward without backward (validation)
    plain = [n for n, p in model.named_parameters() if not hasattr(p, "full_tensor")]
    assert not plain, f"parameters not sharded: {plain}"
    return sum(p.full_tensor().double().square().sum().item() for p in model.parameters())


def fit(max_steps: int, name: str, ckpt_path=None):
    torch.manual_seed(0)
    model = tiny_model(architecture, learning_rate=1e-2, warmup_steps=2, lr_decay_steps=6, dropout=0.1)
    t = trainer(max_steps, name)
    data = TextDataModule(str(corpus), val_fraction=0.2, seq_len=16, batch_size=2, tokenizer="char",
                          cache_dir=str(out / "cache"))  # epochs of 3 steps
    t.fit(model, data, ckpt_path=ckpt_path)
    return t, model


straight_trainer, straight = fit(6, "straight")
fit(3, "first")
resumed_trainer, resumed = fit(6, "first", ckpt_path=out / "first" / "last.ckpt")
metrics = {k: round(float(v), 6) for k, v in resumed_trainer.callback_metrics.items()}
# one file per rank: the ranks' stdout lines interleave
(out / f"rank{straight_trainer.global_rank}.txt").write_text(
    f"RANK {straight_trainer.global_rank} STRAIGHT {digest(straight)!r} RESUMED {digest(resumed)!r} "
    f"STEP {resumed_trainer.global_step} TRAIN_LOSS {metrics['train/loss']} VAL_LOSS {metrics['val/loss']}")
