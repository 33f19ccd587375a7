"""The ``siasam-fast`` command: env, synth, index, plan, train, eval, ask, transcode, demo,
weights, runs.

Each subcommand imports what it needs (torch, transformers, DeepSpeed, PyAV, ...) when it runs,
and the ``siasam_fast`` package imports its names on first use, so ``siasam-fast --help`` loads
nothing heavy.

Bad arguments end with a one-line error naming the value and exit status 2, before anything is
written.
"""

from __future__ import annotations

import argparse
import signal
import sys

from siasam_fast.benchutil import nonneg_float, nonneg_int, positive_int
from siasam_fast.paths import USAGE_ERRORS, json_nulls

# What a subcommand raises for bad arguments (before it writes anything): a one-line error, exit 2.
# `siasam-fast demo`'s synthetic set (siasam_fast.demo.SYNTHETIC / QUICK_SYNTHETIC; a test keeps
# them in step): the parser does not import the demo module.
DEMO_VIDEOS, DEMO_QUICK_VIDEOS = 800, 24
# Frame sizes the synthetic generator renders (SynthConfig.size; a test keeps them in step).
FRAME_SIZES = (16, 1024)


def frame_size(text: str) -> int:
    """An argparse type: a synthetic frame size, an even integer in 16..1024."""
    low, high = FRAME_SIZES
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not low <= value <= high or value % 2:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: must be an even integer from {low} to {high}")
    return value


def _env(args: argparse.Namespace) -> int:
    from siasam_fast.envcheck import run_from_args

    return run_from_args(args)


def _synth(args: argparse.Namespace) -> int:
    from siasam_fast.data.synthetic import check_output_dir, generate
    from siasam_fast.pipeline.manifest import build_manifest

    # --out: new, empty or a synthetic set (regenerated); never a file or someone else's folder.
    check_output_dir(args.out, "--out")
    summary = generate(args.out, num_videos=args.videos, seed=args.seed, size=args.size,
                       workers=args.workers)
    out = f"{args.out}/manifest.jsonl"
    records = build_manifest(f"{args.out}/videos", out, workers=args.workers)
    ok = sum(r.status == "ok" for r in records.values())
    print(f"synthetic set: {summary}; manifest {out}: {ok}/{len(records)} videos ok")
    foreign = sorted(set(records) - set(summary.meta["videos"]))
    if foreign:
        print(f"note: {len(foreign)} video(s) in {args.out}/videos are not of this set (e.g. "
              f"{records[foreign[0]].relpath}): indexed too; remove them to leave them out")
    return 0


def _index(args: argparse.Namespace) -> int:
    from siasam_fast.pipeline.manifest import build_manifest

    records = build_manifest(args.video_dir, args.out, workers=args.workers,
                             mode="demux" if args.fast else "decode")
    bad = [r for r in records.values() if r.status != "ok"]
    skipped = len(records.duplicates)  # each one was warned about as it was skipped
    taken = (f", {skipped} file{'s' if skipped != 1 else ''} skipped (video_id already taken)"
             if skipped else "")
    kept = len(records.reused)
    kept = f", {kept} unchanged since the last run (not probed again)" if kept else ""
    print(f"{args.out}: {len(records) - len(bad)} ok, {len(bad)} corrupt{kept}{taken}")
    for r in bad[:20]:
        print(f"  corrupt: {r.path}: {r.reason}")
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more (see the manifest)")
    _note_nvdec(records)
    return 0


def _note_nvdec(records: dict) -> None:
    """On a GPU with DALI: say now which videos this GPU's NVDEC cannot decode (the training's
    data.backend=auto would take PyAV for the set, backend=dali would refuse it)."""
    import torch

    from siasam_fast.pipeline import loaders

    if not (torch.cuda.is_available() and loaders.dali_available()):
        return
    refusal = loaders.nvdec_refusal(records)
    if refusal:
        print(f"note: {refusal}: data.backend=auto will decode this set with PyAV. "
              f"{loaders.NVDEC_ADVICE}")


