"""Atomic writes: a file or folder appears under its name complete, or not at all.

Everything a stage writes (checkpoints, the model, metrics, plots, the downloaded files) goes through
:func:`atomic_path`: it is built under a temporary name beside its final one (``.tmp-<pid>-<name>-*``,
so a kill leaves only such a name, which a later run removes once that process is gone), flushed to
disk, given the permissions the umask allows (not the 0600/0700 of a temporary file), and renamed
into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DiskFullError, PipelineError, in_the_way, path_problem

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _settle(path: Path, mask: int) -> None:
    """fsync ``path`` (every file in it, for a folder) and set the permissions a new file would get."""
    if path.is_dir():
        for child in path.iterdir():
            _settle(child, mask)
        path.chmod(0o777 & ~mask)
        return
    with path.open("rb") as f:
        os.fsync(f.fileno())
    path.chmod(0o666 & ~mask)


def _disk_full(e: Exception, free: int) -> bool:
    """Whether ``e`` means the disk filled: ENOSPC, or how torch and safetensors report a write that failed."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    said = "No space left on device" in text or "os error 28" in text
    return said or (free < 2**20 and ("unexpected pos" in text or "failed writing" in text))


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a folder already there is swapped out first, then removed."""
    if tmp.is_dir() and final.is_dir():
        old = final.with_name(f"{TMP_PREFIX}{os.getpid()}-{final.name}-old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _writer_alive(name: str) -> bool:
    """Whether the process that named a temporary ``.tmp-<pid>-...`` is still running (and is not this one)."""
    pid = name[len(TMP_PREFIX) :].partition("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():  # no pid, or a leftover of an earlier process with ours
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_partial(folder: Path) -> None:
    """Remove what writes that a kill interrupted left in ``folder``; a write still in progress is left alone."""
    if folder.is_dir():
        for p in folder.glob(f"{TMP_PREFIX}*"):
            if _writer_alive(p.name):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextmanager
def atomic_path(final: str | Path, folder: bool = False, needs: int = 0) -> Iterator[Path]:
    """A temporary path beside ``final`` to write (a file, or a ``folder`` to fill); renamed to ``final`` at the end.

    If the block raises, the temporary path is removed and ``final`` is left as it was. ``needs``, the bytes the
    write is expected to take, goes into the message when the disk fills.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{TMP_PREFIX}{os.getpid()}-{final.name}-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _settle(tmp, _umask())
        _replace(tmp, final)
    except Exception as e:
        if _disk_full(e, shutil.disk_usage(final.parent).free):
            _remove(tmp)
            raise DiskFullError(_no_space(final, needs, shutil.disk_usage(final.parent).free)) from None
        raise
    finally:
        _remove(tmp)


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _no_space(final: Path, needs: int, free: int) -> str:
    """The one line for a write that filled the disk; ``free`` is measured once the partial write is gone."""
    room = (f"it needs about {_mib(needs)}, " if needs else "") + f"{_mib(free)} free in {final.parent}"
    return f"no space left on device writing {final} ({room}); free space there and run again (what was there is kept)"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: object, indent: int = 2) -> None:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def check_outputs(flags: Mapping[str, Path], folders: Collection[str] = ()) -> None:
    """Refuse, before any work, an output the stage could not write, in one line naming its flag.

    ``flags`` maps each output's flag (``--out``) to its path; the ``folders`` flags name folders, the others
    files. Refused: a folder where a file goes, a file or a dangling symlink where a folder goes (the output's
    own, or one above it), and a folder this user may not write in (the nearest that exists above the output,
    where it is written beside its final name, and the output's own).
    """
    for flag, path in flags.items():
        instead, folder = f"pass another {flag}", flag in folders
        if path.is_dir() and not folder:
            raise PipelineError(path_problem(OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path)), instead))
        target = path if folder else path.parent
        if in_the_way(target) is not None:
            raise PipelineError(path_problem(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target)), instead))
        above = next((p for p in [path.parent, *path.parent.parents] if p.exists()), path.parent)
        for where in [above, *[path] * path.is_dir()]:
            if not os.access(where, os.W_OK | os.X_OK):
                no = errno.EROFS if os.statvfs(where).f_flag & os.ST_RDONLY else errno.EACCES
                raise PipelineError(path_problem(OSError(no, os.strerror(no), str(where)), instead))
