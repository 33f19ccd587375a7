"""`siasam-fast env`: the machine report, its real checks, and how it reports a broken part."""

import json
import sys

import pytest
import torch
from conftest import requires_cuda

from siasam_fast import cli, envcheck, siamese


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
    # PyPI's torch is a CUDA build (used on CPU where no CPU wheel is at hand): the row names it
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    assert rows["torch"]["status"] == "ok" and build in rows["torch"]["detail"]
    assert rows["GPU"]["status"] == "info" and "no CUDA GPU" in rows["GPU"]["detail"]
    assert rows["precision"]["detail"].startswith("fp32") and "zero2_fp32.json" in \
        rows["precision"]["detail"]
    # conftest runs the CPU suite under the Triton interpreter: the kernels are really compared.
    assert rows["Triton kernels"]["status"] == "ok"
    assert "matches the reference on the CPU (Triton interpreter)" in \
        rows["Triton kernels"]["detail"]
    assert rows["DALI decode"]["status"] == "ok" and "VP9" in rows["DALI decode"]["detail"]
    assert rows["DALI trimmed"]["status"] == "ok"
    assert "from the stretch that data.dali_trim cuts" in rows["DALI trimmed"]["detail"]
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


@pytest.mark.parametrize("trimmed", [False, True])
def test_dali_decode_check_sees_a_wrong_frame(monkeypatch, trimmed):
    """The decoding check reads each decoded frame's brightness: a clip whose frames are one off
    fails it, whole or trimmed."""
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline import dali_check

    original = dali_check.make_clip

    def shifted(codec):
        monkeypatch.setattr(dali_check, "grey", lambda i: 8 + 15 * (i + 1))
        try:
            return original(codec)
        finally:
            monkeypatch.setattr(dali_check, "grey", lambda i: 8 + 15 * i)

    monkeypatch.setattr(dali_check, "make_clip", shifted)
    ok, detail = dali_check.decode_check(torch.cuda.is_available(), trimmed=trimmed)
    expected = "[143, 188, 218]" if trimmed else "[53, 113, 173]"
    assert not ok and f"expected {expected}" in detail


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

    from siasam_fast.pipeline import dali_check

    def no_decoder(on_gpu, trimmed=False):
        raise RuntimeError("no NVDEC in this container")

    monkeypatch.setattr(dali_check, "decode_check", no_decoder)
    rows = {r.name: r for r in envcheck.check_dali()}
    assert rows["DALI"].status == "ok" and "data.backend=auto" in rows
    assert rows["DALI decode"].status == "fail" and "no NVDEC" in rows["DALI decode"].detail
    assert "data.backend=pyav" in rows["DALI decode"].hint
    assert "DALI trimmed" not in rows  # it would only say the same


def test_a_trimmed_decode_that_fails_is_its_own_row(monkeypatch):
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline import dali_check

    def trimmed_wrong(on_gpu, trimmed=False):
        return (not trimmed, "decoded frames 9, 12, 14: grey levels [1, 2, 3]")

    monkeypatch.setattr(dali_check, "decode_check", trimmed_wrong)
    rows = {r.name: r for r in envcheck.check_dali()}
    assert rows["DALI decode"].status == "ok"
    assert rows["DALI trimmed"].status == "fail" and "[1, 2, 3]" in rows["DALI trimmed"].detail
    assert "whole files" in rows["DALI trimmed"].hint


@pytest.mark.parametrize("cc, arch_list, runs", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # cu13 on V100
    ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], True),  # cu126 on V100
    ((8, 6), ["sm_80"], True),  # same major, lower minor: the cubin runs
    ((9, 0), ["sm_80"], False),
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX, compiled by the driver
    ((8, 0), ["compute_80"], True),  # PTX of the GPU's own capability
    ((7, 5), ["compute_80"], False),
    ((9, 0), ["sm_90a"], True),
    ((10, 0), ["sm_100"], True),
    ((12, 0), ["sm_100", "sm_120"], True),
])
def test_torch_build_against_the_gpu(cc, arch_list, runs):
    assert envcheck._runs_on(cc, arch_list) is runs


def test_version_tuple():
    assert siamese._version_tuple("3.8.0") == (3, 8, 0) >= (3, 8)
    assert siamese._version_tuple("3.9.0+git1234abcd") == (3, 9, 0) >= (3, 9)
    assert siamese._version_tuple("3.10.1rc2") >= (3, 9)


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
        assert rows["DALI trimmed"]["status"] == "ok", rows["DALI trimmed"]


