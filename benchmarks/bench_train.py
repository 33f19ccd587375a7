"""Training throughput: a plain PyTorch baseline against the siasam-fast stack, in one table.

    python benchmarks/bench_train.py --config configs/clipbert_base.yaml --steps 8      # a GPU
    python benchmarks/bench_train.py --config configs/bench_tiny.yaml --steps 2        # CPU check
    python benchmarks/bench_train.py --list                                            # variants

The same model (``model.*`` of the config, randomly initialised), the same data (the config's
train split, in the same order: one seed, one sampler) and the same recipe (AdamW, warm-up then
linear decay, gradient clipping, L = alpha * L_siamese + L_gt of eq. 8) are trained for ``--steps``
steps after ``--warmup`` untimed ones, under each variant:

(a) baselines, plain PyTorch on one device without DeepSpeed:
    ``baseline-fp32``  PyAV DataLoader with ``dedup=False`` (every clip's frames decoded on their
                       own); the V videos x N clips of a batch reshaped into V*N one-clip
                       pseudo-videos, so every clip's frames go through the CNN separately and the
                       question is tokenised and embedded once per clip (model.py unchanged: the
                       outputs are reshaped back to [V, N, ...] for the loss); the eager reference
                       siamese loss; torch AdamW; fp32 with PyTorch's defaults (on CUDA cuDNN runs
                       the convolutions in TF32: ``precision`` says ``fp32 (tf32 convs)``).
    ``baseline-amp``   the same under torch.amp: fp16 autocast + GradScaler on CUDA, bf16 autocast
                       on CPU.
(b) siasam-fast:
    ``fast-fp16``      DALI (NVDEC) loader, frames de-duplicated (each unique frame decoded and
    ``fast-bf16``      encoded once), the question embedded once per video, the fused Triton
                       siamese kernels, DeepSpeed ZeRO (``--zero-stage``, 2 by default) in fp16
                       (dynamic loss scaling) or bf16, DeepSpeed FusedAdam.
(c) one optimisation at a time, each added alone to ``baseline-amp`` (named ``amp-<what>``;
    ``amp-dedup`` to ``amp-question-once``):
    ``amp-question-once``  the model's own forward on each video (dedup still off, so the CNN still
                           sees all N*B clip frames): the question is embedded once per video;
    ``amp-dedup``          frames decoded once and encoded once (the model's de-duplicated
                           forward, which also embeds the question once: model.py does both in one
                           forward), so its ``base`` is ``amp-question-once``, not
                           ``baseline-amp``: its ``speedup_vs_base`` is de-duplication's share
                           alone;
    ``amp-triton``         the fused Triton siamese kernels instead of the eager reference;
    ``amp-fused-adam``     DeepSpeed FusedAdam instead of torch AdamW (foreach);
    ``amp-deepspeed``      the DeepSpeed engine, ZeRO stage ``--zero-stage``, with its own mixed
                           precision (fp16 + dynamic loss scaling on CUDA, bf16 on CPU) instead of
                           torch.amp;
    ``amp-dali``           the DALI loader (NVDEC), still without de-duplication;
    ``amp-channels-last``  the CNN's frames and weights in channels_last (NHWC) memory layout
                           (``model.memory_format``): cuDNN's tensor-core convolutions read NHWC, so
                           NCHW tensors are transposed around every convolution;
    ``amp-cudnn-benchmark`` cuDNN autotuning (``train.cudnn_benchmark``): the frames per step are
                           fixed by the sampling, so each convolution's algorithm is timed once, in
                           the warm-up.
    Why added to the baseline rather than removed from siasam-fast: each row then differs from one
    measured row (``base``) by exactly one thing, and a gain shows even when another part of the
    stack is the bottleneck (removed from the fast stack, an optimisation that does not touch the
    current bottleneck reads as zero). ``baseline-fp32`` -> ``baseline-amp`` is the mixed-precision
    toggle; ``fast-*`` against ``baseline-amp`` is everything together.

What a machine cannot run is reported, never dropped: a toggle whose subject is missing (Triton,
FusedAdam off CUDA or when its JIT build fails, DALI on CPU, fp16 without CUDA, bf16 on V100) is a
``skipped`` row with the reason; a toggle is never measured with a stand-in for its subject. A
skipped row (for whatever reason: a missing subject, fp16 on CPU, the time budget) describes the
variant as meant (loader=dali, siamese_impl=triton, ...), not a substitute. The siasam-fast rows
substitute what is missing (pyav for DALI, the reference for Triton, torch AdamW(fused=True) for
FusedAdam, no cuDNN autotuning off CUDA) and say so in ``substituted`` (short, also the ``notes``
column of the .md table) and ``notes`` (the reason). DALI's CPU decoder reads VP8 / VP9 /
MJPEG, not the H.264 of the synthetic set, so DALI is a GPU-only option here. ``precision`` says
``fp32 (tf32 convs)`` for the fp32 baseline on CUDA: PyTorch's defaults are kept
(``torch.backends.cudnn.allow_tf32`` is True, so cuDNN runs its convolutions in TF32; matrix
products stay fp32 unless ``allow_tf32`` is set for them too, which the label then says). A
V100 (sm_70) has no TF32: there the row says plain ``fp32``.

Columns (one row per variant; ``benchmarks/results/bench_train_<device>_<config>.csv``, with the
device, library versions and config in every row, plus a .md table, a .png and a .json with the
full config):

- ``videos_per_s``, ``clips_per_s`` (= videos x N), ``step_ms``: from a pass of ``--steps`` steps
  with no synchronisation other than what the stack does itself (GradScaler and DeepSpeed's fp16
  overflow checks read a flag each step), closed by one wait for torch's stream (not the whole
  device: DALI's prefetch of later batches runs on streams of its own). These are the throughput.
  ``step_ms_p50``: the median of the host's step-to-step gaps in that pass; with no wait per step
  a gap is the host's pace, which follows the device's only once the queue of launched work is
  full (or the stack waits), so it is indicative; ``step_ms`` is the sound mean.
- ``data_wait_frac`` (``wait%`` in the table) and ``data_wait_ms_nosync``: the share of that same
  pass's wall time, and the mean per step, that the host spent blocked in the loader's ``next()``.
  Near 0: the loader kept up; well above 0: the loader starves the step (videos_per_s is then the
  loader's rate). Where the host runs ahead of the device (no per-step sync) part of a wait can
  overlap queued GPU work, so it is an upper bound on the GPU's idle time.
- ``step_ms_synced`` = ``data_ms + forward_ms + backward_ms + optimizer_ms``: means over a second
  pass of ``--steps`` steps that synchronises torch's stream between phases (timing mode; not
  DALI's streams, whose prefetch of later batches is not this step's work). data: waiting
  for the loader, tokenising, the host-to-device copy (and the pseudo-video reshape of the
  baseline); forward: model + loss; backward; optimizer: clipping, unscaling, step, schedule.
- ``warmup_steps`` (untimed training steps actually run: ``--warmup`` + ``SETTLE_STEPS``),
  ``drained_batches`` and ``loader_prefetch``: see "Warm-up" below.
- ``peak_gpu_mem_gb``: ``torch.cuda.max_memory_allocated`` over the two timed passes (the
  model, the optimizer's state and what the steps allocate; the counter is reset after the
  warm-up, whose one-offs no timed step repeats: cuDNN's autotuning tries each algorithm with a
  workspace of its own; DALI's own pool is not torch's and is not counted), in GB (1e9 bytes);
  ``n/a`` on CPU. ``peak_gpu_reserved_gb``: ``max_memory_reserved`` over the same passes (it
  starts from what torch's cache held after the warm-up).
  ``peak_host_rss_gb``: the process's peak resident memory, in GB too (cumulative when variants
  share one process).
- ``model_tflop_per_step`` and ``mfu`` (model FLOPs utilisation): ONE figure for every row, the
  useful work of a step: the forward and backward FLOPs of the de-duplicated model (each distinct
  frame through the CNN once, the question embedded once per video) on the epoch's first batch (the
  same videos in every variant), counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix
  products, convolutions, attention; the loss and elementwise work are not counted, they are
  negligible here). Each variant counts it in its own process (``model_tflop_counted``: equal in
  every row by construction, a check); the table's figure is the first row's, and
  ``mfu`` = model_tflop_per_step / step time / the card's dense fp16/bf16 tensor-core peak
  (``PEAK_TFLOPS``, from NVIDIA's datasheets, sparsity excluded; the same peak for every variant, so
  fp32 rows show how far plain fp32 is from it). So a variant that encodes duplicate frames gets no
  credit for them: its MFU is lower exactly by its extra time.
- ``tflop_per_step``, ``achieved_tflops`` and ``hfu`` (hardware FLOPs utilisation): the FLOPs this
  variant actually executed, counted the same way on one extra step of its own after the timing
  (duplicate frames included: the baseline's count is ~1.8x the de-duplicated one on ClipBERT-base,
  pseudo-videos and the eager loss's products included), per step, per second, and over the peak.
  ``frames_encoded_per_video``: frames through the CNN per video (N*B without de-duplication).
  ``mfu`` and ``hfu`` are ``n/a`` on CPU or an unknown GPU.
- ``speedup_vs_baseline_fp32`` and ``speedup_vs_base`` (``base``: the row it differs from).
- ``cnn_layout`` (NCHW or NHWC) and ``cudnn_benchmark``: how the variant runs the CNN.
- ``skipped_steps``: optimizer steps skipped by the fp16 loss scaler during the timed passes (they
  make the optimizer look cheaper), ``final_loss`` a sanity check.

Warm-up. The loader runs ahead of the model: up to ``loader_prefetch`` batches (pyav:
``num_workers x prefetch_factor``, 24 with the ClipBERT-base config; DALI: its queue of
``prefetch_factor x data.decode_group``) are ready after the slow first steps, and a timed window
of a few steps served from that backlog would read as compute-bound with no data wait even where
the loader cannot keep up. So after ``--warmup`` untimed steps the backlog is drained (that many
batches taken from the loader and dropped, no training: ``drained_batches``; seconds, not steps),
then ``SETTLE_STEPS`` untimed steps let the loader's queue reach its steady level (empty when the
loader is the slower side, growing when it is the faster) before both timed passes. The drained
batches are batches the timed steps do not see: the pyav and DALI rows time different (equally
shaped) batches of the same epoch order. A loader that is only just faster than the step starts
the window with a near-empty queue, so its small hiccups show (a slightly pessimistic reading).

Caveats. BatchNorm sees duplicated frames in the baseline and unique frames with de-duplication,
so the two compute the same function in evaluation mode (tests check it) and slightly different
batch statistics in training.

Variants run one after the other: in-process on CPU, each in its own subprocess on CUDA
(``--isolate``): DeepSpeed, DALI's reader processes and the CUDA caching allocator then start clean
for every variant, its memory peak is its own, and a crash or out-of-memory ends that row only.
``--time-budget``: a variant is skipped (said in its row) when less time is left than its base
row took (the median of the rows so far when its base did not run; at least ``MIN_ISOLATED_S``
isolated), so the budget runs the baselines and siasam-fast first and cuts the toggles that no
longer fit instead of starting one that the budget would kill. The rows so far are rewritten after
every variant to STEM.partial.{csv,md,json} (``complete`` False, in the CSV's rows and the JSON);
the finished run writes STEM.{csv,md,json,png} and drops them, so a run cut short (a time limit,
Ctrl-C: exit status 130) leaves an earlier finished run's files as they were.
``--profile [VARIANT ...]`` writes a torch.profiler chrome trace of ``--profile-steps`` extra steps
per profiled variant (all when no name is given) under ``<out>/traces/`` (``--profile-gzip``:
.json.gz, for large GPU traces); the phases are labelled ``data``, ``forward``, ``backward``,
``optimizer``.

When the config's manifest or train annotations are missing, a synthetic set is generated at the
config's image size (``siasam_fast.data.synthetic``, ``--num-videos`` videos) into the manifest's
folder, which must then be laid out as the generator writes it
(``<dir>/annotations/train_qa.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import functools
import gc
import inspect
import json
import logging
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# The parent sends this to an isolated variant past its time before killing it
# (stop_with_stacks): the variant's log then ends with where each of its threads was.
STACK_SIGNAL = signal.SIGUSR2
if __name__ == "__main__" and "--worker" in sys.argv[1:]:
    # An isolated variant: armed from the start, not only once torch, DeepSpeed and siasam_fast
    # are imported (seconds): the signal's default action would kill it silently, leaving an
    # empty log that the timeout row says ends with its stacks.
    faulthandler.register(STACK_SIGNAL, all_threads=True)

ROOT = Path(__file__).resolve().parent.parent

# DALI's reader processes (the DALI rows) start with spawn, CUDA being initialised here, and so
# run this file again as "__mp_main__" before they read a byte. They need none of torch,
# DeepSpeed or siasam_fast (what they run is pickled by value), whose imports cost each of them
# seconds and ~0.4 GB: with configs/clipbert_base.yaml, 12 of them at every DALI pass's start.
if __name__ != "__mp_main__":
    import torch  # noqa: E402

    try:  # siasam_fast.training imports DeepSpeed (and chooses its CPU accelerator when no GPU)
        from siasam_fast import ds_config
        from siasam_fast.benchutil import (
            RESULTS_DIR,
            environment,
            format_table,
            markdown_table,
            positive_float,
            positive_int,
            report_interrupted,
            report_no_rows,
            save_figure,
            write_csv,
        )
        from siasam_fast.config import Config, load_config
        from siasam_fast.extlock import FUSED_ADAM, remove_lock_of_killed_build
        from siasam_fast.losses import total_loss
        from siasam_fast.model import load_tokenizer
        from siasam_fast.paths import write_text_atomic
        from siasam_fast.pipeline.dataset import gather_clips
        from siasam_fast.pipeline.loaders import dali_available
        from siasam_fast.pipeline.workpool import die_with_parent
        from siasam_fast.training import (
            TextEncoder,
            adam_kwargs,
            build_fused_adam_op,
            build_model,
            build_optimizer,
            init_distributed,
            load_data,
            make_loader,
            match_buffer_dtypes,
            seed_everything,
            to_device,
            warmup_linear_decay,
        )
    except ImportError as _err:  # pragma: no cover - an install problem, said plainly
        raise SystemExit(f"bench_train.py needs siasam-fast and its dependencies importable "
                         f"(DeepSpeed included: siasam_fast.training imports it): {_err}") from _err

# ------------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    """One way of training the same model on the same data."""

    name: str
    group: str  # "baseline" | "siasam-fast" | "toggle"
    description: str
    base: str = ""  # the measured row this one differs from
    loader: str = "pyav"  # "pyav" | "dali"
    dedup: bool = False  # unique frames decoded and encoded once
    question_once: bool = False  # False: V*N one-clip pseudo-videos (question per clip)
    siamese_impl: str = "reference"  # "reference" (eager) | "triton" (fused kernels)
    engine: str = "torch"  # "torch" (plain loop) | "deepspeed" (ZeRO engine)
    precision: str = "fp32"  # "fp32" | "amp" (torch.amp, or DeepSpeed's fp16 / bf16) | fp16 | bf16
    optimizer: str = "torch"  # "torch" (AdamW) | "fused" (DeepSpeed FusedAdam)
    channels_last: bool = False  # the CNN in NHWC (model.memory_format=channels_last)
    cudnn_benchmark: bool = False  # cuDNN times its algorithms per shape (train.cudnn_benchmark)

    def __post_init__(self) -> None:
        if self.dedup and not self.question_once:
            raise ValueError(f"variant {self.name}: dedup=True needs question_once=True (the "
                             "model's de-duplicated forward embeds the question once per video)")


_AMP = dict(precision="amp", base="baseline-amp")
_FAST = dict(loader="dali", dedup=True, question_once=True, siamese_impl="triton",
             engine="deepspeed", optimizer="fused", channels_last=True, cudnn_benchmark=True,
             base="baseline-amp")
VARIANTS: tuple[Variant, ...] = (
    Variant("baseline-fp32", "baseline",
            "plain PyTorch: pyav, no dedup, question per clip, eager loss, AdamW, fp32"),
    Variant("baseline-amp", "baseline", "baseline-fp32 under torch.amp (fp16 + GradScaler on "
            "CUDA, bf16 autocast on CPU)", precision="amp", base="baseline-fp32"),
    Variant("fast-fp16", "siasam-fast", "DALI, dedup, question once, Triton loss, DeepSpeed ZeRO "
            "fp16, FusedAdam, channels_last CNN, cuDNN autotuning", precision="fp16", **_FAST),
    Variant("fast-bf16", "siasam-fast", "DALI, dedup, question once, Triton loss, DeepSpeed ZeRO "
            "bf16, FusedAdam, channels_last CNN, cuDNN autotuning", precision="bf16", **_FAST),
    Variant("amp-question-once", "toggle", "baseline-amp + question embedded once per video "
            "(the model's forward; CNN still on all N*B clip frames)", question_once=True, **_AMP),
    Variant("amp-dedup", "toggle", "amp-question-once + frames decoded and encoded once (the "
            "model's de-duplicated forward embeds the question once too)", dedup=True,
            question_once=True, **{**_AMP, "base": "amp-question-once"}),
    Variant("amp-triton", "toggle", "baseline-amp + fused Triton siamese kernels",
            siamese_impl="triton", **_AMP),
    Variant("amp-fused-adam", "toggle", "baseline-amp + DeepSpeed FusedAdam", optimizer="fused",
            **_AMP),
    Variant("amp-deepspeed", "toggle", "baseline-amp + DeepSpeed ZeRO engine (its fp16 / bf16 "
            "instead of torch.amp)", engine="deepspeed", **_AMP),
    Variant("amp-dali", "toggle", "baseline-amp + DALI (NVDEC) loader, no dedup", loader="dali",
            **_AMP),
    Variant("amp-channels-last", "toggle", "baseline-amp + the CNN's frames and weights in "
            "channels_last (NHWC)", channels_last=True, **_AMP),
    Variant("amp-cudnn-benchmark", "toggle", "baseline-amp + cuDNN autotuning "
            "(torch.backends.cudnn.benchmark: each convolution's fastest algorithm, timed once "
            "per shape in the warm-up)", cudnn_benchmark=True, **_AMP),
)
BY_NAME = {v.name: v for v in VARIANTS}

# Dense fp16 / bf16 tensor-core peaks in TFLOP/s (NVIDIA datasheets: H100 SXM5 989.4 (1,979 with
# sparsity), H100 PCIe 756, H100 NVL 835, H200 989 / H200 NVL 835, A100 312, V100 SXM2 125 /
# PCIe 112 / V100S 130, L40S 362, L40 181, A10 / A10G 125, L4 121). Matched in order, as whole
# words, against torch.cuda.get_device_name() (peak_for_name: "L4" is not "L40"): the H100 SXM
# reports itself as "NVIDIA H100 80GB HBM3". HARDWARE.md: about 800 TFLOP/s measured for
# a large bf16 matrix product on this project's H100, i.e. 81% of the datasheet number.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4), ("H200 NVL", 835.0), ("H200", 989.4), ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0),
    ("V100S", 130.0), ("V100 PCIE", 112.0), ("V100", 125.0), ("L40S", 362.0), ("L40", 181.0),
    ("A10G", 125.0), ("A10", 125.0), ("L4", 121.0),
)
PEAK_SOURCE = "NVIDIA datasheet, dense fp16/bf16 tensor core"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def peak_for_name(name: str) -> float | None:
    """The first ``PEAK_TFLOPS`` key whose words appear as whole, consecutive words of ``name``
    ("L4" matches "NVIDIA L4", not "NVIDIA L40S"; "V100 PCIE" matches "Tesla V100-PCIE-32GB")."""
    words = _words(name)
    for key, value in PEAK_TFLOPS:
        k = _words(key)
        if any(words[i:i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            return value
    return None


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


# ------------------------------------------------------------------------------------------------
# A variant resolved for this machine


@dataclass
class Plan:
    """What a variant runs here (substitutions in ``substituted`` and ``notes``), or why it
    cannot (``skip``: the plan then keeps the variant's own settings)."""

    variant: Variant
    loader: str
    siamese_impl: str
    engine: str
    precision: str  # fp32 | amp-fp16 | amp-bf16 (torch.amp) | fp16 | bf16 (DeepSpeed)
    optimizer: str  # torch | fused
    zero_stage: int
    notes: list[str] = field(default_factory=list)
    substituted: list[str] = field(default_factory=list)  # short: "pyav for DALI", ...
    skip: str = ""
    tf32: str = ""  # fp32 on CUDA: what PyTorch's TF32 switches let run in TF32


class SubjectMissing(Exception):
    """A toggle's subject cannot run here (found while building it): the row is skipped."""


def substitute(plan: Plan, what: str, fallback: str, reason: str) -> None:
    """Record that a siasam-fast row runs ``fallback`` instead of ``what``."""
    plan.notes.append(f"{fallback} instead of {what}: {reason}")
    plan.substituted.append(f"{fallback} for {what}")


def tf32_label(device: torch.device | None = None) -> str:
    """What PyTorch's TF32 switches let an fp32 step run in TF32 on CUDA (its defaults: cuDNN's
    convolutions yes, matrix products no); nothing before Ampere (a V100, sm_70, has no TF32:
    the switches change nothing there)."""
    try:
        if tuple(torch.cuda.get_device_capability(device)) < (8, 0):
            return ""
    except (AssertionError, RuntimeError):  # no usable device to ask: the switches say it
        pass
    parts = [what for what, on in (("convs", torch.backends.cudnn.allow_tf32),
                                   ("matmuls", torch.backends.cuda.matmul.allow_tf32)) if on]
    return f"tf32 {' + '.join(parts)}" if parts else ""


def resolve(variant: Variant, device: torch.device, zero_stage: int) -> Plan:
    cuda = device.type == "cuda"
    plan = Plan(variant, variant.loader, variant.siamese_impl, variant.engine, variant.precision,
                variant.optimizer, zero_stage)
    toggle = variant.group == "toggle"

    def missing(what: str, reason: str, fallback: str, intended: str) -> str:
        """A toggle is skipped and keeps its own setting (``intended``: what the row describes);
        a siasam-fast row runs ``fallback`` and says so."""
        if toggle:
            plan.skip = plan.skip or reason
            return intended
        substitute(plan, what, {"torch": "torch AdamW"}.get(fallback, fallback), reason)
        return fallback

    if variant.loader == "dali":
        reason = ""
        if not cuda:
            reason = ("DALI decodes H.264 on NVDEC only (its CPU decoder reads VP8/VP9/MJPEG, the "
                      "synthetic set is H.264)")
        elif not dali_available():
            reason = "nvidia-dali is not installed"
        if reason:
            plan.loader = missing("DALI", reason, "pyav", variant.loader)
    if variant.siamese_impl == "triton" and not cuda:
        plan.siamese_impl = missing("Triton", "the fused Triton kernels need CUDA (the Triton "
                                    "interpreter runs them on CPU, but that is no speed)",
                                    "reference", variant.siamese_impl)
    if variant.optimizer == "fused" and not cuda:
        plan.optimizer = missing("FusedAdam", "DeepSpeed FusedAdam needs CUDA", "torch",
                                 variant.optimizer)
    if variant.cudnn_benchmark and not cuda:
        if toggle:
            plan.skip = plan.skip or "cuDNN autotuning needs CUDA (cuDNN)"
        else:
            plan.notes.append("no cuDNN autotuning here: cuDNN is CUDA only")
            plan.substituted.append("no cuDNN autotuning")
    if variant.precision == "amp":
        if variant.engine == "torch":
            plan.precision = "amp-fp16" if cuda else "amp-bf16"
        else:  # DeepSpeed's mixed precision in the same 16-bit type as torch.amp's
            plan.precision = "fp16" if cuda else "bf16"
    if plan.engine == "deepspeed" and plan.precision == "fp16" and not cuda:
        plan.skip = plan.skip or "fp16 needs a CUDA GPU (DeepSpeed refuses it on CPU)"
    if plan.precision in ("bf16", "amp-bf16") and cuda and not ds_config.has_bf16():
        plan.skip = plan.skip or f"{torch.cuda.get_device_name()} has no bf16 (e.g. V100)"
    if plan.precision == "fp32" and cuda:
        plan.tf32 = tf32_label(device)  # PyTorch's defaults are kept: said, not changed
    return plan


# ------------------------------------------------------------------------------------------------
# Data


def ensure_data(cfg: Config, num_videos: int) -> None:
    """Generate the config's synthetic set (at its image size) when its files are missing."""
    manifest, train = Path(cfg.data.manifest), Path(cfg.data.train)
    if not cfg.data.manifest or not cfg.data.train:
        raise ValueError("the config needs data.train and data.manifest (see configs/"
                         "bench_tiny.yaml)")
    if manifest.is_file() and train.is_file():
        return
    root = manifest.parent
    if train.resolve() != (root / "annotations" / "train_qa.json").resolve():
        raise FileNotFoundError(
            f"data.manifest={str(manifest)!r} or data.train={str(train)!r} is missing, and they "
            f"are not laid out as the synthetic generator writes them ({root}/manifest.jsonl and "
            f"{root}/annotations/train_qa.json), so the benchmark cannot generate them")
    from siasam_fast.data.synthetic import generate
    from siasam_fast.pipeline.manifest import build_manifest

    t0 = time.perf_counter()
    print(f"generating {num_videos} synthetic videos at {cfg.data.image_size} px into {root} ...",
          flush=True)
    generate(root, num_videos, seed=0, size=cfg.data.image_size, progress=False)
    # Our own fresh files: indexing the packets is enough (no full-decode probe).
    build_manifest(root / "videos", manifest, workers=0, mode="demux", progress=False)
    print(f"generated in {time.perf_counter() - t0:.1f} s", flush=True)


def fit_workers_to_shm(cfg: Config, plan: Plan, notes: list[str]) -> int:
    """PyAV workers hand batches over in /dev/shm (prefetch_factor 2 each): fewer workers when
    it cannot hold that (containers often give it 64 MB)."""
    workers = cfg.data.num_workers
    if plan.loader != "pyav" or workers <= 1 or not os.path.isdir("/dev/shm"):
        return workers
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    s = cfg.sampling
    frames = s.num_clips * (max(s.frames_per_clip) if isinstance(s.frames_per_clip, tuple)
                            else s.frames_per_clip)
    batch = cfg.train.batch_size * frames * 3 * cfg.data.image_size ** 2 * 4
    fit = max(1, int(0.5 * free // (2 * batch)))
    if fit < workers:
        notes.append(f"{fit} loader workers instead of {workers}: /dev/shm has "
                     f"{free / 2**30:.1f} GiB free")
        return fit
    return workers


def endless(loader, batch_size: int):
    """Full batches forever (epochs wrap around; a short last batch is dropped). An epoch that
    gives no full batch (no examples left, or fewer than ``batch_size``) is an error: it would
    never give one."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        full = 0
        for batch in loader:
            if len(batch["example_index"]) == batch_size:
                full += 1
                yield batch
        if not full:
            raise RuntimeError(
                f"the train loader gave no full batch of {batch_size} videos in epoch {epoch} "
                "(too few examples left after the manifest's corrupt or missing videos?)")
        epoch += 1


def single_clip_videos(batch: dict, text: TextEncoder) -> dict:
    """The plain baseline's view of a batch decoded without de-duplication: V videos x N clips ->
    V*N one-clip pseudo-videos, each with its own B frames and its own tokenised copy of the
    question, in the batch contract the model reads (so model.py stays as it is)."""
    frames, clip_index, frame_mask = batch["frames"], batch["clip_index"], batch["frame_mask"]
    V, N, B = clip_index.shape
    in_order = torch.arange(N * B).view(1, N, B).expand(V, N, B)
    if frames.shape[1] == N * B and torch.equal(clip_index.cpu(), in_order):
        clips = frames.reshape(V * N, B, *frames.shape[2:])  # clip n: U slots nB .. nB+B-1
    else:  # B varies between videos, or a de-duplicated batch: gather (zeros at padding)
        clips = gather_clips(frames, clip_index.to(frames.device),
                             frame_mask.to(frames.device)).flatten(0, 1)
    tokens = text({"question": [q for q in batch["question"] for _ in range(N)],
                   "candidates": [c for c in batch["candidates"] for _ in range(N)]})
    return {
        "frames": clips,
        "num_unique": frame_mask.reshape(V * N, B).sum(1),  # padding is a tail: never encoded
        "clip_index": torch.arange(B).repeat(V * N, 1).view(V * N, 1, B),
        "frame_mask": frame_mask.reshape(V * N, 1, B),
        "clip_mask": batch["clip_mask"].reshape(V * N, 1),
        **tokens,
    }


def per_video_outputs(outputs: dict, V: int, N: int) -> dict:
    """Pseudo-video outputs [V*N, 1, ...] back to [V, N, ...] for the loss."""
    return {k: v.reshape(V, N, *v.shape[2:]) for k, v in outputs.items()}


LOSS_KEYS = ("clip_mask", "label", "answer_index", "count")
MIN_ISOLATED_S = 30  # an isolated variant needs this much at least (start, imports, model build)
# Set by the parent when its one FusedAdam build failed: the variants then fall back (or skip the
# FusedAdam toggle) at once instead of each retrying a build that eats its --variant-timeout.
FUSED_ADAM_PROBLEM_ENV = "SIASAM_BENCH_FUSED_ADAM_PROBLEM"
FUSED_ADAM_BUILD_S = 300  # the most the one FusedAdam build may take (nvcc: about a minute)
STACK_WAIT_S = 3  # how long a timed-out variant gets to write its stacks


def _process_seconds() -> float:
    """Seconds since this process started (its imports included)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or refused: since this module's import
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def progress(args, text: str) -> None:
    """A time-stamped line in an isolated variant's log (its process's age): where a variant's
    time goes, and where one that timed out was."""
    if getattr(args, "worker", None):
        print(f"[{_process_seconds():6.1f} s] {text}", flush=True)

# ------------------------------------------------------------------------------------------------
# One variant's training step, in phases


class Trainer:
    """The model, optimizer and the four phases of a step for one plan."""

    def __init__(self, plan: Plan, cfg: Config, data, tokenizer, device: torch.device,
                 total_steps: int):
        self.plan, self.cfg, self.device = plan, copy.deepcopy(cfg), device
        cfg = self.cfg
        cfg.siamese.impl = plan.siamese_impl
        self.text = TextEncoder(tokenizer, cfg.task, cfg.data.max_question_len,
                                cfg.data.mc_text)
        seed_everything(cfg.train.seed, 0)  # same initial weights in every variant
        layout_device = device if plan.engine == "torch" else None  # DeepSpeed: frames only
        model = build_model(cfg, len(data.ans2label), len(tokenizer), layout_device).to(device)
        self.num_params = sum(p.numel() for p in model.parameters())
        optimizer, self.optimizer_name = self._optimizer(model, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_linear_decay(total_steps, cfg.train.warmup_ratio))
        self.autocast = contextlib.nullcontext
        self.scaler = None
        if plan.engine == "deepspeed":
            import deepspeed

            init_distributed()
            ds = ds_config.load_ds_config(None, plan.precision, stage=plan.zero_stage)
            ds = ds_config.finalize(ds, cfg.train.batch_size, cfg.train.grad_clip, 1)
            engine, optimizer, _, scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
            match_buffer_dtypes(engine.module)
            self.model, self.module = engine, engine.module
            self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16,
                          "fp32": torch.float32}[plan.precision]
        else:
            self.model = self.module = model
            self.dtype = torch.float32
            if plan.precision.startswith("amp-"):
                amp_dtype = torch.float16 if plan.precision == "amp-fp16" else torch.bfloat16
                self.autocast = lambda: torch.autocast(device.type, dtype=amp_dtype)
                if amp_dtype == torch.float16:
                    self.scaler = torch.amp.GradScaler(device.type)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _optimizer(self, model, device):
        cfg = self.cfg
        if self.plan.optimizer == "fused":
            cfg.train.optimizer = "deepspeed"
            try:
                problem = os.environ.get(FUSED_ADAM_PROBLEM_ENV)
                if problem:  # the parent's build failed: no second try
                    raise RuntimeError(problem)
                return build_optimizer(model, cfg, device)
            except Exception as err:  # noqa: BLE001 - a JIT build can fail many ways
                first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                why = f"DeepSpeed FusedAdam did not load: {first[:200]}"
                if self.plan.variant.group == "toggle":  # its subject: no stand-in measured
                    raise SubjectMissing(why) from err
                substitute(self.plan, "FusedAdam", "torch AdamW(fused=True)", why)
                cfg.train.optimizer = "torch"
                plain, _ = build_optimizer(model, cfg, device)
                groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                          for g in plain.param_groups]
                return torch.optim.AdamW(groups, fused=True, **adam_kwargs(cfg)), \
                    "torch AdamW (fused)"
        cfg.train.optimizer = "torch"
        optimizer, name = build_optimizer(model, cfg, device)
        return optimizer, name + (" (foreach)" if device.type == "cuda" else "")

    # -- phases ----------------------------------------------------------------------------------

    def prepare(self, raw: dict) -> tuple[dict, dict, int]:
        """Tokenise, reshape (baseline), copy to the device: (model batch, loss batch, frames
        through the CNN)."""
        encoded = int(raw["num_unique"].sum())
        if self.plan.variant.question_once:
            raw.update(self.text(raw))
            batch = to_device(raw, self.device, self.dtype)
            return batch, batch, encoded
        single = to_device(single_clip_videos(raw, self.text), self.device, self.dtype)
        targets = to_device({k: raw[k] for k in LOSS_KEYS}, self.device, self.dtype)
        return single, targets, encoded

    def forward(self, batch: dict, targets: dict) -> tuple[torch.Tensor, dict]:
        with self.autocast():
            outputs = self.model(batch)
            if batch is not targets:  # pseudo-videos: back to [V, N, ...]
                outputs = per_video_outputs(outputs, *targets["clip_mask"].shape)
            return total_loss(outputs, targets, self.cfg.task, self.cfg.siamese,
                              self.module.reasoning)

    def backward(self, loss: torch.Tensor) -> None:
        if self.plan.engine == "deepspeed":
            self.model.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> None:
        if self.plan.engine == "deepspeed":
            self.model.step()  # clipping, loss scaling, schedule, zero_grad
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        # No set_to_none: DeepSpeed's FusedAdam (amp-fused-adam) overrides zero_grad() without
        # arguments (a TypeError); it sets the grads to None by default, as torch's optimizers do.
        self.optimizer.zero_grad()

    def skipped_steps(self) -> float:
        """Optimizer steps skipped by loss scaling so far (a counter or the scale's halvings)."""
        if self.plan.engine == "deepspeed":
            return float(self.model.skipped_steps)
        if self.scaler is not None:  # GradScaler halves on overflow; growth is 2000 steps away
            return math.log2(65536.0 / self.scaler.get_scale())
        return 0.0

    def close(self) -> None:
        if self.plan.engine == "deepspeed" and hasattr(self.model, "destroy"):
            with contextlib.suppress(Exception):  # frees ZeRO's buffers; best effort
                self.model.destroy()
        self.model = self.module = self.optimizer = self.scheduler = self.params = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_sync(device: torch.device) -> None:
    """Wait for the work queued on torch's current stream (DeepSpeed joins its side streams to
    it), not for every stream of the device: DALI prefetches the next batches on streams of its
    own, and a device-wide wait would bill that work to the training phases."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def run_step(trainer: Trainer, batches, timing: bool) -> tuple[dict, torch.Tensor, int]:
    """One step; with ``timing`` torch's stream is synchronised after each phase."""
    device = trainer.device
    hold = (lambda: phase_sync(device)) if timing else (lambda: None)
    t0 = time.perf_counter()
    with torch.profiler.record_function("data"):
        raw = next(batches)
        t_wait = time.perf_counter()
        batch, targets, encoded = trainer.prepare(raw)
        hold()
    t1 = time.perf_counter()
    with torch.profiler.record_function("forward"):
        loss, _ = trainer.forward(batch, targets)
        hold()
    t2 = time.perf_counter()
    with torch.profiler.record_function("backward"):
        trainer.backward(loss)
        hold()
    t3 = time.perf_counter()
    with torch.profiler.record_function("optimizer"):
        trainer.step()
        hold()
    t4 = time.perf_counter()
    return {"wait": t_wait - t0, "data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2,
            "optimizer": t4 - t3, "step": t4 - t0}, loss, encoded


def count_flops(trainer: Trainer, batches, notes: list[str]) -> float:
    """FLOPs of one step of this variant as it runs (FlopCounterMode), forward and backward, then
    the step itself: what the hardware executed (duplicate frames and pseudo-videos included)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch, targets, _ = trainer.prepare(next(batches))
    with FlopCounterMode(display=False) as counter:
        loss, _ = trainer.forward(batch, targets)
        forward = counter.get_total_flops()
        trainer.backward(loss)
    trainer.step()
    total = float(counter.get_total_flops())
    if total < 1.5 * forward:  # backward ran where the counter did not see it
        notes.append("backward FLOPs not seen by FlopCounterMode: counted as 2x the forward")
        total = 3.0 * forward
    return total


def count_model_flops(trainer: Trainer, raw: dict, notes: list[str]) -> float:
    """FLOPs of the de-duplicated model on ``raw`` (a :func:`dedup_batch`): its forward and the
    backward to every trainable parameter (``autograd.grad``: no ``.grad`` written, no optimizer
    hook fires), the loss left out. The same number in every variant: it depends only on the
    model, the batch's shapes and the de-duplicated forward, not on how the variant runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from siasam_fast.model import activation_checkpointing_off

    batch = to_device({**raw, **trainer.text(raw)}, trainer.device, trainer.dtype)
    params = [p for p in trainer.module.parameters() if p.requires_grad]
    # model.activation_checkpointing's recomputation is not useful work (HFU counts it, not MFU)
    with activation_checkpointing_off(trainer.module), FlopCounterMode(display=False) as counter:
        with trainer.autocast():
            outputs = trainer.module(batch)
        forward = counter.get_total_flops()
        surrogate = sum(o.float().sum() for o in outputs.values()
                        if torch.is_tensor(o) and o.is_floating_point())
        torch.autograd.grad(surrogate, params, allow_unused=True)
    total = float(counter.get_total_flops())
    if total < 1.5 * forward:
        notes.append("model backward FLOPs not seen by FlopCounterMode: counted as 2x forward")
        total = 3.0 * forward
    return total


def dedup_batch(raw: dict) -> dict:
    """The de-duplicated form of a loader batch, on the CPU: each video's distinct frames (by
    ``frame_ids``, the source frame numbers) once, ``clip_index`` pointing at them, the text and
    the targets as they were. A batch already de-duplicated comes back the same up to the order
    of its frames. Used to count the model FLOPs of a step in every variant on the same work."""
    ids = raw["frame_ids"].cpu()
    mask = raw["frame_mask"].cpu()
    index = raw["clip_index"].cpu()
    V = index.shape[0]
    picks, counts = [], []
    new_index = torch.zeros_like(index)
    for v in range(V):
        valid = mask[v]
        unique, inverse = torch.unique(ids[v][valid], return_inverse=True)
        # the slot of one occurrence of each distinct frame (any: they hold the same pixels)
        slot = torch.zeros(len(unique), dtype=torch.long).scatter_(0, inverse, index[v][valid])
        new_index[v][valid] = inverse
        picks.append(slot)
        counts.append(len(unique))
    source = raw["frames"]  # on the GPU from DALI: copied over one video at a time
    frames = torch.zeros(V, max(counts), *source.shape[2:], dtype=source.dtype)
    for v, slot in enumerate(picks):
        frames[v, : len(slot)] = source[v].index_select(0, slot.to(source.device)).cpu()
    out = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in raw.items()
           if k not in ("frames", "clips")}
    out.update(frames=frames, num_unique=torch.tensor(counts, dtype=torch.long),
               clip_index=new_index, frame_mask=mask.clone())
    return out


