"""`siasam-fast env`: the machine report, its real checks, and how it reports a broken part."""

import json
import sys

import pytest
import torch
from conftest import requires_cuda

from siasam_fast import cli, envcheck


def run_env(capsys, *argv):
    code = cli.main(["env", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def rows_by_name(path):
    rows = json.loads(path.read_text())
    return {r["name"]: r for r in rows}, rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's report")
def test_cpu_report(capsys, tmp_path):
    code, out, _ = run_env(capsys, "--json", tmp_path / "env" / "rows.json")
    assert code == 0, out
    rows, listed = rows_by_name(tmp_path / "env" / "rows.json")
    assert [r["status"] for r in listed if r["status"] == "fail"] == []
    assert rows["torch"]["status"] == "ok" and "CPU build" in rows["torch"]["detail"]
    assert rows["GPU"]["status"] == "info" and "no CUDA GPU" in rows["GPU"]["detail"]
    assert rows["precision"]["detail"].startswith("fp32") and "zero2_fp32.json" in \
        rows["precision"]["detail"]
    # conftest runs the CPU suite under the Triton interpreter: the kernels are really compared.
    assert rows["Triton kernels"]["status"] == "ok"
    assert "matches the reference on the CPU (Triton interpreter)" in \
        rows["Triton kernels"]["detail"]
    assert rows["DALI decode"]["status"] == "ok" and "VP9" in rows["DALI decode"]["detail"]
    assert rows["data.backend=auto"]["detail"].startswith("pyav")
    assert rows["DeepSpeed"]["status"] == "ok" and "accelerator cpu" in rows["DeepSpeed"]["detail"]
    assert rows["PyAV"]["status"] == "ok" and "h264" in rows["PyAV"]["detail"]
    assert rows["transformers"]["status"] == "ok"
    for name in rows:  # the printed table has every row
        assert name in out
    assert f"{len(listed)} checks:" in out and "0 fail" in out


def test_wrong_kernel_results_are_a_failure(capsys, monkeypatch, tmp_path):
    """The kernel check compares real numbers: a fused loss 1% off fails it, exit status 1."""
    if not (torch.cuda.is_available() or envcheck_interpreting()):
        pytest.skip("the kernels run on a GPU or in Triton's interpreter only")
    from siasam_kernels import siamese as kern

    original = kern.siamese_loss
    monkeypatch.setattr(kern, "siamese_loss", lambda *a, **k: original(*a, **k) * 1.01)
    code, out, _ = run_env(capsys, "--no-decode", "--json", tmp_path / "rows.json")
    rows, _ = rows_by_name(tmp_path / "rows.json")
    assert code == 1
    assert rows["Triton kernels"]["status"] == "fail"
    assert "differs from the reference" in rows["Triton kernels"]["detail"]
    assert "failed: Triton kernels" in out


def envcheck_interpreting():
    from siasam_fast import siamese

    return siamese.interpreting()


def test_dali_decode_check_sees_a_wrong_frame(monkeypatch):
    """The decoding check reads each decoded frame's brightness: a clip whose frames are one off
    fails it."""
    pytest.importorskip("nvidia.dali")
    original = envcheck._test_clip

    def shifted(codec):
        monkeypatch.setattr(envcheck, "_grey", lambda i: 8 + 15 * (i + 1))
        try:
            return original(codec)
        finally:
            monkeypatch.setattr(envcheck, "_grey", lambda i: 8 + 15 * i)

    monkeypatch.setattr(envcheck, "_test_clip", shifted)
    row = envcheck._dali_decode_row(torch.cuda.is_available())
    assert row.status == "fail" and "expected [53, 113, 173]" in row.detail


def test_a_check_that_raises_is_a_failed_row(capsys, monkeypatch):
    def broken():
        raise RuntimeError("libsomething.so: cannot open shared object file\nmore text")

    monkeypatch.setattr(envcheck, "CHECKS", (("python", envcheck.check_python),
                                             ("PyAV", broken)))
    code, out, _ = run_env(capsys, "--no-decode")
    assert code == 1
    assert "the check raised RuntimeError: libsomething.so: cannot open shared object file" in out
    assert "more text" not in out and "failed: PyAV" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's report")
def test_a_package_that_does_not_import_says_to_reinstall_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    monkeypatch.setattr(envcheck, "CHECKS", (("python", envcheck.check_python),
                                             ("DALI", envcheck.check_dali),
                                             ("PyAV", envcheck.check_pyav)))
    code, out, _ = run_env(capsys, "--no-decode")
    assert code == 1
    assert "-> reinstall it: pip install --force-reinstall av" in out
    assert "but PyAV does not import (see its row): no backend works here" in out


def test_an_installed_dali_that_does_not_import_is_a_failure(monkeypatch):
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda130")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # its import raises ImportError
    rows = {r.name: r for r in envcheck.check_dali()}
    assert rows["DALI"].status == "fail" and "installed but does not import" in rows["DALI"].detail
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: None)
    rows = {r.name: r for r in envcheck.check_dali()}
    assert rows["DALI"].status == "missing" and "data.backend=auto" in rows


def test_a_decoder_that_raises_keeps_the_other_dali_rows(monkeypatch):
    pytest.importorskip("nvidia.dali")

    def no_decoder(on_gpu):
        raise RuntimeError("no NVDEC in this container")

    monkeypatch.setattr(envcheck, "_dali_decode_row", no_decoder)
    rows = {r.name: r for r in envcheck.check_dali()}
    assert rows["DALI"].status == "ok" and "data.backend=auto" in rows
    assert rows["DALI decode"].status == "fail" and "no NVDEC" in rows["DALI decode"].detail
    assert "data.backend=pyav" in rows["DALI decode"].hint


@pytest.mark.parametrize("cc, arch_list, runs", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # cu13 on V100
    ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], True),  # cu126 on V100
    ((8, 6), ["sm_80"], True),  # same major, lower minor: the cubin runs
    ((9, 0), ["sm_80"], False),
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX, compiled by the driver
    ((9, 0), ["sm_90a"], True),
    ((10, 0), ["sm_100"], True),
    ((12, 0), ["sm_100", "sm_120"], True),
])
def test_torch_build_against_the_gpu(cc, arch_list, runs):
    assert envcheck._runs_on(cc, arch_list) is runs