def _plan(args: argparse.Namespace) -> int:
    from siasam_fast.config import load_config
    from siasam_fast.pipeline.manifest import load_manifest
    from siasam_fast.pipeline.planner import plan_set

    sampling = load_config(args.config, args.set).sampling  # no config: the defaults (paper's)
    records = load_manifest(args.manifest)
    try:
        plan = plan_set(records, sampling, gops=args.gops, videos=args.videos, draws=args.draws)
    except ValueError as err:
        raise ValueError(str(err).replace("the manifest", f"manifest {args.manifest}", 1)) \
            from None
    frames = sampling.frames_per_clip
    print(f"{args.manifest}: {plan['videos']} usable videos ({plan['sampled']} drawn), median "
          f"{plan['frames']:.0f} frames, a keyframe every {plan['gop']:.0f} frames (median); "
          f"sampling N={sampling.num_clips} clips of B={frames} frames, stride "
          f"{sampling.stride}, {args.draws} draws a video")
    print("decoded frames per needed frame (planner.py's model of the PyAV decoder; clips drawn "
          "over whole videos, where training on a set with question segments, such as How2QA, "
          "draws inside each segment):")
    base = plan["rows"][0]["decoded_per_needed"]
    print(f"  {'set':<12} {'GOP':>5} {'needed':>7} {'decoded':>8} {'per needed':>11} "
          f"{'vs as indexed':>14}")
    for row in plan["rows"]:
        print(f"  {row['set']:<12} {row['gop']:>5.0f} {row['needed']:>7.1f} "
              f"{row['decoded']:>8.1f} {row['decoded_per_needed']:>11.2f} "
              f"{row['decoded_per_needed'] / base:>13.2f}x")
    # GOP 16: the README's measured disk growth (under 2x at 720p) and most of GOP 8's saving
    rows = {row["gop"]: row for row in plan["rows"][1:]}
    pick = rows.get(16.0) or min(rows.values(), key=lambda row: row["decoded_per_needed"],
                                 default=None)
    if pick is not None and base >= 1.5 * pick["decoded_per_needed"]:
        print(f"a transcode (siasam-fast transcode SRC DST {pick['set']}) would decode "
              f"{base / pick['decoded_per_needed']:.1f}x fewer frames per video; the files grow "
              "(README, Measured so far: 'Transcoded sets'). The sampler's keyframe-aware options "
              "(sampling.preroll_temperature, sampling.keyframe_max_shift) cut pre-roll without "
              "one, changing which clips are drawn")
    elif pick is not None:
        print(f"the set decodes {base:.2f} frames per needed frame as it is: a transcode would "
              "save little")
    _note_nvdec(records)
    return 0


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from siasam_fast.training import main as train_main

    return train_main(rest, prog="siasam-fast train")


def _eval(args: argparse.Namespace) -> int:
    import json
    import os
    import tempfile
    from pathlib import Path

    import torch.distributed as dist

    from siasam_fast.paths import check_output_file, takes_new_files, write_text_atomic
    from siasam_fast.pipeline.dataset import close_loaders
    from siasam_fast.training import end_process_group, evaluate_checkpoint

    outputs = {option: check_output_file(path, option, writable=True) for option, path in
               (("--json", args.json), ("--predictions", args.predictions)) if path is not None}
    if len(outputs) == 2 and outputs["--json"].resolve() == outputs["--predictions"].resolve():
        raise ValueError(f"--json and --predictions name the same file "
                         f"({str(outputs['--json'])!r}): give two paths")
    # Both files are made under hidden names and renamed into place together once the evaluation
    # has finished: a stop or a failure keeps the earlier pair as it was (never a new file beside
    # an old one).
    # A symlink's file is the output (the link stays). A special file (/dev/stdout, a pipe), or
    # a writable file in a folder that takes no new file, is written in place at the end: its
    # staged copy waits in the temporary folder.
    real = {option: path if path.exists() and not path.is_file() else
            Path(os.path.realpath(path)) for option, path in outputs.items()}
    special = {option for option, path in real.items()
               if (path.exists() and not path.is_file()) or not takes_new_files(path.parent)}
    staged = {option: (Path(tempfile.gettempdir()) if option in special else path.parent)
              / f".{path.name}.{os.getpid()}.partial" for option, path in real.items()}
    try:
        try:
            metrics = evaluate_checkpoint(args.checkpoint, config_path=args.config,
                                          overrides=args.set, split=args.split,
                                          predictions=staged.get("--predictions"))
        except PermissionError as err:  # a path the checks above could not foresee
            raise ValueError(f"cannot write {err.filename!r}: {err.strerror}") from None
        finally:
            close_loaders()  # a failing evaluation's traceback keeps its loader's workers alive
        if dist.is_initialized():  # every process has its metrics: no collective is left
            rank = dist.get_rank()
            end_process_group()
            if rank != 0:
                return 0
        if "--json" in outputs:
            try:
                write_text_atomic(staged["--json"], json.dumps(json_nulls(metrics), indent=1)
                                  + "\n")
            except OSError as err:
                raise ValueError(f"--json {str(outputs['--json'])!r}: {err.strerror or err}") \
                    from None
        for option, path in real.items():
            if option in special:
                with open(path, "w") as fh:
                    fh.write(staged[option].read_text())
            else:
                os.replace(staged[option], path)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    width = max(len(k) for k in metrics)
    print(f"{'metric':<{width}}  value")
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else
              f"{key:<{width}}  {value}")
    for option, path in outputs.items():
        print(f"{option.removeprefix('--')}: {path}")
    return 0


