"""Tokenizer training and corpus tokenization throughput (MB of text per second), as TextDataModule does them.

    python -m benchmarks.tokenizer_throughput
    python -m benchmarks.tokenizer_throughput --corpus 'my/texts/**/*.txt' --vocab 32000

Corpora: the default corpus (the Python standard library's .py files) and Tiny Shakespeare when found.
"Train" is fitting the tokenizer on the whole corpus; "tokenize" is writing the cached token file
(reading the files, encoding in parallel batches, appending eos, writing uint16/uint32), each from a cold
cache directory. The reference is encoding the same text, already in memory, in one ``encode_batch`` call
(Hugging Face ``tokenizers``' ``encode_batch_fast``), in the same turns: the ratio says how much of the bare
encoder's speed the whole pipeline keeps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import environment, ratio_text, ratios
from llmzoo.data import TextDataModule, resolve_files
from llmzoo.data.sources import read_pieces

TITLE = "Tokenizers: training and corpus tokenization throughput"
ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(os.environ.get("LLMZOO_SHAKESPEARE", ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(path: str | None, kind: str, vocab: int, repeats: int) -> dict:
    """Seconds to train the tokenizer, to tokenize the corpus and to encode its text bare, in turns."""
    files = resolve_files(path)
    texts = [text for file in files for text, _ in read_pieces(file)]
    times = {"train": [], "tokenize": [], "encode": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            dm = TextDataModule(path, tokenizer=kind, bpe_vocab_size=vocab, cache_dir=cache)
            dm.files  # noqa: B018 (resolved outside the timings)
            times["train"].append(seconds(lambda: dm.tokenizer))
            times["tokenize"].append(seconds(dm.prepare_data))
            times["encode"].append(seconds(lambda: dm.tokenizer.encode_batch(texts)))
    name = "Python stdlib (default corpus)" if path is None else Path(path).name
    return dict(corpus=name, kind=kind, megabytes=sum(f.stat().st_size for f in files) / 1e6,
                vocab_size=dm.tokenizer.vocab_size, times=times, ratio=ratios(times["encode"], times["tokenize"]))


def measure(quick: bool = False, corpora: list[str | None] | None = None, vocab: int = 8192, repeats: int = 3) -> dict:
    if quick:
        corpora, vocab, repeats = [str(ROOT / "llmzoo")], 512, 1
    elif corpora is None:
        corpora = [None, *([str(SHAKESPEARE)] if SHAKESPEARE.exists() else [])]
    rows = [run(corpus, kind, vocab, repeats) for corpus in corpora for kind in ("bpe", "char")]
    return {"env": environment(), "quick": quick, "vocab": vocab, "rows": rows}


def report(result: dict, plots: Path | None = None) -> str:
    rows = result["rows"]
    lines = [f"Byte-level BPE ({result['vocab']} tokens asked) and character tokenizers, each run from a cold cache "
             "directory as `TextDataModule` does it: *train* fits the tokenizer on the whole corpus, *tokenize* "
             "writes the cached token file (reading the files, encoding in parallel batches, appending eos, writing "
             "uint16/uint32). Reference: encoding the same text, already in memory, in one `encode_batch` call "
             "(Hugging Face `tokenizers`' `encode_batch_fast`), in the same turns; ratio = encode time / tokenize "
             "time (the share of the bare encoder's speed the whole pipeline keeps), over "
             f"{len(rows[0]['times']['train'])} turns. MB/s from the medians.", "",
             "| corpus | MB | tokenizer | vocab | train MB/s | tokenize MB/s | bare encode MB/s | "
             "pipeline / bare (min) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = {name: r["megabytes"] / statistics.median(t) for name, t in r["times"].items()}
        lines.append(f"| {r['corpus']} | {r['megabytes']:.1f} | {r['kind']} | {r['vocab_size']} | "
                     f"{speed['train']:.1f} | {speed['tokenize']:.1f} | {speed['encode']:.1f} | "
                     f"{ratio_text(r['ratio'])} |")
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", help="files, folder or glob (default: stdlib + Shakespeare)")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small corpus (llmzoo's own source), one turn")
    args = parser.parse_args()
    from benchmarks.report import show

    show("tokenizer", measure(args.quick, args.corpus, args.vocab, args.repeats))


if __name__ == "__main__":
    main()
