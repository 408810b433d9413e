"""Where a checkpoint is written: claimed before the work, published atomically after it.

The contract (a user's directory is never lost, OUT never holds half a checkpoint):

- :meth:`OutputDir.claim` runs before the slow part. It refuses an OUT that exists
  (unless ``force``), that is not a directory, or that is or holds the source model; it
  creates the work directory ``.OUT.partial-<host>-<pid>-<hex>`` beside OUT with the
  permissions a plain ``mkdir`` gets under the user's umask, which also proves the
  location writable; and it finishes what dead runs left behind (see below).
- :meth:`OutputDir.publish` moves the finished work directory to OUT with a rename
  that never replaces anything (``renameat2(RENAME_NOREPLACE)``). Without ``force``, an
  OUT that appeared meanwhile (a user's ``mkdir``, another conversion) is left alone and
  the finished checkpoint is kept beside it under a visible name the error gives. With
  ``force``, only the directory that was at OUT when it was claimed is replaced: it is
  renamed to ``.OUT.old-<host>-<pid>-<hex>``, checked to be that same directory
  (device and inode), and deleted once the new checkpoint is in place.
- Leftovers of dead runs on this host (their pid is gone): a work directory is removed;
  an ``.old`` directory is put back at OUT when OUT is missing (the run died between
  the two renames of a ``force`` swap), else removed (it died after publishing). Those
  of live runs and other hosts are left alone and logged.

So at every instant OUT holds the old checkpoint, the new one, or (only after a kill
inside a ``force`` swap) nothing, and then the next claim of OUT puts the old one back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

__all__ = ["OutputDir", "OutputExistsError"]

log = logging.getLogger(__name__)

_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


class OutputExistsError(FileExistsError):
    """OUT exists (or appeared while converting) and may not be replaced."""


def _libc_renameat2():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    fn = getattr(ctypes.CDLL(name, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return fn


_RENAMEAT2 = _libc_renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """``src -> dst`` atomically, failing with ``FileExistsError`` if ``dst`` exists (even empty).

    Linux: ``renameat2(RENAME_NOREPLACE)``. Where that is unavailable, an existence check
    then ``os.rename``: ``os.rename`` still refuses a non-empty ``dst``, so only an empty
    directory created in that instant could be replaced.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _identity(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_dev, st.st_ino


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class OutputDir:
    """One conversion's claim on an output directory (see the module docstring)."""

    def __init__(self, out: Path, work: Path, force: bool, replaces: tuple[int, int] | None, tag: str):
        self.out, self.work, self.force, self._replaces, self._tag = out, work, force, replaces, tag
        self.published = False

    # ------------------------------------------------------------------ claim
    @classmethod
    def claim(cls, out_dir: str | os.PathLike, *, force: bool = False, protect: tuple = ()) -> "OutputDir":
        """Check OUT, tidy after dead runs, create the work directory; raise before any work.

        ``protect``: paths (the source model) that OUT must neither be nor contain.
        """
        out = Path(os.path.abspath(os.fspath(out_dir)))
        for p in protect:
            src = Path(os.path.realpath(os.fspath(p)))
            real_out = Path(os.path.realpath(out))
            if src == real_out or real_out in src.parents:
                raise ValueError(f"output {out} is the source model {src}{'' if src == real_out else ' or holds it'}; "
                                 "choose another output directory")
        parent = out.parent
        blocker = next((p for p in (parent, *parent.parents) if os.path.lexists(p) and not p.is_dir()), None)
        if blocker is not None:
            raise NotADirectoryError(errno.ENOTDIR, "the output's parent is not a directory", str(blocker))
        parent.mkdir(parents=True, exist_ok=True)
        _tidy(out)
        replaces = None
        if os.path.lexists(out):
            if not out.is_dir() or out.is_symlink():
                raise OutputExistsError(f"{out} exists and is not a directory; refusing to replace it")
            if not force:
                raise OutputExistsError(f"{out} already exists; pass force=True (CLI: --force) to replace it")
            replaces = _identity(out)
        tag = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        work = parent / f".{out.name}.partial-{tag}"
        os.mkdir(work, 0o777)  # the umask applies, as for any mkdir; fails here if parent is not writable
        return cls(out, work, force, replaces, tag)

    # ------------------------------------------------------------------ finish
    def publish(self) -> Path:
        """Move the finished work directory to OUT (see the module docstring); return OUT."""
        old = None
        if self._replaces is not None:
            old = self.out.parent / f".{self.out.name}.old-{self._tag}"
            try:
                rename_noreplace(self.out, old)
            except FileNotFoundError:  # removed meanwhile: nothing left to replace
                old = None
            else:
                if _identity(old) != self._replaces:  # OUT was swapped for another directory meanwhile
                    rename_noreplace(old, self.out)
                    self._keep_beside(f"{self.out} was replaced by another directory while converting; "
                                      "it was left untouched")
        try:
            rename_noreplace(self.work, self.out)
        except FileExistsError:
            if old is not None:  # only in the instant between the two renames: put nothing back over it
                raise OutputExistsError(f"{self.out} appeared while it was being replaced; the previous "
                                        f"checkpoint is at {old}, the new one at {self.work}") from None
            self._keep_beside(f"{self.out} appeared while converting (this run did not create it); it was "
                              "left untouched")
        self.published = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def _keep_beside(self, why: str) -> None:
        """Keep the finished checkpoint under a visible name beside OUT and say where."""
        kept = self.out.parent / f"{self.out.name}.converted-{self._tag.rsplit('-', 1)[-1]}"
        rename_noreplace(self.work, kept)
        self.work = kept
        self.published = True  # nothing to clean up: the result is the user's now
        raise OutputExistsError(f"{why}. The finished checkpoint is at {kept}: move it into place, or rerun "
                                "with --force (force=True) to replace OUT")

    def discard(self) -> None:
        """Remove the work directory (the conversion failed); OUT is untouched."""
        if not self.published:
            shutil.rmtree(self.work, ignore_errors=True)


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _tidy(out: Path) -> None:
    """Finish what dead runs on this host left beside ``out`` (module docstring)."""
    if not out.parent.is_dir():
        return
    for entry in sorted(out.parent.iterdir()):
        m = _LEFTOVER.match(entry.name)
        if m is None or m["name"] != out.name or not entry.is_dir():
            continue
        if m["host"] != _HOST or _pid_alive(int(m["pid"])):
            log.warning("%s belongs to a %s conversion (pid %s on %s); leaving it alone", entry,
                        "running" if m["host"] == _HOST else "possibly running", m["pid"], m["host"])
            continue
        if m["kind"] == "old" and not os.path.lexists(out):
            rename_noreplace(entry, out)
            log.warning("restored %s from %s: a conversion died while replacing it", out, entry.name)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by a conversion that died", entry)
