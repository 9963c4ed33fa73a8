"""A FUSE file system that loses every write not yet fsynced when told "cut", as a power cut does.

The power-cut test runs the daemon with its state_dir on this file system to prove
that whatever edgehook acknowledged (an MQTT PUBACK, a hook's 2xx) was on stable
storage at that moment. A plain ``kill -9`` cannot show that: the kernel's page cache
survives a process crash, so an acknowledged commit that was never fsynced still
reaches the disk. Here the "page cache" is this process's memory, and the "disk" is a
backing directory. (The idea is that of Jepsen's LazyFS, written here afresh in Python.)

Data. Every write goes to an in-memory overlay of 4 KiB pages kept per file (per
backing inode, so it follows renames and is shared by every open handle); reads see
the overlay over the backing file. ``fsync``/``fdatasync`` of a file writes that
file's overlay (its pages and its size) to the backing file, fsyncs it, and forgets
the overlay. ``truncate``/``ftruncate`` change only the overlay's size, so they are
data, lost at a cut unless fsynced, like the writes around them. ``close`` makes
nothing durable. Shared ``mmap`` works (SQLite's ``-shm`` file): the kernel hands its
dirty pages to ``write`` like any other write.

Namespace. ``create``, ``mkdir``, ``unlink``, ``rmdir``, ``rename``, ``link``,
``symlink``, ``chmod``, ``chown`` and ``utimens`` are applied to the backing directory
at once and so count as durable from the moment they return: a cut never undoes them,
and a directory fsync has nothing left to do. That is kinder than a real file system
(a rename that was not followed by a directory fsync can be lost), so this finds lost
*data*, not lost directory entries. A file created and written but never fsynced comes
back after a cut as an empty file.

Cut. The control socket's ``cut`` command drops every overlay (every write since each
file's last fsync) and freezes the file system: each later operation but a close fails
with EIO, as the disk of a machine without power would. The test then unmounts, and a "reboot" is a
new mount over the same backing directory, which holds exactly what was fsynced. The
``status`` command tells how many pages of each file are unsynced, so that a test can
pull the plug at the moment that hurts most.

POSIX and ``flock`` locks are left to the kernel (no lock operation is implemented),
which keeps them correct between the processes on this one machine. All operations
run under one lock: simple, and fast enough for the few thousand operations a second
a test makes.

Run: ``python tests/lazyfs.py BACKING MOUNTPOINT --control SOCKET`` (foreground; needs
fusepy and libfuse 2, and root or fusermount). :class:`LazyMount` does that for a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import importlib.util
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096
MOUNT_TIMEOUT = 10.0


def missing() -> str | None:
    """Why this machine cannot mount a lazyfs (None when it can)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel or container)"
    if ctypes.util.find_library("fuse") is None:
        return "libfuse 2 is not installed (apt-get install -y libfuse2)"
    if importlib.util.find_spec("fuse") is None:
        return "fusepy is not installed (it is in the test extras: pip install -e '.[test]')"
    if os.geteuid() != 0 and shutil.which("fusermount") is None:
        return "not root and no fusermount to mount with (apt-get install -y fuse)"
    return None


# --------------------------------------------------------------------------- the file system

@dataclass
class _Overlay:
    """A file's writes since its last fsync: what a power cut loses."""

    name: str  # the file's path when last written (for status)
    size: int  # the size readers see
    floor: int  # backing bytes at or beyond this were truncated away: they read as zeros
    pages: dict[int, bytearray] = field(default_factory=dict)


def _backing_page(fd: int, index: int, floor: int) -> bytearray:
    """Page `index` as the backing file holds it, zeros past EOF and past `floor`."""
    start = index * PAGE
    data = bytearray(os.pread(fd, PAGE, start)) if start < floor else bytearray()
    keep = max(0, min(len(data), floor - start))
    del data[keep:]
    data.extend(bytes(PAGE - len(data)))
    return data


