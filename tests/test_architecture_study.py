"""The architecture study: parameters matched in every setting, and the --quick run through ``python -m benchmarks``
writes its page, table and figures (into a temporary directory, never docs/). No result is asserted."""

import json

import pytest

from benchmarks import architectures as study
from benchmarks.__main__ import main

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("setting", ["cpu", "gpu"])
def test_every_architecture_matches_gpt2s_non_embedding_parameters(setting):
    shapes = study.matched_shapes(study.SETTINGS[setting], vocab_size=1024)  # on the meta device: no memory
    target = shapes[study.REFERENCE]["params"]["active"]
    assert set(shapes) == set(study.ORDER)
    for name, shape in shapes.items():
        params = shape["params"]
        assert abs(params["active"] - target) / target < 0.01, name
        assert shape["kwargs"]["ffn_dim"] % 8 == 0
        assert (params["total"] > params["active"]) if name == "Mixtral" else params["active"] == params["non_embedding"]


def test_quick_study_writes_its_page(tmp_path):
    main(["--quick", "--out", str(tmp_path), "--part", "architectures"])
    page = (tmp_path / "architectures.md").read_text()
    assert page.startswith(f"# {study.TITLE}") and "**Quick smoke run**" in page
    for name in study.ORDER:
        assert f"| {name} |" in page
    for figure in ("curves", "final"):
        assert (tmp_path / "architectures" / f"{figure}.png").stat().st_size > 1000
        assert f"(architectures/{figure}.png)" in page
    stored = json.loads((tmp_path / "architectures" / "results.json").read_text())
    assert len(stored["runs"]) == len(study.ORDER) and all(r["final_bpb"] > 0 for r in stored["runs"])
    main(["--out", str(tmp_path), "--part", "architectures", "--render"])
    assert (tmp_path / "architectures.md").read_text() == page
