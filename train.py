"""Train SiaSamRea: `deepspeed train.py --deepspeed_config configs/ds/zero2_fp16.json --config ...`.

Also `python train.py --config configs/synthetic.yaml` (one process, no launcher, CPU or GPU) and
`torchrun --nproc_per_node 2 train.py ...`. The loop lives in siasam_fast/training.py (so that
`siasam-fast train`, the demo and the benchmarks run the same code): deepspeed.add_config_arguments,
deepspeed.initialize, engine.backward / engine.step, evaluation, checkpoints and exact resume.
"""

import sys

from siasam_fast.training import main

if __name__ == "__main__":
    sys.exit(main())