class LazyFS:
    """Passthrough to a backing directory, with unsynced data held in memory (see module doc).

    Subclasses nothing of fusepy's so that only the operations defined here are
    registered with libfuse (an unregistered ``lock`` leaves locking to the kernel).
    """

    use_ns = True

    def __init__(self, backing: str, control: str | None = None,
                 fsync_delay: float = 0.0) -> None:
        self.root = os.path.realpath(backing)
        self.control = control
        self.fsync_delay = fsync_delay
        self.frozen = False
        self._lock = threading.RLock()
        self._overlays: dict[tuple[int, int], _Overlay] = {}
        self._fds: dict[int, tuple[int, tuple[int, int]]] = {}  # fh -> (backing fd, key)
        self._next_fh = 1

    # -- plumbing
    def __call__(self, op: str, *args: Any) -> Any:
        """Dispatch one FUSE operation (fusepy's entry point), serialised and frozen-aware.

        fusepy answers any OSError with its errno, so the ``os`` calls' errors pass through.
        An fsync first waits `fsync_delay` (other operations go on meanwhile), as a slow
        card does; a cut during that wait loses what it was about to make durable.
        """
        if op == "fsync" and self.fsync_delay:
            time.sleep(self.fsync_delay)
        with self._lock:
            if self.frozen and op not in ("destroy", "flush", "release"):
                raise OSError(errno.EIO, "the power is off")
            return getattr(self, op)(*args)

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int]:
        return (st.st_dev, st.st_ino)

    def _overlay(self, key: tuple[int, int], backing_size: int, path: str | None) -> _Overlay:
        ov = self._overlays.get(key)
        if ov is None:
            ov = self._overlays[key] = _Overlay(path or "?", backing_size, backing_size)
        elif path:
            ov.name = path
        return ov

    def _forget_if_gone(self, key: tuple[int, int], nlink: int) -> None:
        """Drop the overlay of an inode that has no name and no open handle left."""
        if nlink == 0 and not any(k == key for _fd, k in self._fds.values()):
            self._overlays.pop(key, None)

    def _open_fd(self, fd: int) -> int:
        key = self._key(os.fstat(fd))
        fh = self._next_fh
        self._next_fh += 1
        self._fds[fh] = (fd, key)
        return fh

    # -- lifecycle and control
    def init(self, path: str) -> None:
        """Start the control socket once the file system is mounted."""
        if self.control:
            threading.Thread(target=self._serve_control, daemon=True).start()

    def _serve_control(self) -> None:
        assert self.control is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.control + ".tmp")
        srv.listen(4)
        os.rename(self.control + ".tmp", self.control)  # appears only once it listens
        while True:
            conn, _ = srv.accept()
            with conn:
                command = conn.makefile("r").readline().strip()
                conn.sendall((self.command(command) + "\n").encode())

    def command(self, command: str) -> str:
        """Run one control command and answer in JSON.

        ``status``: the unsynced pages per file; ``cut``: the same, then drop them all
        and freeze (every later operation fails with EIO).
        """
        with self._lock:
            unsynced: dict[str, int] = {}
            for ov in self._overlays.values():
                unsynced[ov.name] = unsynced.get(ov.name, 0) + len(ov.pages)
            answer = {"frozen": self.frozen, "unsynced_pages": unsynced}
            if command == "cut":
                self._overlays.clear()
                self.frozen = True
            elif command != "status":
                answer = {"error": f"unknown command {command!r}"}
            return json.dumps(answer)

    def destroy(self, path: str) -> None:
        """Close what is still open at unmount (its unsynced data is simply lost)."""
        for fd, _key in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    # -- metadata
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        """lstat of the backing file, with the size the overlay says."""
        handle = self._fds.get(fh) if isinstance(fh, int) else None
        st = os.fstat(handle[0]) if handle else os.lstat(self._path(path))
        attrs = {name: getattr(st, name) for name in (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
            "st_mtime_ns", "st_ctime_ns", "st_blocks")}
        for name in ("st_atime", "st_mtime", "st_ctime"):
            attrs[name] = attrs.pop(name + "_ns")
        ov = self._overlays.get(self._key(st))
        if ov is not None and stat.S_ISREG(st.st_mode):
            attrs["st_size"] = ov.size
            attrs["st_blocks"] = (ov.size + 511) // 512
        return attrs

    def access(self, path: str, amode: int) -> None:
        if not os.access(self._path(path), amode):
            raise OSError(errno.EACCES, "access denied")

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._path(path))
        return {name: getattr(sv, name) for name in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_flag", "f_namemax")}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    # -- namespace: applied to the backing directory at once (durable)
    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._path(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        if times is None:
            os.utime(self._path(path), follow_symlinks=False)
        else:
            os.utime(self._path(path), ns=times, follow_symlinks=False)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._path(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._path(path))

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._path(target))

    def link(self, target: str, source: str) -> None:
        os.link(self._path(source), self._path(target))

    def unlink(self, path: str) -> None:
        st = os.lstat(self._path(path))
        os.unlink(self._path(path))
        self._forget_if_gone(self._key(st), st.st_nlink - 1)

    def rename(self, old: str, new: str) -> None:
        try:
            replaced: os.stat_result | None = os.lstat(self._path(new))
        except FileNotFoundError:
            replaced = None
        moved = os.lstat(self._path(old))
        os.rename(self._path(old), self._path(new))
        if replaced is not None and self._key(replaced) != self._key(moved):
            self._forget_if_gone(self._key(replaced), replaced.st_nlink - 1)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return self._open_fd(os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode))

    def open(self, path: str, flags: int) -> int:
        """Open the backing file read-write whatever the caller asked (the overlay reads it)."""
        fh = self._open_fd(os.open(self._path(path), os.O_RDWR))
        if flags & os.O_TRUNC:
            self.truncate(path, 0, fh)
        return fh

    def release(self, path: str | None, fh: int) -> None:
        """Close the handle; unsynced data stays in the overlay (close is not fsync)."""
        fd, key = self._fds.pop(fh)
        nlink = os.fstat(fd).st_nlink
        os.close(fd)
        self._forget_if_gone(key, nlink)

    def flush(self, path: str | None, fh: int) -> None:
        """Nothing to do: closing a file makes nothing durable."""

    # -- data: held in the overlay until fsync
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        fd, key = self._fds[fh]
        ov = self._overlays.get(key)
        if ov is None:
            return os.pread(fd, size, offset)
        end = min(offset + size, ov.size)
        out = bytearray()
        pos = offset
        while pos < end:
            index, skip = divmod(pos, PAGE)
            page = ov.pages.get(index)
            if page is None:
                page = _backing_page(fd, index, ov.floor)
            take = min(PAGE - skip, end - pos)
            out += page[skip:skip + take]
            pos += take
        return bytes(out)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        fd, key = self._fds[fh]
        ov = self._overlay(key, os.fstat(fd).st_size, path)
        pos, view = offset, memoryview(data)
        while view:
            index, skip = divmod(pos, PAGE)
            page = ov.pages.get(index)
            if page is None:
                page = ov.pages[index] = _backing_page(fd, index, ov.floor)
            take = min(PAGE - skip, len(view))
            page[skip:skip + take] = view[:take]
            view = view[take:]
            pos += take
        ov.size = max(ov.size, offset + len(data))
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        if isinstance(fh, int) and fh in self._fds:
            fd, key = self._fds[fh]
            st = os.fstat(fd)
        else:
            assert path is not None
            st = os.lstat(self._path(path))
            key = self._key(st)
        ov = self._overlay(key, st.st_size, path)
        if length < ov.size:
            ov.floor = min(ov.floor, length)
            index, skip = divmod(length, PAGE)
            for i in [i for i in ov.pages if i > index or (i == index and skip == 0)]:
                del ov.pages[i]
            if skip and index in ov.pages:
                ov.pages[index][skip:] = bytes(PAGE - skip)
        ov.size = length

    def fsync(self, path: str | None, datasync: int, fh: int) -> None:
        """Make this file's overlay durable: write it to the backing file and fsync that."""
        fd, key = self._fds[fh]
        ov = self._overlays.pop(key, None)
        if ov is not None:
            os.ftruncate(fd, min(ov.floor, os.fstat(fd).st_size))
            for index in sorted(ov.pages):
                start = index * PAGE
                if start < ov.size:
                    os.pwrite(fd, ov.pages[index][:min(PAGE, ov.size - start)], start)
            os.ftruncate(fd, ov.size)
        (os.fdatasync if datasync else os.fsync)(fd)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        """Nothing to do: namespace operations are durable at once (module doc)."""