def test_version_tuple():
    assert envcheck._version_tuple("3.8.0") == (3, 8, 0) >= (3, 8)
    assert envcheck._version_tuple("3.9.0+git1234abcd") == (3, 9, 0) >= (3, 9)
    assert envcheck._version_tuple("3.10.1rc2") >= (3, 9)


def test_dali_wheel_cuda_version():
    assert envcheck._wheel_cuda_major("nvidia-dali-cuda120") == 12
    assert envcheck._wheel_cuda_major("nvidia-dali-cuda130") == 13
    assert envcheck._wheel_cuda_major("nvidia-dali") is None


def test_json_path_under_a_file_is_refused_before_any_check(capsys, tmp_path, monkeypatch):
    def no_checks(*args, **kwargs):
        raise AssertionError("the checks ran before the arguments were checked")

    monkeypatch.setattr(envcheck, "run_checks", no_checks)
    victim = tmp_path / "file"
    victim.write_text("keep")
    code, _, err = run_env(capsys, "--json", victim / "rows.json")
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_env(capsys, "--json", tmp_path)
    assert code == 2 and "is a folder" in err
    code, _, err = run_env(capsys, "--json", "")
    assert code == 2 and "--json is empty" in err
    assert victim.read_text() == "keep"


@requires_cuda
def test_gpu_report(capsys, tmp_path):
    code, out, _ = run_env(capsys, "--json", tmp_path / "rows.json")
    rows, _ = rows_by_name(tmp_path / "rows.json")
    assert code == 0, out
    assert rows["GPU"]["status"] == "ok"
    assert rows["Triton kernels"]["status"] == "ok"
    if "DALI decode" in rows:
        assert rows["DALI decode"]["status"] == "ok" and "NVDEC" in rows["DALI decode"]["detail"]