def test_a_cuda13_dali_wheel_on_a_v100_is_refused_and_auto_picks_pyav(monkeypatch):
    """nvidia-dali-cuda130 holds no sm_70 code (its fat binaries start at sm_75): on a V100,
    whatever CUDA version the driver reports, `env` says to install nvidia-dali-cuda120 and
    data.backend=auto does not pick DALI."""
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline import loaders

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(envcheck, "cuda_driver_version", lambda: (13, 0))  # an R580 driver
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda130")
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    assert loaders.resolve_backend("auto", {}) == "pyav"
    with pytest.raises(ValueError, match="nvidia-dali-cuda120"):
        loaders.resolve_backend("dali", {})
    rows = {r.name: r for r in envcheck.check_dali(decode=False)}
    assert rows["DALI"].status == "fail" and "nvidia-dali-cuda120" in rows["DALI"].hint
    assert rows["data.backend=auto"].detail.startswith("pyav")
    # what a set must be for NVDEC, by NVIDIA's tables: a V100's has no 4:4:4 HEVC and no AV1
    nvdec_row = rows["NVDEC decodes"].detail
    assert nvdec_row == ("volta: 8-bit 4:2:0 h264 (48x16 to 4096 px), hevc (144x144 to 8192 px), "
                         "vp9 (128x128 to 8192 px), vp8 (48x16 to 4096 px); no av1, mjpeg")
    # the CUDA 12 wheel, or a Turing+ GPU, is fine
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda120")
    assert loaders.resolve_backend("auto", {}) == "dali"
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda130")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert loaders.resolve_backend("auto", {}) == "dali"


def test_no_triton_on_a_v100_names_the_triton_that_compiles_for_it(monkeypatch):
    """`pip install triton` installs the newest, which cannot compile for sm_70."""
    monkeypatch.setitem(sys.modules, "triton", None)  # its import raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, hint in (((7, 0), "pip install triton==3.8.0 (the newest Triton that "
                                      "compiles for a V100)"), ((9, 0), "pip install triton")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        (row,) = envcheck.check_kernels()
        assert (row.status, row.hint) == ("missing", hint)


def test_auto_does_not_pick_a_dali_that_cannot_run_here(monkeypatch, caplog):
    """`env` failed the DALI row (it does not import; a cuda130 wheel on a CUDA 12 driver) and
    then said data.backend=auto would use DALI, as training's auto did: the package was only
    found, never imported, and the driver's CUDA never compared with the wheel's."""
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline import loaders

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda130")
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(envcheck, "cuda_driver_version", lambda: (12, 8))
    with caplog.at_level("WARNING"):
        assert loaders.resolve_backend("auto", {}) == "pyav"
    assert ("nvidia-dali-cuda130 needs a CUDA 13 driver; this driver supports CUDA 12.8: "
            "install nvidia-dali-cuda120 instead; using pyav") in caplog.text
    with pytest.raises(ValueError, match="backend='dali': nvidia-dali-cuda130 needs a CUDA 13"):
        loaders.resolve_backend("dali", {})
    caplog.clear()
    with caplog.at_level("WARNING"):
        rows = {r.name: r for r in envcheck.check_dali(decode=False)}
    assert rows["DALI"].status == "fail"
    assert rows["data.backend=auto"].detail.startswith("pyav (PyAV on the CPU: DALI needs a "
                                                       "DALI that runs on this GPU (see its row)")
    assert "using pyav" not in caplog.text  # (the DALI row says it: no warning above the table)
    monkeypatch.setattr(envcheck, "cuda_driver_version", lambda: (13, 0))
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # its import raises ImportError
    assert loaders.resolve_backend("auto", {}) == "pyav"
    with pytest.raises(ValueError, match="is installed but does not import"):
        loaders.resolve_backend("dali", {})
    assert {r.name: r for r in envcheck.check_dali(decode=False)}[
        "data.backend=auto"].detail.startswith("pyav")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's report")