def _transcode(args: argparse.Namespace) -> int:
    from siasam_fast.pipeline.transcode import run_from_args

    return run_from_args(args)


def _demo(args: argparse.Namespace) -> int:
    from siasam_fast.demo import TrainingFailed, run_demo

    try:
        run_demo(args.out, videos=args.videos, seed=args.seed, quick=args.quick)
    except TrainingFailed as err:  # its log holds the traceback, if any: one line here
        print(f"siasam-fast demo: error: {err}", file=sys.stderr)
        return 1
    return 0


def add_synth_options(parser: argparse.ArgumentParser, outputs: str) -> None:
    """The synthetic generator's options (``siasam-fast synth`` and ``python -m
    siasam_fast.data.synthetic``); ``outputs`` says what --out gets."""
    parser.add_argument("--out", required=True,
                        help=f"output folder: gets {outputs} (new, empty, or holding a synthetic "
                        "set, which is regenerated)")
    parser.add_argument("--videos", type=positive_int, default=400,
                        help="number of videos (default 400)")
    parser.add_argument("--seed", type=nonneg_int, default=0,
                        help="random seed, >= 0: the same seed gives the same set (default 0)")
    parser.add_argument("--size", type=frame_size, default=64,
                        help="frame height = width in pixels, even, 16 to 1024 (default 64)")
    parser.add_argument("--workers", type=nonneg_int, default=None,
                        help="render processes (default: all CPUs; 0 or 1: in this process)")


def _weights(args: argparse.Namespace) -> int:
    from siasam_fast.weights import TEXT, VISUAL, config_lines, fetch_weights

    if args.clipbert:
        from siasam_fast.clipbert import config_lines as clipbert_lines
        from siasam_fast.clipbert import convert_clipbert

        if args.visual:
            raise ValueError("--visual and --clipbert: the ResNet comes from the ClipBERT "
                             "checkpoint; give one of them")
        folders = convert_clipbert(args.clipbert, args.out, tokenizer=args.text or TEXT,
                                   force=args.force, num_heads=args.heads)
        print("\nTo start from them, put this in the config:\n" + clipbert_lines(folders))
        return 0
    if args.heads is not None:
        raise ValueError("--heads goes with --clipbert (a BERT folder has its own config)")
    folders = fetch_weights(args.out, visual=args.visual or VISUAL, text=args.text or TEXT,
                            force=args.force)
    print("\nTo start from them, put this in the config:\n" + config_lines(folders))
    return 0


def _ask(args: argparse.Namespace) -> int:
    import json

    from siasam_fast.training import answer_question

    candidates = None
    if args.candidates is not None:
        candidates = [c.strip() for c in args.candidates.split("|")]
        if len(candidates) < 2 or not all(candidates):
            raise ValueError(f"--candidates {args.candidates!r}: give two or more non-empty "
                             "answers separated by |")
    result = answer_question(args.checkpoint, args.video, args.question, candidates, args.top,
                             args.set, start=args.start, end=args.end, task=args.task)
    if args.json:
        print(json.dumps(result))
    elif result["task"] == "count":
        count = result["count"]  # an integer: rounded and clipped (eval.count_metric tgif)
        if count is None or isinstance(count, int):  # None: the output is not a number
            print(f"count: {'-' if count is None else count} (model output "
                  f"{result['output']:.2f})")
        else:
            print(f"count: {count:.2f}")
    else:
        width = max(len(answer) for answer, _ in result["answers"])
        for answer, prob in result["answers"]:
            print(f"{answer:<{width}}  {prob:6.1%}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from siasam_fast.paths import check_output_file
    from siasam_fast.runs import RUN_OUTPUTS, format_table, run_folders, summarize_run, write_csv

    folders = run_folders(args.folders)
    if args.csv is not None:  # checked before the table: nothing printed, then an error
        csv_path = check_output_file(args.csv, "--csv", writable=True).resolve()
        if csv_path.name in RUN_OUTPUTS and any(csv_path.parent == f.resolve() for f in folders):
            raise ValueError(f"--csv {args.csv!r} is a file of the run folder "
                             f"{str(csv_path.parent)!r}, which training wrote; give another path")
    rows = [summarize_run(path) for path in folders]
    print(format_table(rows))
    if args.csv:
        write_csv(rows, Path(args.csv))
        print(f"wrote {args.csv}")
    return 0


def _config(args: argparse.Namespace) -> int:
    import yaml

    from siasam_fast.config import Config, load_config

    cfg = load_config(args.config, args.set).to_dict()
    if args.changed:
        defaults = Config().to_dict()
        cfg = {section: ({k: v for k, v in values.items() if defaults[section].get(k) != v}
                         if isinstance(values, dict) else values)
               for section, values in cfg.items() if values != defaults[section]}
    source = args.config or "the defaults"
    extra = f" with {' '.join(args.set)}" if args.set else ""
    what = "the keys that differ from the defaults" if args.changed else "every key"
    print(f"# {source}{extra}: valid; {what}")
    print(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False), end="")
    return 0


