"""siasam_fast.stopping: stop signals become a flag, repeats from launchers are one stop, and loader
workers leave the signals to their main process."""

import os
import signal
import subprocess
import sys
import time

import pytest

from siasam_fast import stopping
from siasam_fast.stopping import StopRequest


def test_a_signal_asks_for_a_stop_and_the_old_handlers_come_back(capsys):
    before = {name: signal.getsignal(getattr(signal, name)) for name in stopping.STOP_SIGNALS}
    with StopRequest() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(2) and stop.signal == "SIGUSR1"
        assert stop.exit_status == 128 + signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher passing the same stop on: no effect
        assert stop.signal == "SIGUSR1"
    assert {name: signal.getsignal(getattr(signal, name)) for name in stopping.STOP_SIGNALS} == \
        before
    assert "SIGUSR1: stopping after this step with a checkpoint" in capsys.readouterr().err


def test_ctrl_c_twice_stops_at_once_but_an_echo_does_not(monkeypatch):
    monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.2)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within the window: the launcher's echo
        assert stop.signal == "SIGINT" and stop.exit_status == 130
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest


def test_several_processes_wait_for_the_agreed_step():
    """Without a group to ask (world > 1), only the agreed steps read the flag: the others say
    nothing, whatever the flag."""
    stop = StopRequest(world_size=2, check_every=10)
    stop.signal = "SIGTERM"
    assert not stop.should_stop(7)


def test_loader_workers_leave_stop_signals_to_the_main_process():
    """A worker ignores SIGINT and SIGUSR1, outlives a SIGTERM by the grace period (its main
    process may still need the batch it is making), then exits with status 0 (PyTorch reports a
    worker killed by a signal as an error)."""
    code = ("import os, signal, time\n"
            "from siasam_fast import stopping\n"
            "stopping.WORKER_GRACE_S = 1.0\n"
            "stopping.defer_stop_signals(0)\n"
            "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):\n"
            "    os.kill(os.getpid(), s)\n"
            "time.sleep(0.3)\n"
            "print('still here', flush=True)\n"
            "time.sleep(30)\n"
            "print('not ended')\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "still here" in out.stdout and "not ended" not in out.stdout
    assert time.monotonic() - start < 20
