"""The one way files are written: to a temporary name in the same folder, then renamed.

A crash at any moment leaves either the old file or the complete new one under the final
name, never a partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask_mode() -> int:
    """Permissions a plain ``open()`` would give (mkstemp's are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    ``durable`` fsyncs the file and its folder (checkpoints: the rename survives power loss).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def save_npy_atomic(path: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
