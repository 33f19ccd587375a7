"""Fused siamese loss (Triton) vs the eager PyTorch reference vs torch.compile(reference).

    python benchmarks/bench_kernels.py                  # full sweep on a GPU (slow: many compiles)
    python benchmarks/bench_kernels.py --quick          # a few points + the two H100 targets
    python benchmarks/bench_kernels.py --check --quick  # verify every impl first (float64 oracle)
    python benchmarks/bench_kernels.py --interpret      # no GPU: CPU timings + interpreter check

Times forward, backward and forward+backward at N = 9 clips, sweeping V (videos), K (answers) and
D (feature size) for float16 / float32 / bfloat16, with ``triton.testing.do_bench`` medians and
20 / 80 % quantiles. Prints a table, writes CSV + PNG under benchmarks/results/ (device and versions
in every row) and reports the two H100 targets explicitly:
  A. V=64, N=9, D=768, K=1500, fp16, fwd+bwd: >= 5x faster than eager, >= 1.5x than torch.compile;
  B. V=4096, N=9, D=768, K=4096, fp16, fwd+bwd: within 2x of the memory floor at 3.0 TB/s.

Byte model (the least each call must move, in the inputs' dtype; theta, the mask and the per-video
statistics are under 0.1 % and left out):
  forward:            read z [V, N, K] and f [V, N, D]                      -> z + f
  backward, fwd+bwd:  read z and f once, write dz and df once               -> 2 (z + f)
The fused kernels read z twice in a training step (once in each direction), so their fwd+bwd
ceiling is about 2 / 3 of the copy bandwidth on logit-dominated shapes.

Without a GPU the script says so, times the reference on CPU at small sizes (eager, plus
torch.compile with --cpu-compile) and, with --interpret, runs a tiny Triton-interpreter
correctness pass. Timings on CPU say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from siasam_fast.benchutil import existing_file, positive_int  # noqa: E402
from siasam_fast.ds_config import has_bf16  # noqa: E402

N_CLIPS = 9
NOMINAL_COPY_TBPS = 3.0  # H100 80GB device-to-device copy, measured (shared/HARDWARE.md)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("triton", "eager", "compile", "compile-max")
MODES = ("fwd", "bwd", "full")
TARGET_A = dict(V=64, D=768, K=1500)
TARGET_B = dict(V=4096, D=768, K=4096)
# Launch settings swept at target B by --sweep-configs: grids joined by "|", each the cartesian
# product of its KEY=values lists; fwd_ / bwd_ keys tune one kernel, timed alone.
DEFAULT_GRID = (
    "fwd_acc_2d=0,1;fwd_anchor_2d=0,1;fwd_prefetch=0,1;fwd_block_k=128,256,512,1024;"
    "fwd_num_warps=4,8"
    "|bwd_anchor_2d=0,1;bwd_prefetch=0,1;bwd_block_k=256,512,1024;bwd_num_warps=4,8"
    "|bwd_anchor_2d=0,1;bwd_block_k=1024,2048;bwd_num_warps=16"
)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few sweep points and the two targets")
    p.add_argument("--dtypes", default="fp16,fp32,bf16", help="comma list of fp16, fp32, bf16")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, bwd, full")
    p.add_argument("--out", "--out-dir", default=None,
                   help="results folder (default benchmarks/results)")
    p.add_argument("--check", action="store_true", help="verify each impl vs float64 first")
    p.add_argument("--no-targets", action="store_true", help="skip the two H100 target rows")
    p.add_argument("--targets-only", action="store_true",
                   help="time only the two target shapes (for the slow compile-max)")  # fmt: skip
    p.add_argument("--interpret", action="store_true",
                   help="no GPU: also run a tiny Triton-interpreter correctness pass")  # fmt: skip
    p.add_argument("--cpu-compile", action="store_true", help="no GPU: also time torch.compile")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--sweep-configs", nargs="?", const=DEFAULT_GRID, default=None, metavar="GRID",
                   help="time the Triton loss at target B's shape under every launch config of "
                        f"GRID (default {DEFAULT_GRID!r}) and the built-in heuristic")  # fmt: skip
    p.add_argument("--compile-workers", type=positive_int, default=None,
                   help="--sweep-configs: processes compiling the grid's kernels in parallel "
                        "before the timing (default 8 on a GPU, 1 = compile as each config is "
                        "timed, the default without one)")  # fmt: skip
    p.add_argument("--combine", nargs="+", metavar="CSV", default=None, type=existing_file,
                   help="no timing: merge the timing CSVs of runs on one card into one table "
                        "(ms per impl, Triton's speed-ups) and report the targets")  # fmt: skip
    return p


def parse_args(argv=None):
    """The options, checked before any work: a bad value ends with argparse's error (status 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    for name, valid in (("dtypes", DTYPES), ("impls", IMPLS), ("modes", MODES)):
        text = getattr(args, name)
        values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        bad = [v for v in values if v not in valid]
        if bad:
            p.error(f"--{name} {','.join(bad)}: valid values are {', '.join(valid)}")
        if not values:
            p.error(f"--{name} {text!r}: give at least one of {', '.join(valid)}")
        setattr(args, name, values)
    if args.targets_only and args.no_targets:
        p.error("--targets-only and --no-targets exclude each other")
    if args.combine:
        return args
    cuda = torch.cuda.is_available()
    if args.targets_only and not cuda:
        p.error("--targets-only times the two H100 target shapes, which need a CUDA GPU "
                "(without one, leave it out to time the reference at small sizes)")  # fmt: skip
    if args.sweep_configs is not None:
        check_sweep_grid(p, args.sweep_configs, cuda, args.interpret)
    return args


