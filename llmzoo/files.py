"""Files written whole or not at all: the one writer of every file and directory llmzoo produces (checkpoints,
the token cache, tokenizers, Hugging Face directories). Imports nothing of llmzoo."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def sibling(path: Path, kind: str) -> Path:
    """A hidden, unused name beside ``path`` (the same file system, so a rename onto ``path`` is atomic):
    ``.<name>.<pid>-<random>.<kind>``."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}"


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` so that readers see the old
    file or the whole new one, never a part, even if the process is killed or the machine fails midway:
    a temporary file beside ``path`` (created with the user's umask) is written, flushed to disk and renamed
    onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(path, "tmp")
    try:
        with open(tmp, "xb") as file:
            data(file) if callable(data) else file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_bytes(data: dict) -> bytes:
    """``data`` as the JSON llmzoo writes: indented, keys sorted, a final newline."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


@contextmanager
def new_directory(directory: str | os.PathLike, overwrite: bool = False,
                  replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary sibling of ``directory`` to fill; when the block succeeds its files are flushed to disk and
    it is renamed into place, so ``directory`` is never left half-written. A non-empty ``directory`` is
    replaced only with ``overwrite``, and only if ``replaceable(directory)`` (when given) says it may be."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory: choose a directory path")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{target} is not empty: pass overwrite=True (--overwrite true) or choose a new "
                                  f"directory")
        if replaceable is not None and not replaceable(target):
            raise FileExistsError(f"{target} is not empty and is not a directory llmzoo wrote: refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = sibling(target, "partial")
    temporary.mkdir()  # the umask applies, as for any directory the user makes
    try:
        yield temporary
        _fsync_tree(temporary)
        if target.exists():
            old = sibling(target, "old")
            target.rename(old)
            temporary.rename(target)
            shutil.rmtree(old)
        else:
            temporary.rename(target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directory itself to disk (no-op where unsupported)."""
    for path in [*directory.rglob("*"), directory]:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
        except OSError:
            pass
        finally:
            os.close(descriptor)