def test_a_torch_that_does_not_import_is_blamed_once_with_the_right_reinstall(capsys,
                                                                               monkeypatch):
    """A broken torch (a CUDA library missing on a cluster node, say) is the torch row's
    failure, with the README's per-GPU install as the hint: not `pip install torch==2.13.0`
    (PyPI's torch is a CUDA 13 build, without sm_70 code), nor reinstalls of the packages that
    merely import torch ('apex' on PyPI is another project; there is no 'precision' package)."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setattr(envcheck, "CHECKS", (("python", envcheck.check_python),
                                             ("torch", envcheck.check_torch),
                                             ("precision", envcheck.check_precision),
                                             ("apex", envcheck.check_apex),
                                             ("transformers", envcheck.check_transformers)))
    rows = {r.name: r for r in envcheck.run_checks(decode=False)}
    assert rows["torch"].status == "fail" and "cu126" in rows["torch"].hint
    assert "torch==2.13.0" not in rows["torch"].hint.split("without a GPU")[0]
    for name in ("precision", "apex", "transformers"):
        assert rows[name].status == "fail" and "needs torch" in rows[name].detail, name
        assert "pip install" not in rows[name].hint, name


def fake_toolkit(folder, release: str):
    """A CUDA toolkit folder whose ``bin/nvcc`` prints ``release`` as nvcc does."""
    nvcc = folder / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True, exist_ok=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}'\n")
    nvcc.chmod(0o755)
    return folder


def stand_in_gpus(monkeypatch, torch_cuda: str, count: int = 1, capability=(7, 0)):
    """``count`` GPUs of ``capability`` (a callable of the index for mixed ones) for DeepSpeed's
    check, a torch built with CUDA ``torch_cuda``, no apex (`import apex` raises)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        capability if callable(capability) else lambda *a: capability)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setitem(sys.modules, "apex", None)


def test_an_nvcc_that_cannot_build_fused_adam_for_this_gpu_is_not_ok(monkeypatch, tmp_path):
    """The nvcc torch's extension builder would use (CUDA_HOME first, then PATH) decides whether
    FusedAdam can be built: a CUDA 13 nvcc cannot compile for a V100 (sm_70), and one of another
    major version than torch's CUDA is refused by the builder; training then falls back to torch
    AdamW, so `env` must not report FusedAdam as ok."""
    import os

    pytest.importorskip("deepspeed")
    cuda13 = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    cuda12 = fake_toolkit(tmp_path / "cuda-12.6", "12.6")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{cuda13 / 'bin'}:" + os.environ["PATH"])
    stand_in_gpus(monkeypatch, "12.6")

    def optimizer_row():
        return {r.name: r for r in envcheck.check_deepspeed()}["optimizer"]

    row = optimizer_row()  # a V100, CUDA 13's nvcc first on PATH
    assert row.status == "missing" and "CUDA 13.0" in row.detail and "sm_70" in row.detail
    assert "cu126 torch and a CUDA 12 toolkit" in row.hint
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    row = optimizer_row()  # an A100: the major version still differs from torch's
    assert row.status == "missing" and "refuses a different major version" in row.detail
    assert "CUDA 12.6 toolkit" in row.hint
    monkeypatch.setenv("CUDA_HOME", str(cuda12))  # what the build uses, whatever PATH says
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert optimizer_row().status == "ok", optimizer_row()
    monkeypatch.setenv("CUDA_HOME", str(cuda13))
    monkeypatch.setenv("PATH", f"{cuda12 / 'bin'}:" + os.environ["PATH"])
    assert optimizer_row().status == "missing"


def test_an_arch_list_without_the_gpu_makes_fused_adam_fail(monkeypatch, tmp_path):
    """DeepSpeed's JIT build of FusedAdam compiles for TORCH_CUDA_ARCH_LIST when it is set, not
    for the GPUs present: "8.0;9.0" (an A100 / H100 cluster's setting) on a V100 builds no code
    that runs there, and the first optimizer step fails ("no kernel image"). The optimizer row
    fails, naming the variable and sm_70; a list that covers 7.0 (a cubin, or older PTX) is ok."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import FusedAdamBuilder

    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda-12.6", "12.6")))
    stand_in_gpus(monkeypatch, "12.6")
    monkeypatch.setattr(FusedAdamBuilder, "is_compatible", lambda self, verbose=False: True)
    for value, status in (("8.0;9.0", "fail"), ("8.0 9.0a+PTX", "fail"), ("7.0;8.0", "ok"),
                          ("6.0+PTX", "ok"), ("7.0+PTX", "ok"), ("", "ok")):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        row = {r.name: r for r in envcheck.check_deepspeed()}["optimizer"]
        assert row.status == status, (value, row)
        if status == "fail":
            assert "TORCH_CUDA_ARCH_LIST" in row.detail and "sm_70" in row.detail, row
            assert "7.0" in row.hint, row


def test_cuda_driver_version_reads_major_and_minor(monkeypatch):
    """libcuda's cuDriverGetVersion gives 1000 * major + 10 * minor (12060: CUDA 12.6)."""
    import ctypes

    class FakeLibcuda:
        def __init__(self, value):
            self.value = value

        def cuDriverGetVersion(self, ref):  # noqa: N802 - libcuda's name
            ref._obj.value = self.value
            return 0

    for value, expected in ((12060, (12, 6)), (13000, (13, 0)), (11080, (11, 8))):
        monkeypatch.setattr(ctypes, "CDLL", lambda name, value=value: FakeLibcuda(value))
        assert envcheck.cuda_driver_version() == expected, value

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert envcheck.cuda_driver_version() is None