def check_sweep_grid(p, grid, cuda, interpret):
    """Refuse --sweep-configs without a GPU or --interpret, and a bad GRID, naming the flag."""
    if not cuda and not interpret:
        p.error("--sweep-configs times the Triton kernels: it needs a CUDA GPU (or --interpret "
                "for a slow functional run)")  # fmt: skip
    try:
        configs = parse_grid(grid)
    except SystemExit as err:
        p.error(str(err))
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import Triton
    try:
        from siasam_kernels import siamese as ks
    except ImportError as err:
        p.error(f"--sweep-configs needs the Triton kernels (siasam_kernels): {err}")
    for cfg in configs:
        try:
            ks.config_override(config_text(cfg))
        except ValueError as err:
            p.error(f"--sweep-configs: {str(err).removeprefix(ks.CONFIG_ENV + ': ')}")


# ------------------------------------------------------------------------------------------------
# inputs, implementations, byte model


def make_inputs(V, N, D, K, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    f = torch.randn(V, N, D, generator=g).to(device=device, dtype=dtype)
    z = (3 * torch.randn(V, N, K, generator=g)).to(device=device, dtype=dtype)
    t1 = (0.1 * torch.randn(N, generator=g)).to(device)
    t2 = (0.1 * torch.randn(N, generator=g)).to(device)
    mask = (torch.rand(V, N, generator=g) > 0.1).to(device)
    for x in (f, z, t1, t2):
        x.requires_grad_()
    return f, z, t1, t2, mask


def make_impls(names, device_type):
    """name -> callable(f, z, t1, t2, mask) returning the mean loss."""
    from siasam_fast.siamese import siamese_loss, siamese_loss_reference

    impls = {}
    for name in names:
        if name == "triton":
            impls[name] = lambda f, z, t1, t2, m: siamese_loss(f, z, t1, t2, clip_mask=m,
                                                               impl="triton")  # fmt: skip
        elif name == "eager":
            impls[name] = lambda f, z, t1, t2, m: siamese_loss_reference(f, z, t1, t2, clip_mask=m)
        elif name in ("compile", "compile-max"):
            mode = "max-autotune" if name == "compile-max" else None
            compiled = torch.compile(siamese_loss_reference, mode=mode, dynamic=False)

            def call(f, z, t1, t2, m, compiled=compiled):
                if device_type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # max-autotune uses CUDA graphs
                return compiled(f, z, t1, t2, clip_mask=m)

            impls[name] = call
    return impls


def fresh_impls(names, device_type):
    """New wrappers with an empty torch.compile cache: every shape / dtype compiles for itself,
    and dynamo's recompile limit (8 per function) never silently sends a point back to eager."""
    if any(n.startswith("compile") for n in names):
        torch._dynamo.reset()
    return make_impls(names, device_type)


def bytes_moved(V, N, D, K, dtype, mode):
    """The byte model of the module docstring."""
    e = torch.empty((), dtype=dtype).element_size()
    once = V * N * (K + D) * e
    return once if mode == "fwd" else 2 * once


# ------------------------------------------------------------------------------------------------
# timing


def _cpu_bench(fn, quantiles, grad_to_none=None, rep_s=0.5, min_reps=5):
    """Median and quantiles (ms) with perf_counter: do_bench needs CUDA events."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < rep_s:
        if grad_to_none:
            for x in grad_to_none:
                x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=100, method="inclusive")
    return [statistics.median(times) if q == 0.5 else qs[int(q * 100) - 1] for q in quantiles]


def bench(fn, device_type, grad_to_none=None):
    """(p50, p20, p80) in ms."""
    quantiles = [0.5, 0.2, 0.8]
    if device_type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=quantiles, grad_to_none=grad_to_none)
    return _cpu_bench(fn, quantiles, grad_to_none)


def time_impl(fn, inputs, mode, device_type):
    f, z, t1, t2, m = inputs
    leaves = [f, z, t1, t2]
    if mode == "fwd":
        return bench(lambda: fn(f, z, t1, t2, m), device_type)
    if mode == "full":
        return bench(lambda: fn(f, z, t1, t2, m).backward(), device_type, grad_to_none=leaves)
    loss = fn(f, z, t1, t2, m)
    return bench(lambda: loss.backward(retain_graph=True), device_type, grad_to_none=leaves)


def copy_bandwidth_gbps(device_type):
    """Measured device-to-device copy bandwidth (read + write), GB/s."""
    if device_type != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device_type)[0]
    return 2 * 2**30 / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# correctness


def relative_errors(fn, V, N, D, K, dtype, device, seed=1):
    """max |a - b| / max |b| of the loss and each gradient vs the float64 reference, as columns
    named <quantity>_rel_err (relative errors, not values)."""
    from siasam_fast.siamese import siamese_loss_reference

    inputs = make_inputs(V, N, D, K, dtype, device, seed)
    f, z, t1, t2, m = inputs
    loss = fn(f, z, t1, t2, m)
    loss.backward()
    ref_in = [x.detach().double().requires_grad_() for x in (f, z, t1, t2)]
    ref = siamese_loss_reference(*ref_in, clip_mask=m)
    ref.backward()
    errs = {}
    for name, a, b in zip(("loss", "d_features", "d_logits", "d_theta1", "d_theta2"),
                          [loss, f.grad, z.grad, t1.grad, t2.grad],
                          [ref] + [x.grad for x in ref_in]):  # fmt: skip
        a, b = a.detach().double(), b.detach()
        errs[f"{name}_rel_err"] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return errs


def run_checks(impl_names, shapes, dtypes, device):
    print("\ncorrectness vs a float64 reference (max |err| / max |ref|, fresh random inputs)")
    rows = []
    for (V, D, K), dname in ((s, d) for s in shapes for d in dtypes):
        for name, fn in fresh_impls(impl_names, device.type).items():
            try:
                errs = relative_errors(fn, V, N_CLIPS, D, K, DTYPES[dname], device)
            except Exception as err:  # noqa: BLE001 - report, keep going
                errs = {"error": f"{type(err).__name__}: {str(err)[:80]}"}
            rows.append(dict(impl=name, dtype=dname, V=V, N=N_CLIPS, D=D, K=K, **errs))
    from siasam_fast.benchutil import format_table

    print(format_table(rows))
    return rows


# ------------------------------------------------------------------------------------------------
# sweeps


def sweep_points(quick, device_type):
    if device_type != "cuda":
        base = dict(V=16, D=128, K=256)
        pts = [("V", dict(base, V=v)) for v in (4, 16, 64)]
        pts += [("K", dict(base, K=k)) for k in (16, 1024)]
        return pts
    if quick:
        pts = [("V", dict(V=v, D=768, K=1500)) for v in (16, 1024)]
        pts += [("K", dict(V=256, D=768, K=k)) for k in (128, 16384)]
        pts += [("D", dict(V=256, D=d, K=1500)) for d in (128, 4096)]
        return pts
    pts = [("V", dict(V=v, D=768, K=1500)) for v in (16, 64, 256, 1024, 4096)]
    pts += [("K", dict(V=256, D=768, K=k)) for k in (16, 128, 1500, 4096, 16384, 65536)]
    pts += [("D", dict(V=256, D=d, K=1500)) for d in (64, 256, 768, 2048, 4096)]
    return pts


def run_timings(impl_names, points, dtypes, modes, device, on_row=None):
    """Time every (point, dtype, impl, mode); ``on_row(rows)`` after each row (partial CSV)."""
    rows = []
    for (sweep, shape), dname in ((p, d) for p in points for d in dtypes):
        V, D, K = shape["V"], shape["D"], shape["K"]
        dtype = DTYPES[dname]
        inputs = make_inputs(V, N_CLIPS, D, K, dtype, device)
        for name, fn in fresh_impls(impl_names, device.type).items():
            for mode in modes:
                row = dict(sweep=sweep, dtype=dname, V=V, N=N_CLIPS, D=D, K=K, impl=name,
                           mode=mode)  # fmt: skip
                try:
                    p50, p20, p80 = time_impl(fn, inputs, mode, device.type)
                    nbytes = bytes_moved(V, N_CLIPS, D, K, dtype, mode)
                    row.update(ms=p50, ms_p20=p20, ms_p80=p80, bytes=nbytes,
                               gbps=nbytes / (p50 * 1e-3) / 1e9)  # fmt: skip
                except Exception as err:  # noqa: BLE001 - one failing impl must not stop the run
                    row.update(error=f"{type(err).__name__}: {str(err)[:100]}")
                rows.append(row)
                print(_one_line(row), flush=True)
                if on_row:
                    on_row(rows)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _one_line(row):
    head = f"{row['sweep']:>6} {row['dtype']} V={row['V']} D={row['D']} K={row['K']} " \
           f"{row['impl']:>11} {row['mode']:>4}"  # fmt: skip
    if "error" in row:
        return f"{head}: {row['error']}"
    return f"{head}: {row['ms']:.4f} ms  {row['gbps']:.3g} GB/s"


def target_rows(rows, copy_gbps):
    """Speedups for target A, floor ratio for target B (fp16, fwd+bwd)."""

    def ms(shape, impl):
        for r in rows:
            if (r["sweep"] == "target" and r["impl"] == impl and r["mode"] == "full"
                    and r["dtype"] == "fp16" and r["V"] == shape["V"] and r["K"] == shape["K"]
                    and "ms" in r):  # fmt: skip
                return r["ms"]
        return None

    out = []
    tri_a = ms(TARGET_A, "triton")
    eager_a = ms(TARGET_A, "eager")
    compiled = [t for t in (ms(TARGET_A, "compile"), ms(TARGET_A, "compile-max")) if t]
    row = dict(target="A: V=64 N=9 D=768 K=1500 fp16 fwd+bwd", triton_ms=tri_a)
    if tri_a and eager_a:
        row["vs_eager"] = eager_a / tri_a
        row["goal_eager"] = ">= 5"
    if tri_a and compiled:
        row["vs_compile_best"] = min(compiled) / tri_a
        row["goal_compile"] = ">= 1.5"
    missing = [name for name, t in (("triton", tri_a), ("eager", eager_a),
                                    ("compile", compiled)) if not t]
    row["pass"] = (f"not measured (no {', '.join(missing)} row)" if missing else
                   bool(row["vs_eager"] >= 5 and row["vs_compile_best"] >= 1.5))
    out.append(row)

    tri_b = ms(TARGET_B, "triton")
    nbytes = bytes_moved(TARGET_B["V"], N_CLIPS, TARGET_B["D"], TARGET_B["K"], torch.float16,
                         "full")  # fmt: skip
    floor_ms = nbytes / (NOMINAL_COPY_TBPS * 1e12) * 1e3
    row = dict(target="B: V=4096 N=9 D=768 K=4096 fp16 fwd+bwd", triton_ms=tri_b,
               floor_ms_3TBps=floor_ms, goal_floor="<= 2")  # fmt: skip
    if tri_b:
        row["floor_ratio"] = tri_b / floor_ms
        if copy_gbps:
            row["floor_ratio_measured_copy"] = tri_b / (nbytes / (copy_gbps * 1e9) * 1e3)
        row["pass"] = row["floor_ratio"] <= 2
    else:
        row["pass"] = "not measured (no triton row)"
    out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# output


def plot(rows, path, title):
    import matplotlib

    from siasam_fast.benchutil import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The plot shows fwd+bwd timings: none (e.g. --modes fwd) makes no PNG, not an empty one
    sweeps = [s for s in ("V", "K", "D") if any(r["sweep"] == s and r["mode"] == "full"
                                                and "ms" in r for r in rows)]
    if not sweeps:
        return None
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        sel = [r for r in rows if r["sweep"] == sweep and r["mode"] == "full" and "ms" in r]
        for impl in IMPLS:
            for dname in DTYPES:
                pts = sorted((r[sweep], r["ms"]) for r in sel
                             if r["impl"] == impl and r["dtype"] == dname)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{impl} {dname}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sweep)
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def interpreter_pass():
    """Tiny shapes through the Triton interpreter (CPU): correctness only, no timing."""
    from siasam_fast.benchutil import format_table
    from siasam_fast.siamese import interpreting

    if not interpreting():
        print("interpreter pass skipped: TRITON_INTERPRET was not set before Triton was imported")
        return []
    impls = make_impls(["triton"], "cpu")
    cpu = torch.device("cpu")
    rows = []
    for (V, D, K), dname in (((3, 33, 100), "fp32"), ((2, 768, 1537), "fp16"),
                             ((2, 33, 5), "bf16")):  # fmt: skip
        errs = relative_errors(impls["triton"], V, N_CLIPS, D, K, DTYPES[dname], cpu)
        rows.append(dict(impl="triton-interpreter", dtype=dname, V=V, N=N_CLIPS, D=D, K=K, **errs))
    print("\nTriton interpreter correctness pass (max |err| / max |ref| vs float64)")
    print(format_table(rows))
    return rows


def parse_grid(text):
    """"block_k=128,256;num_warps=4,8" -> the cartesian product as a list of dicts; grids joined
    by "|" give the union of their products (in order, without repeats)."""
    import itertools

    configs = []
    for grid in text.split("|"):
        axes = []
        for part in grid.split(";"):
            key, sep, values = part.partition("=")
            try:
                axes.append([(key.strip(), int(v)) for v in values.split(",") if v.strip()])
            except ValueError:
                raise SystemExit(f"--sweep-configs: {part!r} is not KEY=INT,INT,...") from None
            if not sep or not axes[-1]:
                raise SystemExit(f"--sweep-configs: {part!r} is not KEY=INT,INT,...")
        configs += [dict(combo) for combo in itertools.product(*axes)]
    unique = []
    for cfg in configs:
        if cfg not in unique:
            unique.append(cfg)
    return unique


def config_text(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) if cfg else ""


def config_kinds(cfg):
    """The kernels a config changes: a fwd_ / bwd_ prefix names one, a bare key both."""
    if not cfg or any(not k.startswith(("fwd_", "bwd_")) for k in cfg):
        return ("fwd", "bwd")
    return tuple(kind for kind in ("fwd", "bwd") if any(k.startswith(kind + "_") for k in cfg))


def settings_text(launch):
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.items())


def tunable_settings(launch):
    """A launch's keyword arguments as SIASAM_KERNEL_CONFIG keys (block_d left to the heuristic)."""
    return {k.lower(): int(v) for k, v in launch.items() if k != "BLOCK_D"}


_WORKER_INPUTS = {}


def _precompile(task):
    """Spawned worker: launch the Triton loss forward and backward once under one config, so that
    Triton's on-disk cache holds its kernels before the timing starts (compiling the grid in
    parallel instead of one config after another). Returns an error message or None."""
    from siasam_kernels import siamese as ks

    text, shape, dname, device_type = task
    key = (tuple(shape.values()), dname)
    if key not in _WORKER_INPUTS:
        _WORKER_INPUTS.clear()
        _WORKER_INPUTS[key] = make_inputs(shape["V"], N_CLIPS, shape["D"], shape["K"],
                                          DTYPES[dname], torch.device(device_type))  # fmt: skip
    os.environ[ks.CONFIG_ENV] = text
    try:
        f, z, t1, t2, m = _WORKER_INPUTS[key]
        make_impls(["triton"], device_type)["triton"](f, z, t1, t2, m).backward()
        if device_type == "cuda":
            torch.cuda.synchronize()
        for x in (f, z, t1, t2):
            x.grad = None
    except Exception as err:  # noqa: BLE001 - reported by the timing pass
        return f"{type(err).__name__}: {str(err)[:100]}"
    return None


def precompile(configs, shapes, dtypes, workers, device_type):
    import concurrent.futures as cf
    import multiprocessing as mp

    tasks = [(config_text(c), s, d, device_type) for d in dtypes for s in shapes for c in configs]
    # Each worker takes one dtype's configs in turn (its inputs are made once per dtype).
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        errors = [e for e in pool.map(_precompile, tasks, chunksize=max(1, len(tasks) // workers))
                  if e]  # fmt: skip
    print(f"compiled {len(tasks)} configs in {time.perf_counter() - start:.0f} s with {workers} "
          f"processes ({len(errors)} failed: the timing pass reports them)", flush=True)


# A swept pair goes into the tuned table only when its fwd+bwd beats the heuristic's by this much:
# smaller differences are within a repeat's noise on the cards measured (a few percent).
TUNE_MIN_GAIN = 1.05


def worth_tuning(speedup):
    """Whether a pair of launch settings measured ``speedup`` x the heuristic is worth a tuned
    entry (None: not timed)."""
    return speedup is not None and speedup >= TUNE_MIN_GAIN


def sweep_configs(grid, dtypes, device, env, out_dir, tag, workers=None):
    """Triton forward and backward, each timed alone, at target B for the heuristic and each
    config of ``grid`` (through SIASAM_KERNEL_CONFIG), then the fastest forward with the fastest
    backward (fwd+bwd) against the heuristic: the data for a GPU's launch settings. Writes the
    timings (CSV) and the winners as a tuned table (JSON, the format of SIASAM_KERNEL_TUNED)."""
    import json

    from siasam_kernels import siamese as ks

    from siasam_fast.benchutil import (
        finish_csv,
        format_table,
        partial_path,
        report_interrupted,
        results_path,
        write_csv,
    )

    configs = [None] + parse_grid(grid)
    for cfg in configs[1:]:  # refuse a bad grid before any timing
        ks.config_override(config_text(cfg))
    fn = make_impls(["triton"], device.type)["triton"]
    slug = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    suffix = ("_" + tag) if tag else ""
    path = results_path(f"bench_kernels_{slug}_configs{suffix}.csv", out_dir)
    # Target B only: at A's size every config is bound by host overheads (see the README).
    # The interpreter (no GPU) only shows that the sweep runs: a tiny shape.
    shapes = (TARGET_B,) if device.type == "cuda" else (dict(V=2, D=32, K=64),)
    if workers is None:
        workers = 8 if device.type == "cuda" else 1
    if workers > 1:
        precompile(configs, shapes, dtypes, workers, device.type)
    rows, saved = [], os.environ.get(ks.CONFIG_ENV)
    tuned = {}
    heuristic_2 = False  # fp16's pair was not kept: 2-byte dtypes keep the heuristic

    def time_config(shape, dname, inputs, cfg, label=None):
        text = config_text(cfg)
        os.environ[ks.CONFIG_ENV] = text
        kinds = config_kinds(cfg)
        row = dict(dtype=dname, N=N_CLIPS, **shape, config=label or text or "heuristic",
                   kinds="+".join(kinds))  # fmt: skip
        es = DTYPES[dname].itemsize
        for kind in kinds:
            row[f"{kind}_launch"] = settings_text(
                ks._launch_settings(shape["V"], shape["D"], shape["K"], device, kind, es))
        for mode in (("fwd", "bwd", "full") if len(kinds) == 2 else kinds):
            try:
                row[f"{mode}_ms"] = time_impl(fn, inputs, mode, device.type)[0]
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory
                row["error"] = f"{type(err).__name__}: {str(err)[:100]}"
                break
        rows.append(row)
        timing = row.get("error") or "  ".join(
            f"{m} {row[m + '_ms']:.4f} ms" for m in ("fwd", "bwd", "full") if m + "_ms" in row)
        print(f"{dname} V={shape['V']} K={shape['K']} {row['config']}: {timing}", flush=True)
        write_csv(rows, partial_path(path), env)  # NAME.csv of an earlier sweep stays as it was
        return row

    try:
        for shape, dname in ((s, d) for s in shapes for d in dtypes):
            inputs = make_inputs(shape["V"], N_CLIPS, shape["D"], shape["K"], DTYPES[dname], device)
            mine = [time_config(shape, dname, inputs, cfg) for cfg in configs]
            best = {}
            for kind in ("fwd", "bwd"):
                timed = [r for r in mine if f"{kind}_ms" in r and not r.get("error")]
                best[kind] = min(timed, key=lambda r: r[f"{kind}_ms"])
            # The two winners together, by their effective settings (fwd_ / bwd_ keys).
            es = DTYPES[dname].itemsize
            chosen = {}
            for kind in ("fwd", "bwd"):
                os.environ[ks.CONFIG_ENV] = "" if best[kind]["config"] == "heuristic" else \
                    best[kind]["config"]  # fmt: skip
                launch = ks._launch_settings(shape["V"], shape["D"], shape["K"], device, kind, es)
                chosen[kind] = tunable_settings(launch)
            both = {f"{kind}_{k}": v for kind in ("fwd", "bwd") for k, v in chosen[kind].items()}
            row = time_config(shape, dname, inputs, both, label="chosen: " + " | ".join(
                best[k]["config"] for k in ("fwd", "bwd")))  # fmt: skip
            heuristic = mine[0]
            if row.get("full_ms") and heuristic.get("full_ms"):
                # The heuristic again, right after the pair: the faster of its two timings, so
                # that drift between the first and the last config is not read as a gain.
                again = time_config(shape, dname, inputs, None, label="heuristic, again")
                heuristic_ms = min(heuristic["full_ms"], again.get("full_ms", float("inf")))
                row["full_speedup_vs_heuristic"] = heuristic_ms / row["full_ms"]
            else:
                heuristic_ms = None
                row["full_speedup_vs_heuristic"] = None
            keep = worth_tuning(row["full_speedup_vs_heuristic"])
            row["tuned"] = "yes" if keep else \
                f"no (under {TUNE_MIN_GAIN:.2f}x: the heuristic stays)"  # fmt: skip
            key = str(es)
            if device.type == "cuda" and dname == "fp16" and not keep:  # fp16 speaks for bf16:
                heuristic_2 = True  # its heuristic stays, whatever a bf16 pair did
                tuned.get(torch.cuda.get_device_name(device), {}).pop(key, None)
            if device.type == "cuda" and keep and not (es == 2 and heuristic_2):
                # (target B: the only shape swept there)
                entry = tuned.setdefault(torch.cuda.get_device_name(device), {})
                if key not in entry or dname == "fp16":  # fp16 speaks for bf16 unless alone
                    entry[key] = dict(chosen, measured=f"{dname} V={shape['V']} D={shape['D']} "
                                      f"K={shape['K']}: fwd+bwd {row['full_ms']:.4f} ms vs "
                                      f"heuristic {heuristic_ms:.4f} ms, "
                                      f"{env['date']}, torch {env['torch']}, "
                                      f"triton {env['triton']}")  # fmt: skip
            write_csv(rows, partial_path(path), env)
    except KeyboardInterrupt:
        return report_interrupted(path, bool(rows))
    finally:
        if saved is None:
            os.environ.pop(ks.CONFIG_ENV, None)
        else:
            os.environ[ks.CONFIG_ENV] = saved
    cols = ["dtype", "config", "kinds", "fwd_ms", "bwd_ms", "full_ms", "full_speedup_vs_heuristic",
            "tuned", "fwd_launch", "bwd_launch", "error"]  # fmt: skip
    for kind in ("fwd", "bwd"):
        ranked = sorted((r for r in rows if f"{kind}_ms" in r),
                        key=lambda r: (r["dtype"], r[f"{kind}_ms"]))  # fmt: skip
        print(f"\n{kind}, fastest first")
        print(format_table(ranked, [c for c in cols if any(c in r for r in ranked)]))
    finish_csv(rows, path, env)
    final = [r for r in rows if r["config"].startswith(("heuristic", "chosen"))]
    print("\nheuristic vs chosen (fwd+bwd)")
    print(format_table(final, [c for c in cols if any(c in r for r in final)]))
    print(f"\nwrote {path}")
    if tuned:
        tuned_path = results_path(f"tuned_{slug}{suffix}.json", out_dir)
        tuned_path.write_text(json.dumps(tuned, indent=1) + "\n")
        print(f"wrote {tuned_path} (use it with {ks.TUNED_ENV}={tuned_path})")
    return 0


# A timing row's own columns (the rest of a CSV's columns are the environment's)
TIMING_COLUMNS = ("sweep", "dtype", "V", "N", "D", "K", "impl", "mode", "ms", "ms_p20", "ms_p80",
                  "bytes", "gbps", "error")


def combine(paths, out_dir=None):
    """Merge timing CSVs (e.g. Triton + eager, compile and compile-max from separate runs on one
    card) into one row per (sweep, dtype, shape, mode) with each impl's ms and Triton's speed-ups,
    then the targets. Check / target CSVs among ``paths`` are skipped."""
    import csv

    from siasam_fast.benchutil import format_table, results_path, write_csv

    rows, devices, copy = [], set(), []
    for path in paths:
        try:
            with open(path, newline="") as fh:
                for r in csv.DictReader(fh):
                    if "mode" not in r or "sweep" not in r or not r.get("ms"):
                        continue
                    devices.add(r.get("device", "?"))
                    if r.get("copy_gbps"):
                        copy.append(float(r["copy_gbps"]))
                    rows.append(dict(r, ms=float(r["ms"]), V=int(r["V"]), D=int(r["D"]),
                                     K=int(r["K"])))  # fmt: skip
        except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as err:
            raise SystemExit(f"--combine: {path} is not a readable timing CSV of bench_kernels.py "
                             f"({type(err).__name__}: {err})") from None
    if not rows:
        raise SystemExit(f"--combine: no timing rows in {', '.join(map(str, paths))}")
    if len(devices) > 1:
        raise SystemExit(f"--combine: the CSVs come from different devices {sorted(devices)}; "
                         "compare impls only within one card")  # fmt: skip
    merged: dict = {}
    for r in rows:
        key = (r["sweep"], r["dtype"], r["V"], r["D"], r["K"], r["mode"])
        merged.setdefault(key, {})[r["impl"]] = r["ms"]
    table = []
    for (sweep, dtype, V, D, K, mode), ms in merged.items():
        row = dict(sweep=sweep, dtype=dtype, V=V, D=D, K=K, mode=mode)
        row.update({f"{impl}_ms": ms[impl] for impl in IMPLS if impl in ms})
        for impl in IMPLS[1:]:
            if "triton" in ms and impl in ms:
                row[f"x_vs_{impl}"] = ms[impl] / ms["triton"]
        table.append(row)
    cols = list(dict.fromkeys(k for r in table for k in r))
    print(f"device: {devices.pop()}\n" + format_table(table, cols))
    targets = target_rows(rows, statistics.median(copy) if copy else None)
    print("\ntargets (fp16, fwd+bwd)")
    print(format_table(targets, list(dict.fromkeys(k for r in targets for k in r))))
    out = results_path("bench_kernels_combined.csv", out_dir or Path(paths[0]).parent)
    # The environment columns the inputs share (device, versions): the combined rows' too
    env_cols = [k for k in rows[0] if k not in TIMING_COLUMNS
                and all(r.get(k) == rows[0][k] for r in rows)]
    print(f"\nwrote {write_csv(table, out, {k: rows[0][k] for k in env_cols})}")
    return 0


def main(argv=None):
    threads = torch.get_num_threads()  # set to 1 on CPU below; restored for a calling program
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv):
    args = parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    cuda = torch.cuda.is_available()
    if not cuda and args.interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton kernels
    from siasam_fast.benchutil import (
        environment,
        finish_csv,
        format_table,
        partial_path,
        report_interrupted,
        report_no_rows,
        results_path,
        write_csv,
    )

    env = environment()
    device = torch.device("cuda" if cuda else "cpu")
    print("siamese loss benchmark:", ", ".join(f"{k}={env[k]}" for k in
          ("device", "torch", "triton", "python")))  # fmt: skip
    dtypes = list(args.dtypes)
    if cuda:
        if "bf16" in dtypes and not has_bf16():
            print("bf16 not supported on this GPU: skipped")
            dtypes.remove("bf16")
        impl_names = args.impls
    elif args.sweep_configs:
        print("\nNO CUDA GPU FOUND: --interpret runs the config sweep in the Triton interpreter "
              "at a tiny shape; its timings say nothing about a GPU")  # fmt: skip
    else:
        print(
            "\nNO CUDA GPU FOUND: the Triton kernels cannot be timed here. Timing the PyTorch "
            "reference on CPU at small sizes instead (eager"
            + (" and torch.compile" if args.cpu_compile else "; --cpu-compile adds torch.compile")
            + "). These numbers say nothing about GPU speed; the H100 targets are not measured."
        )
        dtypes = [d for d in dtypes if d != "fp16"] or ["fp32"]  # fp16 matmuls are slow on CPU
        impl_names = ["eager"] + (["compile"] if args.cpu_compile else [])
        if impl_names != args.impls or dtypes != args.dtypes:
            print(f"asked for --impls {','.join(args.impls)} --dtypes {','.join(args.dtypes)}; "
                  f"measuring --impls {','.join(impl_names)} --dtypes {','.join(dtypes)} "
                  "instead (CPU: the reference only, no fp16)")  # fmt: skip
        torch.set_num_threads(1)  # steadier numbers on shared machines (CI, dev boxes)
    env["copy_gbps"] = copy_bandwidth_gbps(device.type)
    if env["copy_gbps"]:
        print(f"measured device copy bandwidth: {env['copy_gbps']:.0f} GB/s "
              f"(targets use the nominal {NOMINAL_COPY_TBPS} TB/s)")  # fmt: skip

    if args.sweep_configs:
        return sweep_configs(args.sweep_configs, dtypes, device, env, args.out, args.tag,
                             workers=args.compile_workers)
    points = [] if args.targets_only else sweep_points(args.quick, device.type)
    if cuda and not args.no_targets:
        points += [("target", TARGET_A), ("target", TARGET_B)]

    check_rows = []
    if args.check:
        shapes = sorted({(p["V"], p["D"], p["K"]) for _, p in points})
        if cuda:
            shapes = [s for s in shapes if s[0] * s[2] <= 4096 * 4096]
        check_rows = run_checks(impl_names, shapes, dtypes, device)
    interp_rows = interpreter_pass() if (not cuda and args.interpret) else []

    slug = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    stem = f"bench_kernels_{slug}{('_' + args.tag) if args.tag else ''}"
    csv_path = results_path(f"{stem}.csv", args.out)
    # The rows so far go to NAME.partial.csv after every row, so a run stopped early keeps what
    # it measured, and an earlier finished run's NAME.csv stays until this one finishes.
    wrote: list[Path] = []
    try:
        rows = run_timings(impl_names, points, dtypes, args.modes, device,
                           on_row=lambda done: wrote.append(
                               write_csv(done, partial_path(csv_path), env)))
    except KeyboardInterrupt:
        return report_interrupted(csv_path, bool(wrote))
    if not rows:  # nothing timed (e.g. no dtype left): an earlier run's files stay as they were
        return report_no_rows(csv_path, "no sweep point, dtype or impl left to time")
    cols = ["sweep", "dtype", "V", "N", "D", "K", "impl", "mode", "ms", "ms_p20", "ms_p80",
            "gbps", "error"]  # fmt: skip
    print("\n" + format_table(rows, [c for c in cols if any(c in r for r in rows)]))

    targets = target_rows(rows, env["copy_gbps"]) if cuda and not args.no_targets else []
    if targets:
        print("\ntargets (H100, fp16, fwd+bwd)")
        print(format_table(targets, list(dict.fromkeys(k for r in targets for k in r))))
    elif not cuda:
        print("\ntargets: not measured (they need the H100)")

    finish_csv(rows, csv_path, env)
    print(f"\nwrote {csv_path}")
    for extra, name in ((check_rows + interp_rows, "check"), (targets, "targets")):
        companion = results_path(f"{stem}_{name}.csv", args.out)
        if extra:
            print(f"wrote {write_csv(extra, companion, env)}")
        elif companion.exists():  # an earlier run's, beside this run's timings: misleading
            companion.unlink()
            print(f"removed {companion} (an earlier run's; this run made no {name} rows)")
    png = plot(rows, results_path(f"{stem}.png", args.out),
               f"siamese loss, N={N_CLIPS}: {env['device']}, torch {env['torch']}, "
               f"triton {env['triton']}")  # fmt: skip
    if png:
        print(f"wrote {png}")
    else:
        print("no PNG: it plots fwd+bwd timings (--modes full), and this run has none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
