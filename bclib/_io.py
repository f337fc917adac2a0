"""Atomic file writes: every file bclib writes appears whole or not at all."""
from __future__ import annotations

import os
import tempfile
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
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:  # on disk before the rename: a power cut leaves old or new
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path
