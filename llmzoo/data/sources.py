"""Where text comes from: files, folders and globs; plain text or JSON lines, gzipped or not; the cache.

A corpus is read as a sequence of *pieces* ``(text, ends_document)``: one per JSON line, and for plain
text files chunks of about ``CHUNK_CHARS`` characters cut where the byte-level pre-tokenizer would
cut anyway (a newline between two non-space characters), so a chunked file encodes to the same
tokens as the whole file and large files encode in parallel with bounded memory.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import os
import re
import sysconfig
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK_CHARS = 1 << 20
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # a newline between two non-space characters


def default_corpus() -> list[Path]:
    """The embedded default corpus: the Python standard library's own ``.py`` files, minus its test suites
    and installed packages. Every machine with Python has it, so it needs no download."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts))
    if not files:
        raise FileNotFoundError(f"no .py files under {stdlib}: give the corpus explicitly with --data.path")
    return files


def resolve_files(path: str | list[str] | None) -> list[Path]:
    """Files named by ``path``: files, folders (every file below, recursively), globs, or a list of them.
    ``None`` is the default corpus. Sorted and without duplicates, so the order never depends on the file system."""
    if path is None:
        return default_corpus()
    files: set[Path] = set()
    for item in [path] if isinstance(path, (str, os.PathLike)) else path:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            matches = [p for p in Path(item).rglob("*") if p.is_file()
                       and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(item).parts)]
        elif glob.has_magic(item):
            matches = [Path(p) for p in glob.glob(item, recursive=True) if os.path.isfile(p)]
        elif os.path.isfile(item):
            matches = [Path(item)]
        else:
            raise FileNotFoundError(f"data path {item!r} does not exist: give text files, folders or globs "
                                    f"(e.g. --data.path 'corpus/**/*.txt')")
        if not matches:
            raise FileNotFoundError(f"data path {item!r} matches no files")
        files.update(p.resolve() for p in matches)
    return sorted(files)


def _count_invalid_utf8(error: UnicodeDecodeError) -> tuple[str, int]:
    """The ``errors="replace"`` of UTF-8 decoding (U+FFFD for each invalid sequence), counting the bytes."""
    _invalid_utf8_bytes[0] += error.end - error.start
    return "\ufffd", error.end


_invalid_utf8_bytes = [0]  # replaced so far in this process
codecs.register_error("llmzoo-count-invalid", _count_invalid_utf8)


def _open_text(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="llmzoo-count-invalid", newline="")


def split_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """``text`` in pieces of about ``chunk_chars`` characters, cut only at pre-tokenizer boundaries (a text
    with none for 16 chunks, such as a file of one huge line, is cut anyway)."""
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        cut = _SAFE_CUT.search(text, start + chunk_chars, start + 16 * chunk_chars)
        if cut is None and len(text) - start <= 16 * chunk_chars:
            break
        end = cut.start() if cut else start + chunk_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def read_pieces(path: Path, text_field: str = "text", chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, bool]]:
    """``(text, ends_document)`` pieces of one file: a document per JSON line (its ``text_field``) for
    ``.jsonl[.gz]``, otherwise the whole file is one document, read in chunks. Bytes that are not UTF-8 are
    read as U+FFFD and counted in a warning."""
    invalid_before = _invalid_utf8_bytes[0]
    yield from _read_pieces(path, text_field, chunk_chars)
    if (invalid := _invalid_utf8_bytes[0] - invalid_before) and path not in _warned:
        _warned.add(path)  # once per file and process (a tokenizer is trained on the text, then it is tokenized)
        warnings.warn(f"{path}: {invalid} bytes are not UTF-8 and were read as U+FFFD; re-encode the "
                      f"file as UTF-8 to keep its text", stacklevel=2)


_warned: set[Path] = set()
SNIFF_BYTES, MOST_INVALID = 65536, 0.1


def check_text_files(files: list[Path]) -> None:
    """Refuse a file that is not text: one whose first 64 KiB (decompressed, for ``.gz``) hold a NUL byte or
    are more than 10% bytes that are not UTF-8, as a binary file, a UTF-16 text or a wrong path are.
    ``--data.allow_binary true`` reads such files anyway (their invalid bytes as U+FFFD, counted)."""
    for path in files:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            sample = f.read(SNIFF_BYTES)
        text = sample[:-3] if len(sample) == SNIFF_BYTES else sample  # not a character cut in two
        invalid = len(text) - len(text.decode("utf-8", errors="ignore").encode("utf-8"))
        if b"\0" in sample or invalid > MOST_INVALID * len(text):
            what = "holds NUL bytes" if b"\0" in sample else f"is {invalid / len(text):.0%} bytes that are not UTF-8"
            raise ValueError(f"{path} does not look like text: its start {what} (a binary or UTF-16 file?); give "
                             f"UTF-8 text files, or --data.allow_binary true to read it anyway")


def _read_pieces(path: Path, text_field: str, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    with _open_text(path) as f:
        if path.name.endswith(JSONL_SUFFIXES):
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)[text_field], True
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise ValueError(f"{path}:{number}: not a JSON object with a {text_field!r} string "
                                         f"({error}); set --data.text_field to the field holding the text") from None
            return
        carry = ""
        while block := f.read(chunk_chars):
            *done, carry = split_text(carry + block, chunk_chars)
            for piece in done:
                yield piece, False
        yield carry, True


# ----------------------------------------------------------------- cache
def cache_dir(path: str | None = None) -> Path:
    """``path``, else ``$LLMZOO_CACHE``, else ``$XDG_CACHE_HOME/llmzoo`` (``~/.cache/llmzoo``)."""
    path = path or os.environ.get("LLMZOO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "llmzoo"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(files: list[Path], *parts: object) -> str:
    """A hash of the files' names, sizes and modification times and of ``parts`` (settings, tokenizer)."""
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for part in parts:
        digest.update(str(part).encode() + b"\n")
    return digest.hexdigest()[:20]


@contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (a hidden ``.lock`` file beside it) while inside, so that processes
    building the same cache file take turns and the later ones find it built: the ranks of a ``torchrun`` or
    ``srun`` launch start together. Without ``fcntl`` (Windows), in a read-only directory or where the file
    system refuses locks, no lock is taken (the file is still written atomically)."""
    try:
        import fcntl

        lock = open(path.parent / f".{path.name}.lock", "a")
    except (ImportError, OSError):
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the lock
