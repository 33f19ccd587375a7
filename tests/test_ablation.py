"""benchmarks/ablation.py: the variant table and the command line (no training here)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402

from siasam_fast.config import load_config  # noqa: E402


def overrides_of(name, runs="runs/ablation", seed=0):
    """A variant's overrides as plan_runs fills them in for one seed."""
    items = [o.replace("{runs}", runs).replace("{seed}", str(seed))
             for o in ablation.ALL_VARIANTS[name][1]]  # fmt: skip
    return dict(item.split("=", 1) for item in items)


def test_variants_cover_the_papers_ablations():
    assert set(ablation.VARIANTS) == {
        "baseline",
        "skr_only",
        "skg_skr",
        "no_w1",
        "no_w2",
        "no_w1_w2",
        "clips_1",
        "clips_2",
        "clips_4",
        "anchor_copies",
    }
    assert overrides_of("baseline") == {"siamese.alpha": "0", "sampling.num_clips": "1"}
    assert overrides_of("skr_only")["siamese.skg"] == "false"
    assert overrides_of("skg_skr") == {
        "siamese.alpha": "1",
        "siamese.skg": "true",
        "sampling.num_clips": "9",
    }
    assert overrides_of("no_w1")["siamese.learn_w1"] == "false"
    assert "siamese.learn_w1" not in overrides_of("no_w2")
    assert overrides_of("no_w1_w2")["siamese.learn_w2"] == "false"
    # 1 / 2 / 4 siamese clips = N of 2 / 3 / 5 (the anchor is clip 0); 8 is skg_skr itself.
    assert [overrides_of(f"clips_{k}")["sampling.num_clips"] for k in (1, 2, 4)] == ["2", "3", "5"]
    assert overrides_of("anchor_copies")["sampling.anchor_copies"] == "true"
    assert overrides_of("anchor_copies")["sampling.num_clips"] == "9"


@pytest.mark.parametrize("name", sorted(ablation.ALL_VARIANTS))
def test_every_variant_is_a_valid_config_that_differs_only_in_method_switches(name):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"{k}={v}" for k, v in
                                                       overrides_of(name).items()])  # fmt: skip
    base = load_config(ROOT / "configs" / "demo.yaml")
    for section in ("data", "model", "train", "eval"):  # the hyper-parameters stay the demo's
        got, want = getattr(cfg, section), getattr(base, section)
        if section == "train" and name.startswith("ft_"):  # fine-tuning: its start, epochs, lr
            changed = {k for k in vars(got) if getattr(got, k) != getattr(want, k)}
            assert changed == {"init_from", "epochs", "lr"}, changed
        else:
            assert got == want, section
    # Later overrides win, so each variant's own switches are what the run gets.
    for key, value in overrides_of(name).items():
        section, field = key.split(".")
        got = getattr(getattr(cfg, section), field)
        expected = {"true": True, "false": False}.get(value, value)
        assert got == type(got)(expected), key


