"""Files written so that nothing is lost: atomic writes (a temporary file in the same directory, fsync,
rename), permissions that follow the umask, checksums, and the version stamp every output carries."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch

from .version import __version__

__all__ = ["sha256_file", "atomic_write", "atomic_write_bytes", "atomic_save_tensors", "write_json", "versions", "umask",
           "LockedError", "directory_lock"]

PathLike = Union[str, Path]


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would (0666 less the umask), is fsynced before
    the rename, and a failure (or an interrupt) leaves ``path`` as it was and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_save_tensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with one metadata key ``delsketch`` (sorted JSON): safetensors orders several
    metadata keys nondeterministically, which would break byte identity."""
    from safetensors.torch import save

    meta = {"delsketch": json.dumps(metadata, sort_keys=True)}
    # serialized in memory and written by Python, so that a failing write (disk full, read-only) is an OSError
    # with its errno and file name (safetensors' own writer reports it as a generic SafetensorError)
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata=meta))


def write_json(path: PathLike, obj, sort_keys: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n").encode())


def versions() -> dict:
    return {"delsketch": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


class LockedError(RuntimeError):
    """Another process holds the lock of a directory."""


@contextlib.contextmanager
def directory_lock(directory: PathLike, name: str = ".lock"):
    """Hold an exclusive ``fcntl.flock`` on ``directory/name`` for the duration of the block.

    A second holder fails at once with :class:`LockedError` (naming the holder's pid). The kernel drops the
    lock when the holder's process ends, however it ends (``kill -9`` included), so a crash never leaves a
    directory locked; a clean exit also removes the file. Removing the file while others may be opening it is
    made safe by re-checking, after locking, that the locked file is still the one at the path."""
    import fcntl

    path = Path(directory) / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise LockedError(f"{directory} is locked by another process (pid {holder or '?'})") from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by the previous holder between our open and our lock: try again
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def jsonable(x, nulls: set | None = None, name: str = "value"):
    """Strict JSON of tensors, arrays, numbers, lists and dicts: non-finite numbers become ``None`` (and ``name`` is
    added to ``nulls`` so the caller can say why); tensors become nested lists."""
    import math

    def conv(v):
        if isinstance(v, dict):
            return {str(k): conv(u) for k, u in v.items()}
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            return conv(v.item() if v.dim() == 0 else v.tolist())
        if isinstance(v, np.ndarray):
            return conv(v.tolist())
        if isinstance(v, (list, tuple)):
            return [conv(u) for u in v]
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            if nulls is not None:
                nulls.add(name)
            return None
        return v

    return conv(x)