def test_a_driver_without_a_cuda_torch_build_says_to_install_one(monkeypatch):
    """No GPU visible to torch: the GPU row hints at a CUDA build only when an NVIDIA driver is
    there and torch is a CPU build (a CUDA build without a GPU, or no driver: nothing to do)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for build, driver, hinted in ((None, (12, 6), True), ("12.6", (12, 6), False),
                                  (None, None, False)):
        monkeypatch.setattr(torch.version, "cuda", build)
        monkeypatch.setattr(envcheck, "cuda_driver_version", lambda driver=driver: driver)
        gpu = {r.name: r for r in envcheck.check_torch()}["GPU"]
        assert gpu.status == "info", (build, driver)
        assert ("install a CUDA build" in gpu.hint) is hinted, (build, driver, gpu.hint)


def test_triton_that_cannot_compile_for_a_v100_is_a_failure(monkeypatch):
    """Triton 3.9 and newer emits PTX that its ptxas refuses for sm_70 (V100): the kernel row
    fails with the pin to install; Triton 3.8 there, or 3.9 on Turing (sm_75), is checked as usual
    (the comparison itself is stubbed: there is no GPU here)."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(envcheck, "_kernel_vs_reference", lambda device: 0.0)
    monkeypatch.setattr(envcheck, "_tuned_row",
                        lambda name: envcheck.Check("kernel settings", "info", ""))
    for cc, version, status in (((7, 0), "3.9.0", "fail"), ((7, 0), "3.10.1", "fail"),
                                ((7, 0), "3.8.0", "ok"), ((7, 5), "3.9.0", "ok")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cc=cc: cc)
        monkeypatch.setattr(triton, "__version__", version)
        row = envcheck.check_kernels()[0]
        assert row.status == status, (cc, version, row)
        if status == "fail":
            assert "triton==3.8.0" in row.hint


def test_fused_adam_is_judged_by_the_oldest_gpu(monkeypatch, tmp_path):
    """A V100 beside an A100: the CUDA 13 nvcc cannot build FusedAdam for the V100 (sm_70),
    whichever GPU comes first."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda-13.0", "13.0")))
    stand_in_gpus(monkeypatch, "13.0", count=2)
    for capabilities in (((8, 0), (7, 0)), ((7, 0), (8, 0))):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda i=0, caps=capabilities: caps[i])
        row = {r.name: r for r in envcheck.check_deepspeed()}["optimizer"]
        assert row.status == "missing" and "sm_70" in row.detail, (capabilities, row)


def test_fused_adam_without_an_nvcc_is_missing(monkeypatch):
    """No nvcc for torch's extension builder: FusedAdam cannot be built, whatever DeepSpeed's
    own compatibility check says."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import FusedAdamBuilder

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setattr(envcheck, "_build_nvcc", lambda: None)
    monkeypatch.setattr(FusedAdamBuilder, "is_compatible", lambda self, verbose=False: True)
    row = {r.name: r for r in envcheck.check_deepspeed()}["optimizer"]
    assert row.status == "missing" and "no nvcc" in row.detail, row


def test_deepspeed_check_on_a_cpu_machine_picks_the_cpu_accelerator(monkeypatch):
    """As train.py does: without a GPU, DS_ACCELERATOR=cpu unless it is set already."""
    pytest.importorskip("deepspeed")
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    envcheck.check_deepspeed()
    assert os.environ.get("DS_ACCELERATOR") == "cpu"


def test_pyav_without_an_h264_decoder_is_a_failure(monkeypatch):
    import av

    monkeypatch.setattr(av, "codecs_available", {"vp9", "libx264"})
    row = envcheck.check_pyav()[0]
    assert row.status == "fail" and "decodes vp9" in row.detail, row