def test_defaults_and_options(tmp_path):
    args = ablation.parse_args([])
    assert args.seeds == [0, 1, 2] and args.variants == list(ablation.VARIANTS)
    assert args.jobs == 1 and not args.quick and args.out is None
    args = ablation.parse_args(
        [
            "--quick",
            "--variants",
            "baseline",
            "skg_skr",
            "--jobs",
            "2",
            "--out",
            str(tmp_path),
            "--runs",
            str(tmp_path / "runs"),
        ]
    )
    assert args.quick and args.seeds == [0] and args.jobs == 2
    assert args.variants == ["baseline", "skg_skr"] and args.runs == tmp_path / "runs"
    assert ablation.parse_args(["--seeds", "3", "4", "5"]).seeds == [3, 4, 5]


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--variants", "nope"], "unknown variant(s) ['nope']"),
        (["--jobs", "0"], "--jobs=0: must be >= 1"),
    ],
)
def test_bad_options_are_refused(bad, message, capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(bad)
    assert message in capsys.readouterr().err


def test_plan_runs_builds_one_command_per_variant_and_seed(tmp_path):
    args = ablation.parse_args(
        [
            "--variants",
            "baseline",
            "clips_2",
            "--seeds",
            "0",
            "7",
            "--runs",
            str(tmp_path),
            "--set",
            "train.lr=0.002",
        ]
    )
    runs = ablation.plan_runs(args, tmp_path / "data")
    assert [(r["variant"], r["seed"]) for r in runs] == [
        ("baseline", 0),
        ("baseline", 7),
        ("clips_2", 0),
        ("clips_2", 7),
    ]
    cmd = runs[3]["cmd"]
    assert cmd[:3] == [sys.executable, "-m", "siasam_fast.training"]
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert "train.seed=7" in sets and "sampling.num_clips=3" in sets and "train.lr=0.002" in sets
    assert sets[-2:] == [f"train.out_dir={tmp_path / 'clips_2-seed7'}", "train.overwrite=true"]
    assert any(s.startswith("data.manifest=") for s in sets)
    assert not ablation._finished(runs[0])


def test_a_finished_run_is_reused_only_for_the_same_command_and_data(tmp_path):
    import json
    import os

    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"version": 3, "seed": 0, "num_videos": 8}))
    args = ablation.parse_args(["--variants", "baseline", "--seeds", "0", "--runs", str(tmp_path)])
    run = ablation.plan_runs(args, data)[0]
    assert run["data"] == ablation.data_fingerprint(data) is not None
    d = run["run_dir"]
    d.mkdir()
    (d / "summary.json").write_text("{}")
    (d / "predictions_test.jsonl").write_text("")
    assert not ablation._finished(run)  # no command.json: made by something else
    record = {"command": run["cmd"][1:], "data": run["data"]}
    (d / "command.json").write_text(json.dumps(record))
    assert ablation._finished(run)
    (d / "command.json").write_text(json.dumps(
        {**record, "command": [*run["cmd"][1:], "--set", "train.lr=0.002"]}))
    assert ablation.not_reusable(run) == ("made with another command (--set, seed or variant "
                                          "switches)")
    # The synthetic set was generated again with another seed since: not the same data
    (d / "command.json").write_text(json.dumps(record))
    (data / "meta.json").write_text(json.dumps({"version": 3, "seed": 1, "num_videos": 8}))
    rerun = ablation.plan_runs(args, data)[0]
    assert ablation.not_reusable(rerun) == ("trained on another synthetic set (--data-seed, "
                                            "--videos or --quick)")
    # A run made before train.overwrite existed: the same training.
    older = run["cmd"][1:-2]
    assert run["cmd"][-2:] == ["--set", "train.overwrite=true"]
    (d / "command.json").write_text(json.dumps({**record, "command": older}))
    assert ablation._finished(run)
    # command.json of older versions (the command alone): reused while the data set is older
    (d / "command.json").write_text(json.dumps(run["cmd"][1:]))
    summary_time = (d / "summary.json").stat().st_mtime
    os.utime(data / "meta.json", (summary_time - 10, summary_time - 10))
    assert ablation._finished(run)
    os.utime(data / "meta.json", (summary_time + 10, summary_time + 10))
    assert not ablation._finished(run)


def test_repeated_variants_and_seeds_run_once_and_seeds_must_not_be_negative(capsys):
    args = ablation.parse_args(["--variants", "clips_1", "baseline", "clips_1",
                                "--seeds", "1", "0", "1"])  # fmt: skip
    assert args.variants == ["clips_1", "baseline"] and args.seeds == [1, 0]
    err = capsys.readouterr().err
    assert "--variants repeats values; each runs once: clips_1 baseline" in err
    assert "--seeds repeats values; each runs once: 1 0" in err
    for bad in (["--seeds", "0", "-1"], ["--data-seed", "-3"]):
        with pytest.raises(SystemExit):
            ablation.parse_args(bad)
        assert "must be >= 0" in capsys.readouterr().err


def _fake_run(tmp_path, name, script, needs=None):
    """A plan entry whose "training" is a small Python script (run with the run folder)."""
    d = tmp_path / name
    return {"variant": name.split("-")[0], "seed": 0, "run_dir": d, "needs": needs,
            "cmd": [sys.executable, "-c", script, str(d)], "data": "d", "data_dir": tmp_path}


FINISH = ("import sys, time, pathlib; d = pathlib.Path(sys.argv[1]); time.sleep(2); "
          "(d / 'predictions_test.jsonl').write_text(''); (d / 'summary.json').write_text('new')")
