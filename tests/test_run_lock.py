"""One training at a time in a run folder: the lock of ``train.out_dir`` (siasam_fast.paths
.lock_folder), its holder named in the refusal, freed when the holder dies, skipped with a warning
where the file system takes no lock; and a training refused before it touches the folder."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_env import cpu_env

from siasam_fast import paths
from siasam_fast.paths import LOCK_FILE, lock_folder

ROOT = Path(__file__).resolve().parent.parent
HOLD = ("import sys, time\nfrom siasam_fast.paths import lock_folder\n"
        "lock = lock_folder(sys.argv[1], 'train.out_dir')\nprint('held', flush=True)\n"
        "time.sleep(300)\n")


@pytest.fixture
def holder():
    """Start a process that takes a folder's lock and keeps it: holder(folder) -> the process
    (killed at the end of the test)."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "--job", "x"],
                                cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_holder_is_refused_with_the_first_named_until_it_is_killed(tmp_path, holder):
    run = tmp_path / "run"
    proc = holder(run)
    with pytest.raises(ValueError) as refused:
        lock_folder(run, "train.out_dir")
    message = str(refused.value)
    assert message.startswith(f"train.out_dir={str(run)!r} is in use by another training (pid "
                              f"{proc.pid} on {socket.gethostname()}, since 20")
    assert "UTC: -c " in message and "--job x" in message and "\n" not in message
    assert message.endswith("wait for it to end, stop it, or choose another train.out_dir")
    # SIGKILL: no clean-up ran (its lock file is left), but the kernel freed the lock.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / LOCK_FILE).is_file()
    lock = lock_folder(run, "train.out_dir")
    assert f'"pid": {os.getpid()}' in (run / LOCK_FILE).read_text()
    lock.release()
    assert run.is_dir() and not (run / LOCK_FILE).exists()  # not made by this lock: kept


def test_a_released_lock_leaves_nothing_behind(tmp_path):
    run = tmp_path / "new" / "run"
    lock = lock_folder(run, "train.out_dir")
    assert (run / LOCK_FILE).is_file()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # the folders it made, still empty, are gone
    lock = lock_folder(tmp_path, "train.out_dir")
    (tmp_path / "kept.txt").write_text("x")
    lock.release()
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys, code):
    def no_flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(paths.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    lock = lock_folder(run, "train.out_dir")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: train.out_dir={str(run)!r}: its "
                                                   "file system takes no file locks")
    assert os.strerror(code) in err and lock.fd is None and not (run / LOCK_FILE).exists()
    lock.release()
    assert not run.exists()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("launcher, extra", [
    ([], ["--resume", "auto"]),
    (["-m", "torch.distributed.run", "--nproc_per_node", "2"], ["--set", "train.overwrite=true"]),
], ids=["one-process-resume", "torchrun-2-overwrite"])
def test_a_training_on_a_held_folder_stops_before_touching_it(tmp_path, holder, launcher, extra):
    """Another training holds the folder: this one (every process of it) stops with one line,
    before it reads its checkpoint, sets the run aside or opens the logs."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step2").mkdir(parents=True)
    (run / "checkpoints" / "step2" / "run_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step2\n")
    for name in ("metrics_steps.csv", "metrics_epochs.csv"):
        (run / name).write_text("step,loss\n1,2.0\n2,1.5\n")
    (run / "config.json").write_text("{}")
    proc = holder(run)
    before = _snapshot(run)
    manifest = tmp_path / "manifest.jsonl"  # (checked first, for being there only)
    manifest.write_text("")
    port = ["--master_port", str(_free_port())] if launcher else []
    cmd = [sys.executable, *launcher, *port, "train.py", "--config", "configs/synthetic.yaml",
           "--set", f"train.out_dir={run}", "--set", f"data.manifest={manifest}", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(line == errors[0] for line in errors), done.stderr[-3000:]
    assert len(errors) == (2 if launcher else 1), done.stderr[-4000:]  # every process stopped
    assert errors[0].startswith(f"error: train.out_dir={str(run)!r} is in use by another "
                                f"training (pid {proc.pid} on {socket.gethostname()}, since")
    assert done.returncode == (1 if launcher else 2)  # torchrun: 1 for any failed worker
    if not launcher:  # (torchrun prints a traceback of its own for a failed worker)
        assert "Traceback" not in done.stderr
    assert _snapshot(run) == before and not list(run.glob("replaced-*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FORK_AND_DIE = ("import os, signal, sys, time\nfrom siasam_fast.paths import lock_folder\n"
                "lock = lock_folder(sys.argv[1], 'train.out_dir')\nchild = os.fork()\n"
                "if child == 0:\n    null = os.open(os.devnull, os.O_RDWR)\n"
                "    os.dup2(null, 1)\n    os.dup2(null, 2)\n    time.sleep(60)\n    os._exit(0)\n"
                "print(child, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")


def test_a_forked_child_does_not_keep_the_lock_of_its_killed_parent(tmp_path):
    """A data-loading worker (forked) outlives its training process's SIGKILL by seconds (up to
    30 s after a SIGTERM): it must not lock a restarted training out, naming a dead pid."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FORK_AND_DIE, str(run)], cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=60)
    child = int(proc.stdout.split()[0])
    try:
        os.kill(child, 0)  # still alive
        lock = lock_folder(run, "train.out_dir")  # refused before: the child held the lock
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_forked_child_leaves_its_parents_lock_held(tmp_path):
    run = tmp_path / "run"
    lock = lock_folder(run, "train.out_dir")
    child = os.fork()
    if child == 0:  # closes its copy of the lock, and releasing does nothing here
        lock.release()
        os._exit(0 if (run / LOCK_FILE).exists() else 1)
    assert os.waitpid(child, 0)[1] == 0
    with pytest.raises(ValueError, match="is in use by another training"):
        lock_folder(run, "train.out_dir")
    lock.release()
    assert not run.exists()


def test_a_lock_file_removed_by_its_previous_holder_is_not_the_one_held(tmp_path, monkeypatch):
    """The holder before this one removes its lock file while releasing it: a lock taken on that
    removed file would lock nothing (the next training opens a new file at the path). The lock
    is taken again on the file now at the path, and its holder's line replaces what was there."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"command": "x" * 500}) + "\n")  # a longer line
    real_flock, calls = paths.fcntl.flock, []

    def flock_after_a_release(fd, operation):
        calls.append(fd)
        if len(calls) == 1:  # the previous holder's release, just before this lock
            (run / LOCK_FILE).unlink()
        return real_flock(fd, operation)

    monkeypatch.setattr(paths.fcntl, "flock", flock_after_a_release)
    lock = lock_folder(run, "train.out_dir")
    assert len(calls) == 2
    assert os.path.samestat(os.fstat(lock.fd), os.stat(run / LOCK_FILE))
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    (run / LOCK_FILE).write_text(json.dumps({"command": "x" * 500}) + "\n")  # a killed holder's
    monkeypatch.setattr(paths.fcntl, "flock", real_flock)
    lock = lock_folder(run, "train.out_dir")
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()  # one line, whole
    lock.release()


def test_the_holders_line_reaches_the_file_server_before_the_lock_is_used(tmp_path, monkeypatch):
    """On NFS a write stays in the writer's page cache until close, fsync or writeback (up to
    ~30 s): a training refused from another node in that time would read an empty lock file
    ("its holder has not written its name yet"). The held file, never closed, is fsync'ed."""
    synced = []
    real_fsync = paths.os.fsync
    monkeypatch.setattr(paths.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    lock = lock_folder(tmp_path / "run", "train.out_dir")
    assert lock.fd in synced
    lock.release()