def serve(backing: str, mountpoint: str, control: str | None, fsync_delay: float = 0.0) -> None:
    """Mount in the foreground until unmounted."""
    from fuse import FUSE

    FUSE(LazyFS(backing, control, fsync_delay), mountpoint, foreground=True, fsname="lazyfs",
         subtype="lazyfs")


# --------------------------------------------------------------------------- the test side

def mounted(path: Path) -> bool:
    """Whether something is mounted at `path`, asked of the kernel's table, not of the mount
    (a frozen lazyfs fails every lstat, which os.path.ismount takes for "not mounted")."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as table:
        for line in table:
            point = line.split()[1]
            for esc, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"),
                              ("\\134", "\\")):
                point = point.replace(esc, char)
            if point == target:
                return True
    return False


def _umount(path: str, flags: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return 0 if libc.umount2(path.encode(), flags) == 0 else ctypes.get_errno()


class LazyMount:
    """One lazyfs process mounted over `backing` at `mountpoint`; mount, cut, unmount, mount."""

    def __init__(self, backing: Path, mountpoint: Path, workdir: Path,
                 fsync_delay: float = 0.0) -> None:
        self.backing = backing
        self.fsync_delay = fsync_delay
        self.mountpoint = mountpoint
        self.control = workdir / "lazyfs.sock"
        self.log = workdir / "lazyfs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)

    def mount(self) -> LazyMount:
        """Mount (again: a "reboot" sees only what was fsynced) and wait until it serves."""
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.mountpoint),
                 "--control", str(self.control), "--fsync-delay", str(self.fsync_delay)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not (mounted(self.mountpoint) and self.control.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"lazyfs did not mount at {self.mountpoint}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.02)
        return self

    def command(self, command: str) -> dict[str, Any]:
        """Send one control command and return the file system's answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.control))
            s.sendall(command.encode() + b"\n")
            return json.loads(s.makefile("r").readline())

    def unsynced(self) -> dict[str, int]:
        """Pages written but not yet fsynced, per file (paths inside the mount)."""
        return self.command("status")["unsynced_pages"]

    def cut(self) -> dict[str, int]:
        """Drop every write not yet fsynced and fail everything after (power off).

        Returns the unsynced pages per file that the cut dropped.
        """
        return self.command("cut")["unsynced_pages"]

    def unmount(self, timeout: float = 10.0) -> None:
        """Unmount and wait for the process to end (lazily if something still holds it)."""
        if mounted(self.mountpoint):
            mp = os.path.realpath(self.mountpoint)
            if os.geteuid() == 0:
                if _umount(mp) != 0:
                    _umount(mp, 2)  # MNT_DETACH
            else:
                subprocess.run(["fusermount", "-u", "-z", mp], check=False)
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
            self.proc = None

    def __enter__(self) -> LazyMount:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def main(argv: list[str] | None = None) -> None:
    """Command line: mount BACKING at MOUNTPOINT until unmounted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--control", help="Unix socket for the cut and status commands")
    parser.add_argument("--fsync-delay", type=float, default=0.0, metavar="SECONDS",
                        help="how long each fsync takes (an SD card's is milliseconds)")
    args = parser.parse_args(argv)
    serve(args.backing, args.mountpoint, args.control, args.fsync_delay)


if __name__ == "__main__":
    main()
