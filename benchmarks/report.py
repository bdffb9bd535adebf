"""docs/benchmarks.md from the stored results of every part (``<out>/benchmarks/results.json``).

Each part is a module with ``TITLE``, ``measure(quick) -> dict`` (JSON-ready, with its ``env``: date, hardware,
versions), ``report(result, plots) -> str`` (the Markdown of its section, figures written into ``plots``) and
``targets(result)`` (rows of the summary table). A result holding ``skipped`` says why the part did not run.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

PARTS = {  # the page's sections, in order
    "train": "benchmarks.train_step",
    "decode": "benchmarks.decode",
    "memory": "benchmarks.memory",
    "finetune": "benchmarks.finetune",
    "preference": "benchmarks.preference",
    "scaling": "benchmarks.scaling",
    "moe": "benchmarks.moe",
    "tokenizer": "benchmarks.tokenizer_throughput",
    "shakespeare": "benchmarks.shakespeare",
    "serve": "benchmarks.serve",
    "gpu": "benchmarks.gpu",
}

INTRO = """# Benchmarks

Every figure is a ratio against a reference measured in the same process (or the same run of the suite),
in alternating turns, on the same machine: its median and its minimum over the turns. Absolute numbers
appear only under the hardware they came from. This page is written by the suite from its stored results
(`docs/benchmarks/results.json`); each section says when and where it was measured.

```bash
pip install -e ".[bench]"
python -m benchmarks                        # every part, then this page
python -m benchmarks --part train decode    # some parts; the other sections keep their stored results
python -m benchmarks --render               # only rewrite the page from the stored results
```
"""


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def store(results: dict, part: str, result: dict) -> None:
    """Record ``result`` as ``part``'s; a skipped run does not replace measured figures (they keep their own
    date and hardware, and the skip is noted beside them)."""
    previous = results.get(part)
    if "skipped" in result and previous is not None and "skipped" not in previous:
        previous["last_skipped"] = result
    else:
        results[part] = result


def when(env: dict) -> str:
    return f"{env['date']} on {env['hardware']}, torch {env['torch']}, transformers {env['transformers']}"


def section(part: str, result: dict | None, plots: Path | None = None) -> str:
    module = importlib.import_module(PARTS[part])
    lines = [f"## {module.TITLE}", "",
             f"Reproduce: `python -m benchmarks --part {part}` (or on its own: `python -m {module.__name__}`).", ""]
    if result is None:
        lines.append("Not measured yet.")
    elif "skipped" in result:
        lines.append(f"Skipped {when(result['env'])}: {result['skipped']}.")
    else:
        lines.append(f"Measured {when(result['env'])}.")
        if result.get("quick"):
            lines.append("**Quick smoke run** (toy sizes, few repeats): these numbers only show that the suite works.")
        if "last_skipped" in result:
            skipped = result["last_skipped"]
            lines.append(f"(A later run skipped this part, {when(skipped['env'])}: {skipped['skipped']}.)")
        lines += ["", module.report(result, plots)]
    return "\n".join(lines)


def summary(results: dict) -> str:
    lines = ["## Targets", "", "| figure | measured | target | met | measured on |", "|---|---|---|---|---|"]
    for part, name in PARTS.items():
        result = results.get(part)
        if result is None or "skipped" in result:
            continue
        note = " (quick smoke run)" if result.get("quick") else ""
        for figure, value, target, met in importlib.import_module(name).targets(result):
            lines.append(f"| {figure} | {value} | {target} | {'yes' if met else '**no**'} | "
                         f"{result['env']['date']}, {result['env']['hardware']}{note} |")
    return "\n".join(lines)


def page(results: dict, plots: Path) -> str:
    sections = [section(part, results.get(part), plots) for part in PARTS]
    return "\n\n".join([INTRO, summary(results), *sections]) + "\n"


def show(part: str, result: dict) -> None:
    """Print one part's section (the scripts' own output when run alone); no figures."""
    print(section(part, result))
