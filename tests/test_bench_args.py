"""The benchmark scripts' options: a bad value is refused while parsing (argparse's one-line error,
exit status 2, naming the value), before any video is generated or anything timed; both spellings
of the output folder work; a run that measures nothing leaves an earlier result file untouched."""

import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402
import bench_kernels  # noqa: E402
import bench_memory  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_transcode  # noqa: E402

from siasam_fast import benchutil  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")


def no_work(*args, **kwargs):
    raise AssertionError("work started although the options were bad")


def refused(call, capsys, *expected):
    """``call()`` ends with argparse's error (status 2) whose message holds every ``expected``;
    nothing reaches stdout (no notice printed before the error). Returns stderr."""
    with pytest.raises(SystemExit) as info:
        call()
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "", out
    assert "error:" in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


# ------------------------------------------------------------------------------------------------
# the shared types


@pytest.mark.parametrize(
    "check, text, message",
    [
        (benchutil.positive_int, "0", "invalid value '0': must be an integer >= 1"),
        (benchutil.positive_int, "2.5", "invalid value '2.5': must be an integer >= 1"),
        (benchutil.nonneg_int, "-1", "invalid value '-1': must be an integer >= 0"),
        (benchutil.positive_float, "-1", "invalid value '-1': must be a number > 0"),
        (benchutil.positive_float, "0", "invalid value '0': must be a number > 0"),
        (benchutil.positive_float, "nan", "invalid value 'nan': must be a number > 0"),
        (benchutil.int_in_range(0, 51), "52", "invalid value '52': must be an integer in [0, 51]"),
        (benchutil.positive_float, "inf", "invalid value 'inf': must be a number > 0"),
        (benchutil.nonneg_float, "-0.5", "invalid value '-0.5': must be a number >= 0"),
        (benchutil.nonneg_float, "inf", "invalid value 'inf': must be a number >= 0"),
    ],
)
def test_shared_types_refuse_bad_values(check, text, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[")):
        check(text)


def test_shared_types_accept_good_values(tmp_path):
    assert benchutil.positive_int("3") == 3 and benchutil.nonneg_int("0") == 0
    assert benchutil.positive_float("0.5") == 0.5
    assert benchutil.nonneg_float("0") == 0.0 and benchutil.nonneg_float("2.5") == 2.5
    check = benchutil.int_in_range(0, 51)
    assert check("0") == 0 and check("51") == 51  # both ends are in the range
    (tmp_path / "a.csv").write_text("x\n")
    assert benchutil.existing_file(str(tmp_path / "a.csv")) == tmp_path / "a.csv"


# ------------------------------------------------------------------------------------------------
# bench_pipeline.py


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--sets", "foo"], ["--sets", "'foo'", "msrvtt-like"]),
        (["--sets", "synthetic"], ["--sets synthetic needs --synthetic"]),
        (["--batch-size", "0"], ["--batch-size", "'0'", ">= 1"]),
        (["--image-size", "-5"], ["--image-size", "'-5'", ">= 1"]),
        (["--workers", "1", "-1"], ["--workers", "'-1'", ">= 0"]),
        (["--dali-groups", "0"], ["--dali-groups", "'0'", ">= 1"]),
        (["--dali-threads", "-2"], ["--dali-threads", "'-2'", ">= 1"]),
        (["--dali-workers", "-1"], ["--dali-workers", "'-1'", ">= 0"]),
        (["--min-videos", "-1"], ["--min-videos", "'-1'", ">= 1"]),
        (["--max-seconds", "-1"], ["--max-seconds", "'-1'", "> 0"]),
        (["--hard-max-seconds", "0"], ["--hard-max-seconds", "'0'", "> 0"]),
        (["--min-steady-rounds", "0"], ["--min-steady-rounds", "'0'", ">= 1"]),
    ],
)
def test_bench_pipeline_refuses_bad_options(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_pipeline, "prepare_set", no_work)
    monkeypatch.setattr(bench_pipeline, "synthetic_set", no_work)
    refused(lambda: bench_pipeline.main([*argv, "--work-dir", str(tmp_path)]), capsys, *expected)


