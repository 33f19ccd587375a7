"""What a user writes in a config file or a --set, read as meant (found by the config review)."""

import math
import os
from pathlib import Path

import pytest

from siasam_fast.config import load_config

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "configs" / "synthetic.yaml"


def test_a_key_or_section_given_twice_is_an_error(tmp_path):
    """YAML keeps the last of two equal keys: a second train section dropped the first one's lr
    and epochs silently."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 0.001\n  epochs: 3\ntrain:\n  epochs: 5\n")
    with pytest.raises(ValueError, match=r"key 'train' appears twice \(lines 1 and 4\)"):
        load_config(twice)
    inner = tmp_path / "inner.yaml"
    inner.write_text("train: {lr: 0.001, epochs: 3, lr: 0.1}\n")
    with pytest.raises(ValueError, match=r"key 'lr' appears twice"):
        load_config(inner)
    merged = tmp_path / "merged.yaml"  # a merge key's values are overridden by design
    merged.write_text("base: &b {lr: 0.001, epochs: 3}\ntrain: {<<: *b, epochs: 2}\n"
                      "x: {}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['base', 'x'\] in config"):
        load_config(merged)  # (loaded: the anchors' own sections are then unknown keys)
    merged.write_text("data:\n  tasks:\n    a: &a {task: open, num_answers: 5}\n"
                      "    b: {<<: *a, task: mc}\ntask: multi\n")
    assert load_config(merged).data.tasks["b"] == {"task": "mc", "num_answers": 5}
    once = tmp_path / "once.yaml"
    once.write_text("train: {lr: 0.001}\neval: {batch_size: 4}\n")
    assert load_config(once).train.lr == 0.001


def test_numbers_in_a_file_read_as_written_where_yaml_1_1_would_change_them(tmp_path):
    """YAML 1.1 reads an unquoted 010 as 8, 1.10 as 1.1 and 1:30 as 90: out_dir: 010 wrote into
    ./8. String fields keep the text (as --set does); whole numbers read 010 as 10."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  out_dir: 010\n  epochs: 010\n  lr: 1.10\ndata:\n"
                   "  video_dir: 1:30\n  train: 1.10\n")
    loaded = load_config(cfg)
    assert (loaded.train.out_dir, loaded.train.epochs, loaded.train.lr) == ("010", 10, 1.1)
    assert (loaded.data.video_dir, loaded.data.train) == ("1:30", "1.10")
    cfg.write_text("data:\n  tasks:\n    a: {task: open, test: 0100}\ntask: multi\n")
    assert load_config(cfg).data.tasks["a"]["test"] == "0100"
    cfg.write_text("train:\n  epochs: 1:30\n")
    with pytest.raises(ValueError, match=r"train.epochs='1:30': expected a whole number"):
        load_config(cfg)
    cfg.write_text("train:\n  epochs: 3\n  out_dir: '010'\n")  # (quoted: a string already)
    assert (load_config(cfg).train.epochs, load_config(cfg).train.out_dir) == (3, "010")


def test_a_leading_tilde_in_a_path_is_the_home_folder(tmp_path, monkeypatch):
    """The shell leaves ~ in --set train.out_dir=~/runs as it is: the run went to ./~/runs."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(BASE, ["train.out_dir=~/runs/a", "data.train=~/a.json, ~/b.json",
                             "data.manifest=~/m.jsonl", "train.init_from=runs/~x"])
    assert cfg.train.out_dir == os.path.join(str(tmp_path), "runs/a")
    assert cfg.data.train == f"{tmp_path}/a.json,{tmp_path}/b.json"
    assert cfg.data.manifest == f"{tmp_path}/m.jsonl"
    assert cfg.train.init_from == "runs/~x"  # only a leading ~
    assert load_config(BASE, ["train.out_dir=~"]).train.out_dir == str(tmp_path)  # not null
    from siasam_fast.training import _apply  # eval / ask: the checkpoint's config, --set
    assert _apply({"data": {"test": ""}}, ["data.test=~/x.json"])["data"]["test"] == \
        f"{tmp_path}/x.json"
    multi = tmp_path / "multi.yaml"
    multi.write_text("task: multi\ndata:\n  tasks:\n    qa: {task: open, train: ~/qa.json}\n")
    assert load_config(multi).data.tasks["qa"]["train"] == f"{tmp_path}/qa.json"


def test_a_mistyped_key_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['nmu_clips'\] in sampling; did you "
                                         r"mean 'num_clips'\? valid: "):
        load_config(BASE, ["sampling.nmu_clips=3"])
    with pytest.raises(ValueError, match=r"\['qqq'\] in train; valid: "):  # nothing close
        load_config(BASE, ["train.qqq=3"])


def test_a_string_key_keeps_its_text_as_written():
    """YAML read ' #...' as a comment: data.train=runs/q #2.json became runs/q."""
    cfg = load_config(BASE, ["data.train=runs/q #2.json", "train.out_dir='runs/x'"])
    assert cfg.data.train == "runs/q #2.json"
    assert cfg.train.out_dir == "runs/x"  # quoted: YAML's string


