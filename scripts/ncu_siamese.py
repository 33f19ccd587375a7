"""Run the fused siamese loss (forward + backward) a few times at one shape, for a profiler:

    ncu -k regex:_siamese --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats python3 scripts/ncu_siamese.py --V 4096 --D 768 --K 4096

The first call compiles (and is skipped by --launch-skip 2: one forward and one backward launch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_kernels import DTYPES, N_CLIPS, make_inputs  # noqa: E402

from siasam_fast.siamese import siamese_loss  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--V", type=int, default=4096)
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_siamese.py profiles the Triton kernels: it needs a CUDA GPU")
    f, z, t1, t2, m = make_inputs(args.V, N_CLIPS, args.D, args.K, DTYPES[args.dtype], "cuda")
    for _ in range(args.repeats):
        for x in (f, z, t1, t2):
            x.grad = None
        siamese_loss(f, z, t1, t2, clip_mask=m, impl="triton").backward()
    torch.cuda.synchronize()
    print(f"ran {args.repeats} x forward + backward at V={args.V} N={N_CLIPS} D={args.D} "
          f"K={args.K} {args.dtype}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