SEE_BASELINE = ("import sys, pathlib; d = pathlib.Path(sys.argv[1]); "
                "(d / 'saw.txt').write_text((d.parent / 'baseline-seed0' / 'summary.json')"
                ".read_text()); (d / 'predictions_test.jsonl').write_text(''); "
                "(d / 'summary.json').write_text('{}')")


def test_a_fine_tuning_run_waits_for_its_baseline_being_retrained(tmp_path):
    """The old baseline's summary.json is there while its retraining runs: the fine-tuning run
    must not start from it (it starts once this sweep's baseline has finished)."""
    base = _fake_run(tmp_path, "baseline-seed0", FINISH)
    base["run_dir"].mkdir()
    (base["run_dir"] / "summary.json").write_text("old")
    ft = _fake_run(tmp_path, "ft_baseline-seed0", SEE_BASELINE, needs=base["run_dir"])
    assert ablation.execute([base, ft], jobs=2) == []
    assert (ft["run_dir"] / "saw.txt").read_text() == "new"


def test_a_failed_baseline_skips_its_fine_tuning_runs(tmp_path, capsys):
    base = _fake_run(tmp_path, "baseline-seed0", "import sys; sys.exit(3)")
    base["run_dir"].mkdir()
    (base["run_dir"] / "summary.json").write_text("old")  # a failed start leaves the old run
    ft = _fake_run(tmp_path, "ft_baseline-seed0", SEE_BASELINE, needs=base["run_dir"])
    assert [r["variant"] for r in ablation.execute([base, ft], jobs=2)] == ["baseline",
                                                                              "ft_baseline"]
    out = capsys.readouterr().out
    assert "FAILED baseline seed 0 (exit 3)" in out and "SKIPPED ft_baseline seed 0: its " \
        "baseline failed" in out
    assert not (ft["run_dir"] / "saw.txt").exists()


