"""What a resume (``load_run_state``) and an evaluation (``checkpoint_config``) let a config change
and what they refuse: auto fields compared by what they resolved to, the answer vocabulary by its
hash, the train set by its examples, settings that only shape the loss allowed in an evaluation.
Unit tests over run_state.json files: no training."""

import json
from pathlib import Path

import pytest

from siasam_fast.config import Config

MSRVTT_ROW = {"question": "what is it", "answer": "cat", "video_id": 1, "id": 0}


def _state(cfg: Config, **extra) -> dict:
    return {"step": 4, "epoch": 0, "sampler": {}, "vocab": "", "config": cfg.to_dict(),
            "world_size": 1, **extra}


def _tag(tmp_path: Path, state: dict) -> Path:
    tag = tmp_path / "run" / "checkpoints" / "step4"
    tag.mkdir(parents=True)
    (tag / "run_state.json").write_text(json.dumps(state))
    return tag


def _fields(err) -> list[str]:
    return [line.strip().split(":")[0] for line in str(err.value).splitlines()[1:]]


# -- auto fields: compared by what auto resolved to --------------------------------------------


def test_precision_and_optimizer_compare_what_auto_resolved_to(tmp_path):
    """A run of defaults (auto) resumed with the value its auto picked, as --set says it: the same
    run. The checkpoint records what its auto picked; another value stays refused."""
    from siasam_fast.training import load_run_state

    saved = Config()
    tag = _tag(tmp_path, _state(saved, precision="fp32",
                                resolved={"train.precision": "fp32", "train.optimizer": "torch"}))
    cfg = Config()
    cfg.train.precision, cfg.train.optimizer = "fp32", "torch"
    here = {"train.precision": "fp32", "train.optimizer": "torch"}
    assert load_run_state(tag, cfg, 1, here)["step"] == 4
    cfg.train.optimizer = "deepspeed"
    with pytest.raises(ValueError, match="incompatible config") as err:
        load_run_state(tag, cfg, 1, {**here, "train.optimizer": "deepspeed"})
    assert _fields(err) == ["train.optimizer"]
    assert "(the checkpoint's auto is 'torch' there" in str(err.value)


def test_an_older_checkpoint_without_the_optimizer_recorded_is_refused_by_name(tmp_path):
    """A run state from before "resolved": its precision is known (recorded since 2026-11), what
    its optimizer's auto picked is not: that change is refused, saying why."""
    from siasam_fast.training import load_run_state

    tag = _tag(tmp_path, _state(Config(), precision="fp32"))
    cfg = Config()
    cfg.train.precision = "fp32"
    here = {"train.precision": "fp32", "train.optimizer": "torch"}
    assert load_run_state(tag, cfg, 1, here)["step"] == 4
    cfg.train.optimizer = "torch"
    with pytest.raises(ValueError, match="does not record what its auto chose") as err:
        load_run_state(tag, cfg, 1, here)
    assert _fields(err) == ["train.optimizer"]
    # without the precision recorded either (older still): as written
    tag = _tag(tmp_path / "older", _state(Config()))
    with pytest.raises(ValueError) as err:
        load_run_state(tag, cfg, 1, here)
    assert _fields(err) == ["train.optimizer", "train.precision"]


def test_data_format_compares_what_auto_read_train_as(tmp_path):
    from siasam_fast.training import load_run_state, train_formats

    train = tmp_path / "train_qa.json"
    train.write_text(json.dumps([MSRVTT_ROW]))
    saved = Config()
    saved.data.train = str(train)
    assert train_formats(saved.to_dict()) == {"data.format": "official"}
    cfg = Config()
    cfg.data.train, cfg.data.format = str(train), "official"
    # an older run state: its own train file, still here, says what auto read
    tag = _tag(tmp_path, _state(saved))
    assert load_run_state(tag, cfg, 1, {"data.format": "official"})["step"] == 4
    cfg.data.format = "clipbert"
    with pytest.raises(ValueError) as err:
        load_run_state(tag, cfg, 1, {"data.format": "clipbert"})
    assert _fields(err) == ["data.format"]
    # its train file gone: the format recorded in the run state
    moved = tmp_path / "moved" / "train_qa.json"
    moved.parent.mkdir()
    train.rename(moved)
    cfg.data.train, cfg.data.format = str(moved), "official"
    with pytest.raises(ValueError, match="does not record what its auto chose"):
        load_run_state(tag, cfg, 1, {"data.format": "official"})
    tag = _tag(tmp_path / "new", _state(saved, resolved={"data.format": "official"}))
    assert load_run_state(tag, cfg, 1, {"data.format": "official"})["step"] == 4


