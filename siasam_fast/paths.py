"""Small path checks shared by the commands that write folders, and the errors those commands
report as one line (no heavy imports)."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

# What a command reports as a one-line usage error (exit status 2): bad values and paths.
USAGE_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

# The repository's configs/ (run configs, configs/ds/ DeepSpeed configs): a wheel installs it as
# siasam_fast/configs/ (setup.py); an editable install reads it from the checkout.
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
CHECKOUT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def packaged_config(name: str | os.PathLike) -> Path:
    """The file ``name`` (e.g. "demo.yaml", "ds/zero2_fp32.json") of the configs shipped with the
    package: the installed copy, else the checkout's (that path, missing, if neither has it)."""
    for folder in (PACKAGE_CONFIGS, CHECKOUT_CONFIGS):
        if (folder / name).is_file():
            return folder / name
    return CHECKOUT_CONFIGS / name


def shipped_config(path: str | os.PathLike) -> Path:
    """A ``--config`` / ``--deepspeed_config`` path: itself if it exists; a relative
    ``configs/...`` path that does not exist here names the config shipped with the package, so
    the README's commands (``--config configs/synthetic.yaml``) run from any folder and from an
    installed wheel. A file of that name in the working folder comes first."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("configs",) or \
            len(path.parts) < 2:
        return path
    found = packaged_config(Path(*path.parts[1:]))
    return found if found.is_file() else path


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file (``folder`` itself or one of its parents) that stops ``folder`` being a folder,
    or None."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def check_output_file(path: str | os.PathLike, option: str, writable: bool = False) -> Path:
    """``path`` as a Path, or a ValueError naming ``option`` when no file can be written there:
    it is empty or a folder, or a file stands where one of its folders should be; ``writable``:
    also when the file (if it exists) cannot be opened for writing, or the nearest existing folder
    on its way takes no new file (tried with a probe file, removed at once: permissions alone
    pass /proc, /sys and read-only mounts for root). The file itself is neither created nor
    changed."""
    if not str(path):
        raise ValueError(f"{option} is empty; give a file path")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; give a file path")
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise ValueError(f"{option} {str(path)!r}: {str(blocker)!r} is a file, not a folder; "
                         "give a file path")
    if writable:
        target = path if path.exists() else next(p for p in path.absolute().parents
                                                  if p.exists())
        why = _not_writable(target)
        if why:
            raise ValueError(f"{option} {str(path)!r}: {str(target)!r} is not writable here "
                             f"({why})")
    return path


def _not_writable(target: Path) -> str:
    """Why nothing can be written at ``target`` (an existing file: opened for appending, nothing
    written; a folder: a probe file created and removed), or ""."""
    if not os.access(target, os.W_OK):
        return "no write permission"
    folder = target.is_dir()
    try:
        if folder:
            with tempfile.NamedTemporaryFile(dir=target, prefix=".siasam-probe-"):
                pass
        else:
            with open(target, "ab"):
                pass
    except OSError as err:  # /proc says "No such file or directory": say what was tried
        what = "creating a file in it" if folder else "opening it for writing"
        return f"{what} fails: {err.strerror or type(err).__name__}"
    return ""


def takes_new_files(folder: str | os.PathLike) -> bool:
    """Whether a new file can be made in ``folder`` (not made yet: its nearest existing parent),
    tried with a probe file as :func:`check_output_file` does."""
    folder = Path(folder).absolute()
    target = next(p for p in (folder, *folder.parents) if p.exists())
    return target.is_dir() and not _not_writable(target)


def json_nulls(value):
    """``value`` with NaN and infinite floats as None, for strict JSON files (``eval --json``,
    summary.json): a metric with no question to score, e.g. the accuracy of a split whose answers
    are all hidden, is NaN, which Python's json writes as the bare word NaN that JSON.parse and
    other readers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_nulls(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_nulls(item) for item in value]
    return value


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed over it: a write cut
    short (a kill, a full disk) leaves the previous version, never half a file. ``durable``: the
    file's bytes reach the disk before the rename, and the rename before this returns (a power
    loss then leaves the old version or the new one, never an empty file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_path(path.parent)
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') writes to the disk. A file system that cannot
    sync a folder (some network mounts answer EINVAL) is left to its own guarantees."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (Path(path).is_dir() and err.errno in (errno.EINVAL, errno.EBADF, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """:func:`fsync_path` on every file and folder under ``root``, ``root`` last. A file gone
    meanwhile is skipped: other processes write into the same folder (a checkpoint's ranks: their
    temporary files are renamed or removed while this walks)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            try:
                fsync_path(os.path.join(folder, name))
            except FileNotFoundError:
                pass
        fsync_path(folder)