def test_finished_runs_are_not_replaced_without_replace(tmp_path, monkeypatch, capsys):
    """Another data seed would regenerate the set the finished runs were trained on; another
    --set would retrain them: both refused (exit 2) before anything is written."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    meta = {"version": 3, "seed": 0, "num_videos": 8, "params": {}}
    (data / "meta.json").write_text(json.dumps(meta))
    args = ablation.parse_args(["--variants", "baseline", "--seeds", "0", "--runs", str(tmp_path)])
    run = ablation.plan_runs(args, data)[0]
    run["run_dir"].mkdir()
    (run["run_dir"] / "summary.json").write_text("{}")
    (run["run_dir"] / "predictions_test.jsonl").write_text("")
    (run["run_dir"] / "command.json").write_text(json.dumps({"command": run["cmd"][1:],
                                                             "data": run["data"]}))
    before = (data / "meta.json").read_text()
    argv = ["--variants", "baseline", "--seeds", "0", "--runs", str(tmp_path)]
    assert ablation.main([*argv, "--data-seed", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} holds 1 finished run(s) trained on its synthetic set (data seed 0" in err
    assert "--replace" in err and (data / "meta.json").read_text() == before
    # Same data, another command: refused, naming the run and why
    monkeypatch.setattr(ablation.demo, "dataset_matches", lambda d, seed, options: True)
    monkeypatch.setattr(ablation.demo, "ensure_dataset", lambda d, seed, options: d)
    assert ablation.main([*argv, "--set", "train.lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert "1 finished run(s) under" in err and "baseline-seed0: made with another command" in err
    assert (run["run_dir"] / "summary.json").is_file()


def test_summary_mean_and_std():
    rows = [
        {"variant": v, "seed": s, "accuracy": a, "color": 1.0, "train_seconds": 1.0, "num_test": 10}
        for v, s, a in [("baseline", 0, 0.5), ("baseline", 1, 0.7), ("skg_skr", 0, 0.8)]
    ]
    out = ablation.summarise(rows, ["baseline", "skg_skr"])
    assert out[0]["accuracy_mean"] == pytest.approx(0.6)
    assert out[0]["accuracy_std"] == pytest.approx(0.1414, abs=1e-3)
    assert out[1]["delta_vs_baseline"] == pytest.approx(0.3)  # against the baseline's seed 0
    assert out[1]["accuracy_std"] == 0.0
    table = ablation.display_rows(out)
    assert table[0]["accuracy"] == "60.0 +- 14.1" and table[1]["delta"] == "+30.0"


def test_delta_pairs_runs_by_seed():
    # The variant has seeds 1 and 2, the baseline 0 and 1: only seed 1 is shared. Against the
    # mean of the baseline's seeds the delta would be 0.85 - 0.6 = +0.25; paired, 0.8 - 0.7.
    rows = [
        {"variant": v, "seed": s, "accuracy": a, "train_seconds": 1.0}
        for v, s, a in [
            ("baseline", 0, 0.5), ("baseline", 1, 0.7), ("skg_skr", 1, 0.8), ("skg_skr", 2, 0.9),
            ("no_w1", 0, 0.6), ("no_w1", 1, 0.6), ("clips_1", 5, 0.1),
        ]
    ]
    out = {r["variant"]: r for r in ablation.summarise(rows, ["baseline", "skg_skr", "no_w1",
                                                                "clips_1"])}
    assert out["skg_skr"]["delta_vs_baseline"] == pytest.approx(0.1)
    assert out["skg_skr"]["delta_seeds"] == "1"
    assert out["no_w1"]["delta_vs_baseline"] == pytest.approx(0.0)
    assert out["no_w1"]["delta_vs_baseline_std"] == pytest.approx(0.1414, abs=1e-3)
    assert "delta_vs_baseline" not in out["clips_1"]  # no seed in common: no delta
    table = {r["variant"]: r for r in ablation.display_rows(list(out.values()))}
    assert table["skg_skr"]["delta"] == "+10.0 (seed 1 only)"
    assert table["no_w1"]["delta"] == "+0.0"
    assert "delta" not in table["clips_1"]


def test_summary_keeps_columns_that_the_first_run_lacks():
    rows = [
        {"variant": "baseline", "seed": 0, "accuracy": 0.5, "train_seconds": 1.0},
        {
            "variant": "baseline",
            "seed": 1,
            "accuracy": 0.7,
            "flash_hidden": 0.2,
            "train_seconds": 3.0,
        },
    ]
    out = ablation.summarise(rows, ["baseline", "skg_skr"])  # skg_skr has no runs: no row
    assert len(out) == 1
    assert out[0]["flash_hidden_mean"] == pytest.approx(0.2) and out[0]["flash_hidden_std"] == 0.0
    assert out[0]["train_seconds_mean"] == pytest.approx(2.0)
    assert ablation.display_rows(out)[0]["flash_hidden"] == "20.0 +- 0.0"


def test_fine_tuning_runs_wait_for_their_baseline(tmp_path):
    args = ablation.parse_args(["--variants", "ft_skg_skr", "baseline", "--seeds", "1",
                                "--runs", str(tmp_path)])  # fmt: skip
    ft, base = ablation.plan_runs(args, tmp_path / "data")
    sets = [ft["cmd"][i + 1] for i, a in enumerate(ft["cmd"]) if a == "--set"]
    assert f"train.init_from={tmp_path / 'baseline-seed1'}" in sets
    assert ft["needs"] == tmp_path / "baseline-seed1" and base["needs"] is None
    # Without the baseline in the plan and without its finished run, nothing starts.
    with pytest.raises(RuntimeError, match="starts from .*baseline-seed1, which has no finished"):
        ablation.execute([ft], jobs=2)


def test_noisy_train_split_changes_exactly_that_fraction(tmp_path):
    import json

    ann = tmp_path / "annotations"
    ann.mkdir()
    colours = ["red", "blue", "green", "cyan"] * 25
    items = [{"answer": c, "category_id": 0, "id": i, "question": "what color is it?",
              "video_id": i} for i, c in enumerate(colours)]  # fmt: skip
    (ann / "train_qa.json").write_text(json.dumps(items))
    path = ablation.noisy_train_split(tmp_path, 0.3, seed=4)
    noisy = json.loads(path.read_text())
    changed = [a for a, b in zip(items, noisy) if a["answer"] != b["answer"]]
    assert len(changed) == 30 and len(noisy) == 100
    assert all(a["id"] == b["id"] and a["question"] == b["question"] for a, b in zip(items, noisy))
    assert {b["answer"] for b in noisy} <= {"red", "blue", "green", "cyan"}
    assert ablation.noisy_train_split(tmp_path, 0.3, seed=4).read_text() == path.read_text()
    assert json.loads((ann / "train_qa.json").read_text()) == items  # the clean split is kept


def test_label_noise_must_be_a_fraction(capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--train-label-noise", "1.5"])
    assert "--train-label-noise=1.5: must be in [0, 1)" in capsys.readouterr().err


def test_a_run_retrained_under_another_command_is_not_reused_by_the_old_one(tmp_path,
                                                                            monkeypatch):
    """The sweep stopped or killed (SIGTERM to it alone, SIGKILL) while a run it retrains under
    another command finishes on its own: the old command.json must not make the new results pass
    for the old command's, and the command that made them reuses them."""
    import json
    import os

    run = _fake_run(tmp_path, "baseline-seed0", FINISH)
    d = run["run_dir"]
    d.mkdir()
    old = {"command": ["--set", "train.lr=0.001"], "data": "d"}
    (d / "command.json").write_text(json.dumps(old))
    # The sweep dies once the training has ended, before it records anything about it.
    monkeypatch.setattr(ablation, "_finish", lambda *a, **k: None)
    ablation._execute([run], [], [], 1, dict(os.environ))
    assert (d / "summary.json").read_text() == "new"
    old_run = {**run, "cmd": [sys.executable, *old["command"]]}
    assert not ablation._finished(old_run)
    assert ablation._finished(run)


