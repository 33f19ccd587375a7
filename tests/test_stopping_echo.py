"""stop_raises: the launcher's echo of a stop must not kill the process on its way out."""
import os
import signal
import subprocess
import sys
import time

import pytest

from siasam_fast import stopping
from siasam_fast.stopping import Stopped, stop_raises

CHILD = """
import os, signal, subprocess, sys, time
from siasam_fast.stopping import Stopped, stop_raises
NUM = int(sys.argv[1])
try:
    with stop_raises():
        # the group's signal, then the launcher passing it on 50 ms later
        subprocess.Popen(["sh", "-c", f"sleep 0.05; kill -{NUM} {os.getpid()}"])
        os.kill(os.getpid(), NUM)
        time.sleep(5)
except Stopped as stopped:
    time.sleep(0.5)  # the way out (printing, closing loaders, destroying the group)
    print("stopped by", stopped.name)
    sys.exit(stopped.exit_status)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_an_echoed_stop_signal_gives_one_line_and_its_status(sig):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(int(sig))], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 128 + sig, proc.stderr
    assert proc.stdout.strip() == f"stopped by {sig.name}" and "Traceback" not in proc.stderr


def test_a_second_signal_while_the_first_unwinds_is_ignored_and_handlers_come_back():
    before = {n: signal.getsignal(getattr(signal, n)) for n in stopping.STOP_SIGNALS}
    with stop_raises():
        with pytest.raises(Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # on the way out (closing loaders): no new Stopped
        time.sleep(0.05)
    assert {n: signal.getsignal(getattr(signal, n)) for n in stopping.STOP_SIGNALS} == before
    with stop_raises():
        pass
    assert {n: signal.getsignal(getattr(signal, n)) for n in stopping.STOP_SIGNALS} == before


def test_after_a_stop_a_later_ctrl_c_stops_at_once_and_a_later_sigterm_does_not(monkeypatch):
    monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.05)
    before = {n: signal.getsignal(getattr(signal, n)) for n in stopping.STOP_SIGNALS}
    try:
        with pytest.raises(Stopped), stop_raises():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        time.sleep(0.1)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's SIGKILL ends that grace period
            time.sleep(0.05)
        except KeyboardInterrupt:
            pytest.fail("a later SIGTERM stopped at once")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)
