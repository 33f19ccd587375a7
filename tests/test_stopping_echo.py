"""stop_raises: the launcher's echo of a stop must not kill the process on its way out."""
import signal
import subprocess
import sys

import pytest

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