# The lock file of a folder that one process at a time may write (a training's train.out_dir),
# and the errors of a file system that takes no flock (some NFS and Lustre mounts).
LOCK_FILE = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)
# The descriptors of the locks this process holds. A forked child (a DataLoader worker, DALI's
# readers) would share each lock (flock is per open file description) and keep it after its
# parent's SIGKILL, locking a restarted training out while naming a dead pid: children close them.
_HELD: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


class FolderLock:
    """An exclusive ``flock`` on a folder's :data:`LOCK_FILE`, held until :meth:`release` or the
    process's end (the kernel frees it even on a SIGKILL). ``fd`` is None where the file system
    takes no lock."""

    def __init__(self, path: Path, fd: int | None, made: list[Path]):
        self.path, self.fd, self.made = path, fd, made
        self.pid = os.getpid()  # a forked child holds nothing (its copy of fd is closed)
        if fd is not None:
            _HELD.add(fd)

    def release(self) -> None:
        """Remove the lock file (still held, so no one takes the lock of a file about to go) and
        free the lock; remove the folders the lock made if they are still empty (a failed start
        leaves nothing)."""
        if self.pid != os.getpid():
            return
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.made):
            try:
                folder.rmdir()
            except OSError:  # the run wrote into it
                break
        self.made = []


def _flock_soon(fd: int, tries: int = 5, every_s: float = 0.1) -> None:
    """The exclusive lock of ``fd``, tried a few times over half a second: a look at the folder
    (:func:`folder_holder`, `siasam-fast runs`) holds it shared for a moment; a training holds
    it for good (then BlockingIOError)."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(every_s)


def lock_folder(folder: str | os.PathLike, option: str) -> FolderLock:
    """Take the exclusive lock of ``folder`` (made if need be) and write who holds it (host, pid,
    start time, Slurm job, command) into its lock file. Another process holding it: a ValueError
    naming ``option``, the folder and the holder. A file system without locks: a warning, and a
    FolderLock that holds nothing."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    made = [p for p in (*reversed(folder.parents), folder) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _flock_soon(fd)
            except BlockingIOError:
                holder = os.read(fd, 65536).decode(errors="replace")
                os.close(fd)
                FolderLock(path, None, made).release()
                raise ValueError(f"{option}={str(folder)!r} is in use by another training "
                                 f"({_holder(holder)}): wait for it to end, stop it, or choose "
                                 f"another {option}") from None
            except OSError as err:
                os.close(fd)
                if err.errno not in NO_LOCKS:
                    raise
                path.unlink(missing_ok=True)
                print(f"warning: {option}={str(folder)!r}: its file system takes no file locks "
                      f"({err.strerror}): nothing stops another training from using the folder "
                      "at the same time", file=sys.stderr)
                return FolderLock(path, None, made)
            try:  # the lock of the file now at ``path``, not of one its holder just removed
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        lock = FolderLock(path, fd, made)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "slurm_job": os.environ.get("SLURM_JOB_ID"), "command": shlex.join(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode())
            # the file stays open: on NFS the line would reach the server (and a training
            # refused from another node) only at writeback, up to ~30 s later
            try:
                os.fsync(fd)
            except OSError:  # a file system that takes no fsync: the line is there all the same
                pass
        except BaseException:
            lock.release()
            raise
        return lock
    except OSError as err:
        FolderLock(path, None, made).release()
        raise ValueError(f"{option}={str(folder)!r}: cannot lock {str(path)!r} "
                         f"({err.strerror or err})") from None


def folder_holder(folder: str | os.PathLike) -> dict | None:
    """Who holds ``folder``'s lock (:func:`lock_folder`: a training running there), as its lock
    file names it ({} before it has written its name), or None when nobody does (no lock file,
    a lock left by a process that ended, a file system without locks)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (a training takes it at once or waits:
    except BlockingIOError:  # lock_folder tries again for a moment)
        try:
            return json.loads(os.read(fd, 65536).decode(errors="replace"))
        except ValueError:
            return {}
    except OSError:  # no locks on this file system
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(text: str) -> str:
    """The holder a lock file names, in words."""
    try:
        who = json.loads(text)
        command = " ".join(str(who["command"]).split())
        job = f", Slurm job {who['slurm_job']}" if who.get("slurm_job") else ""
        return (f"pid {who['pid']} on {who['host']}{job}, since {who['since']}: "
                f"{command[:160]}{'...' if len(command) > 160 else ''}")
    except (ValueError, TypeError, KeyError):
        return "its holder has not written its name yet"
