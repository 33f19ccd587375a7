"""Activation memory of the visual side per unique frame: what the CNN and its head keep for the
backward, by image size and by what is frozen or recomputed.

    python benchmarks/bench_memory.py                          # clipbert_base.yaml, 224 and 448 px
    python benchmarks/bench_memory.py --config configs/msrvtt_qa.yaml --sizes 224 336 448

The CNN's activations are the part of a step's memory that no ZeRO stage shards (README, "V100
memory"): per unique frame, times the unique frames a video (37 at N = 9, B = 8, stride 4; up to
69 with the dataset configs' B up to 16), times the videos per GPU. This script counts them
exactly, on any device, without a GPU: it runs the model's ``VisualEmbeddings.encode_frames`` on a
few random frames in training mode under ``torch.autograd.graph.saved_tensors_hooks`` and adds up
the distinct storages autograd keeps for the backward, per frame (less the weights and buffers it
keeps too, which are the model state). Rows: the default (``proj``
head, nothing frozen), ClipBERT's (``model.visual_head: clipbert``, ``model.cnn_freeze:
detectron2``: frozen BatchNorms, stem and first stage, whose activations need not be kept),
BatchNorms frozen alone, and ``model.activation_checkpointing: cnn`` (only each stage's input is
kept; the backward recomputes one stage at a time, whose activations come on top of the column
while it runs, so that row is a floor, not a peak).

On the CPU the model runs in fp32; the ``MiB / frame, 16-bit`` column halves it, which is what
fp16 / bf16 autocast keeps for the convolutions (BatchNorm statistics and a few small tensors stay
fp32: a slight underestimate). Allocator overhead and cuDNN workspaces are not counted. As a
check, the default at 224 px counts 41.1 MiB per frame at 16 bits here (2-core CPU, 2026-11-27),
and the H100's peak allocation for a whole ClipBERT-base step gave about 42 MiB per unique 224 px
frame beside the model state (README, "V100 memory").
Writes a table and ``benchmarks/results/memory.csv`` (``memory.partial.csv`` while it runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from siasam_fast.benchutil import (  # noqa: E402
    RowLog,
    environment,
    format_table,
    int_at_least,
    report_no_rows,
    results_path,
)

# (name, model.visual_head, model.cnn_freeze, model.activation_checkpointing)
SETTINGS = (
    ("default", "proj", "none", "none"),
    ("clipbert", "clipbert", "detectron2", "none"),
    ("bn_frozen", "proj", "batchnorm", "none"),
    ("checkpointed", "proj", "none", "cnn"),
)


def saved_bytes_per_frame(model: torch.nn.Module, size: int, frames: int,
                          device: torch.device) -> float:
    """Bytes of the distinct storages autograd keeps for the backward of ``encode_frames`` on
    ``frames`` random frames of ``size`` px, per frame; runs the backward too (so a broken
    setting fails here rather than passing unnoticed)."""
    kept: dict[int, int] = {}
    # weights and buffers are saved too (a convolution keeps its weight for the input's
    # gradient) but exist once, whatever the frames: the model state, not activations
    state = {t.untyped_storage().data_ptr()
             for t in (*model.parameters(), *model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in state:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(frames, 3, size, size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.visual.encode_frames(x)
    out.float().sum().backward()
    return sum(kept.values()) / frames


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--config", default=str(ROOT / "configs" / "clipbert_base.yaml"),
                        help="the model to measure (its model.* section; default: "
                        "configs/clipbert_base.yaml, ResNet-50 and BERT-base, random init)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as train.py takes it (repeatable)")
    parser.add_argument("--sizes", type=int_at_least(8), nargs="+", default=[224, 448],
                        help="frame sizes in pixels (data.image_size; default: 224 448)")
    parser.add_argument("--settings", nargs="+", default=[s[0] for s in SETTINGS],
                        choices=[s[0] for s in SETTINGS], help="rows to measure (default: all)")
    parser.add_argument("--frames", type=int_at_least(1), default=2,
                        help="frames per measurement (default: 2)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda: where the model runs, in fp32")
    parser.add_argument("--out-dir", "--out", default=None, help="where memory.csv goes "
                        "(default: benchmarks/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from siasam_fast.config import load_config
    from siasam_fast.model import SiaSamReaModel

    try:
        device = torch.device(args.device)
    except RuntimeError:  # torch's message lists every device type it knows of
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        print(f"error: --device {args.device!r}: valid devices are cpu and cuda (or cuda:N)",
              file=sys.stderr)
        return 2
    try:
        base = load_config(args.config, args.set)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    path = results_path("memory.csv", args.out_dir)
    # memory.partial.csv after each row; memory.csv once the run has finished (a stopped run
    # keeps what it measured, and an earlier run's memory.csv stays as it was)
    results = RowLog(path, environment, lambda row: True)
    try:
        for size in args.sizes:
            for name, head, freeze, checkpointing in SETTINGS:
                if name not in args.settings:
                    continue
                overrides = [*args.set, f"model.visual_head={head}", f"model.cnn_freeze={freeze}",
                             f"model.activation_checkpointing={checkpointing}"]
                cfg = load_config(args.config, overrides)
                torch.manual_seed(0)
                model = SiaSamReaModel(cfg.model, "open", 2, 64, cfg.sampling.num_clips).to(device)
                model.train()
                per_frame = saved_bytes_per_frame(model, size, args.frames, device)
                results.add({"run_device": str(device),  # (the environment's device column
                             # names the machine's GPU even when the model ran on the CPU)
                             "setting": name, "visual_head": head, "cnn_freeze": freeze,
                             "activation_checkpointing": checkpointing, "image_size": size,
                             "bytes_per_frame_fp32": int(per_frame),
                             "mib_per_frame_fp32": round(per_frame / 2**20, 2),
                             "mib_per_frame_16bit": round(per_frame / 2**21, 2)})
                print(f"{name} {size} px: {per_frame / 2**20:.1f} MiB / frame (fp32)", flush=True)
    except KeyboardInterrupt:
        return results.interrupted()
    rows = results.rows
    if not rows:
        return report_no_rows(path)
    defaults = [r for r in rows if r["setting"] == "default"]
    ref = min(defaults, key=lambda r: r["image_size"])["bytes_per_frame_fp32"] if defaults else 0
    for r in rows:  # against the default setting at the smallest size measured
        r["vs_default_smallest"] = round(r["bytes_per_frame_fp32"] / ref, 2) if ref else None
    results.finish()
    print(f"\nmodel: visual={base.model.visual}, text={base.model.text}, on {device}; "
          f"{args.frames} frames a measurement\n")
    print(format_table(rows, ["setting", "image_size", "mib_per_frame_fp32",
                              "mib_per_frame_16bit", "vs_default_smallest"]))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
