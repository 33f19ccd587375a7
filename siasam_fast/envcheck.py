"""``siasam-fast env``: what this machine can run, and what a training run here would pick.

Each check tries the real thing on a tiny input where it can (the fused loss against the reference,
forward and backward; DALI decoding three chosen frames of a small encoded clip) and otherwise
reports versions and availability. A check never raises: an error inside it becomes a ``fail`` row
with the error's first line. Statuses:

- ``ok``: present and working;
- ``info``: a fact, or a choice this machine makes (e.g. no GPU: fp32, PyAV, the reference loss);
- ``missing``: an optional part is not installed (a hint says what it would add);
- ``fail``: installed but broken, or mismatched with this machine (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

STATUSES = ("ok", "info", "missing", "fail")


@dataclass
class Check:
    name: str
    status: str  # one of STATUSES
    detail: str
    hint: str = ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def cuda_driver_version() -> tuple[int, int] | None:
    """The CUDA version the installed NVIDIA driver supports, (major, minor), or None (no
    driver). Read from libcuda itself, so it is right whatever CUDA build torch has."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value:
            return version.value // 1000, version.value % 1000 // 10
    return None


# -- the checks --------------------------------------------------------------------------------


def check_python() -> list[Check]:
    return [Check("python", "info", f"{platform.python_version()} on {platform.platform()}")]


def check_torch() -> list[Check]:
    import torch

    build = torch.version.cuda
    rows = [Check("torch", "ok", f"{torch.__version__}, "
                  + (f"CUDA {build} build" if build else "CPU build (no CUDA)"))]
    if not torch.cuda.is_available():
        driver = cuda_driver_version()
        hint = ("an NVIDIA driver is installed but this torch build has no CUDA: install a CUDA "
                "build (README, Install on a GPU machine)") if driver and not build else ""
        rows.append(Check("GPU", "info", "no CUDA GPU visible: training runs on the CPU (fp32, "
                          "PyAV decoding, the reference loss)", hint))
        return rows
    arch_list = torch.cuda.get_arch_list()
    driver = cuda_driver_version()
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cc = (props.major, props.minor)
        detail = (f"{i}: {props.name}, compute capability {cc[0]}.{cc[1]}, "
                  f"{props.total_memory / 2**30:.0f} GiB"
                  + (f", driver CUDA {driver[0]}.{driver[1]}" if driver else ""))
        if _runs_on(cc, arch_list):
            rows.append(Check("GPU", "ok", detail))
        else:
            hint = ("V100 (7.0) needs a cu126 torch build" if cc == (7, 0) else
                    f"install a torch build with code for sm_{cc[0]}{cc[1]}")
            rows.append(Check(
                "GPU", "fail", f"{detail}; this torch build has code for {', '.join(arch_list)} "
                "only", f"{hint} (README, Install on a GPU machine)"))
    return rows


