"""The benchmark suite in --quick mode: every CPU part runs and the page and its figures are written (into a
temporary directory, never docs/). No timings are asserted."""

import importlib
import json

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.report import PARTS, store

pytest.importorskip("matplotlib")

FIGURES = ["train", "decode", "window", "memory", "scaling_seq", "scaling_width", "moe"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    parts = [part for part in PARTS if part != "shakespeare"]  # ~40 s even when quick: left to the slow suite
    main(["--quick", "--out", str(out), "--part", *parts])
    return out


def test_quick_suite_writes_the_page_and_its_figures(quick_run):
    page = (quick_run / "benchmarks.md").read_text()
    for name in PARTS.values():
        assert f"## {importlib.import_module(name).TITLE}" in page
    assert "## Targets" in page and "training step vs HF, llama" in page and "MoE layer vs per-expert loop" in page
    for figure in FIGURES:
        assert (quick_run / "benchmarks" / f"{figure}.png").stat().st_size > 1000
        assert f"(benchmarks/{figure}.png)" in page
    assert page.count("**Quick smoke run**") == len(PARTS) - 2  # every part that ran, but the GPU's
    shakespeare = page.split("## Quality: character-level Tiny Shakespeare")[1].split("\n## ")[0]
    assert "Not measured yet." in shakespeare
    if not torch.cuda.is_available():
        assert "no CUDA device" in page.split("## GPU:")[1]


def test_render_keeps_every_stored_result(quick_run):
    before = (quick_run / "benchmarks.md").read_text()
    main(["--quick", "--out", str(quick_run), "--render"])
    assert (quick_run / "benchmarks.md").read_text() == before
    stored = json.loads((quick_run / "benchmarks" / "results.json").read_text())
    assert set(stored) == set(PARTS) - {"shakespeare"} and all("env" in r for r in stored.values())


def test_a_skipped_run_keeps_the_measured_figures():
    results = {"gpu": {"env": {"date": "d1"}, "mfu": [0.5]}}
    store(results, "gpu", {"env": {"date": "d2"}, "skipped": "no CUDA device"})
    assert results["gpu"]["mfu"] == [0.5] and results["gpu"]["last_skipped"]["skipped"] == "no CUDA device"
    store(results, "moe", {"env": {"date": "d2"}, "skipped": "why"})
    assert results["moe"]["skipped"] == "why"


@pytest.mark.slow
def test_gpu_part_runs_on_cpu_as_a_dry_run():
    from benchmarks import gpu

    result = gpu.run("cpu", quick=True, compile=False)
    assert result["mfu"] is None  # no peak FLOP/s for a CPU
    assert "| tokens/s (median step) |" in gpu.report(result)


@pytest.mark.slow
def test_shakespeare_part_quick(shakespeare):
    from benchmarks import shakespeare as part

    result = part.measure(quick=True, corpus=str(shakespeare))
    (steps, ours), (plain_steps, plain) = (zip(*run[0]["val_loss"]) for run in (result["llmzoo"], result["plain"]))
    assert steps == plain_steps == (10, 20) and ours == pytest.approx(plain, abs=1e-3)  # the same training
    assert "| step |" in part.report(result)
