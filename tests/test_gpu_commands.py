"""Every command line a GPU loan issues, accepted by the current code, checked on CPU without
running anything: the scripts of docs/gpu_runbook.md (scripts/gpu_owed.sh and the scripts it
calls, gpu_check_train.sh, gpu_check_kernels.sh) run with stand-ins for python, deepspeed, ncu and
nvidia-smi that only record their arguments; each recorded command (and each command the runbook
gives directly) is then parsed by its own argparse, its config built with its --set overrides and
its DeepSpeed config finalised. A renamed option, config key, variant or file then fails here
instead of on a 15-minute GPU loan."""

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from subprocess_env import cpu_env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
RUNBOOK = ROOT / "docs" / "gpu_runbook.md"

RECORDER = """#!/usr/bin/env bash
# one write per command: the scripts run some in the background, at the same time
line="$(basename "$0")$(printf ' %q' "$@")"
printf '%s\\n' "$line" >> "$RECORD"
[ "${1:-}" = "-c" ] && echo 1   # gpu_check_train.sh's epoch count
[ "${1:-}" = "-" ] && cat > /dev/null
exit 0
"""


def runbook_text() -> str:
    return " ".join(RUNBOOK.read_text().split())


@pytest.fixture
def stubs(tmp_path):
    """A folder of stand-ins (py, deepspeed, ncu record their arguments; nvidia-smi names an
    H100, so that the scripts take their GPU branches) and a function that runs a script with
    them and returns the recorded commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("py", "deepspeed", "ncu"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/usr/bin/env bash\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 570.0'\n")
    smi.chmod(0o755)
    record = tmp_path / "record.txt"

    def run(script: str, **env: str) -> tuple[list[list[str]], str]:
        record.write_text("")
        full = cpu_env(**{"PATH": f"{bin_dir}:{cpu_env()['PATH']}", "RECORD": str(record),
                          "PY": "py", "PYTHON": "py", "SKIP_STAGE": "1",
                          "SITE": str(tmp_path / "site"), "STAGE": str(tmp_path / "stage"),
                          "TMPDIR": str(tmp_path), "KEEP": str(tmp_path / "keep"),
                          "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
                          **env})
        proc = subprocess.run(["bash", script], cwd=ROOT, env=full, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [shlex.split(line) for line in record.read_text().splitlines()], proc.stdout

    return run


class Parsed(Exception):
    """Raised by the patched parse_args once a script's own parser accepted its arguments."""


