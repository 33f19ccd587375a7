"""siasam-fast demo: the quick (smoke) path end to end, and reuse of the synthetic set."""

import json
import struct

import pytest

from siasam_fast import demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = demo.run_demo(out, quick=True, seed=1)
    return out, summary


def test_summary_has_both_models_delta_config_and_time(quick_demo):
    out, returned = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary["delta"] == pytest.approx(returned["delta"])
    for name in ("baseline", "siasamrea"):
        res = summary[name]
        assert 0.0 <= res["accuracy"] <= 1.0
        assert res["num_test"] > 0
        assert set(res["by_type"]) == set(demo.SYNTHETIC["question_types"])
        for t, acc in res["by_type"].items():
            vis = res["by_type_visibility"][t]
            n_vis, n_hid = vis["num_visible"], vis["num_hidden"]
            parts = [(vis["visible"], n_vis), (vis["hidden"], n_hid)]
            weighted = sum(a * n for a, n in parts if n) / (n_vis + n_hid)
            assert weighted == pytest.approx(acc)  # the visibility split partitions the type
        assert res["history"] and res["history"][-1]["epoch"] == 1
        assert "train_loss" in res["history"][0] and "val_accuracy" in res["history"][0]
    assert summary["delta"] == pytest.approx(
        summary["siasamrea"]["accuracy"] - summary["baseline"]["accuracy"]
    )
    # The two runs differ only in the method switches.
    cfg = {n: json.loads((out / n / "config.json").read_text()) for n in ("baseline", "siasamrea")}
    base, sia = cfg["baseline"], cfg["siasamrea"]
    assert base["siamese"]["alpha"] == 0 and base["sampling"]["num_clips"] == 1
    assert sia["siamese"]["alpha"] == 1 and sia["sampling"]["num_clips"] == 9
    for section in ("data", "model", "train", "eval"):
        a, b = dict(cfg["baseline"][section]), dict(cfg["siasamrea"][section])
        a.pop("out_dir", None), b.pop("out_dir", None)
        assert a == b, section
    assert summary["config"]["quick"] is True and summary["config"]["synthetic"]["seed"] == 1
    assert summary["config"]["setup"] == {"device": "cpu", "precision": "fp32", "backend": "pyav"}
    for name in ("baseline", "siasamrea"):  # what the runs used, as the demo said
        assert json.loads((out / name / "summary.json").read_text())["precision"] == "fp32"
    assert summary["seconds"] > 0 and summary["seconds_by_stage"]["siasamrea"] > 0
    assert summary["table"][0]["test accuracy"] == "overall"


def test_runs_name_their_own_folder_not_the_hidden_one_they_trained_in(quick_demo):
    """Each run trains in a hidden .NAME.partial folder, renamed once both finished: its
    summary.json's best checkpoint (README: for `siasam-fast eval --checkpoint`) and its
    config.json's train.out_dir name the folder it is in (they named the gone .partial one)."""
    out, _ = quick_demo
    for name in ("baseline", "siasamrea"):
        run = out / name
        best = json.loads((run / "summary.json").read_text())["best"]
        assert best["checkpoint"] == str(run / "checkpoints" / f"step{best['step']}")
        assert (run / "checkpoints" / f"step{best['step']}").is_dir()
        assert json.loads((run / "config.json").read_text())["train"]["out_dir"] == str(run)
        # the run's log names its checkpoints where they are now (the walkthrough found the
        # gone .partial folder there)
        log = (out / f"{name}.log").read_text()
        assert ".partial" not in log and str(run / "checkpoints" / "step") in log, log[-400:]


def test_learning_curve_png(quick_demo):
    out, summary = quick_demo
    png = out / "learning_curves.png"
    assert summary["plot"] == str(png)
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 300 and height > 200


def test_dataset_is_reused_only_when_it_matches(quick_demo):
    out, _ = quick_demo
    options = demo.synthetic_options(None, quick=True)
    assert demo.dataset_matches(out / "data", 1, options)
    assert not demo.dataset_matches(out / "data", 2, options)
    assert not demo.dataset_matches(out / "data", 1, {**options, "num_videos": 25})
    assert not demo.dataset_matches(out / "data", 1, {**options, "size": 32})
    assert not demo.dataset_matches(out / "missing", 1, options)


