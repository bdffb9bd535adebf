"""Multi-process training on CPU through Lightning (gloo): real subprocesses, since Lightning's
launcher re-runs the script for every rank."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.parametrize("architecture", ["Llama", pytest.param("Mixtral", marks=pytest.mark.slow)])
def test_fsdp2_sharded_training_and_resume_on_two_cpu_processes(architecture, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPTS / "fsdp2_cpu.py"), architecture, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = " ".join(path.read_text() for path in sorted(tmp_path.glob("rank*.txt")))
    lines = re.findall(r"RANK (\d) STRAIGHT (\S+) RESUMED (\S+) STEP (\d+) TRAIN_LOSS (\S+) VAL_LOSS (\S+)", results)
    assert len(lines) == 2, results
    (_, straight0, resumed0, step0, _, val0), (_, straight1, resumed1, step1, _, val1) = sorted(lines)
    assert (straight0, resumed0, val0) == (straight1, resumed1, val1)  # every rank holds the same model
    assert straight0 == resumed0  # the resumed run ends where the uninterrupted one does (dropout and epochs too)
    assert step0 == step1 == "6"  # resumed from the sharded checkpoint at step 3, ran to 6
    assert float(val0) < 4.5  # trained: the initial loss is ln(97) = 4.57
    shards = sorted(p.name for p in (tmp_path / "first" / "last.ckpt").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank, no full copy