def add_command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:  # noqa: A002
    """A subcommand whose ``--help`` starts with what it does (its line in the command list)."""
    return sub.add_parser(name, help=help, description=help, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from siasam_fast import __version__

    parser = argparse.ArgumentParser(
        prog="siasam-fast", description="Fast SiaSamRea training for VideoQA.")
    parser.add_argument("--version", action="version", version=f"siasam-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_command(sub, "env", help="what this machine can run (GPU, precision, kernels, DALI, "
                       "DeepSpeed, codecs) and what a run here would pick")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows as JSON to PATH")
    p.add_argument("--no-decode", action="store_true",
                   help="skip the DALI decoding check (a second or two)")

    p = add_command(sub, "synth", help="generate the synthetic VideoQA set (and its manifest)")
    add_synth_options(p, "videos/, annotations/, meta.json, manifest.jsonl")

    p = add_command(sub, "index", help="probe every video once and write the manifest (JSONL)")
    p.add_argument("video_dir", help="the folder of videos (subfolders too)")
    p.add_argument("--out", required=True, help="manifest path, e.g. data/msrvtt/manifest.jsonl")
    p.add_argument("--workers", type=nonneg_int, default=None,
                   help="processes (default: all cores)")
    p.add_argument("--fast", action="store_true",
                   help="demux only (no full decode): faster, but misses corrupt frame data")

    p = add_command(sub, "plan", help="what the training's sampling costs to decode on a "
                       "manifest's videos (cost model), and what a short-GOP transcode saves")
    p.add_argument("manifest", help="a manifest (siasam-fast index)")
    p.add_argument("--config", default=None,
                   help="a run config whose sampling section the model draws with (default: "
                   "the paper's N=9 clips, B=8 frames, stride 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. sampling.stride=2")
    p.add_argument("--gops", type=positive_int, nargs="+", default=[8, 16, 32],
                   help="transcoded GOPs to compare (default: 8 16 32)")
    p.add_argument("--videos", type=positive_int, default=500,
                   help="videos drawn from the manifest (default 500)")
    p.add_argument("--draws", type=positive_int, default=16,
                   help="sampler draws a video (default 16)")

    add_command(sub, "train", help="train (same as `python train.py`; see `train --help`)",
                   add_help=False)

    p = add_command(sub, "config", help="check a config and its --set values without starting "
                       "anything, and print the resolved config (YAML)")
    p.add_argument("config", nargs="?", default=None,
                   help="a config file, e.g. configs/synthetic.yaml (the shipped configs are found "
                   "from any folder; default: every default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.lr=1e-4")
    p.add_argument("--changed", action="store_true",
                   help="print only the keys whose values differ from the defaults")

    p = add_command(sub, "eval", help="evaluate a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (a run's or a tag)")
    p.add_argument("--config", default=None, help="config file (default: the checkpoint's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. eval.num_clips=4")
    p.add_argument("--split", default=None, help="val, test or train (default: eval.split)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the metrics (unrounded) as JSON to PATH")
    p.add_argument("--predictions", default=None, metavar="PATH",
                   help="write one JSON line per question (qid, question type, prediction, "
                   "its score) to PATH")

    p = add_command(sub, "ask", help="answer one question about one video with a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (a run's or a tag)")
    p.add_argument("--video", required=True, help="a video file")
    p.add_argument("--question", required=True, help="the question, e.g. 'what is the man doing?'")
    p.add_argument("--candidates", default=None, metavar="A|B|...",
                   help="multiple choice (a task=mc checkpoint): the answers, separated by |")
    p.add_argument("--top", type=positive_int, default=5,
                   help="open-ended: how many of the most likely answers to show (default 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. eval.num_clips=4")
    p.add_argument("--start", type=nonneg_float, default=None, metavar="SECONDS",
                   help="only the video's segment from SECONDS on (How2QA's ts), as eval would")
    p.add_argument("--end", type=nonneg_float, default=None, metavar="SECONDS",
                   help="only the video's segment up to SECONDS")
    p.add_argument("--task", default=None, metavar="NAME",
                   help="a task=multi checkpoint: which of its tasks (data.tasks) answers")
    p.add_argument("--json", action="store_true", help="print the answers as JSON")

    p = add_command(sub, "transcode", help="re-encode videos once for fast random access "
                       "(short GOP, constant frame rate)")
    from siasam_fast.pipeline.transcode import build_parser as transcode_parser

    transcode_parser(p)

    p = add_command(sub, "weights", help="fetch the pretrained ResNet-50 and BERT-base that "
                       "ClipBERT starts from into local folders for model.visual / model.text")
    p.add_argument("out", nargs="?", default="weights",
                   help="folder to put them in (default: weights)")
    p.add_argument("--visual", default=None,
                   help="a Hub id or a local save_pretrained folder of a ResNet "
                   "(default: microsoft/resnet-50, ImageNet-trained)")
    p.add_argument("--text", default=None,
                   help="a Hub id or a local save_pretrained folder of a BERT with its tokenizer "
                   "(default: google-bert/bert-base-uncased)")
    p.add_argument("--force", action="store_true",
                   help="fetch again folders that are already there")
    p.add_argument("--clipbert", default=None, metavar="CKPT",
                   help="convert ClipBERT's image-text pre-trained checkpoint "
                   "(clipbert_image_text_pretrained.pt, the paper's starting point) into "
                   "OUT/clipbert-visual and OUT/clipbert-text instead; --text then names only "
                   "the tokenizer (default: google-bert/bert-base-uncased, ClipBERT's)")
    p.add_argument("--heads", type=positive_int, default=None,
                   help="with --clipbert: BERT's attention heads (default: hidden size / 64, "
                   "12 for ClipBERT's BERT-base)")

    p = add_command(sub, "runs", help="one table of training runs (best / last / test metric, "
                       "speed) to compare them")
    p.add_argument("folders", nargs="+", metavar="RUN",
                   help="run folders (train.out_dir), or a folder of them such as runs/")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    p = add_command(sub, "demo", help="train baseline vs SiaSamRea on synthetic data (CPU)")
    p.add_argument("--out", default="runs/demo",
                   help="folder for the synthetic set, both runs, their logs, summary.json and "
                   "the plot: new, empty, or one an earlier demo wrote (default runs/demo)")
    p.add_argument("--videos", type=positive_int, default=None,
                   help=f"synthetic videos (default {DEMO_VIDEOS}; "
                   f"{DEMO_QUICK_VIDEOS} with --quick)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seeds the synthetic set and both training runs, >= 0 (default 0)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        try:
            return _train(argparse.Namespace(), argv[1:])
        except KeyboardInterrupt:  # while the training modules import (main handles the rest)
            print("siasam-fast train: interrupted while starting: nothing was written",
                  file=sys.stderr)
            return 130
    args = build_parser().parse_args(argv)
    handler = {"env": _env, "synth": _synth, "index": _index, "plan": _plan, "eval": _eval,
               "demo": _demo, "config": _config,
               "transcode": _transcode, "weights": _weights, "ask": _ask,
               "runs": _runs}[args.command]
    if args.command in INTERRUPTED:
        # A scheduler's SIGTERM takes the Ctrl-C path: what was done is written before exiting.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return handler(args)
    except USAGE_ERRORS as err:
        # one write (eval under a launcher: every process's line whole, as training's)
        sys.stderr.write(f"siasam-fast {args.command}: error: {err}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        if args.command not in INTERRUPTED:
            raise
        print(f"siasam-fast {args.command}: interrupted; {INTERRUPTED[args.command]}",
              file=sys.stderr)
        return 130


# What an interrupted command (Ctrl-C, SIGTERM) leaves: one line, exit status 130.
CONTINUES = ("what was done is kept, and running the same command again continues from there "
             "(until then the manifest is marked incomplete, and training refuses it)")
INTERRUPTED = {
    # generate() renders every video again (it does not skip finished ones): say so
    "synth": "the set is left incomplete (no meta.json or manifest, so it is never taken for a "
             "complete one); running the same command again generates it anew",
    "index": CONTINUES, "transcode": CONTINUES,
    "demo": "the previous demo's runs and summary (if any) are kept as they were; running it "
            "again trains both runs anew",
    "eval": "nothing was written (--json / --predictions are replaced only once the evaluation "
            "has finished)",
    "ask": "nothing was written",
    "weights": "the folders already complete are kept; the one being written was not kept, and "
               "running the same command again fetches or converts it",
}


def _interrupt(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
