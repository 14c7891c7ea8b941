"""Filesystem guards: every writer in vq4dit writes to a temp file or dir and renames it into place.

- `check_replace_target(out, marker, protect)`: an existing OUT may only be replaced when it holds
  a previous vq4dit output (its marker file) and is not an input model, the working directory or
  one of its parents.
- `replace_dir(tmp, out)`: put a fully written temp dir at OUT. At every moment OUT holds the complete
  old or the complete new content, or the old one sits in `.OUT.vq4dit-backup`, which
  `recover_backup(out)` (called before every write) restores.
- `temp_dir_for(out)`: the temp dir next to OUT; stale ones of dead processes are removed.
- `atomic_file(path, overwrite=True)`: a temp path next to a file, renamed (or, no-clobber, linked) onto it.
- `check_writable(path)`: probe a directory before hours of compute.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

BACKUP_SUFFIX = ".vq4dit-backup"
_TMP_RE = re.compile(r"^\.(?P<name>.+)-tmp(?P<pid>\d+)-[^/]*$")


def _abs(p) -> Path:
    """Absolute path without resolving links ('.' and 'a/..' get a real name)."""
    return Path(os.path.abspath(p))


def backup_path(out: Path) -> Path:
    out = _abs(out)
    return out.with_name(f".{out.name}{BACKUP_SUFFIX}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a temp dir or lock named after it is then not stale)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_temps(out: Path):
    """Remove `.OUT-tmpPID-*` dirs (and `.OUT.tmpPID` files) left by processes that no longer run."""
    out = _abs(out)
    parent = out.parent
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        m = _TMP_RE.match(p.name)
        if m and m.group("name") == out.name and not pid_alive(int(m.group("pid"))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass


def recover_backup(out: Path) -> Optional[str]:
    """Finish an interrupted replace. Returns what was done ("restored", "removed") or None."""
    out = _abs(out)
    bak = backup_path(out)
    if not bak.exists():
        return None
    if out.exists():  # the new output was renamed into place: the backup is obsolete
        shutil.rmtree(bak, ignore_errors=True)
        return "removed"
    os.replace(bak, out)
    return "restored"


def temp_dir_for(out: Path) -> Path:
    """A fresh temp dir next to OUT (same filesystem, so the final rename is atomic)."""
    out = _abs(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_backup(out)
    clean_stale_temps(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp{os.getpid()}-", dir=out.parent))


@contextmanager
def atomic_file(path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path next to `path` (same filesystem); when the block succeeds it is renamed onto
    `path`, so readers see the old file or the new one, never half of one. On any error, or an
    interrupt, the temp file is removed and `path` is untouched. overwrite=False never replaces a
    file: the temp file is hard-linked into place, which raises FileExistsError if `path` exists.

        with atomic_file(out) as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a link, an error or an interrupt (a no-op after a replace)


def replace_dir(tmp: Path, out: Path):
    """Rename the complete dir `tmp` to `out`, replacing an old `out` without a moment of nothing.

    Order: old OUT -> backup, tmp -> OUT, delete backup. If the second rename fails, the backup is
    renamed back; if the process dies in between, `recover_backup` restores it on the next run.
    """
    tmp, out = Path(tmp), _abs(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    bak = backup_path(out)
    if bak.exists():
        shutil.rmtree(bak)
    os.replace(out, bak)
    try:
        os.replace(tmp, out)
    except BaseException:
        if not out.exists():
            os.replace(bak, out)
        raise
    shutil.rmtree(bak, ignore_errors=True)


def _is_same_or_parent(a: Path, b: Path) -> bool:
    """True when a == b or a is an ancestor of b (both resolved)."""
    return a == b or a in b.parents


def check_replace_target(out, marker: str, protect: Iterable = (), what: str = "vq4dit output"):
    """Raise unless an existing `out` is a directory holding `marker` (a previous vq4dit output)
    that is neither a protected path (e.g. the input model), nor contains one, nor is the working
    directory or a parent of it. A missing `out` is fine."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    r = out.resolve()
    if out.is_symlink():
        raise FileExistsError(f"refusing to replace {out}: it is a symbolic link")
    cwd = Path.cwd().resolve()
    if _is_same_or_parent(r, cwd):
        raise FileExistsError(f"refusing to replace {out}: it is the working directory or one of its parents")
    for p in protect:
        if p is None:
            continue
        pr = Path(p).resolve()
        if _is_same_or_parent(r, pr):
            raise FileExistsError(f"refusing to replace {out}: it is (or contains) the input model {p}")
    if not out.is_dir():
        raise FileExistsError(f"refusing to replace {out}: it is a file, not a previous {what}")
    if not (out / marker).is_file():
        raise FileExistsError(f"refusing to replace {out}: it is not a previous {what} (no {marker} in it)")


def check_writable(directory) -> None:
    """Create `directory` if needed and prove a file can be written there (clear error otherwise)."""
    d = Path(directory)
    blocker = next((a for a in (d, *d.parents) if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise PermissionError(f"cannot write to {d}: {blocker} is a file, not a directory (pick another path)")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".write-probe-tmp{os.getpid()}-", dir=d)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise PermissionError(f"cannot write to {d}: {e.strerror or e}") from None


LOCK_SUFFIX = ".vq4dit-lock"


class output_lock:
    """Claim OUT for this process before any work: `.OUT.vq4dit-lock` (created O_EXCL, holding the pid).
    A second process on the same OUT fails at start instead of after hours of compute (or racing the
    first one's rename); a lock of a dead process is taken over."""

    def __init__(self, out):
        out = _abs(out)
        self.out, self.path = out, out.with_name(f".{out.name}{LOCK_SUFFIX}")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid_alive(pid):
                    raise FileExistsError(f"another vq4dit process (pid {pid}) is writing {self.out}: wait for it "
                                          f"to finish or pick another --out") from None
                try:
                    self.path.unlink()  # the lock of a process that no longer runs
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise FileExistsError(f"could not claim {self.out}: another process keeps creating {self.path}")

    def __exit__(self, *exc):
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass
        return False