@pytest.mark.parametrize("text, value", [("1e5", 100000), ("2E3", 2000), ("1000.0", 1000)])
def test_a_whole_number_in_scientific_notation_is_an_integer(text, value):
    assert load_config(BASE, [f"train.max_steps={text}"]).train.max_steps == value


def test_preroll_temperature_may_be_infinite_as_documented(tmp_path):
    assert load_config(BASE, ["sampling.preroll_temperature=.inf"]).sampling.preroll_temperature \
        == math.inf
    with pytest.raises(ValueError, match="expected a finite number"):
        load_config(BASE, ["train.lr=.inf"])


def test_max_question_len_beyond_the_text_models_positions_is_refused():
    """A question longer than BERT's position embeddings failed mid-run with a traceback."""
    from siasam_fast.training import build_model

    cfg = load_config(BASE, ["data.max_question_len=200"])  # the tiny BERT has 128 positions
    with pytest.raises(ValueError, match=r"data.max_question_len=200: model.text=tiny has 128 "
                                         r"token positions; use at most 128"):
        build_model(cfg, 5, 64)
    assert build_model(load_config(BASE, ["data.max_question_len=128"]), 5, 64) is not None


def test_config_command_checks_and_prints_without_starting_anything(capsys):
    import yaml

    from siasam_fast.cli import main

    assert main(["config", str(BASE), "--set", "train.lr=1e-3", "--changed"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {BASE} with train.lr=1e-3: valid; the keys that differ")
    printed = yaml.safe_load(out)
    assert printed["train"]["lr"] == 0.001 and "model" not in printed  # unchanged: left out
    assert main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 5e-4  # every key
    assert main(["config", str(BASE), "--set", "train.lrr=1"]) == 2
    assert "siasam-fast config: error: unknown key(s) ['lrr'] in train; did you mean 'lr'?" \
        in capsys.readouterr().err


def test_an_empty_model_name_says_it_is_empty():
    with pytest.raises(ValueError, match=r"model.visual is empty: valid: tiny, resnet18, "):
        load_config(BASE, ["model.visual="])
    with pytest.raises(ValueError, match=r"model.text is empty: valid: tiny, bert-base"):
        load_config(BASE, ["model.text= "])


@pytest.mark.parametrize("ds_args, message", [
    (["--deepspeed_config", "/nope/ds.json"], "DeepSpeed config '/nope/ds.json' does not exist"),
    (["--deepspeed_config", "configs/ds/zero2_fp16.json"], "fp16 needs a CUDA GPU"),
])
def test_a_bad_deepspeed_config_is_said_before_the_process_group_starts(
        monkeypatch, capsys, tmp_path, ds_args, message):
    """It was read only after init_distributed, which on a CPU builds or waits for DeepSpeed's
    all-reduce op (24-45 s measured before the one-line error)."""
    import torch

    from siasam_fast import training

    if torch.cuda.is_available() and "fp16" in message:
        pytest.skip("a GPU takes fp16")

    def started():
        raise AssertionError("the process group started before the DeepSpeed file was checked")

    monkeypatch.setattr(training, "init_distributed", started)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    assert training.main(["--config", str(BASE), "--set", f"data.manifest={manifest}",
                          *ds_args]) == 2
    assert message in capsys.readouterr().err
