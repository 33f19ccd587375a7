"""The environment of the command-line runs that tests start in child processes."""

import os

DISTRIBUTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cpu_env(*, drop: tuple[str, ...] = (), **values: str) -> dict:
    """This process's environment for a CPU child: DeepSpeed's CPU accelerator, unbuffered output,
    no distributed variables left over (the child starts its own process group), ``values`` on
    top and the ``drop`` variables removed."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **values}
    for key in (*DISTRIBUTED, *drop):
        env.pop(key, None)
    return env
