"""Folders that survive a crash or a power cut whole, and are known damaged when they did not.

Checkpoints, each stage's final/ and token cache entries are written under a temporary name,
sealed (each file's size and CRC-32 into checksums.json, then every file and the folder
fsynced), and only then renamed into place, the rename itself fsynced through the parent folder.
So a folder under its real name is complete on disk, and `damage` finds one changed later (a
truncated copy, a flipped bit, a half-synced file after a power cut on a filesystem that lied).
No torch here: the token cache uses it too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import zlib
from pathlib import Path

from ..errors import LlmforgeError

SUMS = "checksums.json"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, a file size limit
# OS errors that say a path is unusable as given (the user's to fix, not a bug).
PATH_ERRORS = (errno.ENAMETOOLONG, errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP, errno.EROFS,
               errno.EISDIR)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (folders: POSIX only)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a folder cannot be opened on Windows: its entries are flushed with it there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checksum(path: Path) -> list[int]:
    """[size, CRC-32] of a file (~1.8 GB/s: a bit flip or a cut is caught; this guards against
    damage, not against tampering). Read through one 1 MiB buffer: a larger read each time would
    raise the process's peak memory at the end of every stage, when checkpoints are sealed."""
    crc, buf = 0, bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return [path.stat().st_size, crc]


def seal(folder: Path) -> None:
    """Write checksums.json for every file in `folder`, then fsync the files and the folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != SUMS)
    (folder / SUMS).write_text(json.dumps({p.name: checksum(p) for p in files}, indent=1))
    for p in (*files, folder / SUMS, folder):
        fsync(p)


def publish(tmp: Path, final: Path) -> None:
    """Rename a sealed temporary folder into place (an old one at that name moved aside first and
    deleted after, never in place) and make the rename durable."""
    if final.exists():
        old = final.parent / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync(final.parent)


def damage(folder: Path) -> str | None:
    """What is wrong with a folder's files against its checksums.json, or None (also for folders
    written before checksums were)."""
    try:
        sums = json.loads((folder / SUMS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"{SUMS} is unreadable ({e})"
    if not isinstance(sums, dict):
        return f"{SUMS} is unreadable (not a mapping)"
    for name, expected in sums.items():
        try:
            size, crc = expected
            got_size, got_crc = checksum(folder / name)
        except OSError as e:
            return f"{name}: {e.strerror or e}"
        except (TypeError, ValueError):
            return f"{SUMS} is unreadable (entry {name!r})"
        if got_size != size:
            return f"{name} is {got_size:,} bytes, {size:,} when saved (truncated or replaced)"
        if got_crc != crc:
            return f"{name} does not match its checksum (the bytes changed since it was saved)"
    return None


def stamp(folder: Path) -> list | None:
    """The content stamp of a sealed folder's files (their checksums), or None if unsealed."""
    try:
        return sorted(json.loads((folder / SUMS).read_text()).items())
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def writing(tmp: Path, final: Path, needed: int | None = None):
    """Around the writes into `tmp`, to be published as `final`: on any failure tmp is removed
    (what was published before stays as it was), and a full disk becomes a clear error naming
    the folder and the bytes it needs."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _disk_full(e, tmp, needed):
            free = shutil.disk_usage(_existing(tmp)).free
            need = f"about {needed:,} bytes" if needed else "more space"
            raise LlmforgeError(f"{final}: cannot be written, the disk is full ({e}); it needs {need}, "
                                f"{free:,} bytes are free; nothing written before was changed",
                                hint="free some space (or lower checkpoint.keep), then run the same command "
                                     "again: it resumes from the last complete checkpoint") from None
        raise


def _disk_full(e: Exception, path: Path, needed: int | None) -> bool:
    """Whether a failed write ran out of space. Not every writer keeps the errno: safetensors
    reports "No space left on device (os error 28)" as text, numpy "N requested and M written"."""
    if getattr(e, "errno", None) in NO_SPACE or any(f"os error {n})" in str(e) for n in NO_SPACE):
        return True
    return isinstance(e, OSError) and needed is not None and shutil.disk_usage(_existing(path)).free < needed


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
