"""Tokenizer training and corpus tokenization throughput (MB of text per second), as TextDataModule does them.

    python -m benchmarks.tokenizer_throughput
    python -m benchmarks.tokenizer_throughput --corpus 'my/texts/**/*.txt' --vocab 32000

Corpora: the default corpus (the Python standard library's .py files) and Tiny Shakespeare when found.
"Train" is fitting the tokenizer on the whole corpus; "tokenize" is writing the cached token file
(reading the files, encoding in parallel batches, appending eos, writing uint16/uint32), each from a cold
cache directory. Median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import hardware
from llmzoo.data import TextDataModule, resolve_files

SHAKESPEARE = Path(os.environ.get("LLMZOO_SHAKESPEARE", Path(__file__).resolve().parents[2] / "shared" / "data"
                                  / "tinyshakespeare.txt"))


def measure(path: str | None, kind: str, vocab: int, repeats: int) -> dict:
    """Median seconds to train the tokenizer and to tokenize the corpus, and the corpus size in MB."""
    megabytes = sum(f.stat().st_size for f in resolve_files(path)) / 1e6
    train, tokenize = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            dm = TextDataModule(path, tokenizer=kind, bpe_vocab_size=vocab, cache_dir=cache)
            dm.files  # noqa: B018 (resolved outside the timings)
            start = time.perf_counter()
            tokenizer = dm.tokenizer
            train.append(time.perf_counter() - start)
            start = time.perf_counter()
            dm.prepare_data()
            tokenize.append(time.perf_counter() - start)
    return dict(megabytes=megabytes, train=statistics.median(train), tokenize=statistics.median(tokenize),
                vocab_size=tokenizer.vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", help="files, folder or glob (default: stdlib + Shakespeare)")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    corpora = args.corpus or [None, *([str(SHAKESPEARE)] if SHAKESPEARE.exists() else [])]
    print(f"{hardware()}")
    print(f"{'corpus':28s} {'MB':>6s} {'tokenizer':>10s} {'vocab':>6s} {'train MB/s':>11s} {'tokenize MB/s':>14s}")
    for corpus in corpora:
        for kind in ("bpe", "char"):
            r = measure(corpus, kind, args.vocab, args.repeats)
            name = "Python stdlib (default)" if corpus is None else Path(corpus).name
            print(f"{name:28s} {r['megabytes']:6.1f} {kind:>10s} {r['vocab_size']:6d} "
                  f"{r['megabytes'] / r['train']:11.1f} {r['megabytes'] / r['tokenize']:14.1f}", flush=True)


if __name__ == "__main__":
    main()