def test_only_the_checks_that_need_torch_are_skipped_when_torch_does_not_import(monkeypatch):
    """A broken torch marks the checks that import it as not checked, not the others (PyAV);
    another package that does not import (av) is its own row, not taken for torch's."""
    def needs_torch():
        import torch  # noqa: F401

        return [envcheck.Check("precision", "info", "checked")]

    import av

    def needs_av():
        import av  # noqa: F401

        return [envcheck.Check("PyAV", "ok", "checked")]

    monkeypatch.setattr(envcheck, "CHECKS", (("PyAV", needs_av), ("precision", needs_torch)))
    monkeypatch.setitem(sys.modules, "av", None)
    rows = {r.name: r for r in envcheck.run_checks(decode=False)}
    assert rows["PyAV"].status == "fail" and "does not import" in rows["PyAV"].detail
    assert rows["precision"].detail == "checked"
    monkeypatch.setitem(sys.modules, "av", av)
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(envcheck, "CHECKS", (("torch", envcheck.check_torch),
                                             ("PyAV", needs_av), ("precision", needs_torch)))
    rows = {r.name: r for r in envcheck.run_checks(decode=False)}
    assert rows["torch"].status == "fail" and rows["PyAV"].detail == "checked"
    assert rows["precision"].status == "fail" and "needs torch" in rows["precision"].detail


@pytest.mark.parametrize("problem, status, hint", [
    ("apex is not installed", "missing", "not on PyPI"),
    ("apex_C is not built", "missing", "rebuild apex"),
    (None, "ok", ""),
])
def test_apex_row(monkeypatch, problem, status, hint):
    from siasam_fast import model

    monkeypatch.setattr(model, "apex_problem", lambda: problem)
    (row,) = envcheck.check_apex()
    assert row.status == status and hint in row.hint, row


def test_measured_kernel_settings_row(monkeypatch, tmp_path):
    """The GPU's name in the measured table (SIASAM_KERNEL_TUNED's file here): ok; another GPU:
    the heuristic, with the sweep that would measure it."""
    import json

    kern = pytest.importorskip("siasam_kernels.siamese")
    table = tmp_path / "tuned.json"
    table.write_text(json.dumps({"Some GPU": {"4": {"fwd": {}, "bwd": {}}}}))
    monkeypatch.setenv(kern.TUNED_ENV, str(table))
    assert envcheck._tuned_row("Some GPU").status == "ok"
    row = envcheck._tuned_row("Another GPU")
    assert row.status == "info" and "--sweep-configs" in row.hint


def test_no_decode_skips_the_dali_decoding_rows(monkeypatch):
    pytest.importorskip("nvidia.dali")
    monkeypatch.setattr(envcheck, "CHECKS", (("DALI", envcheck.check_dali),))
    names = [r.name for r in envcheck.run_checks(decode=False)]
    assert "DALI" in names and "DALI decode" not in names and "DALI trimmed" not in names


@pytest.mark.parametrize("arch_list, cc, gap", [
    ("8.0;9.0", (10, 0), False),  # DeepSpeed adds PTX to the highest (9.0): a B200 JITs it
    ("8.0;9.0", (12, 0), False),  # the same on sm_120
    ("8.0", (8, 6), False), ("8.0", (8, 9), False),  # an sm_80 cubin runs on sm_86 and sm_89
    ("9.0", (9, 0), False), ("9.0a", (9, 0), False),  # (train.py hands DeepSpeed 9.0)
    ("7.0 7.5", (8, 0), False),  # space-separated; PTX of 7.5
    ("8.0+PTX;9.0", (10, 0), False),  # a +PTX entry: DeepSpeed adds none, compute_80 runs
    ("8.6", (8, 0), True),  # a cubin runs on the same major, not on a lower minor
    ("8.0;9.0", (7, 0), True),  # PTX runs on newer GPUs only
    ("12.0", (10, 0), True), ("", (7, 0), False)])
def test_arch_list_gaps_take_deepspeeds_added_ptx_and_binary_compatibility(arch_list, cc, gap):
    """A TORCH_CUDA_ARCH_LIST without this GPU's own entry is no gap where its build still runs
    here (a cubin of the same major, or PTX not above the GPU): training keeps FusedAdam there."""
    assert envcheck.arch_list_gaps(arch_list, [cc]) == ([cc] if gap else [])
