"""Throughput and MFU logged during training (llmzoo.callbacks.Throughput) and the device peak table."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tiny import tiny_model
from torch.utils.data import DataLoader

from llmzoo.callbacks import Throughput, peak_flops


def logged(tmp_path, callback, precision="32-true", steps=4):
    model = tiny_model("Mixtral")  # MoE: active experts only
    windows = torch.randint(0, 97, (4 * steps, 33))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", precision=precision, callbacks=[callback],
                        logger=CSVLogger(tmp_path), log_every_n_steps=2, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(windows, batch_size=4))
    return model, trainer.logged_metrics


def test_tokens_flops_and_mfu_are_consistent(tmp_path):
    model, metrics = logged(tmp_path, Throughput(peak_flops=1e9))
    tokens, tflops, mfu = (metrics[f"train/{name}"].item() for name in ("tokens_per_sec", "tflops_per_sec", "mfu"))
    assert tokens > 0
    assert tflops * 1e12 == pytest.approx(tokens * model.flops_per_token(32), rel=1e-4)
    assert mfu == pytest.approx(tflops * 1e12 / 1e9, rel=1e-4)


def test_no_mfu_where_the_peak_is_unknown(tmp_path):
    _, metrics = logged(tmp_path, Throughput(), precision="bf16-mixed")  # a CPU: no peak in Lightning's table
    assert "train/tflops_per_sec" in metrics and "train/mfu" not in metrics


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H200", torch.bfloat16, 989.4e12),  # Lightning lists only "H200 SXM1"/"NVL1" names
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA H200", torch.float64, 33.5e12),
])
def test_peak_flops_of_known_gpus(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    assert peak_flops(torch.device("cuda"), dtype) == pytest.approx(expected)


def test_no_peak_for_a_cpu():
    assert peak_flops(torch.device("cpu"), torch.float32) is None