def _prepend(first, rest):
    try:
        yield first
        yield from rest
    finally:
        rest.close()  # closed early too (after ``first``): stops the loader's workers


def loader_prefetch(plan: Plan, cfg: Config) -> int:
    """Batches the loader can hold ready ahead of the step: pyav's DataLoader keeps
    ``prefetch_factor`` batches in flight per worker, DALI ``prefetch_factor`` iterations of
    ``decode_group`` batches (``build_video_loader``'s default ``prefetch_factor``, which
    ``make_loader`` keeps)."""
    from siasam_fast.pipeline.dataset import build_loader

    factor = inspect.signature(build_loader).parameters["prefetch_factor"].default
    if plan.loader == "dali":
        return factor * max(1, int(getattr(cfg.data, "decode_group", 1) or 1))
    return factor * cfg.data.num_workers if cfg.data.num_workers > 0 else 0


SETTLE_STEPS = 2  # untimed steps after the drain (the first waits for a freshly decoded batch)


def measure(trainer: Trainer, batches, device: torch.device, warmup: int, steps: int,
            prefetch: int, say=lambda text: None) -> dict:
    """Warm up, drain the loader's backlog, settle, then the two timed passes (unsynchronised,
    then synchronised between phases); ``say`` reports each stage."""
    t_warm = time.perf_counter()
    for i in range(warmup):
        t = time.perf_counter()
        run_step(trainer, batches, timing=False)
        say(f"warm-up step {i + 1}/{warmup}: {time.perf_counter() - t:.2f} s (unsynchronised)")
    # The slow first steps let the loader fill its queue; timed steps served from that backlog
    # would hide a loader slower than the step. Take it out (no training), then let the queue
    # find its steady level.
    t_drain = time.perf_counter()
    for _ in range(prefetch):
        next(batches)
    drain_s = time.perf_counter() - t_drain
    say(f"drained the loader's {prefetch} prefetched batches in {drain_s:.2f} s")
    for _ in range(SETTLE_STEPS):
        run_step(trainer, batches, timing=False)
    sync(device)
    warmup_s = time.perf_counter() - t_warm
    if device.type == "cuda":  # the peak of the timed steps, not the warm-up's one-offs
        torch.cuda.reset_peak_memory_stats(device)
    say(f"{SETTLE_STEPS} settling steps done; timing {steps} steps x 2 passes")
    skipped0 = trainer.skipped_steps()

    # Throughput: no synchronisation but the stack's own, one sync at the end.
    waits, bounds, encoded = [], [], []
    t_start = time.perf_counter()
    for _ in range(steps):
        times, loss, enc = run_step(trainer, batches, timing=False)
        waits.append(times["wait"])
        bounds.append(time.perf_counter())
        encoded.append(enc)
    phase_sync(device)  # torch's stream: not DALI's prefetch of later batches
    total = time.perf_counter() - t_start
    gaps = [b - a for a, b in zip([t_start] + bounds[:-1], bounds)]
    say(f"pass 1 (unsynchronised): {total / steps * 1e3:.1f} ms/step")

    # Phase split: synchronised after every phase.
    phases = []
    for _ in range(steps):
        times, loss, enc = run_step(trainer, batches, timing=True)
        phases.append(times)
        encoded.append(enc)
    say(f"pass 2 (synchronised phases): "
        f"{statistics.fmean(p['step'] for p in phases) * 1e3:.1f} ms/step")
    return {"total": total, "gaps": gaps, "waits": waits, "phases": phases, "encoded": encoded,
            "loss": float(loss.detach()), "skipped": trainer.skipped_steps() - skipped0,
            "warmup_s": warmup_s, "warmup_steps": warmup + SETTLE_STEPS,
            "drained": prefetch, "drain_s": drain_s}