def test_a_stopped_sweep_signals_every_running_training_at_once(tmp_path, monkeypatch):
    """--jobs 2 stopped: both trainings get their SIGTERM together (each then takes its time to
    save a checkpoint), not the second only once the first has exited."""
    import textwrap

    fake = tmp_path / "fake.py"
    fake.write_text(textwrap.dedent("""
        import signal, sys, time
        def on_term(n, f):
            open(sys.argv[1], "w").write(repr(time.time()))
            time.sleep(2)  # saving a checkpoint
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        open(sys.argv[1] + ".ready", "w").close()
        while True:
            time.sleep(0.05)
    """))
    runs = [{"variant": f"v{i}", "seed": 0, "run_dir": tmp_path / f"v{i}-seed0", "needs": None,
             "data": "d", "data_dir": tmp_path,
             "cmd": [sys.executable, str(fake), str(tmp_path / f"v{i}.t")]} for i in range(2)]
    real_sleep = ablation.time.sleep

    def sleep_then_stop(seconds):  # the sweep's Ctrl-C, once both trainings are up
        real_sleep(seconds)
        if all((tmp_path / f"v{i}.t.ready").exists() for i in range(2)):
            raise KeyboardInterrupt

    monkeypatch.setattr(ablation.time, "sleep", sleep_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ablation.execute(runs, 2)
    first, second = sorted(float((tmp_path / f"v{i}.t").read_text()) for i in range(2))
    assert second - first < 1.0


@pytest.mark.parametrize("value", ["1", "1.0", "-0.1"])
def test_label_noise_outside_0_to_1_is_refused(capsys, value):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--train-label-noise", value])
    assert f"--train-label-noise={float(value)}: must be in [0, 1)" in capsys.readouterr().err


def test_values_given_once_print_no_note(capsys):
    args = ablation.parse_args(["--variants", "baseline", "clips_1", "--seeds", "2", "0"])
    assert args.variants == ["baseline", "clips_1"] and args.seeds == [2, 0]
    assert capsys.readouterr().err == ""


def test_noisy_train_split_rounds_the_count_and_keeps_one_file_per_seed(tmp_path):
    """0.29 of 100 questions is 29 (0.29 * 100 is 28.999999999999996 in binary); each seed's
    split is a file of its own; a split of one answer cannot be given another."""
    import json

    ann = tmp_path / "annotations"
    ann.mkdir()
    items = [{"answer": ["red", "blue"][i % 2], "id": i, "question": "q", "video_id": i}
             for i in range(100)]
    (ann / "train_qa.json").write_text(json.dumps(items))
    first = ablation.noisy_train_split(tmp_path, 0.29, seed=1)
    noisy = json.loads(first.read_text())
    assert sum(a["answer"] != b["answer"] for a, b in zip(items, noisy)) == 29
    second = ablation.noisy_train_split(tmp_path, 0.29, seed=2)
    assert second != first and json.loads(first.read_text()) == noisy
    (ann / "train_qa.json").write_text(json.dumps([{**x, "answer": "red"} for x in items]))
    with pytest.raises(ValueError, match="label noise needs at least 2 distinct answers"):
        ablation.noisy_train_split(tmp_path, 0.29, seed=1)


def test_data_fingerprint_covers_the_generator_seed_size_and_options(tmp_path):
    import json

    meta = {"version": 3, "seed": 0, "num_videos": 8, "params": {"size": 48}, "videos": {}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    base = ablation.data_fingerprint(tmp_path)
    assert base is not None
    for key, value in (("version", 4), ("seed", 1), ("num_videos", 9), ("params", {"size": 64})):
        (tmp_path / "meta.json").write_text(json.dumps({**meta, key: value}))
        assert ablation.data_fingerprint(tmp_path) != base, key
    assert ablation.data_fingerprint(tmp_path / "none") is None


def test_a_run_without_its_test_predictions_is_not_finished(tmp_path):
    import json

    run = _fake_run(tmp_path, "baseline-seed0", "")
    run["run_dir"].mkdir()
    (run["run_dir"] / "summary.json").write_text("{}")
    (run["run_dir"] / "command.json").write_text(ablation._record(run))
    assert ablation.not_reusable(run) == "not finished"
    (run["run_dir"] / "predictions_test.jsonl").write_text("")
    assert ablation.not_reusable(run) is None and json.loads(ablation._record(run))["data"] == "d"


def test_a_training_that_finished_as_the_sweep_stopped_is_recorded(tmp_path, capsys):
    """Stopped with the sweep, but it had ended with status 0: its results are reused."""
    from types import SimpleNamespace

    run = _fake_run(tmp_path, "baseline-seed0", "")
    run["run_dir"].mkdir()
    (run["run_dir"] / ablation.STARTED).write_text(ablation._record(run))
    log = open(tmp_path / "log", "wb")
    ablation._finish(run, SimpleNamespace(returncode=0), log, 0.0, [], stopped=True)
    assert (run["run_dir"] / "command.json").read_text() == ablation._record(run)
    assert not (run["run_dir"] / ablation.STARTED).exists() and log.closed
    assert "done baseline seed 0" in capsys.readouterr().out


def test_execute_skips_finished_runs_and_runs_jobs_at_a_time(tmp_path, monkeypatch, capsys):
    """A run already finished with the same command is not trained again; the others start at
    most ``jobs`` at a time (trainings stubbed: each is running at its first poll, ended at the
    next)."""
    alive, most = [], []

    class Training:
        def __init__(self, cmd, **kwargs):
            self.returncode, self.polls = None, 0
            alive.append(self)
            most.append(len(alive))

        def poll(self):
            self.polls += 1
            if self.polls > 1:
                self.returncode = 0
                alive.remove(self)
            return self.returncode

    monkeypatch.setattr(ablation.subprocess, "Popen", Training)
    monkeypatch.setattr(ablation.time, "sleep", lambda seconds: None)
    done = _fake_run(tmp_path, "baseline-seed0", "")
    done["run_dir"].mkdir()
    for name, text in (("summary.json", "{}"), ("predictions_test.jsonl", ""),
                       ("command.json", ablation._record(done))):
        (done["run_dir"] / name).write_text(text)
    for jobs in (1, 2):
        runs = [done, *(_fake_run(tmp_path / str(jobs), f"v{i}-seed0", "") for i in range(3))]
        most.clear()
        assert ablation.execute(runs, jobs) == []
        assert max(most) == jobs and len(most) == 3, (jobs, most)
        assert f"4 runs, 1 already done, 3 to train, {jobs} at a time" in capsys.readouterr().out


def test_run_rows_split_a_type_by_visibility_only_where_both_sides_exist(monkeypatch):
    def analysed(run_dir, meta):
        vis = {"num_visible": 4, "num_hidden": 0, "visible": 0.5, "hidden": None}
        return {"accuracy": 0.5, "evidence_visible": 0.5, "evidence_hidden": 0.25,
                "by_type": {"color": 0.75, "flash": 0.25},
                "by_type_visibility": {"color": vis, "flash": {**vis, "num_hidden": 2,
                                                                "hidden": 0.0}},
                "best_val_accuracy": 0.6, "train_seconds": 3.0, "num_test": 8}

    monkeypatch.setattr(ablation.demo, "analyse_run", analysed)
    (row,) = ablation.run_rows([{"variant": "baseline", "seed": 2, "run_dir": None}], {})
    assert row == {"variant": "baseline", "seed": 2, "accuracy": 0.5, "evidence_visible": 0.5,
                   "evidence_hidden": 0.25, "color": 0.75, "flash": 0.25, "flash_visible": 0.5,
                   "flash_hidden": 0.0, "best_val_accuracy": 0.6, "train_seconds": 3.0,
                   "num_test": 8}


def test_summary_leaves_out_the_counts_and_times_each_variant_by_its_own_runs():
    rows = [{"variant": v, "seed": s, "accuracy": 0.5, "train_seconds": t, "num_test": 10}
            for v, s, t in [("baseline", 0, 10.0), ("baseline", 1, 20.0), ("skg_skr", 0, 60.0)]]
    base, sia = ablation.summarise(rows, ["baseline", "skg_skr"])
    assert base["train_seconds_mean"] == 15.0 and sia["train_seconds_mean"] == 60.0
    assert "num_test_mean" not in base and "seed_mean" not in base


def test_replace_and_label_noise_reach_the_sweep(tmp_path, monkeypatch, capsys):
    """--replace lets a sweep go on where a finished run was made on another synthetic set
    (refused without it: test_finished_runs_are_not_replaced_without_replace), and
    --train-label-noise trains on the noisy split (trainings stubbed: none finishes, exit 1)."""
    import json

    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"version": 3, "seed": 0, "num_videos": 8,
                                                "params": {}}))
    (data / "annotations" / "train_qa.json").write_text(json.dumps(
        [{"answer": a, "id": i, "question": "q", "video_id": i} for i, a in enumerate("abab")]))
    argv = ["--variants", "baseline", "--seeds", "0", "--runs", str(tmp_path)]
    run = ablation.plan_runs(ablation.parse_args(argv), data)[0]
    run["run_dir"].mkdir()
    for name, text in (("summary.json", "{}"), ("predictions_test.jsonl", ""),
                       ("command.json", ablation._record(run))):
        (run["run_dir"] / name).write_text(text)
    swept = []

    def generated(d, seed, options):  # the new set, as ensure_dataset would leave it
        (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()),
                                                 "seed": seed}))
        return d

    monkeypatch.setattr(ablation, "execute", lambda runs, jobs: swept.append(runs) or [])
    monkeypatch.setattr(ablation.demo, "ensure_dataset", generated)
    assert ablation.main([*argv, "--data-seed", "1", "--replace"]) == 1  # nothing finished
    assert [r["run_dir"] for r in swept[0]] == [run["run_dir"]]
    monkeypatch.setattr(ablation.demo, "dataset_matches", lambda d, seed, options: True)
    assert ablation.main([*argv, "--train-label-noise", "0.5", "--data-seed", "1",
                          "--replace"]) == 1
    noisy = data / "annotations" / "train_qa_noise0.5_seed1.json"
    assert f"data.train={noisy}" in swept[-1][0]["cmd"] and noisy.is_file()
    assert "no run finished" in capsys.readouterr().err