def test_bench_pipeline_run_with_no_rows_keeps_the_csv(tmp_path, capsys):
    """Every set skipped (here the only one asked for is not a folder): exit status 1, the
    earlier CSV byte for byte as it was."""
    out = tmp_path / "results"
    out.mkdir()
    csv_path = out / "pipeline_pyav.csv"
    csv_path.write_text("set,videos_per_s\nmsrvtt-like,12.5\n")
    status = bench_pipeline.main(["--synthetic", str(tmp_path / "missing"), "--sets", "synthetic",
                                  "--work-dir", str(tmp_path / "work"), "--out-dir", str(out)])
    assert status == 1
    assert csv_path.read_text() == "set,videos_per_s\nmsrvtt-like,12.5\n"
    assert sorted(p.name for p in out.iterdir()) == ["pipeline_pyav.csv"]
    err = capsys.readouterr().err
    assert "no rows measured" in err and "existing file is kept" in err, err


# ------------------------------------------------------------------------------------------------
# bench_transcode.py


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--gops", "8", "0"], ["--gops", "'0'", ">= 1"]),
        (["--height", "-5"], ["--height", "'-5'", "even"]),
        (["--height", "7"], ["--height", "'7'", "even"]),
        (["--draws", "0"], ["--draws", "'0'", ">= 1"]),
        (["--measure-draws", "-1"], ["--measure-draws", "'-1'", ">= 1"]),
        (["--batch-size", "0"], ["--batch-size", "'0'", ">= 1"]),
        (["--workers", "-1"], ["--workers", "'-1'", ">= 0"]),
        (["--dali-groups", "0"], ["--dali-groups", "'0'", ">= 1"]),
        (["--min-videos", "0"], ["--min-videos", "'0'", ">= 1"]),
        (["--crf", "99"], ["--crf", "'99'", "[0, 51]"]),
        (["--preset", "snail"], ["--preset", "'snail'", "veryfast"]),
        (["--max-seconds", "0"], ["--max-seconds", "'0'", "> 0"]),
        (["--hard-max-seconds", "-2"], ["--hard-max-seconds", "'-2'", "> 0"]),
        (["--min-steady-rounds", "0"], ["--min-steady-rounds", "'0'", ">= 1"]),
    ],
)
def test_bench_transcode_refuses_bad_options(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_transcode, "prepare_set", no_work)
    refused(lambda: bench_transcode.main([*argv, "--work-dir", str(tmp_path)]), capsys, *expected)


def test_bench_transcode_refuses_nvenc_without_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_transcode, "prepare_set", no_work)
    monkeypatch.setattr(bench_transcode, "nvenc_available",
                        lambda codec="h264": (False, "FFmpeg has no h264_nvenc encoder"))
    refused(lambda: bench_transcode.main(["--encoder", "nvenc", "--work-dir", str(tmp_path)]),
            capsys, "--encoder nvenc", "no h264_nvenc encoder", "--encoder cpu")


# ------------------------------------------------------------------------------------------------
# bench_kernels.py


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--modes", ","], ["--modes", "','", "fwd, bwd, full"]),
        (["--modes", "fwd,sideways"], ["--modes sideways", "fwd, bwd, full"]),
        (["--dtypes", "fp8"], ["--dtypes fp8", "fp16, fp32, bf16"]),
        (["--impls", ""], ["--impls", "triton, eager"]),
        (["--compile-workers", "0"], ["--compile-workers", "'0'", ">= 1"]),
        (["--combine", "/nonexistent/nope.csv"], ["--combine", "nope.csv", "does not exist"]),
        (["--sweep-configs", "foo", "--interpret"], ["--sweep-configs", "'foo'", "KEY=INT"]),
        (["--sweep-configs", "fwd_blok_k=128", "--interpret"],
         ["--sweep-configs", "fwd_blok_k=128", "fwd_block_k"]),
        (["--sweep-configs", "fwd_block_k=100", "--interpret"],
         ["--sweep-configs", "fwd_block_k=100", "power of 2"]),
    ],
)
def test_bench_kernels_refuses_bad_options(argv, expected, capsys):
    err = refused(lambda: bench_kernels.main(argv), capsys, *expected)
    assert "SIASAM_KERNEL_CONFIG" not in err  # the flag is named, not the variable behind it


