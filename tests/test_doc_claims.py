"""The documentation's most error-prone claims kept honest: every config key that README.md,
docs/*.md and the comments of configs/*.yaml name is a real field, every ``--set key=value`` they
show is accepted by the config loader, and every relative link (file or ``#anchor``) resolves.
Only names shaped like ``section.key`` are read, so prose never fails the test."""

import dataclasses
import re
from pathlib import Path

import pytest

from siasam_fast.config import _SECTIONS, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# `train.py`, `model.py`, `train.jsonl`: file names, not keys
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "md", "csv", "sh", "log", "png", "txt"}
KEY = re.compile(r"(?<![\w./-])(" + "|".join(_SECTIONS) + r")\.([a-z_][a-z0-9_]*)\b(?!\.\w)")
SET = re.compile(r"--set\s+((?:" + "|".join(_SECTIONS) + r")\.[a-z_0-9]+=[^\s`\])]+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".yaml":  # only the comments: the keys themselves are loaded elsewhere
        text = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    return text


def _fields() -> set[str]:
    return {f"{section}.{f.name}" for section, cls in _SECTIONS.items()
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("path", DOCS + CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_config_keys_exist(path):
    known = _fields()
    wrong = sorted({f"{m.group(1)}.{m.group(2)}" for m in KEY.finditer(_text(path))
                    if m.group(2) not in FILE_SUFFIXES} - known)
    assert not wrong, f"{path.name} names config keys that do not exist: {wrong}"


@pytest.mark.parametrize("path", DOCS + CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shown_overrides_are_accepted(path):
    for override in SET.findall(_text(path)):
        if "$" in override:  # a shell variable
            continue
        try:
            load_config(None, [override])
        except ValueError as err:
            pytest.fail(f"{path.name}: --set {override}: {err}")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (code blocks skipped)."""
    found, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchor, n = slug, 1
            while anchor in found:
                anchor, n = f"{slug}-{n}", n + 1
            found.add(anchor)
    return found


@pytest.mark.parametrize("path", DOCS + sorted((ROOT / "benchmarks" / "measured").glob("*.md")),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{path.name}: links that point nowhere: {broken}"


CLIPBERT_SET = "model.visual=weights/clipbert-visual"


@pytest.mark.parametrize("path", DOCS + CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_clipbert_commands_carry_its_input(path):
    """Every command or comment that starts from the converted ClipBERT folders also gives
    ClipBERT's input (README, "ClipBERT's checkpoint": data.frame_fit=pad at data.image_size=448);
    without them a run trains it on centre-cropped 224 px frames."""
    text = _text(path)
    for m in re.finditer(re.escape(CLIPBERT_SET), text):
        near = text[max(0, m.start() - 300): m.end() + 300]
        assert "data.frame_fit=pad" in near and "data.image_size=448" in near, (
            f"{path.name}: --set {CLIPBERT_SET} without data.frame_fit=pad and "
            f"data.image_size=448 near it")


def test_scaling_doc_bandwidth_table_follows_from_the_model():
    """docs/scaling.md, section 2: each cell of the bandwidth-term table is the per-GPU volume of
    DeepSpeed's ZeRO-2 as ``configs/ds/`` sets it up (gradient buckets all-reduced, since
    ``use_multi_rank_bucket_allreduce`` is left at its default true, then the weights all-gathered:
    3 Psi x 2 B x (n-1)/n) over the bus bandwidth the cell names, Psi counted from the model."""
    import json

    import torch

    from siasam_fast.model import load_tokenizer
    from siasam_fast.training import build_model

    for path in sorted((ROOT / "configs" / "ds").glob("*.json")):
        zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {})
        assert "use_multi_rank_bucket_allreduce" not in zero, f"{path.name}: section 2's premise"
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        pass
    else:
        assert DeepSpeedZeroConfig().use_multi_rank_bucket_allreduce is True

    cfg = load_config(ROOT / "configs" / "clipbert_base.yaml", [])
    with torch.device("meta"):  # 18: the synthetic set's open-ended answers (section 1's K)
        model = build_model(cfg, 18, len(load_tokenizer(cfg.model)))
    psi = sum(p.numel() for p in model.parameters())
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert f"**{psi:,}**" in text
    rows = re.findall(r"^\| (\d+) \([^)]*\) \| (?:NVLink|IB) \| (.*) \| (.*) \|$", text, re.M)
    assert [n for n, *_ in rows] == ["8", "64", "512"]
    for n, *cells in rows:
        volume_mb = 3 * psi * 2 * (int(n) - 1) / int(n) / 1e6
        for cell in cells:
            cell_re = r"(\d+) MB / (\d+) GB/s = \*\*([\d.]+) ms\*\*"
            mb, gbps, ms = re.fullmatch(cell_re, cell).groups()
            assert abs(int(mb) - volume_mb) < 1, f"{n} GPUs: {cell}, volume {volume_mb:.0f} MB"
            assert abs(float(ms) - volume_mb / int(gbps)) < 0.06, f"{n} GPUs: {cell}"


def test_scaling_doc_decode_share():
    """docs/scaling.md, section 4: the decode-bound share of an H100's compute is the NVDEC rates
    it names over the step's videos/s."""
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    lo, hi, a, b, step = map(int, re.search(
        r"decode-bound at (\d+)-(\d+)% of its compute capacity\*\* \((\d+) or (\d+) of (\d+)",
        text).groups())
    assert (lo, hi) == (round(100 * a / step), round(100 * b / step))


def _shell_commands(path: Path) -> list[str]:
    """The command lines of a Markdown file's ```bash blocks: continuation lines joined, comments
    dropped, shell variables set in the block (W="...") substituted."""
    import shlex

    lines, block = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            block = [] if stripped == "```bash" and block is None else None
        elif block is not None and lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + stripped
        elif block is not None:
            lines.append(stripped)
    commands, env = [], {}
    for line in lines:
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.fullmatch(r"[A-Z]+=.*", words[0]):
            name, value = words[0].split("=", 1)
            env[name] = value
        elif words:
            commands.append(line)
    out = []
    for command in commands:
        for name, value in env.items():
            command = command.replace(f"${name}", value)
        out.append(" ".join(shlex.split(command, comments=True)))
    return out


GPU_OF = {"fp16": ((7, 0), "Tesla V100-SXM2-16GB"), "bf16": ((9, 0), "NVIDIA H100 80GB HBM3"),
          "fp32": ((9, 0), "NVIDIA H100 80GB HBM3")}


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "docs" / "datasets.md"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shown_training_commands_are_accepted(path):
    """Every train.py command line of the file's shell blocks (python, deepspeed, torchrun; a
    ``--config ...`` left for the reader is skipped) parses with train.py's own arguments, its
    config builds with its --set overrides, and its DeepSpeed file is accepted on the GPU its
    precision is for (fp16 on a V100, bf16 on an H100: README, "Install on a GPU machine")."""
    import shlex
    from unittest import mock

    from siasam_fast import ds_config, training

    checked = 0
    for command in _shell_commands(path):
        words = shlex.split(command)
        if "train.py" not in words:
            continue
        args = words[words.index("train.py") + 1:]
        if "..." in args:
            continue
        parsed = training.parse_args(args)
        cfg = load_config(parsed.config, parsed.set)
        training.check_start_args(parsed, cfg)
        ds = ds_config.load_ds_config(parsed.deepspeed_config, cfg.train.precision)
        cc, name = GPU_OF[ds_config.precision_of(ds)]
        with mock.patch.multiple("torch.cuda", is_available=lambda: True,
                                 get_device_capability=lambda *a, cc=cc: cc,
                                 get_device_name=lambda *a, name=name: name):
            ds_config.finalize(ds, cfg.train.batch_size, cfg.train.grad_clip, 8,
                               cfg.train.grad_accum)
        checked += 1
    assert checked >= {"README.md": 5, "datasets.md": 3}[path.name], checked


def test_shown_benchmark_commands_are_accepted():
    """The README's benchmark command lines (its shell block, and those it gives in the text)
    parse with each script's own arguments, their --config and --set included."""
    import shlex
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from test_gpu_commands import check_all

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    inline = ["bench_train.py --config configs/bench_tiny.yaml --steps 5",
              "bench_kernels.py --quick --interpret", "bench_pipeline.py --quick",
              "bench_transcode.py --quick", "ablation.py --quick", "ablation.py --variants sparse",
              "bench_pipeline.py --quick --sets msrvtt-like --backend dali pyav --dali-trim both "
              "--workers 2",
              "bench_train.py --set model.activation_checkpointing=cnn",
              "bench_kernels.py --sweep-configs --dtypes fp16,fp32",
              "bench_transcode.py --backend dali --workers 16",
              "--original-gop 250 --original-frames 900"]
    commands = [c for c in _shell_commands(ROOT / "README.md") if c.startswith("python bench")]
    for snippet in inline:
        assert snippet in text, snippet
        if snippet.startswith("--"):
            snippet = "bench_transcode.py " + snippet
        commands.append(f"python benchmarks/{snippet}")
    commands.append("python benchmarks/bench_pipeline.py --backend pyav dali --dali-threads 4 8 "
                    "16 --dali-groups 1 2 --dali-trim both")  # the block's comment's options
    assert len(commands) >= 18, commands
    for command in commands:
        words = shlex.split(command)
        if words[1] == "benchmarks/ablation.py":
            import ablation

            ablation.parse_args(words[2:])
        elif words[1] == "benchmarks/bench_memory.py":
            import bench_memory

            bench_memory.build_parser().parse_args(words[2:])
        else:
            check_all([["py", *words[1:]]], ROOT)


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "docs" / "datasets.md"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shown_cli_commands_are_accepted(path):
    """The file's shell blocks' ``siasam-fast`` command lines parse with the CLI's own parser,
    and each ``pip install -e .[EXTRA]`` names an extra that setup.py declares."""
    import shlex

    from siasam_fast import cli

    extras = set(re.findall(r'^\s*"([\w-]+)": \[', (ROOT / "setup.py").read_text(), re.M))
    checked = 0
    for command in _shell_commands(path):
        words = shlex.split(command)
        if words[0] == "siasam-fast":
            cli.build_parser().parse_args(words[1:])
            checked += 1
        elif words[:3] == ["pip", "install", "-e"]:
            wanted = re.fullmatch(r"\.\[([\w,-]+)\]", words[3]).group(1).split(",")
            assert set(wanted) <= extras, (command, extras)
            checked += 1
    assert checked >= {"README.md": 5, "datasets.md": 2}[path.name], checked


def test_the_slurm_templates_grace_period_reaches_the_training():
    """README's Slurm template asks for SIGTERM some seconds before the time limit; torchrun
    passes it on and SIGKILLs its workers 30 s later unless ``--shutdown-timeout`` says
    otherwise, so each torchrun the template shows must wait most of that lead (it cut the
    template's 120 s to 30 s: a stop's checkpoint save was killed halfway, checked on the CPU
    with a save held for 45 s)."""
    text = re.sub(r"\s+", " ", (ROOT / "README.md").read_text(encoding="utf-8"))
    lead = int(re.search(r"#SBATCH [^#]*--signal=TERM@(\d+)", text).group(1))
    launches = re.findall(r"srun --cpus-per-task=\$SLURM_CPUS_PER_TASK torchrun (.*?) train\.py",
                          text)
    assert len(launches) >= 2, launches  # the template's, and the one for several nodes
    for options in launches:
        wait = re.search(r"--shutdown-timeout (\d+)", options)
        assert wait and 30 < int(wait.group(1)) < lead, (options, lead)


def test_scaling_doc_names_the_bench_train_column_it_quotes():
    """docs/scaling.md, section 1: the TFLOP per step it quotes from bench_train.py's H200 CSV is
    the value of the column it names (the CSV's ``tflop_per_step`` is each row's own count, 15.29
    for the baseline's duplicate frames; the de-duplicated figure is ``model_tflop_per_step``)."""
    import csv

    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    m = re.search(r"reports\s+`(\w+)`:\s+([\d.]+) TFLOP in its H200 CSV of 2026-11-27", text)
    assert m, "docs/scaling.md no longer quotes bench_train's H200 CSV"
    column, value = m.group(1), float(m.group(2))
    path = (ROOT / "benchmarks" / "measured" / "h200_2026-11-27" / "train"
            / "bench_train_nvidia-h200_clipbert_base.csv")
    with path.open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    assert rows and all(round(float(r[column]), 2) == value for r in rows), (
        column, value, [r[column] for r in rows])