def _runs_on(cc: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with ``arch_list`` (sm_XY cubins, compute_XY PTX) runs on a GPU of
    compute capability ``cc``: a cubin of the same major and a minor not above, or PTX not
    above (JIT-compiled by the driver)."""
    import re

    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if not m:
            continue
        kind, major, minor = m.group(1), int(m.group(2)), int(m.group(3))
        if kind == "sm" and major == cc[0] and minor <= cc[1]:
            return True
        if kind == "compute" and (major, minor) <= cc:
            return True
    return False


def check_precision() -> list[Check]:
    from siasam_fast.ds_config import config_file_name, default_precision

    precision = default_precision()
    why = {"fp32": "no GPU: DeepSpeed refuses fp16 on the CPU",
           "fp16": "no bf16 on this GPU: fp16 with dynamic loss scaling",
           "bf16": "this GPU has bf16"}[precision]
    return [Check("precision", "info", f"{precision} ({why}); DeepSpeed config "
                  f"configs/ds/{config_file_name(2, precision)} for ZeRO-2")]


def check_kernels() -> list[Check]:
    import torch

    from siasam_fast import siamese

    try:
        import triton
    except ImportError:
        old_gpu = (torch.cuda.is_available()
                   and tuple(torch.cuda.get_device_capability()) < (7, 5))
        return [Check("Triton kernels", "missing", "triton is not installed: the reference loss "
                      "(eager PyTorch) is used", f"pip install {siamese.TRITON_FOR_SM70} (the "
                      "newest Triton that compiles for a V100)" if old_gpu else
                      "pip install triton")]
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not siamese.interpreting():
        return [Check("Triton kernels", "info", f"Triton {triton.__version__}; the fused kernels "
                      "need a CUDA GPU: training here uses the reference loss",
                      "TRITON_INTERPRET=1 runs them on the CPU through Triton's interpreter "
                      "(slow; for tests)")]
    device = torch.device("cuda" if on_gpu else "cpu")
    problem = on_gpu and siamese.triton_gpu_problem(torch.cuda.get_device_capability(device),
                                                    triton.__version__)
    if problem:
        return [Check("Triton kernels", "fail", f"{torch.cuda.get_device_name(device)}: "
                      f"{problem}; training falls back to the reference loss",
                      f"pip install {siamese.TRITON_FOR_SM70} (README, V100 notes)")]
    worst = _kernel_vs_reference(device)
    where = torch.cuda.get_device_name(device) if on_gpu else "the CPU (Triton interpreter)"
    detail = (f"Triton {triton.__version__}: the fused loss matches the reference on {where} "
              f"(forward and backward, largest relative error {worst:.1e})")
    rows = []
    if worst > 1e-3:
        rows.append(Check("Triton kernels", "fail", detail.replace("matches", "differs from"),
                          "report it with this output"))
    else:
        rows.append(Check("Triton kernels", "ok", detail))
    if on_gpu:
        rows.append(_tuned_row(torch.cuda.get_device_name(device)))
    return rows


def _kernel_vs_reference(device) -> float:
    """The largest relative difference between the fused and the reference loss (and their
    gradients) on a small random input, float32."""
    import torch

    from siasam_fast import siamese

    gen = torch.Generator().manual_seed(0)
    V, N, D, K = 4, 3, 32, 16
    inputs = [torch.randn(V, N, D, generator=gen), torch.randn(V, N, K, generator=gen),
              torch.randn(N, generator=gen), torch.randn(N, generator=gen)]
    mask = torch.ones(V, N, dtype=torch.bool)
    mask[1, 2] = False  # a masked clip, as in short videos
    results = []
    for impl in ("triton", "reference"):
        leaves = [t.to(device).requires_grad_() for t in inputs]
        loss = siamese.siamese_loss(*leaves, clip_mask=mask.to(device), impl=impl)
        loss.backward()
        results.append([loss.detach(), *(t.grad for t in leaves)])
    worst = 0.0
    for a, b in zip(*results):
        scale = b.abs().max().clamp_min(1e-6)
        worst = max(worst, float((a.float() - b.float()).abs().max() / scale))
    return worst


def _tuned_row(device_name: str) -> Check:
    import os

    from siasam_kernels import siamese as kern

    path = os.environ.get(kern.TUNED_ENV) or str(kern.TUNED_FILE)
    if device_name in kern._tuned_table(path):
        return Check("kernel settings", "ok", f"launch settings measured on {device_name} "
                     f"({path})")
    return Check("kernel settings", "info", f"no measured launch settings for {device_name}: "
                 "the built-in heuristic applies",
                 "python benchmarks/bench_kernels.py --sweep-configs (about a minute) writes "
                 "them; README, Benchmarks")


def dali_wheel() -> str | None:
    """The installed nvidia-dali distribution's name (nvidia-dali-cuda120, ...), or None."""
    from importlib import metadata

    names = sorted(
        (d.metadata["Name"] or "") for d in metadata.distributions()
        if (d.metadata["Name"] or "").lower().replace("_", "-").startswith("nvidia-dali")
    )
    return names[0] if names else None


def check_dali(decode: bool = True) -> list[Check]:
    import torch

    from siasam_fast.pipeline.loaders import dali_gpu_problem, resolve_backend

    on_gpu = torch.cuda.is_available()
    gpu_problem = dali_gpu_problem()  # None without a GPU
    try:
        import nvidia.dali as dali
    except ImportError as err:
        wheel = dali_wheel()
        if wheel:  # installed, but it does not import
            rows = [Check("DALI", "fail", f"{wheel} is installed but does not import "
                          f"({_first_line(err)})", "reinstall it, or the nvidia-dali wheel for "
                          "this driver's CUDA version (README, Install on a GPU machine)")]
        else:
            rows = [Check("DALI", "missing", "nvidia-dali is not installed: videos are decoded "
                          "by PyAV on the CPU", "pip install 'siasam-fast[gpu]' (CUDA 13 driver) "
                          "or 'siasam-fast[gpu-cu120]' (CUDA 12, V100); README, Install on a GPU "
                          "machine")]
    else:
        wheel = dali_wheel() or "nvidia-dali"
        rows = [Check("DALI", "ok", f"{wheel} {dali.__version__}")]
        wheel_cuda = _wheel_cuda_major(wheel)
        driver = cuda_driver_version()
        if on_gpu and wheel_cuda and driver and driver[0] < wheel_cuda:
            rows[0] = Check("DALI", "fail", f"{wheel} {dali.__version__} needs a CUDA "
                            f"{wheel_cuda} driver; this driver supports CUDA {driver[0]}."
                            f"{driver[1]}", f"pip install nvidia-dali-cuda{driver[0]}0 instead "
                            "(README, Install on a GPU machine)")
        elif gpu_problem:
            rows[0] = Check("DALI", "fail", gpu_problem, "pip install "
                            "nvidia-dali-cuda120 (README, Install on a GPU machine: V100 row)")
        elif decode:
            rows.extend(_dali_decode_rows(on_gpu))
    loaders_log = logging.getLogger("siasam_fast.pipeline.loaders")
    level = loaders_log.level
    loaders_log.setLevel(logging.ERROR)  # (its warning repeats the DALI row)
    try:
        backend = resolve_backend("auto")
    finally:
        loaders_log.setLevel(level)
    why = ("DALI on NVDEC" if backend == "dali" else "PyAV on the CPU: DALI needs "
           + ("a CUDA GPU" if not on_gpu else "a DALI that runs on this GPU (see its row)"
              if gpu_problem else "nvidia-dali"))
    if backend == "pyav":
        try:
            import av  # noqa: F401
        except Exception:  # noqa: BLE001 - reported by the PyAV row
            why += "; but PyAV does not import (see its row): no backend works here"
    rows.append(Check("data.backend=auto", "info", f"{backend} ({why})"))
    if on_gpu:
        from siasam_fast.pipeline import nvdec

        # what a set must be for DALI (a manifest with other videos gets PyAV: README, Backends)
        rows.append(Check("NVDEC decodes", "info",
                          nvdec.summary(tuple(torch.cuda.get_device_capability()))))
    return rows


def _wheel_cuda_major(wheel: str) -> int | None:
    tail = wheel.lower().rpartition("cuda")[2]
    return int(tail[:-1]) if tail[:-1].isdigit() and tail.endswith("0") else None


def _dali_decode_rows(on_gpu: bool) -> list[Check]:
    """Decode frames of a small clip with DALI's video decoder, as the pipeline does (NVDEC with a
    GPU, else DALI's CPU decoder): the whole clip, then the stretch that ``data.dali_trim`` cuts
    (:mod:`siasam_fast.pipeline.dali_check`)."""
    from siasam_fast.pipeline import dali_check

    rows = []
    for name, trimmed in (("DALI decode", False), ("DALI trimmed", True)):
        try:
            ok, detail = dali_check.decode_check(on_gpu, trimmed=trimmed)
        except Exception as err:  # noqa: BLE001 - e.g. no NVDEC in this container
            ok, detail = False, f"decoding a small clip raised {_first_line(err)}"
        if ok:
            rows.append(Check(name, "ok", detail))
        elif trimmed:
            rows.append(Check(name, "fail", detail, "the DALI loader runs this check itself and "
                              "then decodes whole files (slower on long videos); "
                              "data.dali_trim=false says so up front; please report it"))
        else:
            rows.append(Check(name, "fail", detail, "report it with this output; "
                              "data.backend=pyav avoids DALI"))
            break  # the trimmed check would only repeat it
    return rows


def check_deepspeed() -> list[Check]:
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as train.py does on a CPU machine
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as err:
        return [Check("DeepSpeed", "fail", f"cannot import deepspeed ({_first_line(err)}): "
                      "train.py needs it", "pip install deepspeed")]
    rows = [Check("DeepSpeed", "ok", f"{deepspeed.__version__}, accelerator "
                  f"{get_accelerator().device_name()}")]
    if not torch.cuda.is_available():
        rows.append(Check("optimizer", "info", "torch AdamW (DeepSpeed's FusedAdam needs CUDA)"))
        return rows
    from deepspeed.ops.op_builder import FusedAdamBuilder

    from siasam_fast.model import apex_available
    from siasam_fast.training import deepspeed_arch_list

    if apex_available():
        rows.append(Check("optimizer", "ok", "apex FusedAdam (apex is installed; "
                          "train.optimizer=deepspeed picks DeepSpeed's)"))
        return rows

    nvcc = _build_nvcc()
    note = ""
    fixed = deepspeed_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if fixed is not None:
        note = f"; train.py hands its build TORCH_CUDA_ARCH_LIST={fixed!r}"
    toolkit = _nvcc_release(str(nvcc)) if nvcc else None
    built_for = torch.version.cuda
    oldest = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    clash = None
    hint = (f"use a CUDA {built_for} toolkit for the build (CUDA_HOME, or its nvcc first on "
            "PATH), or --set train.optimizer=torch")
    if toolkit and toolkit[0] >= 13 and oldest < (7, 5):
        clash = (f"{nvcc} is CUDA {toolkit[0]}.{toolkit[1]}, which cannot compile for "
                 f"sm_{oldest[0]}{oldest[1]}")
        hint = ("this GPU needs a cu126 torch and a CUDA 12 toolkit (README, Install on a GPU "
                "machine), or --set train.optimizer=torch")
    elif toolkit and built_for and toolkit[0] != int(built_for.split(".")[0]):
        clash = (f"{nvcc} is CUDA {toolkit[0]}.{toolkit[1]} but torch was built with CUDA "
                 f"{built_for}: torch's extension builder refuses a different major version")
    arch_list = fixed if fixed is not None else os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    uncovered = arch_list_gaps(arch_list, [torch.cuda.get_device_capability(i)
                                           for i in range(torch.cuda.device_count())])
    if clash:
        rows.append(Check("optimizer", "missing", f"DeepSpeed FusedAdam cannot be built here "
                          f"({clash}): train.optimizer=auto falls back to torch AdamW", hint))
    elif uncovered:
        gpus = ", ".join(f"sm_{a}{b}" for a, b in uncovered)
        wanted = ";".join(f"{a}.{b}" for a, b in uncovered)
        rows.append(Check("optimizer", "fail", f"TORCH_CUDA_ARCH_LIST={arch_list!r}: DeepSpeed "
                          f"builds FusedAdam for that list, which has no code for {gpus}: the "
                          "first optimizer step would fail ('no kernel image')",
                          f"unset TORCH_CUDA_ARCH_LIST, or add {wanted} to it, or --set "
                          "train.optimizer=torch"))
    elif FusedAdamBuilder().is_compatible(verbose=False) and nvcc:
        rows.append(Check("optimizer", "ok", "DeepSpeed FusedAdam (built on first use, about a "
                          f"minute, then cached){note}"))
    else:
        rows.append(Check("optimizer", "missing", "DeepSpeed FusedAdam cannot be built here "
                          "(no nvcc / CUDA_HOME)", "install the CUDA toolkit, or "
                          "--set train.optimizer=torch"))
    return rows


def arch_list_gaps(arch_list: str, capabilities) -> list[tuple[int, int]]:
    """The compute capabilities among ``capabilities`` that a JIT build for TORCH_CUDA_ARCH_LIST
    ``arch_list`` (DeepSpeed's FusedAdam) has no code for; [] when the list is empty (DeepSpeed
    then builds for the GPUs present)."""
    built = _jit_arch_names(arch_list)
    return sorted({tuple(cc) for cc in capabilities if built and not _runs_on(tuple(cc), built)})


def _jit_arch_names(arch_list: str) -> list[str]:
    """The sm_XY / compute_XY code that DeepSpeed's JIT build makes of TORCH_CUDA_ARCH_LIST
    ("7.0;8.0+PTX"): a cubin per entry, PTX for each "+PTX" one, and (as DeepSpeed adds it when no
    entry has it) PTX for the highest."""
    import re

    names, archs = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)[a-zA-Z]*(\+PTX)?", entry)
        if m:
            archs.append((int(m.group(1)), int(m.group(2)), bool(m.group(3))))
    if archs and not any(ptx for *_, ptx in archs):
        top = max(archs)
        archs[archs.index(top)] = (top[0], top[1], True)
    for major, minor, ptx in archs:
        names.append(f"sm_{major}{minor}")
        if ptx:
            names.append(f"compute_{major}{minor}")
    return names


