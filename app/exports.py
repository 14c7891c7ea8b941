"""Download zips, written only where no other user can plant a file and never reused by name.

Every app process gets one private directory (`tempfile.mkdtemp`: a fresh random name, mode 0700,
removed at exit). Each zip is created with O_EXCL|O_NOFOLLOW in its own fresh sub-directory; the cache maps
(run, what) to the file this process wrote and reuses it only while that exact file (same inode, size
and mtime, not a link) is still there. Sources are opened with O_NOFOLLOW, so a link swapped in after
the check is not followed either."""
from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Iterable, Optional


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PrivateExports:
    def __init__(self):
        self._dir: Optional[Path] = None
        self._made: dict[tuple, tuple[str, tuple]] = {}  # (run_id, what) -> (path, identity)
        self._lock = threading.Lock()

    def directory(self) -> Path:
        """This process's private export dir (created on first use, 0700, fresh random name)."""
        with self._lock:
            d = self._dir
            if d is None or not _is_private_dir(d):
                d = Path(tempfile.mkdtemp(prefix="vq4dit-exports-"))
                atexit.register(shutil.rmtree, d, True)
                self._dir, self._made = d, {}
            return d

    def cached(self, key: tuple) -> Optional[str]:
        hit = self._made.get(key)
        if hit is None:
            return None
        path, ident = hit
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return path if stat.S_ISREG(st.st_mode) and _identity(st) == ident else None

    def write_zip(self, key: tuple, run: Path, arc_prefix: str, rel_files: Iterable[str]) -> str:
        """Zip the regular files `run/rel` (links and files outside `run` skipped) into a new file."""
        hit = self.cached(key)
        if hit:
            return hit
        # a fresh sub-directory per zip keeps the download's name plain (RUN-what.zip) and never reused
        sub = tempfile.mkdtemp(prefix="z", dir=self.directory())
        path = os.path.join(sub, f"{arc_prefix}-{key[1]}.zip")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as z:
                for rel in rel_files:
                    data = read_regular_file(run, rel)
                    if data is not None:
                        z.writestr(f"{arc_prefix}/{rel}", data)
            os.chmod(path, 0o600)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
        self._made[key] = (path, _identity(os.lstat(path)))
        return path


def _is_private_dir(d: Path) -> bool:
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def read_regular_file(root: Path, rel: str) -> Optional[bytes]:
    """Bytes of `root/rel` if every component below `root` is a real directory / regular file (no links)."""
    parts = Path(rel).parts
    cur = Path(root)
    for p in parts[:-1]:
        cur = cur / p
        try:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                return None
        except OSError:
            return None
    try:
        fd = os.open(cur / parts[-1], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read()
