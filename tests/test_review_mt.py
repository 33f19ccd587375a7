"""Review of task=multi, sparse placement and clipbert evaluation placement: each test shows a
bug or gap found in review."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_multitask import TASKS, _checkpoint, multi  # noqa: E402

from siasam_fast.config import Config  # noqa: E402

SETS = dict(sampling={"num_clips": 3})


def test_init_from_does_not_carry_a_head_of_another_qa_head_architecture(tmp_path):
    """model.qa_head may differ only when every head starts fresh ("another task's head starts
    fresh, whichever it is"); a multi-task checkpoint's siasam open head must not be poured into
    a one-task run's clipbert head (its output layer carried over, the rest missing)."""
    from siasam_fast.training import build_model, init_model_from

    pre_cfg = multi(TASKS, model={"grid_pool": 1, "qa_head": "siasam"}, **SETS)
    vocab = {"red": 0, "blue": 1, "cat": 2}
    pre = build_model(pre_cfg, len(vocab), 64)
    tag = _checkpoint(pre, pre_cfg, vocab, tmp_path / "pre" / "checkpoints" / "step9")
    one = Config.from_dict({"task": "open", "model": {"grid_pool": 1, "qa_head": "clipbert"},
                            **SETS})
    fine = build_model(one, len(vocab), 64)
    fresh = {k: v.clone() for k, v in fine.state_dict().items() if k.startswith("head.")}
    note = init_model_from(fine, tag, one, vocab)
    after = fine.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fresh.items()), note
    assert "head initialised afresh" in note and "qa_head" in note, note


# -- training runs (slow) -------------------------------------------------------------------------

import test_multitask  # noqa: E402

multi_args, run = test_multitask.multi_args, test_multitask.run
synth = test_multitask.synth  # the module's synthetic set (a fixture)


def _without_videos(synth: Path, out: Path) -> Path:
    """count.csv with every question about a video the manifest does not have."""
    lines = (synth / "count.csv").read_text().splitlines()
    out.write_text("\r\n".join([lines[0], *("gone" + line for line in lines[1:])]) + "\r\n")
    return out


@pytest.mark.slow
def test_a_task_without_usable_train_examples_is_refused(synth, tmp_path):
    """A one-task run whose train split has no usable example stops ("the train split has no
    usable examples"); a task=multi run trained its other tasks and evaluated (and counted) the
    head of that task, never trained, without a word naming it."""
    bad = _without_videos(synth, tmp_path / "count.csv")
    proc = run([sys.executable, "train.py", *multi_args(
        synth, tmp_path / "run", "--set", f"data.tasks.count.train={bad}",
        "--set", "train.epochs=1")], ok=False)
    assert "data.tasks.count: the train split has no usable examples" in proc.stderr, \
        proc.stderr[-2000:]


@pytest.mark.slow
def test_early_stop_of_a_multi_task_run_names_where_its_split_goes(synth, tmp_path):
    """task=multi: data.val must be empty (each task's val is data.tasks.NAME.val), so "data.val
    is empty" tells nothing; and a split that only count tasks have gives no metric (the mean
    accuracy of the open-ended and multiple-choice tasks is NaN every epoch): train.early_stop
    would never stop the run and no best epoch would be found, silently."""
    unset = ["--set", "data.tasks.qa.val=", "--set", "data.tasks.choice.val="]
    proc = run([sys.executable, "train.py", *multi_args(
        synth, tmp_path / "none", *unset, "--set", "train.early_stop=1")], ok=False)
    assert "data.tasks.NAME.val" in proc.stderr and "data.val is empty" not in proc.stderr, \
        proc.stderr[-2000:]
    proc = run([sys.executable, "train.py", *multi_args(
        synth, tmp_path / "count", *unset, "--set", f"data.tasks.count.val={synth / 'count.csv'}",
        "--set", "train.early_stop=1", "--set", "train.epochs=3")], ok=False)
    assert "train.early_stop=1" in proc.stderr and "count" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("values, message", [
    # a YAML task name that is a number (2019: {...}) was an AttributeError ('int' object has no
    # attribute 'replace'), not the config's error
    ({"task": "multi", "data": {"tasks": {2019: {"task": "open"}}}},
     r"data.tasks: the name 2019 must be letters, digits and _"),
    # a setting of the run, not of one task: the error does not blame the first task for it
    ({"task": "multi", "data": {"tasks": {"a": {"task": "mc"}}}, "train": {"early_stop": 2},
      "eval": {"split": "none"}}, r"^train.early_stop=2 needs an evaluation after each epoch"),
    ({"task": "multi", "data": {"tasks": {"a": {"task": "mc"}}}, "sampling": {"eval_clips": 3}},
     r"^sampling.eval_clips=3: a run's clips per video at evaluation are set by eval.num_clips"),
])
def test_multi_config_errors_name_the_bad_value(values, message):
    with pytest.raises(ValueError, match=message):
        Config.from_dict(values)


class _SamplerLoader:
    """A task loader over a real ShardedSampler (what refuses a state of other data)."""

    def __init__(self, n: int, batch_size: int = 2):
        from siasam_fast.pipeline.dataset import ShardedSampler

        self.sampler, self.batch_size, self.dataset = ShardedSampler(n), batch_size, range(n)

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state, align=1):
        self.sampler.load_state_dict(state, align)


def test_a_resume_on_changed_task_data_names_the_task():
    """A resume whose data.tasks.NAME.train may change (a resumable field) but now holds another
    number of examples is refused by that task's sampler: "sampler state has num_examples=16 but
    this sampler has num_examples=11: resume with the same data" did not say which task."""
    from siasam_fast.pipeline.multitask import MultiTaskLoader

    saved = MultiTaskLoader({"qa": _SamplerLoader(10), "count": _SamplerLoader(16)}, 0, 2)
    state = saved.state_dict()
    again = MultiTaskLoader({"qa": _SamplerLoader(10), "count": _SamplerLoader(11)}, 0, 2)
    with pytest.raises(ValueError, match=r"data.tasks.count: sampler state has num_examples=16"):
        again.load_state_dict(state)


COUNT_TEST_LOADERS = """
import sys
from siasam_fast import training
make_loader = training.make_loader

def counting(cfg, data, split, *args, **kwargs):
    if split == "test":
        print("test loader built", flush=True)
    return make_loader(cfg, data, split, *args, **kwargs)

training.make_loader = counting
sys.exit(training.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_stopped_by_max_steps_builds_no_test_loader(synth, tmp_path):
    """One-task behaviour before task=multi: a run that train.max_steps stops does no test
    evaluation and built no test loader (nor read its videos' plans, nor logged its drops); the
    refactor builds every task's test loader before it checks the stop."""
    ann = synth / "annotations"
    args = ["--config", str(Path(__file__).resolve().parent.parent / "configs" / "synthetic.yaml")]
    for key, value in {"data.train": ann / "train_qa.json", "data.val": "",
                       "data.test": ann / "test_qa.json", "data.manifest": synth / "manifest.jsonl",
                       "data.num_workers": 0, "train.batch_size": 4, "train.max_steps": 1,
                       "train.out_dir": tmp_path / "run", "sampling.num_clips": 3,
                       "sampling.frames_per_clip": 4, "eval.split": "none"}.items():
        args += ["--set", f"{key}={value}"]
    proc = run([sys.executable, "-c", COUNT_TEST_LOADERS, *args])
    assert "done: 1 steps" in proc.stdout
    assert "test loader built" not in proc.stdout