def test_run_resolutions_names_values_as_the_config_does(tmp_path):
    from siasam_fast.training import run_resolutions

    cfg = Config()
    assert run_resolutions(cfg, "bf16", "DeepSpeed FusedAdam") == {
        "train.precision": "bf16", "train.optimizer": "deepspeed"}  # no train file: no format
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(MSRVTT_ROW) + "\n")
    cfg.data.train = str(train)
    assert run_resolutions(cfg, "fp32", "torch AdamW")["data.format"] == "clipbert"


# -- decode-only and vocabulary fields ---------------------------------------------------------


def test_dedup_may_change_on_a_resume(tmp_path):
    from siasam_fast.training import RESUMABLE_CHANGES, load_run_state

    assert "data.dedup" in RESUMABLE_CHANGES
    tag = _tag(tmp_path, _state(Config()))
    cfg = Config()
    cfg.data.dedup = False
    assert load_run_state(tag, cfg, 1)["step"] == 4


def test_vocabulary_fields_pass_where_the_vocabulary_hash_is_checked(tmp_path):
    """data.ans2label / num_answers only say how a new run builds its vocabulary; a resume takes
    the run folder's, whose hash is checked: they may differ then, not without the check."""
    from siasam_fast.training import _vocab_hash, load_run_state

    vocab = {"cat": 0, "dog": 1}
    tag = _tag(tmp_path, _state(Config(), vocab=_vocab_hash(vocab)))
    cfg = Config()
    cfg.data.ans2label, cfg.data.num_answers = str(tmp_path / "run" / "ans2label.json"), 2
    assert load_run_state(tag, cfg, 1, vocab=vocab)["step"] == 4
    with pytest.raises(ValueError) as err:
        load_run_state(tag, cfg, 1)
    assert _fields(err) == ["data.ans2label", "data.num_answers"]
    with pytest.raises(ValueError, match="another answer vocabulary"):
        load_run_state(tag, cfg, 1, vocab={"cat": 0})
    cfg.train.lr *= 2  # what an exact resume needs stays refused
    with pytest.raises(ValueError) as err:
        load_run_state(tag, cfg, 1, vocab=vocab)
    assert _fields(err) == ["train.lr"]


# -- evaluation: settings of training only ------------------------------------------------------


def test_an_evaluation_may_change_what_only_shapes_the_loss(tmp_path):
    """eval / ask load the weights: siamese.alpha, omega, ... (the loss's) and model.dropout (off
    in evaluation) may differ; what makes other parameters (learn_w1, the CNN) may not."""
    from siasam_fast.training import checkpoint_config

    tag = _tag(tmp_path, _state(Config()))
    (tag.parent / "latest").write_text(tag.name)
    changes = ["siamese.alpha=0", "siamese.omega=0.3", "siamese.tau=2", "siamese.skg=false",
               "siamese.detach_soft_label=true", "siamese.gt_clips=all", "siamese.gt_pool=mean",
               "siamese.mc_loss=ce", "siamese.alpha_warmup=0.5", "model.dropout=0.0"]
    assert checkpoint_config(str(tag), overrides=changes)[2].siamese.alpha == 0
    for change in ("siamese.learn_w1=false", "siamese.learn_w2=false", "sampling.num_clips=3",
                   "model.visual=resnet50"):
        with pytest.raises(ValueError, match="does not fit this config:\n  " + change[:10]):
            checkpoint_config(str(tag), overrides=[change])


# -- the train set ------------------------------------------------------------------------------