def test_a_damaged_manifest_is_not_reused(quick_demo, tmp_path):
    import shutil

    out, _ = quick_demo
    options = demo.synthetic_options(None, quick=True)
    copy = tmp_path / "data"
    shutil.copytree(out / "data" / "annotations", copy / "annotations")
    shutil.copy(out / "data" / "meta.json", copy / "meta.json")
    lines = (out / "data" / "manifest.jsonl").read_text().splitlines()
    (copy / "manifest.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # one video missing
    assert not demo.dataset_matches(copy, 1, options)
    (copy / "manifest.jsonl").write_text("\n".join(lines[:-1]) + '\n{"video_id": ')  # truncated
    assert not demo.dataset_matches(copy, 1, options)


def test_per_question_visibility_agrees_with_the_aggregate_report(quick_demo):
    from siasam_fast.data.synthetic import (
        eval_clip_sees_evidence,
        evidence_visibility,
        load_meta,
    )
    from siasam_fast.sampling import SamplingConfig

    out, _ = quick_demo
    meta = load_meta(out / "data")
    sampling = SamplingConfig()
    per_question = eval_clip_sees_evidence(meta, sampling)
    ids = {
        q["open_id"]
        for v in meta["videos"].values()
        for q in v["questions"].values()
        if "open_id" in q
    }
    assert set(per_question) == ids
    report = evidence_visibility(meta, sampling, draws=1)
    for qtype, row in report["by_type"].items():
        mine = [v["visible"] for v in per_question.values() if v["type"] == qtype]
        assert len(mine) == row["questions"]
        assert sum(mine) / len(mine) == pytest.approx(row["eval"], abs=1e-4)


def _result(acc, flash, flash_vis, flash_hid, val):
    return {
        "accuracy": acc,
        "by_type": {"color": 1.0, "flash": flash},
        "evidence_visible": 0.9,
        "evidence_hidden": flash_hid,
        "by_type_visibility": {
            "color": {"visible": 1.0, "hidden": None, "num_visible": 4, "num_hidden": 0},
            "flash": {"visible": flash_vis, "hidden": flash_hid, "num_visible": 1, "num_hidden": 3},
        },
        "val_accuracy": val,
    }


def test_comparison_rows():
    rows = demo.comparison_rows(
        {
            "baseline": _result(0.75, 0.5, 1.0, 1 / 3, 0.7),
            "siasamrea": _result(0.625, 0.25, 0.0, 1 / 3, None),
        }
    )
    by_label = {r["test accuracy"]: r for r in rows}
    # color is visible in every clip: no visible / hidden rows for it.
    assert list(by_label) == [
        "overall",
        "color",
        "flash",
        "evidence visible",
        "evidence hidden",
        "flash, visible (n=1)",
        "flash, hidden (n=3)",
        "val accuracy (last epoch)",
    ]
    assert by_label["overall"]["delta"] == pytest.approx(-0.125)
    assert by_label["flash, visible (n=1)"]["siasamrea"] == 0.0
    assert by_label["flash, visible (n=1)"]["delta"] == pytest.approx(-1.0)
    assert by_label["val accuracy (last epoch)"]["delta"] is None  # a missing value: no delta


def test_printed_table_rounds_to_three_decimals():
    from siasam_fast.benchutil import format_table

    rows = [
        {"test accuracy": "overall", "baseline": 0.7, "siasamrea": 0.540625, "delta": -0.159375},
        # 26/160 - 68/160 = -0.2625 exactly, held as -0.26249999999999996: rounds away from zero
        {"test accuracy": "flash", "baseline": 0.425, "siasamrea": 0.1625, "delta": 0.1625 - 0.425},
        {"test accuracy": "val", "baseline": 0.5, "siasamrea": 0.4999, "delta": -0.0001},
        {"test accuracy": "none", "baseline": 0.74375, "siasamrea": None, "delta": None},
    ]
    printed = demo.printed_rows(rows)
    assert [list(r.values())[1:] for r in printed] == [
        ["0.700", "0.541", "-0.159"],
        ["0.425", "0.163", "-0.263"],
        ["0.500", "0.500", "0.000"],
        ["0.744", None, None],
    ]
    assert rows[0]["siasamrea"] == 0.540625  # the rows themselves (summary.json) stay unrounded
    assert "0.540625" not in format_table(printed) and "-0.263" in format_table(printed)


def test_a_failed_training_raises_and_keeps_its_log(tmp_path, capfd):
    import sys

    log = tmp_path / "logs" / "run.log"
    cmd = [sys.executable, "-c", "import sys; print('step 1'); sys.exit(3)"]
    with pytest.raises(demo.TrainingFailed,
                       match=r"exit code 3 \(log: .*run\.log, .*\); its last line: step 1$"):
        demo.run_training(cmd, log)
    assert "step 1" in log.read_text() and "step 1" in capfd.readouterr().out
    assert log.read_text().startswith(f"$ {sys.executable} -c ")  # the command, for a rerun
    ok = [sys.executable, "-c", "print('done')"]
    assert demo.run_training(ok, log) > 0 and log.read_text().splitlines()[-1] == "done"
    silent = [sys.executable, "-c", "import sys; sys.exit(4)"]  # the command is not its output
    with pytest.raises(demo.TrainingFailed, match=r"its last line: \(no output\)$"):
        demo.run_training(silent, log)


def test_a_failed_demo_training_is_one_line(tmp_path, monkeypatch, capsys):
    """It ended in a traceback (a RuntimeError the command did not expect)."""
    from siasam_fast.cli import main

    def fail(*args, **kwargs):
        raise demo.TrainingFailed("training failed with exit code 2 (log: x.log, ...)")

    monkeypatch.setattr(demo, "run_demo", fail)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 1
    assert capsys.readouterr().err == (
        "siasam-fast demo: error: training failed with exit code 2 (log: x.log, ...)\n")


def test_the_demo_needs_three_videos(tmp_path, capsys):
    from siasam_fast.cli import main

    assert main(["demo", "--quick", "--videos", "2", "--out", str(tmp_path / "d")]) == 2
    assert "--videos 2: the demo needs at least 3 videos" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_regeneration_cut_short_is_never_reused_and_is_generated_again(tmp_path, monkeypatch):
    """The demo regenerates its own set; a generation cut short leaves no meta.json or manifest
    that could pass for the old set, and the next run generates it again."""
    from siasam_fast.data import synthetic

    data = tmp_path / "data"
    options = {"num_videos": 2, "size": 16, "question_types": ["color", "flash"]}
    demo.ensure_dataset(data, 0, options, workers=1)
    assert demo.dataset_matches(data, 0, options)

    def cut_short(job):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "_render_job", cut_short)
        with pytest.raises(KeyboardInterrupt):
            demo.ensure_dataset(data, 1, options, workers=1)
    assert not (data / "meta.json").exists() and not (data / "manifest.jsonl").exists()
    assert not demo.dataset_matches(data, 0, options)
    assert synthetic.is_synthetic_set(data)  # still the generator's folder: it may write again
    demo.ensure_dataset(data, 0, options, workers=1)
    assert demo.dataset_matches(data, 0, options)
    assert not (data / synthetic.IN_PROGRESS).exists()