def test_quick_trains_with_the_demos_quick_settings(tmp_path):
    def sets(argv):
        (run,) = ablation.plan_runs(ablation.parse_args(
            [*argv, "--variants", "baseline", "--runs", str(tmp_path)]), tmp_path / "data")
        return [run["cmd"][i + 1] for i, a in enumerate(run["cmd"]) if a == "--set"]

    quick = sets(["--quick"])
    assert all(o in quick for o in ablation.demo.QUICK_OVERRIDES)
    assert not any(o in sets(["--seeds", "0"]) for o in ablation.demo.QUICK_OVERRIDES)


def test_a_sweep_with_a_failed_training_writes_the_others_and_exits_1(tmp_path, monkeypatch,
                                                                       capsys):
    """The table and files cover the runs that finished, name the failed one, exit status 1
    (trainings and their read-out stubbed)."""
    import csv
    import json

    data = tmp_path / "runs" / "data"
    data.mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"version": 3, "seed": 0, "num_videos": 8,
                                                "params": {}}))
    argv = ["--variants", "baseline", "--seeds", "0", "1", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "results")]
    done, failed = ablation.plan_runs(ablation.parse_args(argv), data)
    done["run_dir"].mkdir()
    for name, text in (("summary.json", "{}"), ("predictions_test.jsonl", ""),
                       ("command.json", ablation._record(done))):
        (done["run_dir"] / name).write_text(text)
    monkeypatch.setattr(ablation.demo, "dataset_matches", lambda d, seed, options: True)
    monkeypatch.setattr(ablation.demo, "ensure_dataset", lambda d, seed, options: d)
    monkeypatch.setattr(ablation, "execute", lambda runs, jobs: [failed])
    monkeypatch.setattr(ablation, "environment", lambda: {"python": "3"})
    monkeypatch.setattr(ablation, "run_rows", lambda runs, meta: [
        {"variant": r["variant"], "seed": r["seed"], "accuracy": 0.5, "train_seconds": 1.0,
         "num_test": 8} for r in runs])
    assert ablation.main(argv) == 1
    assert "1 training(s) did not finish; failed: baseline/seed1" in capsys.readouterr().err
    assert "failed: baseline/seed1" in (tmp_path / "results" / "ablation.md").read_text()
    with open(tmp_path / "results" / "ablation_runs.csv", newline="") as fh:
        assert [(r["variant"], r["seed"]) for r in csv.DictReader(fh)] == [("baseline", "0")]


