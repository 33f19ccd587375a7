"""benchmarks/bench_memory.py on the tiny model: it counts what the CNN keeps for the backward,
per frame, and the counts move the way the settings say they must."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from subprocess_env import cpu_env

ROOT = Path(__file__).resolve().parent.parent


def test_bench_memory_counts_activations_per_frame(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_memory.py", "--config", "configs/synthetic.yaml",
         "--sizes", "64", "128", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "memory.csv").open()))
    got = {(r["setting"], int(r["image_size"])): int(r["bytes_per_frame_fp32"]) for r in rows}
    assert len(got) == 8 and all(v > 0 for v in got.values())
    for size in (64, 128):
        # ClipBERT's freeze keeps less than BatchNorms frozen alone, which keeps less than the
        # default; recomputation keeps the least
        assert got["checkpointed", size] < got["default", size]
        assert got["clipbert", size] < got["bn_frozen", size]
        assert got["bn_frozen", size] < got["default", size]
    # activations scale with the pixels (the weights, saved too, are not counted: 4x exactly
    # up to the grid's rounding)
    assert 3.5 < got["default", 128] / got["default", 64] < 4.5
    assert "vs_default_smallest" in rows[0] and "wrote" in proc.stdout
    # where the model ran (the device column is the machine's: its GPU's name where it has one)
    assert {r["run_device"] for r in rows} == {"cpu"}


def _bench_memory():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    return bench_memory


def test_bench_memory_stopped_by_ctrl_c_keeps_the_earlier_results(tmp_path, monkeypatch, capsys):
    """As every benchmark (README, "Benchmarks"): Ctrl-C after the first row exits 130 with one
    line, the row measured so far in memory.partial.csv, an earlier finished run's memory.csv as
    it was (it was rewritten with the partial rows, and a traceback printed)."""
    bench_memory = _bench_memory()
    calls = []

    def measure(model, size, frames, device):
        calls.append(size)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 1024.0

    monkeypatch.setattr(bench_memory, "saved_bytes_per_frame", measure)
    csv_path = tmp_path / "memory.csv"
    csv_path.write_text("setting,image_size\ndefault,224\n")
    status = bench_memory.main(["--config", "configs/synthetic.yaml", "--settings", "default",
                                "--sizes", "16", "32", "--out-dir", str(tmp_path)])
    assert status == 130 and calls == [16, 32]
    err = capsys.readouterr().err
    assert "interrupted: the rows measured so far are in" in err and "Traceback" not in err
    assert csv_path.read_text() == "setting,image_size\ndefault,224\n"
    with (tmp_path / "memory.partial.csv").open() as fh:
        assert [r["image_size"] for r in csv.DictReader(fh)] == ["16"]
    # a finished run replaces memory.csv and drops the partial file
    monkeypatch.setattr(bench_memory, "saved_bytes_per_frame", lambda *a: 1024.0)
    assert bench_memory.main(["--config", "configs/synthetic.yaml", "--settings", "default",
                              "--sizes", "16", "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.csv"]


def test_bench_memory_bad_config_or_device_is_one_line(tmp_path, capsys):
    """A missing config, an unknown key and a device torch does not know (``--device gpu``) end
    with one line naming the value, exit status 2, nothing written (they were tracebacks)."""
    bench_memory = _bench_memory()
    for argv, expected in (
        (["--config", "configs/nope.yaml"], "configs/nope.yaml"),
        (["--config", "configs/synthetic.yaml", "--set", "model.visul=tiny"], "visul"),
        (["--config", "configs/synthetic.yaml", "--device", "gpu"], "'gpu'"),
        # a device torch knows but this benchmark cannot use (it was a RuntimeError traceback)
        (["--config", "configs/synthetic.yaml", "--device", "mps"], "'mps': valid devices"),
    ):
        status = bench_memory.main([*argv, "--sizes", "16", "--out-dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert status == 2, (argv, err)
        assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_bench_memory_help_describes_it_in_a_whole_sentence(capsys):
    """--help's description is the docstring's first sentence, not its first line cut mid-way."""
    bench_memory = _bench_memory()
    description = bench_memory.build_parser().description
    assert description.endswith("."), description


def test_saved_bytes_per_frame_counts_each_kept_storage_once_per_frame():
    """A toy encoder keeps its input (for the weight's gradient) and the ReLU's output, which a
    view of it is saved as again (twice): two frame-sized storages per frame, the weight not
    counted."""
    bench_memory = _bench_memory()

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def encode_frames(self, x):
            kept = (x * self.w).relu()
            flat = kept.view(kept.shape[0], -1)
            return flat * flat

    model = torch.nn.Module()
    model.visual = Visual()
    size, frames = 8, 3
    got = bench_memory.saved_bytes_per_frame(model, size, frames, torch.device("cpu"))
    assert got == 2 * 3 * size * size * 4
    assert model.visual.w.grad is not None  # the backward ran


def test_bench_memory_columns_against_the_smallest_default(tmp_path, monkeypatch, capsys):
    from siasam_fast import model

    bench_memory = _bench_memory()
    monkeypatch.setattr(model, "SiaSamReaModel", lambda *args: torch.nn.Linear(1, 1))
    monkeypatch.setattr(bench_memory, "saved_bytes_per_frame",
                        lambda model, size, frames, device: float(size * size * 2**12))
    assert bench_memory.main(["--config", "configs/synthetic.yaml", "--settings", "default",
                              "--sizes", "32", "16", "--out-dir", str(tmp_path)]) == 0
    with (tmp_path / "memory.csv").open() as fh:
        rows = {int(r["image_size"]): r for r in csv.DictReader(fh)}
    assert float(rows[16]["vs_default_smallest"]) == 1.0
    assert float(rows[32]["vs_default_smallest"]) == 4.0
    assert float(rows[32]["mib_per_frame_fp32"]) == 4.0  # 32 * 32 * 4096 bytes
    assert float(rows[32]["mib_per_frame_16bit"]) == 2.0
    capsys.readouterr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_bench_memory_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    bench_memory = _bench_memory()
    assert bench_memory.main(["--config", "configs/synthetic.yaml", "--device", "cuda",
                              "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --device cuda: no CUDA GPU here; use --device cpu"
    assert list(tmp_path.iterdir()) == []
