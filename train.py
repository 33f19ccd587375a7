"""Train SiaSamRea: `deepspeed train.py --deepspeed_config configs/ds/zero2_fp16.json --config ...`.

Also `python train.py --config configs/synthetic.yaml` (one process, no launcher, CPU or GPU) and
`torchrun --nproc_per_node 2 train.py ...`. The loop lives in siasam_fast/training.py (so that
`siasam-fast train`, the demo and the benchmarks run the same code): deepspeed.add_config_arguments,
deepspeed.initialize, engine.backward / engine.step, evaluation, checkpoints and exact resume.

The import stays under the main guard: DALI's reader processes start with spawn on a GPU and run
this file again (as ``__mp_main__``) before they read a byte; they need none of torch, DeepSpeed
or transformers, which would cost each of them seconds and ~0.4 GB.
"""

import sys

if __name__ == "__main__":
    try:
        from siasam_fast.training import main
    except KeyboardInterrupt:  # Ctrl-C while torch, DeepSpeed and transformers import: one line
        print("interrupted while starting: nothing was written", file=sys.stderr)
        sys.exit(130)

    sys.exit(main())