def parse_script_main(path: Path, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with the parser that ``path``'s main() builds, stopping right after."""
    spec = importlib.util.spec_from_file_location(f"_cmd_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), \
            mock.patch.object(sys, "argv", [str(path), *argv]), pytest.raises(Parsed) as info:
        module.main()
    return info.value.args[0]


def on_an_h100():
    """torch.cuda as on the loan's card, for the checks that depend on it."""
    return mock.patch.multiple("torch.cuda", is_available=lambda: True,
                               get_device_capability=lambda *a: (9, 0),
                               get_device_name=lambda *a: "NVIDIA H100 80GB HBM3")


def check_command(cmd: list[str], tmp_path: Path) -> str:
    """Parse one recorded command as the code it calls would; returns what it was."""
    from siasam_fast.config import load_config

    name, args = cmd[0], cmd[1:]
    if name == "ncu":  # ncu OPTIONS py SCRIPT ARGS: the profiled command
        return check_command(args[args.index("py"):], tmp_path)
    if name == "deepspeed":  # deepspeed --num_gpus 1 train.py ARGS
        assert args[:3] == ["--num_gpus", "1", "train.py"], args
        from siasam_fast import ds_config, training

        parsed = training.parse_args(["--local_rank=0", *args[3:]])
        cfg = load_config(parsed.config, parsed.set)
        training.check_start_args(parsed, cfg)
        with on_an_h100():
            ds = ds_config.load_ds_config(parsed.deepspeed_config, cfg.train.precision)
            ds_config.finalize(ds, cfg.train.batch_size, cfg.train.grad_clip, 1,
                               cfg.train.grad_accum)
        return "train.py"
    assert name == "py", cmd
    if args[0] in ("-", "-c"):
        return "inline"
    if args[:2] == ["-m", "pytest"]:
        files = [a for a in args[2:] if not a.startswith("-") and a != "no:cacheprovider"]
        assert files and all((ROOT / f).is_file() for f in files), files
        return "pytest"
    if args[:2] in (["-m", "siasam_fast.envcheck"], ["-m", "siasam_fast.cli"]):
        from siasam_fast import cli

        cli.build_parser().parse_args((["env"] if args[1].endswith("envcheck") else [])
                                      + args[2:])
        return args[1]
    script, argv = args[0], args[1:]
    if script == "benchmarks/bench_train.py":
        import bench_train

        parsed = bench_train.parse_args(argv)
        load_config(parsed.config, parsed.set)
    elif script == "benchmarks/bench_kernels.py":
        import bench_kernels

        with on_an_h100():
            bench_kernels.parse_args(argv)
    elif script == "benchmarks/bench_transcode.py":
        import bench_transcode

        bench_transcode.build_parser().parse_args(argv)
    elif script == "benchmarks/bench_pipeline.py":
        import bench_pipeline

        bench_pipeline.build_parser().parse_args(argv)
    elif script in ("scripts/gpu_check_dali.py", "scripts/ncu_siamese.py"):
        parse_script_main(ROOT / script, argv)
    else:
        raise AssertionError(f"no check for {cmd}")
    return script


def check_all(cmds: list[list[str]], tmp_path: Path) -> list[str]:
    checked = []
    for cmd in cmds:
        try:
            checked.append(check_command(cmd, tmp_path))
        except SystemExit as err:  # argparse's error (its message is on stderr)
            raise AssertionError(f"refused ({err}): {shlex.join(cmd)}") from err
    return checked


# The loan's calls, as docs/gpu_runbook.md gives them (each checked to be there, word for word).
OWED_CALLS = [
    'PARTS="dali train" DALI_ARGS=--skip-bench DALI_S=150 BUDGET_S=580 bash scripts/gpu_owed.sh',
    'KEEP=/tmp/owed2 PARTS=train BUDGET_S=230 VARIANTS="baseline-amp amp-deepspeed amp-dali '
    'amp-channels-last amp-cudnn-benchmark" bash scripts/gpu_owed.sh',
    "bash scripts/gpu_owed.sh",
]
TRANSCODE_ARGS = ("--workers 16 --backend dali --samplings paper --batch-size 8 --min-videos 96 "
                  "--min-steady-rounds 2 --hard-max-seconds 20 --measure-draws 4 --gops 8 32 "
                  "--dali-groups 1 2 --dali-trim on")
TRANSCODE_ORIGINALS = ("--original-gop 250 --original-frames 900 --gops 16 --no-control "
                       "--samplings paper")


def env_prefix(call: str) -> dict:
    words = shlex.split(call)
    env = dict(w.split("=", 1) for w in words[:words.index("bash")])
    env.pop("KEEP", None)  # the test's own folders
    return env


@pytest.mark.parametrize("call", OWED_CALLS + ["every part"])
def test_owed_calls_issue_only_accepted_commands(call, stubs, tmp_path):
    if call == "every part":
        env = {"PARTS": "checks dali transcode train", "BUDGET_S": "580"}
    else:
        assert call in runbook_text(), call
        env = env_prefix(call)
    cmds, out = stubs("scripts/gpu_owed.sh", **env)
    log = (tmp_path / "keep" / "owed.log").read_text()
    for part in env.get("PARTS", "checks dali").split():
        assert f"{part}: ok" in log, log  # within its share of BUDGET_S, not skipped
    checked = check_all(cmds, tmp_path)
    if "train" in env.get("PARTS", ""):
        bench = [c for c in cmds if c[1:2] == ["benchmarks/bench_train.py"]]
        main = [c for c in bench if "--time-budget" in c]
        assert len(main) == 1 and any("--build-fused-adam" in c for c in bench), bench
        if "VARIANTS" in env:
            i = main[0].index("--variants")
            assert main[0][i + 1:i + 1 + len(env["VARIANTS"].split())] == \
                env["VARIANTS"].split()
    assert len(checked) == len(cmds)


def test_owed_transcode_calls_of_the_runbook(stubs):
    text = runbook_text()
    assert f'TRANSCODE_ARGS="{TRANSCODE_ARGS}"' in text and TRANSCODE_ORIGINALS in text
    for args in (TRANSCODE_ARGS, f"{TRANSCODE_ARGS} {TRANSCODE_ORIGINALS}"):
        cmds, _ = stubs("scripts/gpu_owed.sh", PARTS="transcode", TRANSCODE_ARGS=args)
        assert check_all(cmds, ROOT) == ["benchmarks/bench_transcode.py"]


@pytest.mark.parametrize("runs", ["", "fp16_accum fp16_multi"])
def test_check_train_runs_are_accepted(runs, stubs, tmp_path):
    assert "QUICK=1 bash scripts/gpu_check_train.sh" in runbook_text()
    if runs:
        assert f'QUICK=1 RUNS="{runs}"' in runbook_text()
    cmds, out = stubs("scripts/gpu_check_train.sh", QUICK="1", RUNS=runs,
                      OUT=str(tmp_path / "check_train"))
    checked = check_all(cmds, tmp_path)
    ran = checked.count("train.py")
    assert ran == (len(runs.split()) if runs else 9), out
    assert "FAIL" not in out


def test_check_kernels_steps_are_accepted(stubs, tmp_path):
    out_dir = tmp_path / "check_kernels"
    out_dir.mkdir()
    (out_dir / "bench_kernels_h100.csv").write_text("impl\n")  # what the timing steps write
    cmds, out = stubs("scripts/gpu_check_kernels.sh", OUT=str(out_dir), PREPARE="true")
    checked = check_all(cmds, tmp_path)
    assert checked.count("benchmarks/bench_kernels.py") == 4 and \
        "scripts/ncu_siamese.py" in checked, checked
    assert "FAIL" not in out


def test_check_kernels_forced_settings_are_valid_kernel_config(tmp_path):
    """gpu_check_kernels.sh forces the sweep's fp16 winners on every GPU test through
    SIASAM_KERNEL_CONFIG: its snippet, applied to the shipped table (the format the sweep
    writes), gives keys the kernels accept."""
    from siasam_kernels import siamese as ks

    script = (ROOT / "scripts" / "gpu_check_kernels.sh").read_text()
    snippet = re.search(r'FORCE=\$\(\$PY -c "(.*?)" "\$tuned"\)', script, re.S).group(1)
    # the sweep's table holds one GPU (the shipped one starts with a note: left out here)
    table = {k: v for k, v in json.loads(ks.TUNED_FILE.read_text()).items()
             if not k.startswith("_")}
    (tmp_path / "tuned.json").write_text(json.dumps(dict(list(table.items())[:1])))
    proc = subprocess.run([sys.executable, "-c", snippet, str(tmp_path / "tuned.json")],
                          capture_output=True, text=True, check=True)
    forced = ks.config_override(proc.stdout.strip())
    assert forced and all(k.startswith(("fwd_", "bwd_")) for k in forced)


@pytest.mark.parametrize("command", [
    "python benchmarks/bench_pipeline.py --backend dali pyav --sets activitynet-like --frames 1800 "
    "--workers 16 --dali-trim both --batch-size 8 --max-seconds 9 --out $OUT",
    "python benchmarks/bench_train.py --config configs/clipbert_base.yaml --variants baseline-amp "
    "fast-bf16 --set model.activation_checkpointing=cnn --out $OUT",
    "python scripts/gpu_check_dali.py --out $OUT",
])
def test_runbooks_direct_commands_are_accepted(command, tmp_path):
    assert command in runbook_text(), command
    words = shlex.split(command.replace("$OUT", str(tmp_path)))
    assert check_all([["py", *words[1:]]], tmp_path) == [words[1]]


def test_gpu_bench_train_default_call_is_accepted(stubs, tmp_path):
    cmds, _ = stubs("scripts/gpu_bench_train.sh")
    checked = check_all(cmds, tmp_path)
    assert checked.count("benchmarks/bench_train.py") == 3, cmds