@no_cuda
def test_bench_kernels_refuses_gpu_only_options_on_cpu(capsys):
    refused(lambda: bench_kernels.main(["--sweep-configs", "foo"]), capsys,
            "--sweep-configs", "CUDA GPU", "--interpret")
    refused(lambda: bench_kernels.main(["--targets-only"]), capsys, "--targets-only", "CUDA GPU")


def test_bench_kernels_combine_refuses_a_file_that_is_no_csv(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("sweep,mode,ms,V\nV,fwd,0.5,many\n")
    with pytest.raises(SystemExit) as info:
        bench_kernels.main(["--combine", str(bad)])
    assert info.value.code and "bad.csv is not a readable timing CSV" in str(info.value.code)
    assert not (tmp_path / "bench_kernels_combined.csv").exists()


@no_cuda
def test_bench_kernels_says_what_it_measures_instead_and_keeps_the_csv(tmp_path, monkeypatch,
                                                                         capsys):
    """On CPU --impls triton --dtypes fp16 becomes the eager reference in fp32, and the notice
    says so; a run that times nothing leaves the earlier CSV as it was."""
    monkeypatch.setattr(benchutil, "environment", lambda: {
        "device": "cpu", "torch": "t", "triton": "t", "python": "p"})  # fmt: skip
    monkeypatch.setattr(bench_kernels, "run_timings", lambda *args, **kwargs: [])
    csv_path = tmp_path / "bench_kernels_cpu.csv"
    csv_path.write_text("impl,ms\neager,1.0\n")
    assert bench_kernels.main(["--impls", "triton", "--dtypes", "fp16", "--out-dir",
                               str(tmp_path)]) == 1  # fmt: skip
    out, err = capsys.readouterr()
    assert ("asked for --impls triton --dtypes fp16; measuring --impls eager --dtypes fp32 "
            "instead") in out, out
    assert csv_path.read_text() == "impl,ms\neager,1.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_kernels_cpu.csv"]
    assert "no rows measured" in err


# ------------------------------------------------------------------------------------------------
# ablation.py


def test_ablation_refuses_bad_videos(capsys):
    refused(lambda: ablation.parse_args(["--videos", "0"]), capsys, "--videos", "'0'", ">= 1")


# ------------------------------------------------------------------------------------------------
# --out and --out-dir: both spellings in every script


def test_every_script_takes_out_and_out_dir():
    for flag in ("--out", "--out-dir"):
        assert bench_pipeline.build_parser().parse_args([flag, "x"]).out_dir == Path("x")
        assert bench_transcode.build_parser().parse_args([flag, "x"]).out_dir == Path("x")
        assert bench_kernels.parse_args([flag, "x"]).out == "x"
        assert ablation.parse_args([flag, "x"]).out == "x"
        assert bench_memory.build_parser().parse_args([flag, "x"]).out_dir == "x"
    # bench_memory's --out worked only as argparse's abbreviation of --out-dir, unlisted in --help
    assert "--out-dir OUT_DIR, --out OUT_DIR" in bench_memory.build_parser().format_help()


# ------------------------------------------------------------------------------------------------
# bench_train.py (imports DeepSpeed: last, and only here)


@pytest.fixture(scope="module")
def bench_train():
    import bench_train

    return bench_train


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--time-budget", "-1"], ["--time-budget", "'-1'", "> 0"]),
        (["--time-budget", "0"], ["--time-budget", "'0'", "> 0"]),
        (["--variant-timeout", "-5"], ["--variant-timeout", "'-5'", "> 0"]),
        (["--steps", "0"], ["--steps", "'0'", ">= 1"]),
        (["--warmup", "-1"], ["--warmup", "'-1'", ">= 1"]),
        (["--num-videos", "0"], ["--num-videos", "'0'", ">= 1"]),
    ],
)
def test_bench_train_refuses_bad_options(bench_train, argv, expected, capsys):
    refused(lambda: bench_train.main(argv), capsys, *expected)