def _loader(*qids: str, dropped: tuple = ()):
    from types import SimpleNamespace

    from siasam_fast.data.examples import QAExample

    examples = [QAExample(qid=q, video_id=f"video{q}", question=f"what is {q}") for q in qids]
    return SimpleNamespace(dataset=SimpleNamespace(
        examples=examples, indices=[i for i, q in enumerate(qids) if q not in dropped]))


def test_a_resume_on_other_train_examples_is_refused_naming_data_train(tmp_path):
    """data.train may move (the same data at another path), not change: the checkpoint records
    its usable examples' count and ids; another file with as many questions is refused too."""
    from siasam_fast.training import check_train_set, train_set

    saved = Config()
    saved.data.train = "/old/train_qa.json"
    identity = train_set(_loader("1", "2", "3"))
    assert identity[""]["num_examples"] == 3
    state = _state(saved, train_set=identity)
    cfg = Config()
    cfg.data.train = "/new/train_qa.json"
    check_train_set(tmp_path, state, cfg, train_set(_loader("1", "2", "3")))  # moved: fine
    with pytest.raises(ValueError, match=r"trained on 3 usable examples of data.train="
                       r"'/old/train_qa.json', this run has other questions in data.train="
                       r"'/new/train_qa.json'"):
        check_train_set(tmp_path, state, cfg, train_set(_loader("1", "2", "4")))
    with pytest.raises(ValueError, match=r"this run has 12 in data.train='/new/"):
        check_train_set(tmp_path, state, cfg, train_set(_loader(*map(str, range(12)))))
    cfg.data.train = saved.data.train  # the same file, other videos: says so
    with pytest.raises(ValueError, match=r"this run has 2 in .*\(the same file: the videos "
                       r"data.manifest"):
        check_train_set(tmp_path, state, cfg, train_set(_loader("1", "2", "3", dropped=("2",))))
    # a run state from before train_set: not checked here
    check_train_set(tmp_path, _state(saved), cfg, train_set(_loader("9")))


def test_the_train_set_of_a_multi_task_run_is_checked_by_task(tmp_path):
    from types import SimpleNamespace

    from siasam_fast.pipeline.multitask import MultiTaskLoader
    from siasam_fast.training import check_train_set, train_set

    loader = MultiTaskLoader.__new__(MultiTaskLoader)
    loader.loaders = {"frameqa": _loader("1", "2"), "action": _loader("a", "b")}
    identity = train_set(loader)
    assert set(identity) == {"frameqa", "action"}
    def multi(action_train: str) -> Config:
        values = Config().to_dict()
        values["task"] = "multi"
        values["data"]["tasks"] = {"frameqa": {"task": "open", "train": "f.json"},
                                   "action": {"task": "mc", "train": action_train}}
        return Config.from_dict(values)

    saved, cfg = multi("a.json"), multi("a2.json")
    state = _state(saved, train_set=identity)
    check_train_set(tmp_path, state, cfg, identity)
    other = {**identity, "action": train_set(SimpleNamespace(
        dataset=_loader("a", "c").dataset))[""]}
    with pytest.raises(ValueError, match=r"data.tasks.action.train='a.json', this run has "
                       r"other questions in data.tasks.action.train='a2.json'"):
        check_train_set(tmp_path, state, cfg, other)


# -- evaluation settings changed on a resume ---------------------------------------------------


def test_a_resume_that_evaluates_otherwise_says_so():
    from siasam_fast.training import eval_settings_note, saved_config

    saved = saved_config(_state(Config()))
    cfg = Config()
    assert eval_settings_note(saved, cfg, "val") is None
    cfg.eval.num_clips, cfg.eval.aggregation = 4, "max"
    cfg.eval.count_metric = "raw"  # an open-ended run: no count metric to change
    note = eval_settings_note(saved, cfg, "val")
    assert note.startswith(f"note: eval.num_clips {Config().eval.num_clips} -> 4, "
                           f"eval.aggregation {Config().eval.aggregation} -> max: the earlier "
                           "epochs' val metrics")
    assert "count_metric" not in note
    assert eval_settings_note(saved, cfg, None) is None  # nothing evaluated
    cfg = Config()
    cfg.task, cfg.eval.count_metric = "count", "raw"
    assert "eval.count_metric" in eval_settings_note(saved, cfg, "test")