def test_a_run_made_on_another_device_precision_or_backend_is_not_reused(tmp_path, monkeypatch):
    """A sweep on a GPU (bf16, DALI) must not count the finished runs of a CPU sweep (fp32, PyAV)
    in the same --runs folder as its own seeds, nor the other way round."""
    import json

    import torch

    from siasam_fast.pipeline import loaders

    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"version": 3, "seed": 0, "num_videos": 8}))
    args = ablation.parse_args(["--variants", "baseline", "--seeds", "0", "--runs", str(tmp_path)])
    cpu_run = ablation.plan_runs(args, data)[0]
    assert cpu_run["setup"] == {"device": "cpu", "precision": "fp32", "backend": "pyav"}
    d = cpu_run["run_dir"]
    d.mkdir()
    (d / "summary.json").write_text("{}")
    (d / "predictions_test.jsonl").write_text("")
    (d / "command.json").write_text(ablation._record(cpu_run))
    assert ablation._finished(cpu_run)
    # The same command on an H100 with DALI installed (stand-ins: no GPU here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_gpu_problem", lambda: None)
    gpu_run = ablation.plan_runs(args, data)[0]
    assert gpu_run["setup"] == {"device": "NVIDIA H100 80GB HBM3", "precision": "bf16",
                                "backend": "dali"}
    assert gpu_run["cmd"] == cpu_run["cmd"]
    assert ablation.not_reusable(gpu_run) == (
        "trained on cpu, fp32, data backend pyav; this sweep trains on NVIDIA H100 80GB HBM3, "
        "bf16, data backend dali")
    # Records written before the set-up was recorded: the CPU's (every sweep measured so far)
    (d / "command.json").write_text(json.dumps({"command": cpu_run["cmd"][1:], "data":
                                                cpu_run["data"]}))
    assert ablation.not_reusable(gpu_run).startswith("trained on cpu, fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ablation._finished(ablation.plan_runs(args, data)[0])
    # --set data.backend=pyav on the GPU: recorded as what it is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = ablation.parse_args(["--variants", "baseline", "--seeds", "0", "--runs", str(tmp_path),
                                "--set", "data.backend=pyav", "--set", "train.precision=fp32"])
    assert ablation.plan_runs(args, data)[0]["setup"] == {
        "device": "NVIDIA H100 80GB HBM3", "precision": "fp32", "backend": "pyav"}
