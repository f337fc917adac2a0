"""Atomic file writes: every file bclib writes appears whole or not at all."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["write_atomically"]


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` in ``path``'s folder (created when missing), then rename onto ``path``.

    The temporary file is removed when ``write`` fails, so a crash never leaves half a file; the
    result gets the usual permissions (``0666`` less the umask), not ``mkstemp``'s private ``0600``.
    """
    path = Path(path)
    if path.is_dir():  # else the rename fails naming the temporary file, which would puzzle
        raise IsADirectoryError(f"path {str(path)!r} is a folder; give the path of a file to write (one inside it, say)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:  # on disk before the rename: a power cut leaves old or new
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def _create_temporary(path: Path) -> str:
    """Create an empty, new file beside ``path`` and return its name.

    Opened with mode 0666 so that the kernel applies the umask (reading the umask means setting it,
    which races with other threads); the name keeps at most 100 bytes of ``path``'s, so that a
    legal long file name still leaves room for the suffix.
    """
    while True:
        stem = path.name.encode()[:100].decode(errors="ignore")  # file systems count bytes, not characters
        temporary = path.parent / f".{stem}.{secrets.token_hex(6)}.part"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(temporary)