def start_batches(plan: Plan, cfg: Config, data):
    """The loader's endless batches; a DALI loader that fails before its first batch gives way
    to pyav in the siasam-fast rows (said in the notes) and fails the DALI toggle."""
    V = cfg.train.batch_size
    batches = endless(make_loader(cfg, data, "train", 0, 1), V)
    if plan.loader != "dali":
        return batches
    try:
        first = next(batches)
    except Exception as err:  # noqa: BLE001 - DALI raises plain RuntimeErrors
        batches.close()
        if plan.variant.group == "toggle":
            raise
        substitute(plan, "DALI", "pyav", f"DALI's loader failed: {_first_line(err)}")
        plan.loader = cfg.data.backend = "pyav"
        cfg.data.num_workers = fit_workers_to_shm(cfg, plan, plan.notes)
        return endless(make_loader(cfg, data, "train", 0, 1), V)
    return _prepend(first, batches)


# ------------------------------------------------------------------------------------------------
# Running one variant


def run_variant(plan: Plan, cfg: Config, args, device: torch.device) -> dict:
    """Build, warm up, time (unsynchronised, then phase by phase), optionally profile."""
    v = plan.variant
    vcfg = copy.deepcopy(cfg)
    vcfg.data.backend, vcfg.data.dedup = plan.loader, v.dedup
    vcfg.model.memory_format = "channels_last" if v.channels_last else "contiguous"
    vcfg.train.cudnn_benchmark = v.cudnn_benchmark
    if vcfg.model.activation_checkpointing != "none":  # from --set: the row recomputes
        plan.notes.append(f"model.activation_checkpointing={vcfg.model.activation_checkpointing}"
                          ": activations recomputed in the backward (in HFU, not in MFU)")
    vcfg.data.num_workers = fit_workers_to_shm(vcfg, plan, plan.notes)
    V, N = cfg.train.batch_size, cfg.sampling.num_clips
    profiled = args.profile is not None and (not args.profile or v.name in args.profile)
    profile_steps = args.profile_steps if profiled else 0
    total_steps = args.warmup + SETTLE_STEPS + 2 * args.steps + profile_steps + 1  # + FLOP count
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    say = functools.partial(progress, args)
    t_build = time.perf_counter()
    data = load_data(vcfg)
    tokenizer = load_tokenizer(vcfg.model)
    say(f"data and tokenizer loaded ({len(data.examples['train'])} train examples)")
    usable = len(data.examples["train"])
    if usable < V:
        raise ValueError(f"the train split has {usable} examples, fewer than "
                         f"train.batch_size={V}: generate more (--num-videos)")
    trainer = Trainer(plan, vcfg, data, tokenizer, device, total_steps)
    num_params, optimizer_name = trainer.num_params, trainer.optimizer_name
    say(f"model and {optimizer_name} built; starting the {plan.loader} loader "
        f"({vcfg.data.num_workers} workers)")
    source = start_batches(plan, vcfg, data)
    prefetch = loader_prefetch(plan, vcfg)  # after start_batches: DALI may have given way to pyav
    if plan.loader == "dali" and vcfg.data.dali_trim and device.type == "cuda":
        from siasam_fast.pipeline.dali_check import gpu_trims_exactly

        trims, why = gpu_trims_exactly(device.index or 0)  # the loader's check, cached
        if not trims:
            plan.notes.append(f"DALI decoded whole files: {why}")
    batches = source
    cudnn_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = vcfg.train.cudnn_benchmark and device.type == "cuda"
    try:
        # The epoch's first batch, de-duplicated and kept on the host: the model-FLOPs count runs
        # on it in every variant (the same videos everywhere, whatever the loader).
        first = next(source)
        model_batch = dedup_batch(first)
        batches = _prepend(first, source)
        del first
        used = V * (total_steps + prefetch)
        if usable < used:
            plan.notes.append(f"{usable} train examples for {used} per run: epochs wrap")
        build_s = time.perf_counter() - t_build
        say(f"first batch after {build_s:.1f} s of building")
        m = measure(trainer, batches, device, args.warmup, args.steps, prefetch, say)
        mem = (torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
               else None)
        reserved = (torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda"
                    else None)

        trace = ""
        if profiled:
            trace = profile_variant(trainer, batches, args, v.name, device)
            say(f"profiled {args.profile_steps} steps: {trace}")
        flops = model_flops = None
        try:  # last: a failure here must not cost the timings
            flops = count_flops(trainer, batches, plan.notes)
        except Exception as err:  # noqa: BLE001
            plan.notes.append(f"FLOPs not counted: {type(err).__name__}: {_first_line(err)}")
        try:
            model_flops = count_model_flops(trainer, model_batch, plan.notes)
        except Exception as err:  # noqa: BLE001
            plan.notes.append(f"model FLOPs not counted: {type(err).__name__}: "
                              f"{_first_line(err)}")
        say("FLOPs counted; closing the loader")
    finally:
        torch.backends.cudnn.benchmark = cudnn_before
        batches.close()  # stops the loader's workers / DALI's readers
        source.close()
        trainer.close()
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    step_s = m["total"] / args.steps
    peak = peak_tflops(device)
    na = "n/a"
    phases = m["phases"]
    mean = {k: statistics.fmean(p[k] for p in phases) for k in phases[0]}
    ms = 1e3
    return {
        **describe(plan),
        "optimizer": optimizer_name,
        "status": "ok",
        "reason": "",
        "videos_per_s": V / step_s,
        "clips_per_s": V * N / step_s,
        "step_ms": step_s * ms,
        "step_ms_p50": statistics.median(m["gaps"]) * ms,
        "data_wait_frac": sum(m["waits"]) / m["total"],
        "data_wait_ms_nosync": statistics.fmean(m["waits"]) * ms,
        "step_ms_synced": mean["step"] * ms,
        "step_ms_synced_p50": statistics.median(p["step"] for p in phases) * ms,
        "data_ms": mean["data"] * ms,
        "forward_ms": mean["forward"] * ms,
        "backward_ms": mean["backward"] * ms,
        "optimizer_ms": mean["optimizer"] * ms,
        "peak_gpu_mem_gb": "n/a" if mem is None else mem,
        "peak_gpu_reserved_gb": "n/a" if reserved is None else reserved,
        "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # KiB
        "model_tflop_counted": na if model_flops is None else model_flops / 1e12,
        "tflop_per_step": na if flops is None else flops / 1e12,
        "achieved_tflops": na if flops is None else flops / step_s / 1e12,
        "hfu": na if peak is None or flops is None else flops / step_s / (peak * 1e12),
        "peak_tflops": "n/a" if peak is None else peak,
        "frames_encoded_per_video": statistics.fmean(m["encoded"]) / V,
        "num_params": num_params,
        "skipped_steps": m["skipped"],
        "final_loss": m["loss"],
        "build_s": build_s,
        "warmup_s": m["warmup_s"],
        "warmup_steps": m["warmup_steps"],
        "drained_batches": m["drained"],
        "drain_s": m["drain_s"],
        "loader_prefetch": prefetch,
        "loader_workers": vcfg.data.num_workers,
        "trace": trace,
        "notes": "; ".join(plan.notes),
    }