def test_bench_train_options_and_help(bench_train, capsys):
    args = bench_train.parse_args(["--out-dir", "x", "--time-budget", "60"])
    assert args.out == "x" and args.time_budget == 60.0 and args.variant_timeout is None
    assert bench_train.parse_args(["--out", "x"]).out == "x"
    with pytest.raises(SystemExit) as info:
        bench_train.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "issue" not in text.lower() and "--time-budget" in text


@no_cuda
def test_bench_train_with_every_variant_skipped_keeps_the_csv(bench_train, tmp_path, monkeypatch,
                                                              capsys):
    """A GPU-only variant on CPU is skipped: nothing ran, so no result file is rewritten."""
    monkeypatch.setattr(bench_train, "ensure_data", lambda cfg, num_videos: None)
    monkeypatch.setattr(bench_train, "environment", lambda: {
        "device": "cpu", "torch": "t", "deepspeed": "d", "dali": "x", "triton": "t"})  # fmt: skip
    csv_path = tmp_path / "bench_train_cpu_bench_tiny.csv"
    csv_path.write_text("variant,status\nbaseline-fp32,ok\n")
    status = bench_train.main(["--variants", "fast-fp16", "--out", str(tmp_path),
                               "--isolate", "none"])
    assert status == 1
    assert csv_path.read_text() == "variant,status\nbaseline-fp32,ok\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_train_cpu_bench_tiny.csv"]
    assert "no rows measured" in capsys.readouterr().err


@no_cuda
def test_bench_train_stopped_by_ctrl_c_keeps_the_earlier_results(bench_train, tmp_path,
                                                                 monkeypatch, capsys):
    """Ctrl-C in the second variant: exit 130, the first variant's row in STEM.partial.csv (and
    .md / .json), an earlier finished run's STEM.csv as it was; no traceback."""
    monkeypatch.setattr(bench_train, "ensure_data", lambda cfg, num_videos: None)
    monkeypatch.setattr(bench_train, "environment", lambda: {
        "device": "cpu", "torch": "t", "deepspeed": "d", "dali": "x", "triton": "t"})  # fmt: skip
    ran = []

    def run_in_process(plan, cfg, args, device):
        ran.append(plan.variant.name)
        if len(ran) == 2:
            raise KeyboardInterrupt
        return bench_train.skipped_row(plan, "failed", "stand-in row")

    monkeypatch.setattr(bench_train, "run_in_process", run_in_process)
    csv_path = tmp_path / "bench_train_cpu_bench_tiny.csv"
    csv_path.write_text("variant,status\nbaseline-fp32,ok\n")
    status = bench_train.main(["--variants", "baseline-fp32", "baseline-amp", "--out",
                               str(tmp_path), "--isolate", "none"])
    assert status == 130 and ran == ["baseline-fp32", "baseline-amp"]
    err = capsys.readouterr().err
    assert "interrupted: the rows measured so far are in" in err and "Traceback" not in err
    assert csv_path.read_text() == "variant,status\nbaseline-fp32,ok\n"
    with (tmp_path / "bench_train_cpu_bench_tiny.partial.csv").open() as fh:
        assert [r["variant"] for r in csv.DictReader(fh)] == ["baseline-fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_train_cpu_bench_tiny.csv", "bench_train_cpu_bench_tiny.partial.csv",
        "bench_train_cpu_bench_tiny.partial.json", "bench_train_cpu_bench_tiny.partial.md"]


def test_bench_transcode_original_set_is_configurable_and_cached_apart():
    """--original-gop / --original-frames make another original set, cached under its own name
    (the default set keeps its name and cache); a too-short original is refused."""
    default = bench_transcode.original_set(False)
    assert (default.name, default.gop, default.num_frames) == ("activitynet-like", 100, 300)
    args = bench_transcode.build_parser().parse_args(["--original-gop", "250",
                                                      "--original-frames", "900"])
    spec = bench_transcode.original_set(False, args.original_gop, args.original_frames)
    assert (spec.gop, spec.num_frames, spec.width) == (250, 900, 1280)
    assert spec.folder_name != default.folder_name
    with pytest.raises(SystemExit):
        bench_transcode.build_parser().parse_args(["--original-frames", "10"])
