"""The benchmark suite: runs the parts, stores their results and writes docs/benchmarks.md with its figures.

    python -m benchmarks                          # every part (CPU parts, and the GPU part where CUDA exists)
    python -m benchmarks --part train moe         # some parts; the page keeps the others' stored results
    python -m benchmarks --part gpu               # GPT-2 124M MFU and decoding on the GPU (a few minutes)
    python -m benchmarks --quick --out /tmp/b     # a smoke run: toy sizes, a page in /tmp/b
    python -m benchmarks --render                 # rewrite the page from the stored results only
    python -m benchmarks --part architectures     # the architecture study (~30 min): docs/architectures.md

Writes ``<out>/benchmarks.md``, ``<out>/benchmarks/results.json`` and ``<out>/benchmarks/*.png``; ``--out``
defaults to docs/ (``--quick``: runs/benchmarks-quick/, so that a smoke run never replaces the real page).
Results already stored there are kept for the parts not run. On a machine whose output must go elsewhere
(a borrowed GPU), start from a copy of docs/ so that the page keeps the CPU sections:

    cp -r docs "$OUT/docs" && python -m benchmarks --part gpu --out "$OUT/docs"   # then copy it back
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch

from benchmarks.report import PARTS, load, page, section, store

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {"architectures": "benchmarks.architectures"}  # parts with a page of their own, run only when named


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=[*PARTS, *STUDIES], default=list(PARTS), metavar="PART",
                        help=f"parts to run, of: {' '.join([*PARTS, *STUDIES])} (default: all but "
                             f"{', '.join(STUDIES)}, whose own pages take longer)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and few repeats: checks that it all works")
    parser.add_argument("--out", type=Path, help="where the page goes (default: docs/, or runs/benchmarks-quick/)")
    parser.add_argument("--render", action="store_true", help="run nothing; rewrite the page from the stored results")
    args = parser.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)  # toy models gain nothing from more; on a busy machine they lose a lot
    out = args.out or ROOT / ("runs/benchmarks-quick" if args.quick else "docs")
    plots = out / "benchmarks"
    plots.mkdir(parents=True, exist_ok=True)
    stored = plots / "results.json"
    results = load(stored)
    for study in [part for part in args.part if part in STUDIES]:  # <out>/<study>.md
        module = importlib.import_module(STUDIES[study])
        print(f"[{study}] wrote {module.render(out) if args.render else module.run(args.quick, out)}", flush=True)
    for part in [] if args.render else [part for part in args.part if part not in STUDIES]:
        print(f"[{part}] running ...", flush=True)
        start = time.perf_counter()
        result = importlib.import_module(PARTS[part]).measure(quick=args.quick)
        store(results, part, result)
        stored.write_text(json.dumps(results, indent=1) + "\n")  # after each part: a crash keeps what was measured
        print(section(part, result), f"\n[{part}] {time.perf_counter() - start:.0f} s\n", flush=True)
    (out / "benchmarks.md").write_text(page(results, plots))
    print(f"wrote {out / 'benchmarks.md'} and {plots}/")


if __name__ == "__main__":
    main()