def _build_nvcc() -> Path | None:
    """The nvcc that torch's extension builder (and so DeepSpeed's FusedAdam build) would use:
    CUDA_HOME / CUDA_PATH first, then the nvcc on PATH, then /usr/local/cuda; None if none."""
    import os
    import shutil

    from torch.utils import cpp_extension

    try:
        home = cpp_extension._find_cuda_home()  # looked up now: the environment may have changed
    except Exception:  # noqa: BLE001 - a private helper: fall back to its documented order
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        if not home and shutil.which("nvcc"):
            home = str(Path(shutil.which("nvcc")).resolve().parent.parent)
    nvcc = Path(home, "bin", "nvcc") if home else None
    return nvcc if nvcc is not None and nvcc.is_file() else None


def _nvcc_release(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) of ``nvcc --version`` ("release 12.6"), or None if it does not run."""
    import re
    import subprocess

    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_apex() -> list[Check]:
    from siasam_fast.model import apex_problem

    problem = apex_problem()
    if problem == "apex is not installed":
        return [Check("apex", "missing", "not installed (optional: its FusedAdam and "
                      "FusedLayerNorm are used on CUDA when it is)",
                      "not on PyPI: see NVIDIA/apex's README")]
    if problem:
        return [Check("apex", "missing", f"{problem}: training uses DeepSpeed's FusedAdam and "
                      "torch's LayerNorm instead", "rebuild apex with its CUDA extensions "
                      "(--cpp_ext --cuda_ext; see NVIDIA/apex's README)")]
    return [Check("apex", "ok", "FusedAdam and FusedLayerNorm used on CUDA (train.optimizer / "
                  "model.layer_norm: auto)")]


def check_pyav() -> list[Check]:
    import av

    from siasam_fast.pipeline.transcode import nvenc_available

    codecs = av.codecs_available
    decoders = [c for c in ("h264", "hevc", "vp9", "mjpeg") if c in codecs]
    encoders = [c for c in ("libx264", "libx265") if c in codecs]
    status = "ok" if "h264" in decoders else "fail"
    rows = [Check("PyAV", status, f"{av.__version__}; decodes {', '.join(decoders) or 'nothing'}; "
                  f"encodes {', '.join(encoders) or 'neither libx264 nor libx265'} (transcode)")]
    ok, why = nvenc_available("h264")
    rows.append(Check("NVENC", "ok" if ok else "info",
                      "h264_nvenc opens: transcode encodes on the GPU" if ok else
                      f"{why}; transcode encodes on the CPU"))
    return rows


def check_transformers() -> list[Check]:
    import transformers
    from transformers import BertModel, ResNetModel  # noqa: F401

    return [Check("transformers", "ok", f"{transformers.__version__} (BertModel, ResNetModel)")]


# (the name of its first row, the check), in order.
CHECKS: tuple[tuple[str, Callable[..., list[Check]]], ...] = (
    ("python", check_python), ("torch", check_torch), ("precision", check_precision),
    ("Triton kernels", check_kernels), ("DALI", check_dali), ("DeepSpeed", check_deepspeed),
    ("apex", check_apex), ("PyAV", check_pyav), ("transformers", check_transformers),
)


# pip's name of the package behind a check (the CPU set-up pins torch; see the Makefile), or the
# whole hint where a plain reinstall from PyPI would be wrong: PyPI's torch is a CUDA 13 build
# (no sm_70 code), PyPI's "apex" is another project, and the DALI wheel depends on the GPU.
PIP_NAMES = {"PyAV": "av", "DeepSpeed": "deepspeed", "Triton kernels": "triton==3.8.0"}
REINSTALL_HINTS = {
    "torch": "reinstall the torch build for this machine (README, Install on a GPU machine: a "
             "cu126 wheel on V100; without a GPU, torch==2.13.0 from PyTorch's CPU index)",
    "DALI": "pip install --force-reinstall nvidia-dali-cuda120 (CUDA 12 drivers, and every V100) "
            "or nvidia-dali-cuda130 (CUDA 13 drivers, Turing and newer)",
    "apex": "rebuild NVIDIA apex for this torch with its CUDA extensions (not on PyPI: PyPI's "
            "'apex' is another project; see NVIDIA/apex's README)",
}
# Checks that import torch: when torch itself does not import, they say so instead of blaming
# (and reinstalling) their own package.
NEEDS_TORCH = frozenset({"precision", "Triton kernels", "DALI", "DeepSpeed", "apex",
                         "transformers"})


def _reinstall_hint(name: str) -> str:
    return REINSTALL_HINTS.get(name) or \
        f"reinstall it: pip install --force-reinstall {PIP_NAMES.get(name, name)}"


def run_checks(decode: bool = True) -> list[Check]:
    """Every check in order; an error inside one becomes a ``fail`` row of its name."""
    rows: list[Check] = []
    torch_error = None
    for name, check in CHECKS:
        if torch_error is not None and name in NEEDS_TORCH:
            rows.append(Check(name, "fail", f"not checked: needs torch, which does not import "
                              f"({torch_error})", "fix torch first (see its row)"))
            continue
        try:
            rows.extend(check(decode) if check is check_dali else check())
        except ImportError as err:  # installed but broken (or missing): reinstall it
            if name == "torch":
                torch_error = _first_line(err)
            rows.append(Check(name, "fail", f"does not import: {_first_line(err)}",
                              _reinstall_hint(name)))
        except Exception as err:  # noqa: BLE001 - a broken part is a row, not a crash
            rows.append(Check(name, "fail", f"the check raised {_first_line(err)}",
                              "report it with this output"))
    return rows


def format_rows(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.status:<7}  {r.detail}")
        if r.hint:
            lines.append(f"{'':<{width}}  {'':<7}  -> {r.hint}")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    """Print the table (and write --json); exit status 1 if any row is ``fail``."""
    from siasam_fast.paths import check_output_file

    if args.json is not None:
        args.json = check_output_file(args.json, "--json", writable=True)
    rows = run_checks(decode=not args.no_decode)
    print(format_rows(rows))
    failed = [r.name for r in rows if r.status == "fail"]
    print(f"\n{len(rows)} checks: " + ", ".join(
        f"{sum(r.status == s for r in rows)} {s}" for s in STATUSES)
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
        except OSError as err:
            print(f"siasam-fast env: error: --json {str(args.json)!r}: {err.strerror or err}",
                  file=sys.stderr)
            return 2
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from siasam_fast.cli import main as cli_main

    return cli_main(["env", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
