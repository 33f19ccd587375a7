"""The environment of the command-line runs that tests start in child processes."""

import os
import time
from pathlib import Path

DISTRIBUTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cpu_env(*, drop: tuple[str, ...] = (), **values: str) -> dict:
    """This process's environment for a CPU child: DeepSpeed's CPU accelerator, unbuffered output,
    no distributed variables left over (the child starts its own process group), ``values`` on
    top and the ``drop`` variables removed."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **values}
    for key in (*DISTRIBUTED, *drop):
        env.pop(key, None)
    return env


def ended(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` ends within ``within_s`` seconds: gone, or a zombie that nobody
    reaps (a container's PID 1 may not; a zombie still answers kill(0))."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False