def test_a_data_folder_of_someone_elses_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "train_qa.json").write_text("[]")
    (data / "manifest.jsonl").write_text("mine\n")
    with pytest.raises(ValueError, match="not a synthetic set"):
        demo.ensure_dataset(data, 0, {"num_videos": 2, "size": 16}, workers=1)
    assert (data / "manifest.jsonl").read_text() == "mine\n"
    assert sorted(p.name for p in data.rglob("*")) == ["annotations", "manifest.jsonl",
                                                       "train_qa.json"]


def snapshot(out):
    """Every file under ``out`` (runs in training excepted) and a hash of its content."""
    import hashlib

    return {str(p.relative_to(out)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not any(
                part.endswith(".partial") or part.endswith(".partial.log")
                for part in p.relative_to(out).parts)}


def test_a_stopped_demo_keeps_the_previous_results(quick_demo):
    """Ctrl-C (SIGINT to the process group) while a second demo trains into the same folder: one
    line and exit 130; the previous demo's runs and summary are as they were, and the training
    process is not left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from subprocess_env import cpu_env

    out, _ = quick_demo
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-m", "siasam_fast.cli", "demo", "--quick",
                             "--seed", "1", "--out", str(out)], env=cpu_env(OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    steps = out / ".baseline.partial" / "metrics_steps.csv"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not steps.is_file():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "siasam-fast demo: interrupted; the previous demo's runs and summary (if any) are " \
           "kept as they were" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert snapshot(out) == before
    alive = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert alive.stdout.strip() == ""  # nothing of its session is left running


def test_a_stopped_demo_with_a_new_data_set_keeps_the_previous_data_too(quick_demo, monkeypatch):
    """Another seed regenerates the synthetic set: the previous demo's data, runs and summary are
    set aside and put back when the new demo stops, so its runs never describe data that is no
    longer there (the data used to be replaced in place at once)."""
    out, _ = quick_demo
    before = snapshot(out)
    trained = []

    def stopped(cmd, log):
        trained.append(cmd)
        assert json.loads((out / "data" / "meta.json").read_text())["seed"] == 2  # the new set
        assert (out / demo.PREVIOUS / "summary.json").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_training", stopped)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, quick=True, seed=2)
    assert trained and snapshot(out) == before
    assert not (out / demo.PREVIOUS).exists()


def test_outputs_set_aside_by_a_killed_demo_are_put_back(quick_demo, monkeypatch, capsys):
    """A demo killed (no chance to clean up) while it generated a new set left the previous
    outputs in .previous and a new data folder begun: the next demo puts them back first."""
    out, _ = quick_demo
    before = snapshot(out)
    assert demo._set_aside_previous(out)
    (out / "data").mkdir()  # a generation just begun

    def stopped(cmd, log):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_training", stopped)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, quick=True, seed=1)
    assert "put back the previous demo's data, runs and summary" in capsys.readouterr().out
    assert snapshot(out) == before and not (out / demo.PREVIOUS).exists()


@pytest.mark.parametrize("seed", [3, 1])
def test_a_demo_stopped_while_its_new_runs_are_renamed_into_place_keeps_the_previous_one(
        quick_demo, monkeypatch, seed):
    """Both new runs finished, Ctrl-C between the two renames into place: the previous demo's
    data (another seed), runs and summary were already given up (.previous.discarded, deleted by
    the next demo first), or (the same seed) the previous run was being deleted, which could
    leave half of it. They must come back, as for a stop during the training."""
    import shutil
    from pathlib import Path

    out, _ = quick_demo
    before = snapshot(out)
    runs = {n: out / n for n in demo.METHODS}
    saved = {n: out.parent / f"saved-{n}" for n in demo.METHODS}
    for n in demo.METHODS:  # stand-ins for the new runs: copies of the finished ones
        shutil.rmtree(saved[n], ignore_errors=True)
        shutil.copytree(runs[n], saved[n])

    def trained(cmd, log):
        run_dir = Path(next(c.split("=", 1)[1] for c in cmd if c.startswith("train.out_dir=")))
        name = "baseline" if "sampling.num_clips=1" in cmd else "siasamrea"
        shutil.copytree(saved[name], run_dir)
        log.write_text("")
        return 0.0

    real_rename = Path.rename
    stops = []

    def rename(self, target):  # once: after the new baseline's rename, before the siasamrea's
        if Path(target) == runs["siasamrea"] and self.name.endswith(".partial") and not stops:
            stops.append(self)
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(demo, "run_training", trained)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, quick=True, seed=seed)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert stops and snapshot(out) == before

    def stopped(cmd, log):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_training", stopped)
    with pytest.raises(KeyboardInterrupt):  # the next demo, with the previous demo's seed
        demo.run_demo(out, quick=True, seed=1)
    assert snapshot(out) == before
    for n in demo.METHODS:
        shutil.rmtree(saved[n], ignore_errors=True)


def test_a_training_stopped_by_a_signal_stops_the_demo(tmp_path, monkeypatch, capfd):
    """A training that exits as a stopped one does (130: Ctrl-C reached it too) stops the demo
    as Ctrl-C does, not as a failure; the training runs as a single process whatever launched the
    demo (RANK and friends removed)."""
    import sys

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    log = tmp_path / "run.log"
    show = [sys.executable, "-c", "import os; print(os.environ.get('RANK'), "
            "os.environ.get('WORLD_SIZE'))"]
    demo.run_training(show, log)
    assert log.read_text().splitlines()[-1] == "None None"
    with pytest.raises(KeyboardInterrupt):
        demo.run_training([sys.executable, "-c", "import sys; sys.exit(130)"], log)
    capfd.readouterr()


@pytest.mark.parametrize("kwargs, message", [
    ({"videos": 2}, "--videos 2: the demo needs at least 3"),
    ({"seed": -1}, "seed=-1: must be >= 0"),
])
def test_run_demo_refuses_bad_values_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo.run_demo(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_set_whose_manifest_is_missing_is_not_reused(tmp_path):
    """A demo stopped while it indexed its new set leaves meta.json without manifest.jsonl: the
    next one generates the set again (it does not fail reading the manifest)."""
    data = tmp_path / "data"
    options = {"num_videos": 2, "size": 16, "question_types": ["color", "flash"]}
    demo.ensure_dataset(data, 0, options, workers=1)
    (data / "manifest.jsonl").unlink()
    assert not demo.dataset_matches(data, 0, options)


def test_synthetic_options_take_videos_and_quick():
    assert demo.synthetic_options(None, False) == demo.SYNTHETIC
    assert demo.synthetic_options(None, True)["num_videos"] == demo.QUICK_SYNTHETIC["num_videos"]
    assert demo.synthetic_options(5, True) == {**demo.SYNTHETIC, "num_videos": 5}


def test_analyse_run_groups_test_accuracy_by_type_and_evidence_visibility(tmp_path,
                                                                           monkeypatch):
    """Per question: its type and whether the evaluation clip shows its evidence (stubbed here)
    decide its groups; the best val accuracy is the highest epoch's, the last epoch's is kept."""
    from siasam_fast.data import synthetic

    seen = {1: {"type": "color", "visible": True}, 2: {"type": "flash", "visible": True},
            3: {"type": "flash", "visible": False}, 4: {"type": "flash", "visible": False}}
    monkeypatch.setattr(synthetic, "eval_clip_sees_evidence", lambda meta, sampling: seen)
    monkeypatch.setattr(demo, "eval_sampling", lambda run_dir: None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions_test.jsonl").write_text("".join(
        json.dumps({"qid": q, "accuracy": a}) + "\n" for q, a in ((1, 1), (2, 1), (3, 0), (4, 1))))
    (run / "summary.json").write_text(json.dumps({"train_seconds": 5.0, "steps": 10}))
    (run / "metrics_epochs.csv").write_text(
        "epoch,train_loss,train_loss_gt,train_loss_siamese,val_accuracy\n"
        "1,2.0,1.5,0.5,0.25\n2,1.0,0.75,0.25,0.75\n3,0.5,0.5,,0.5\n")
    res = demo.analyse_run(run, {"params": {"question_types": ["color", "flash"]}})
    assert res["accuracy"] == 0.75 and res["num_test"] == 4
    assert res["by_type"] == {"color": 1.0, "flash": pytest.approx(2 / 3)}
    assert res["evidence_visible"] == 1.0 and res["evidence_hidden"] == 0.5
    assert res["by_type_visibility"]["flash"] == {"visible": 1.0, "hidden": 0.5,
                                                  "num_visible": 1, "num_hidden": 2}
    assert res["by_type_visibility"]["color"]["num_hidden"] == 0
    assert res["best_val_accuracy"] == 0.75 and res["val_accuracy"] == 0.5
    assert [h["train_loss_siamese"] for h in res["history"]] == [0.5, 0.25, None]


def test_training_setup_names_the_device_precision_and_backend(tmp_path, monkeypatch):
    """What the demo's trainings run on: the CPU (fp32, PyAV) here; with a GPU (stand-ins) the
    GPU, bf16 from Ampere on and fp16 on a V100, and DALI when it is installed."""
    import torch

    from siasam_fast.pipeline import loaders

    assert demo.training_setup(demo.DEMO_CONFIG) == {"device": "cpu", "precision": "fp32",
                                                     "backend": "pyav"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    assert demo.training_setup(demo.DEMO_CONFIG) == {
        "device": "Tesla V100-SXM2-32GB", "precision": "fp16", "backend": "pyav"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_gpu_problem", lambda: None)
    assert demo.training_setup(demo.DEMO_CONFIG, ["train.precision=fp32"]) == {
        "device": "Tesla V100-SXM2-32GB", "precision": "fp32", "backend": "dali"}
    assert demo.describe_setup(demo.training_setup(demo.DEMO_CONFIG)) == \
        "Tesla V100-SXM2-32GB, bf16, data backend dali"