def profile_variant(trainer: Trainer, batches, args, name: str, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            run_step(trainer, batches, timing=False)
        sync(device)
    folder = Path(args.out_dir) / "traces"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trace_{args.stem}_{name}.json{'.gz' if args.profile_gzip else ''}"
    prof.export_chrome_trace(str(path))
    return str(path)


def describe(plan: Plan) -> dict:
    v = plan.variant
    engine = "torch" if plan.engine == "torch" else f"deepspeed-zero{plan.zero_stage}"
    optimizer = {"torch": "torch AdamW", "fused": "DeepSpeed FusedAdam"}[plan.optimizer]
    precision = plan.precision + (f" ({plan.tf32})" if plan.tf32 else "")
    return {"variant": v.name, "group": v.group, "base": v.base, "loader": plan.loader,
            "dedup": v.dedup, "question": "once" if v.question_once else "per clip",
            "siamese_impl": plan.siamese_impl, "engine": engine, "precision": precision,
            "cnn_layout": "NHWC" if v.channels_last else "NCHW",
            "cudnn_benchmark": v.cudnn_benchmark,
            "optimizer": optimizer, "description": v.description,
            "substituted": "; ".join(plan.substituted)}


def skipped_row(plan: Plan, status: str, reason: str) -> dict:
    """The row of a variant that has no timings. ``skipped``: nothing ran, so the row describes
    the variant as meant (no stand-ins: a fast row skipped here shows loader=dali, not the pyav it
    would have fallen back to). ``failed`` / ``timeout`` / ``oom``: the plan as it ran."""
    if status == "skipped":
        v = plan.variant
        plan = Plan(v, v.loader, v.siamese_impl, v.engine, plan.precision, v.optimizer,
                    plan.zero_stage, skip=plan.skip, tf32=plan.tf32)
    return {**describe(plan), "status": status, "reason": reason, "notes": "; ".join(plan.notes)}


# ------------------------------------------------------------------------------------------------
# Driver


def run_in_process(plan: Plan, cfg: Config, args, device) -> dict:
    try:
        return run_variant(plan, cfg, args, device)
    except SubjectMissing as err:  # a toggle whose subject turned out missing: said, not timed
        return skipped_row(plan, "skipped", str(err))
    except Exception as err:  # noqa: BLE001 - one failed variant must not end the others
        traceback.print_exc()
        status = "oom" if isinstance(err, torch.cuda.OutOfMemoryError) else "failed"
        return skipped_row(plan, status, f"{type(err).__name__}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else repr(err))[:300]


def stop_with_stacks(proc: subprocess.Popen) -> None:
    """Stop an isolated variant that ran out of time: ask it for its stacks (its log then ends
    with where it was), give it ``STACK_WAIT_S`` to write them, then kill its process group (the
    variant and its loader's processes)."""
    try:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, STACK_SIGNAL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STACK_WAIT_S)
    finally:  # Ctrl-C in the wait too: its own session would not see it and run on
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def popen_own_session(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``cmd`` in a session of its own (its process group is stopped as a whole; the terminal's
    Ctrl-C reaches only this script, which stops it), ended when this script ends, even killed
    with SIGKILL (a job's time limit): a variant left running would hold the GPU."""
    return subprocess.Popen(cmd, start_new_session=True,
                            preexec_fn=functools.partial(die_with_parent, os.getpid()), **kwargs)


def run_isolated(plan: Plan, args, argv: list[str], timeout: float | None) -> dict:
    """The variant in a fresh interpreter: its row comes back as JSON, its output in a log."""
    logs = Path(args.out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{args.stem}_{plan.variant.name}.log"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv,
               "--worker", plan.variant.name, "--worker-json", str(out)]
        with log.open("w") as fh:
            proc = popen_own_session(cmd, stdout=fh, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_with_stacks(proc)
                return skipped_row(plan, "timeout", f"no result within {timeout:.0f} s "
                                   f"(log: {log}, which ends with where it was)")
            except KeyboardInterrupt:  # its own session does not see the terminal's Ctrl-C
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        if out.is_file():
            return json.loads(out.read_text())
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return skipped_row(plan, "failed", f"exit status {rc}: {tail[-1][:300] if tail else ''} "
                       f"(log: {log})")


def worker_main(args, cfg: Config, device: torch.device) -> int:
    plan = resolve(BY_NAME[args.worker], device, args.zero_stage)
    print(f"variant {plan.variant.name} on {device}: {plan.variant.description}", flush=True)
    row = run_in_process(plan, cfg, args, device)
    Path(args.worker_json).write_text(json.dumps(row))
    print(f"variant {plan.variant.name}: {row['status']}"
          + (f", {row['videos_per_s']:.4g} videos/s" if row["status"] == "ok"
             else f": {row['reason']}"), flush=True)
    return 0


def apply_model_flops(rows: list[dict]) -> float | None:
    """One model-FLOPs figure for every row (the first row's count of the de-duplicated step:
    every row counts the same batch the same way) and each row's MFU from it. Returns the figure
    in TFLOP, or None when no row counted it."""
    figure = next((r["model_tflop_counted"] for r in rows
                   if isinstance(r.get("model_tflop_counted"), float)), None)
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["model_tflop_per_step"] = "n/a" if figure is None else figure
        peak, step_ms = r.get("peak_tflops"), r.get("step_ms")
        r["mfu"] = (figure / (step_ms / 1e3) / peak
                    if figure is not None and isinstance(peak, (int, float))
                    and isinstance(step_ms, (int, float)) else "n/a")
    return figure


def expected_seconds(variant: Variant, rows: list[dict], floor: float) -> float:
    """About how long ``variant`` will take: what its base row took (wall time: start, build,
    warm-up with the drain, both passes, counts), else the median of the rows run so far;
    ``floor`` at least."""
    walls = {r["variant"]: r["wall_s"] for r in rows
             if r.get("status") == "ok" and isinstance(r.get("wall_s"), (int, float))}
    if variant.base in walls:
        return max(floor, walls[variant.base])
    return max(floor, statistics.median(walls.values())) if walls else floor


def add_speedups(rows: list[dict]) -> None:
    speed = {r["variant"]: r["videos_per_s"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for column, ref in (("speedup_vs_baseline_fp32", "baseline-fp32"),
                            ("speedup_vs_base", r.get("base"))):
            r[column] = r["videos_per_s"] / speed[ref] if ref in speed else "n/a"


TABLE = [("variant", "variant"), ("status", "status"), ("loader", "loader"),
         ("precision", "precision"), ("videos/s", "videos_per_s"), ("clips/s", "clips_per_s"),
         ("step_ms", "step_ms"), ("wait%", "data_wait_frac"), ("synced_ms", "step_ms_synced"),
         ("data_ms", "data_ms"), ("fwd_ms", "forward_ms"), ("bwd_ms", "backward_ms"),
         ("opt_ms", "optimizer_ms"), ("mem_GB", "peak_gpu_mem_gb"),
         ("own_TFLOP", "tflop_per_step"), ("MFU", "mfu"), ("HFU", "hfu"),
         ("x_fp32", "speedup_vs_baseline_fp32"), ("x_base", "speedup_vs_base")]
PERCENT = ("wait%", "MFU", "HFU")
NOTE_CHARS = 90  # the .md table's notes: what a row substituted, or why it did not run


def table_rows(rows: list[dict], notes: bool = False) -> list[dict]:
    out = []
    for r in rows:
        row = {label: r.get(key, "") for label, key in TABLE}
        for label in PERCENT:
            if isinstance(row[label], float):
                row[label] = f"{100 * row[label]:.1f}%"
        if notes:
            text = r.get("substituted", "") if r.get("status") == "ok" else r.get("reason", "")
            text = str(text).replace("|", "/").replace("\n", " ")
            row["notes"] = text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 3] + "..."
        out.append(row)
    return out


def table_legend(figure: float | None) -> str:
    model = f"{figure:.4g} TFLOP/step" if figure is not None else "n/a"
    return ("MFU: model FLOPs (the de-duplicated step: each distinct frame through the CNN once, "
            f"the question once per video; {model}, the same for every row) / step time / the "
            "card's dense fp16/bf16 peak. HFU and own_TFLOP: the FLOPs each row actually ran "
            "(duplicate frames included). wait%: share of the unsynchronised pass spent waiting "
            "for the loader. notes: what a siasam-fast row substituted, or why a row did not run.")


def save_rows(rows: list[dict], args, env: dict, cfg, argv, final: bool = False
              ) -> tuple[Path, Path]:
    """Write the CSV, the markdown table and the JSON of the rows so far. Before ``final`` they
    go to STEM.partial.{csv,md,json} and hold the variants done so far (``complete`` False), so
    that an earlier finished run's STEM.{csv,md,json} stay as they were until this run ends;
    ``final`` adds the speed-up columns (they need every row), writes STEM.{csv,md,json} and
    drops the partial files."""
    figure = apply_model_flops(rows)
    if final:
        add_speedups(rows)
    for r in rows:
        r.setdefault("peak_tflops", "n/a")
    stem = args.stem if final else f"{args.stem}.partial"
    csv_path = write_csv(rows, args.out_dir / f"{stem}.csv", {**env, "complete": final})
    md_path = args.out_dir / f"{stem}.md"
    write_text_atomic(md_path, markdown_table(table_rows(rows, notes=True)) + "\n\n"
                      + table_legend(figure) + "\n")
    meta = {"env": env, "config": cfg.to_dict(), "argv": argv if argv is not None else
            sys.argv[1:], "complete": final, "rows": rows}
    write_text_atomic(args.out_dir / f"{stem}.json", json.dumps(meta, indent=1, default=str))
    if final:
        for suffix in (".csv", ".md", ".json"):
            (args.out_dir / f"{args.stem}.partial{suffix}").unlink(missing_ok=True)
    return csv_path, md_path


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ok) + 2))
    colours = {"baseline": "tab:grey", "siasam-fast": "tab:green", "toggle": "tab:blue"}
    ax1.barh(names, [r["videos_per_s"] for r in ok], color=[colours[r["group"]] for r in ok])
    for i, r in enumerate(ok):
        x = r.get("speedup_vs_baseline_fp32")
        if isinstance(x, float):
            ax1.text(r["videos_per_s"], i, f" {x:.2f}x", va="center", fontsize=8)
    ax1.set_xlabel("videos/s (no phase syncs)")
    ax1.invert_yaxis()
    left = [0.0] * len(ok)
    for phase, colour in (("data_ms", "tab:orange"), ("forward_ms", "tab:blue"),
                          ("backward_ms", "tab:red"), ("optimizer_ms", "tab:purple")):
        values = [r[phase] for r in ok]
        ax2.barh(names, values, left=left, color=colour, label=phase[:-3])
        left = [a + b for a, b in zip(left, values)]
    ax2.set_xlabel("step time split, ms (synchronised between phases)")
    ax2.invert_yaxis()
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "bench_tiny.yaml"),
                   help="run config (YAML), e.g. configs/clipbert_base.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=4 (repeatable)")
    p.add_argument("--steps", type=positive_int, default=10,
                   help="timed steps per pass (two passes)")
    p.add_argument("--warmup", type=positive_int, default=3,
                   help="untimed steps first (>= 1); then the loader's prefetched batches are "
                   f"dropped and {SETTLE_STEPS} more untimed steps run")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help=f"variants to run (default: all): {', '.join(BY_NAME)}")
    p.add_argument("--zero-stage", type=int, default=2, choices=ds_config.STAGES,
                   help="DeepSpeed ZeRO stage of the DeepSpeed variants")
    p.add_argument("--profile", nargs="*", default=None, metavar="NAME",
                   help="write a chrome trace of these variants (no name: every variant)")
    p.add_argument("--profile-steps", type=positive_int, default=3, help="steps in each trace")
    p.add_argument("--profile-gzip", action="store_true", help="write traces as .json.gz")
    p.add_argument("--out", "--out-dir", default=None,
                   help="results folder (default: benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--num-videos", type=positive_int, default=384,
                   help="videos to generate when the config's synthetic set is missing")
    p.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                   help="each variant in its own process (auto: on CUDA) or all in this one")
    p.add_argument("--variant-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="seconds one isolated variant may take (default: no limit)")
    p.add_argument("--time-budget", type=positive_float, default=None, metavar="SECONDS",
                   help="seconds for all variants; the rest are skipped once spent "
                   "(default: no limit)")
    p.add_argument("--prepare-only", action="store_true",
                   help="generate the config's synthetic set if missing, then exit")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--build-fused-adam", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [n for n in (args.variants or []) + (args.profile or []) if n not in BY_NAME]
    if args.worker is not None and args.worker not in BY_NAME:
        unknown.append(args.worker)
    if unknown:
        p.error(f"unknown variant(s) {unknown}; valid: {', '.join(BY_NAME)}")
    return args


def worker_argv(args) -> list[str]:
    """The options a worker process needs (the same measurement settings)."""
    argv = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--zero-stage", str(args.zero_stage), "--profile-steps", str(args.profile_steps),
            "--out", str(args.out_dir), "--tag", args.tag]
    for item in args.set:
        argv += ["--set", item]
    if args.profile is not None:
        argv += ["--profile", *args.profile]
    if args.profile_gzip:
        argv.append("--profile-gzip")
    return argv


def fused_adam_build_cmd(args) -> list[str]:
    """The command of the one FusedAdam build (this script's --build-fused-adam)."""
    return [sys.executable, str(Path(__file__).resolve()), "--config", args.config,
            "--build-fused-adam"]


def run_build(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit status, output) of ``cmd``; (None, output so far) past ``timeout``, its whole process
    group killed (ninja and nvcc too: left running they would hold the build's lock and the CPUs
    through the variants' timings)."""
    proc = popen_own_session(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        return None, ""
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def prebuild_fused_adam(names: list[str], args, device: torch.device,
                        started: float | None = None) -> None:
    """On CUDA, when a variant to run uses FusedAdam: build its JIT extension once, in a child
    process, before the variants, whose --variant-timeout would otherwise pay for the build (an
    H200 run lost both siasam-fast rows to it). A failed build is said once and handed to the
    variants (``FUSED_ADAM_PROBLEM_ENV``): the siasam-fast rows fall back to torch
    AdamW(fused=True) at once and the FusedAdam toggle is skipped. The build gets at most
    ``FUSED_ADAM_BUILD_S``, and at most half of what is left of --time-budget (counted from
    ``started``): a stuck build must not take the baselines' time."""
    if device.type != "cuda":
        return
    plans = [resolve(BY_NAME[n], device, args.zero_stage) for n in names]
    wanted = [p.variant.name for p in plans if p.optimizer == "fused" and not p.skip]
    toggles = [p.variant.name for p in plans
               if p.variant.name in wanted and p.variant.group == "toggle"]
    fallback = [name for name in wanted if name not in toggles]
    then = [f"{', '.join(fallback)} use torch AdamW(fused=True) and say so"] if fallback else []
    then += [f"{', '.join(toggles)} skipped"] if toggles else []
    if not wanted:
        return
    if os.environ.get(FUSED_ADAM_PROBLEM_ENV):  # a caller's build failed (gpu_bench_train.sh)
        print(f"FusedAdam not built here: {os.environ[FUSED_ADAM_PROBLEM_ENV][:300]}: "
              f"{'; '.join(then)}", flush=True)
        return
    print(f"building DeepSpeed's FusedAdam once for {', '.join(wanted)} (JIT: about a minute the "
          "first time, then cached) ...", flush=True)
    t0 = time.perf_counter()
    limit = float(FUSED_ADAM_BUILD_S)
    if args.time_budget is not None:
        left = args.time_budget - (t0 - (t0 if started is None else started))
        limit = max(1.0, min(limit, left / 2))
    wall = time.time()
    rc, output = run_build(fused_adam_build_cmd(args), limit)
    lines = [x for x in output.splitlines() if x.strip()]
    if rc is None:
        problem = f"the build took over {limit:.0f} s"
        lock = remove_lock_of_killed_build(FUSED_ADAM, wall)
        if lock is not None:  # else every later FusedAdam load on this machine waits for ever
            print(f"    removed {lock}, the lock the killed build left", flush=True)
    else:
        problem = "" if rc == 0 else (lines[-1] if lines else f"exit status {rc}")
    if problem:
        os.environ[FUSED_ADAM_PROBLEM_ENV] = f"its build failed: {problem[:300]}"
        print(f"    FusedAdam build failed ({problem[:300]}): {'; '.join(then)}", flush=True)
    else:
        print(f"    FusedAdam ready ({time.perf_counter() - t0:.0f} s)", flush=True)


def build_fused_adam_main() -> int:
    """--build-fused-adam: build (or load from the cache) FusedAdam's extension; the last line
    says why when it fails."""
    try:
        build_fused_adam_op()
    except Exception as err:  # noqa: BLE001 - the caller reads the last line
        traceback.print_exc()
        print(f"{type(err).__name__}: {_first_line(err)}", file=sys.stderr)
        return 1
    print("FusedAdam built")
    return 0


def run_variants(names: list[str], rows: list[dict], args, cfg, env: dict, device,
                 isolate: bool, argv, started: float | None = None) -> None:
    """Run the variants in turn, appending each one's row to ``rows`` (skipped ones too) and
    saving the rows so far after each (STEM.partial.*). ``started``: when the --time-budget
    began (default: now)."""
    started = time.perf_counter() if started is None else started
    for name in names:
        plan = resolve(BY_NAME[name], device, args.zero_stage)
        if plan.skip:
            rows.append(skipped_row(plan, "skipped", plan.skip))
            print(f"--- {name}: skipped ({plan.skip})", flush=True)
            continue
        left = (args.time_budget - (time.perf_counter() - started)
                if args.time_budget is not None else None)
        need = expected_seconds(plan.variant, rows, MIN_ISOLATED_S if isolate else 1)
        if left is not None and left < need:
            rows.append(skipped_row(plan, "skipped", f"--time-budget {args.time_budget:.0f} s: "
                                    f"{max(left, 0):.0f} s left, about {need:.0f} s needed"))
            print(f"--- {name}: skipped (time budget: {max(left, 0):.0f} s left, about "
                  f"{need:.0f} s needed)", flush=True)
            continue
        print(f"--- {name}: {plan.variant.description}", flush=True)
        t0 = time.perf_counter()
        if isolate:
            limits = [x for x in (args.variant_timeout, left) if x is not None]
            row = run_isolated(plan, args, worker_argv(args), min(limits) if limits else None)
        else:
            row = run_in_process(plan, cfg, args, device)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if row["status"] == "ok":
            print(f"    {row['videos_per_s']:.3g} videos/s, step {row['step_ms']:.4g} ms "
                  f"({row['wall_s']:.0f} s)", flush=True)
        else:
            print(f"    {row['status']}: {row['reason']}", flush=True)
        # Written (STEM.partial.*) after every variant, so that a run cut short (a device
        # loan's limit, Ctrl-C) leaves the rows that finished and an earlier finished run's
        # STEM.* as they were; the last write (STEM.*) adds the speed-ups and the plot.
        save_rows(rows, args, env, cfg, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for v in VARIANTS:
            print(f"{v.name:18s} {v.group:12s} {v.description}")
        return 0
    for name in ("deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.task == "multi":
        print(f"error: {args.config} is a task=multi config; bench_train.py times one task's "
              "steps: give a one-task config (each task of data.tasks as its own config)",
              file=sys.stderr)
        return 2
    if cfg.train.grad_accum != 1 and not args.worker:
        print(f"note: train.grad_accum={cfg.train.grad_accum} is not benchmarked: every row steps "
              "the optimizer on each batch of train.batch_size videos (with accumulation the "
              "optimizer's share of a step shrinks by that factor)")
    if args.build_fused_adam:
        return build_fused_adam_main()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    slug = "".join(c if c.isalnum() else "-" for c in
                   (torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"))
    args.stem = f"bench_train_{slug.strip('-').lower()}_{Path(args.config).stem}" + \
        (f"_{args.tag}" if args.tag else "")
    args.out_dir = Path(args.out) if args.out else RESULTS_DIR
    if args.worker:
        return worker_main(args, cfg, device)

    try:
        ensure_data(cfg, args.num_videos)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.prepare_only:
        return 0
    isolate = args.isolate == "process" or (args.isolate == "auto" and device.type == "cuda")
    env = environment()
    env.update(config=str(args.config), overrides=" ".join(args.set), visual=cfg.model.visual,
               text=cfg.model.text, image_size=cfg.data.image_size,
               batch_videos=cfg.train.batch_size, num_clips=cfg.sampling.num_clips,
               frames_per_clip=str(cfg.sampling.frames_per_clip), stride=cfg.sampling.stride,
               steps=args.steps, warmup=args.warmup, settle_steps=SETTLE_STEPS,
               zero_stage=args.zero_stage,
               isolated=isolate, peak_source=PEAK_SOURCE)
    if device.type == "cuda":
        env.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)  # cudnn_benchmark: per row
    print("training benchmark:", ", ".join(f"{k}={env[k]}" for k in (
        "device", "torch", "deepspeed", "dali", "triton", "config")), flush=True)

    names = args.variants or list(BY_NAME)
    rows: list[dict] = []
    started = time.perf_counter()  # the --time-budget includes the FusedAdam build
    try:
        prebuild_fused_adam(names, args, device, started)
        run_variants(names, rows, args, cfg, env, device, isolate, argv, started)
    except KeyboardInterrupt:
        return report_interrupted(args.out_dir / f"{args.stem}.csv",
                                  any(r["status"] != "skipped" for r in rows))
    if all(r["status"] == "skipped" for r in rows):  # nothing ran: earlier results stay
        return report_no_rows(args.out_dir / f"{args.stem}.csv",
                              "every variant was skipped: see the reasons above")
    csv_path, md_path = save_rows(rows, args, env, cfg, argv, final=True)
    png = plot(rows, args.out_dir / f"{args.stem}.png",
               f"bench_train {Path(args.config).name} on {env['device']}: V={cfg.train.batch_size} "
               f"N={cfg.sampling.num_clips} B={cfg.sampling.frames_per_clip} "
               f"{cfg.data.image_size}px, torch {env['torch']}")
    print(f"\nwrote {csv_path}, {md_path}" + (f", {png}" if png else ""))
    for r in rows:
        if r.get("trace"):
            print(f"trace {r['variant']}: {r['trace']}")
    print("\nnotes:")
    for r in rows:
        text = r["reason"] if r["status"] != "ok" else r.get("notes", "")
        if text:
            print(f"  {r['variant']}: [{r['status']}] {text}")
    peak = next((r["peak_tflops"] for r in rows if r.get("peak_tflops") not in (None, "n/a")),
                "n/a")
    figure = apply_model_flops(rows)
    counted = {round(r["model_tflop_counted"], 9) for r in rows
               if isinstance(r.get("model_tflop_counted"), float)}
    if len(counted) > 1:
        print(f"warning: the rows counted different model FLOPs ({sorted(counted)} TFLOP): MFU "
              f"uses the first, {figure:.6g}")
    print(f"\n{env['device']} ({env['cpu_count']} CPUs), config {args.config}, "
          f"V={cfg.train.batch_size} videos/step, N={cfg.sampling.num_clips} clips, "
          f"{args.steps} timed steps x 2 passes after {args.warmup} + {SETTLE_STEPS} warm-up "
          f"steps (the loader's backlog drained between them); MFU: "
          f"{'n/a' if figure is None else f'{figure:.4g}'} model TFLOP/step (de-duplicated, "
          f"every row) against {peak} TFLOP/s ({PEAK_SOURCE}); HFU / own_TFLOP: each row's own "
          "count; x_fp32 / x_base: speed-up over baseline-fp32 / the row's base")
    print(format_table(table_rows(rows)))
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
