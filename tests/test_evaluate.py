"""training.evaluate on hand-made batches (no video, no checkpoint): what it scores and writes."""

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from siasam_fast import training
from siasam_fast.config import Config
from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dataset import _reason_kind
from siasam_fast.training import (
    LabelLookup,
    _duplicate_qids,
    evaluate,
    evaluate_tasks,
    tasks_line,
)


class Scores(torch.nn.Module):
    """A model whose per-clip scores travel in the batch."""

    def forward(self, batch):
        key = {"open": "logits", "mc": "scores", "count": "prediction"}[batch["_task"]]
        return {key: batch["_scores"]}


def batch(task, indices, scores, answer_index=None, count=None, qtype="what", label=None):
    V = len(indices)
    return {
        "_task": task, "_scores": torch.tensor(scores, dtype=torch.float32).unsqueeze(1),
        "example_index": torch.tensor(indices), "qid": [f"q{i}" for i in indices],
        "question_type": qtype if isinstance(qtype, list) else [qtype] * V,
        "clip_mask": torch.ones(V, 1, dtype=torch.bool),
        "label": torch.tensor(label) if label is not None else torch.full((V,), -1),
        "count": torch.tensor(count or [float("nan")] * V),
        "answer_index": torch.tensor(answer_index if answer_index is not None else [-1] * V),
    }


def run(task, batches, tmp_path, **eval_keys):
    preds = tmp_path / "preds.jsonl"
    cfg = Config.from_dict({"task": task, "eval": eval_keys})
    metrics = evaluate(Scores(), batches, cfg, lambda b: {}, torch.device("cpu"), torch.float32,
                       predictions=preds)
    return metrics, [json.loads(line) for line in preds.read_text().splitlines()]


def test_multiple_choice_without_answers_is_predicted_not_scored(tmp_path):
    """How2QA's hidden-label test files (no answer_idx) load with answer_index None: their
    questions used to count as wrong (accuracy 0 for a hidden-label file)."""
    hidden = [batch("mc", [0, 1, 2], [[1, 0], [0, 1], [1, 0]])]
    metrics, rows = run("mc", hidden, tmp_path)
    assert metrics["num_examples"] == 0 and metrics["num_unlabeled"] == 3
    assert metrics["accuracy"] != metrics["accuracy"]  # NaN: nothing to score
    assert [r["prediction"] for r in rows] == [0, 1, 0]  # the predictions are all written
    assert all(r["accuracy"] is None for r in rows)
    # Some answered, some not: the accuracy is over the answered ones only.
    mixed = [batch("mc", [0, 1, 2, 3], [[1, 0], [0, 1], [1, 0], [0, 1]],
                   answer_index=[0, -1, 1, -1])]
    metrics, rows = run("mc", mixed, tmp_path)
    assert metrics == {"num_examples": 2, "num_unlabeled": 2, "accuracy": 0.5,
                       "accuracy/what": 0.5}
    assert [r["accuracy"] for r in rows] == [1.0, None, 0.0, None]


def test_answered_questions_keep_their_metrics_and_keys(tmp_path):
    """An all-answered split: no num_unlabeled key; a last partial batch and wrap-around
    duplicates (padded shards) count each example once."""
    batches = [batch("mc", [0, 1, 2], [[1, 0], [0, 1], [0, 1]], answer_index=[0, 0, 1]),
               batch("mc", [3, 0, 1], [[1, 0], [1, 0], [0, 1]], answer_index=[1, 0, 0])]
    metrics, rows = run("mc", batches, tmp_path)
    assert metrics == {"num_examples": 4, "accuracy": 0.5, "accuracy/what": 0.5}
    assert [r["qid"] for r in rows] == ["q0", "q1", "q2", "q3"]
    counts = [batch("count", [0, 1, 2], [1.0, 2.0, 5.0], count=[1.0, 4.0, 3.0])]
    metrics, _ = run("count", counts, tmp_path)
    assert metrics == {"num_examples": 3, "mse": pytest.approx(8 / 3),
                       "mse_raw": pytest.approx(8 / 3), "mse/what": pytest.approx(8 / 3)}


def test_count_is_scored_as_published_tgif_qa_count_numbers_are(tmp_path):
    """TGIF-QA's Count MSE as published (HCRN's evaluation): the regression output rounded to
    the nearest integer (halves up) and clipped to 1..10; eval.count_metric=raw scores the output
    itself. Worked by hand."""
    outputs = [2.49, 2.5, -3.0, 14.2, 6.7]
    answers = [2.0, 4.0, 1.0, 9.0, 6.0]
    counts = [batch("count", [0, 1, 2, 3, 4], outputs, count=answers, qtype="count")]
    metrics, rows = run("count", counts, tmp_path)
    # answers taken: 2, 3, 1, 10, 7 -> squared errors 0, 1, 0, 1, 1
    assert [r["prediction"] for r in rows] == [2, 3, 1, 10, 7]
    assert all(isinstance(r["prediction"], int) for r in rows)
    assert [r["output"] for r in rows] == pytest.approx(outputs)
    assert [r["mse"] for r in rows] == [0.0, 1.0, 0.0, 1.0, 1.0]
    raw = sum((o - a) ** 2 for o, a in zip(outputs, answers)) / 5
    assert metrics == {"num_examples": 5, "mse": pytest.approx(3 / 5),
                       "mse_raw": pytest.approx(raw), "mse/count": pytest.approx(3 / 5)}
    metrics, rows = run("count", counts, tmp_path, count_metric="raw")
    assert metrics == {"num_examples": 5, "mse": pytest.approx(raw),
                       "mse/count": pytest.approx(raw)}
    assert [r["prediction"] for r in rows] == pytest.approx(outputs)


def test_a_count_output_that_is_not_a_number_answers_nothing(tmp_path):
    """A diverged model's NaN output: no integer answer (null, not a garbage integer), and the
    MSE says NaN rather than a number."""
    counts = [batch("count", [0, 1], [float("nan"), 3.2], count=[2.0, 3.0])]
    metrics, rows = run("count", counts, tmp_path)
    assert [r["prediction"] for r in rows] == [None, 3]
    assert metrics["mse"] != metrics["mse"]  # NaN


class Loader(list):
    """Batches with the dataset facts evaluate reads: the examples, the positions kept and the
    examples left out when the loader was built."""

    def __init__(self, batches, examples, kept, dropped):
        super().__init__(batches)
        self.dataset = SimpleNamespace(
            examples=examples, indices=kept, dropped=dropped,
            drop_reasons=Counter(_reason_kind(r) for _, _, r in dropped))


def _examples(n, answered=True):
    return [QAExample(qid=f"q{i}", video_id=f"v{i}", question="which?", task="mc",
                      answer="a", candidates=["a", "b"], answer_index=0 if answered else None)
            for i in range(n)]


def test_questions_left_out_of_the_split_are_counted(tmp_path, capsys):
    """Published numbers are over every question of a split: questions whose video is missing
    or corrupt in the manifest (left out when the loader was built) and those whose video failed
    at decode time are counted, and accuracy_all scores them as wrong."""
    examples = _examples(6)
    examples[5] = _examples(6, answered=False)[5]  # a hidden-label question: not in accuracy_all
    dropped = [(3, "q3", "video missing from the manifest"),
               (4, "q4", "video corrupt: invalid data"), (5, "q5", "video corrupt: invalid data")]
    # positions kept: examples 0, 1, 2; example 2's video failed at decode time (not in a batch)
    loader = Loader([batch("mc", [0, 1], [[1, 0], [0, 1]], answer_index=[0, 0])], examples,
                    [0, 1, 2], dropped)
    metrics = evaluate(Scores(), loader, Config.from_dict({"task": "mc"}), lambda b: {},
                       torch.device("cpu"), torch.float32, desc="eval test")
    assert metrics == {"num_examples": 2, "accuracy": 0.5, "accuracy/what": 0.5,
                       "num_failed": 1, "num_dropped": 3, "accuracy_all": pytest.approx(1 / 5)}
    err = capsys.readouterr().err
    assert ("note: eval test: 3 question(s) of the split not scored, left out when the loader "
            "was built (2 video corrupt: invalid data, 1 video missing from the manifest); the "
            "metrics cover the other 2; accuracy_all counts them as wrong") in err
    # count: the numbers, no accuracy_all
    counts = Loader([batch("count", [0], [2.0], count=[2.0])], examples, [0], dropped[:1])
    metrics = evaluate(Scores(), counts, Config.from_dict({"task": "count"}), lambda b: {},
                       torch.device("cpu"), torch.float32)
    assert metrics["num_dropped"] == 1 and "accuracy_all" not in metrics


def test_open_ended_accuracy_counts_out_of_vocabulary_answers_as_wrong(tmp_path):
    """Open-ended: the answer is the argmax over the vocabulary, scored against ``label``; the
    label -1 (an answer outside the vocabulary) is a question answered wrong, not an unlabeled
    one."""
    scores = [[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    metrics, rows = run("open", [batch("open", [0, 1, 2, 3], scores, label=[1, 0, -1, 2])],
                        tmp_path)
    assert metrics == {"num_examples": 4, "accuracy": 0.5, "accuracy/what": 0.5}
    assert [r["prediction"] for r in rows] == [1, 0, 2, 0]
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("task", ["open", "mc"])
def test_nan_scores_are_no_answer_and_make_the_metrics_nan(tmp_path, task, capsys):
    """A diverged model's NaN scores: argmax gave the first answer (an open-ended vocabulary's
    most frequent), so a NaN model scored the split's majority rate and passed for a real one;
    now such a question has no prediction, counts as NaN, and the run is told."""
    nan = float("nan")
    scores = [[nan, nan, nan], [3.0, 0.0, 0.0]]
    keys = {"label": [0, 0]} if task == "open" else {"answer_index": [0, 0]}
    metrics, rows = run(task, [batch(task, [0, 1], scores, **keys)], tmp_path)
    assert math.isnan(metrics["accuracy"]) and metrics["num_nonfinite"] == 1
    assert [r["prediction"] for r in rows] == [None, 0]
    assert math.isnan(rows[0]["accuracy"]) and rows[1]["accuracy"] == 1.0
    assert "non-finite scores" in capsys.readouterr().err


def test_a_count_question_without_a_count_is_predicted_not_scored(tmp_path):
    """count NaN (no count given): its row keeps the prediction and output, its error is null,
    and the MSEs are over the other questions."""
    counts = [batch("count", [0, 1, 2], [2.0, 7.0, 4.0], count=[2.0, float("nan"), 5.0])]
    metrics, rows = run("count", counts, tmp_path)
    assert metrics == {"num_examples": 2, "num_unlabeled": 1, "mse": 0.5, "mse_raw": 0.5,
                       "mse/what": 0.5}
    assert [r["prediction"] for r in rows] == [2, 7, 4]
    assert [r["output"] for r in rows] == [2.0, 7.0, 4.0]
    assert [r["mse"] for r in rows] == [0.0, None, 1.0]


def test_per_type_metrics_only_when_questions_have_types(tmp_path):
    """No question has a type: no breakdown; some have: the others are 'untyped'."""
    plain = [batch("mc", [0, 1], [[1, 0], [1, 0]], answer_index=[0, 1], qtype="")]
    assert run("mc", plain, tmp_path)[0] == {"num_examples": 2, "accuracy": 0.5}
    mixed = [batch("mc", [0, 1, 2], [[1, 0], [1, 0], [0, 1]], answer_index=[0, 1, 1],
                   qtype=["", "what", "what"])]
    assert run("mc", mixed, tmp_path)[0] == {"num_examples": 3, "accuracy": pytest.approx(2 / 3),
                                             "accuracy/untyped": 1.0, "accuracy/what": 0.5}


def test_every_processes_shard_is_scored_once_and_written_in_example_order(tmp_path,
                                                                            monkeypatch):
    """Two processes (torch.distributed stood in for): each scores its shard (the last one
    padded by wrapping), rank 0 gathers them, counts each example once and writes the rows in the
    examples' order."""
    shards = {0: [batch("mc", [0, 2, 4], [[1, 0], [0, 1], [1, 0]], answer_index=[0, 0, 0])],
              1: [batch("mc", [1, 3, 0], [[1, 0], [0, 1], [1, 0]], answer_index=[0, 1, 0])]}
    gathered_rows = {}

    def dist_of(rank):
        def all_gather_object(out, rows):
            gathered_rows[rank] = rows
            out[:] = [gathered_rows.get(r, {}) for r in range(2)]
        return SimpleNamespace(is_initialized=lambda: True, get_world_size=lambda: 2,
                               get_rank=lambda: rank, all_gather_object=all_gather_object)

    cfg = Config.from_dict({"task": "mc"})
    monkeypatch.setattr(training, "dist", dist_of(1))
    evaluate(Scores(), shards[1], cfg, lambda b: {}, torch.device("cpu"), torch.float32,
             predictions=tmp_path / "rank1.jsonl")
    assert not (tmp_path / "rank1.jsonl").exists()  # rank 0 writes
    monkeypatch.setattr(training, "dist", dist_of(0))
    preds = tmp_path / "preds.jsonl"
    metrics = evaluate(Scores(), shards[0], cfg, lambda b: {}, torch.device("cpu"),
                       torch.float32, predictions=preds)
    # answers 0, 0, 0, 1, 0 for examples 0..4; right: 0, 1, 3, 4 (example 0 once, not twice)
    assert metrics == {"num_examples": 5, "accuracy": 0.8, "accuracy/what": 0.8}
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["qid"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_accuracy_all_leaves_unanswered_questions_out_of_its_denominator(tmp_path):
    """A hidden-label question that was scored (not counted) and a dropped answered one (counted
    wrong): accuracy_all = right / (answered scored + answered not scored)."""
    examples = _examples(3)
    loader = Loader([batch("mc", [0, 1], [[1, 0], [1, 0]], answer_index=[0, -1])], examples,
                    [0, 1], [(2, "q2", "video missing from the manifest")])
    metrics = evaluate(Scores(), loader, Config.from_dict({"task": "mc"}), lambda b: {},
                       torch.device("cpu"), torch.float32)
    assert metrics["num_examples"] == 1 and metrics["num_unlabeled"] == 1
    assert metrics["accuracy_all"] == 0.5


def test_evaluation_leaves_the_models_mode_as_it_was(tmp_path):
    for training_mode in (False, True):
        model = Scores().train(training_mode)
        evaluate(model, [batch("mc", [0], [[1, 0]], answer_index=[0])],
                 Config.from_dict({"task": "mc"}), lambda b: {}, torch.device("cpu"),
                 torch.float32)
        assert model.training is training_mode


def test_clips_are_pooled_in_float32_whatever_the_models_precision(tmp_path):
    """A bf16 model's per-clip outputs are averaged in fp32: 2, 3, 2 pool to 7 / 3, not to
    bf16's 2.328."""
    b = batch("count", [0], [0.0], count=[2.0])
    b["_scores"] = torch.tensor([[2.0, 3.0, 2.0]], dtype=torch.bfloat16)  # [V=1, N=3]
    b["clip_mask"] = torch.ones(1, 3, dtype=torch.bool)
    metrics, rows = run("count", [b], tmp_path, count_metric="raw")
    assert rows[0]["output"] == pytest.approx(7 / 3, rel=1e-6)
    assert metrics["mse"] == pytest.approx((7 / 3 - 2) ** 2, rel=1e-5)


def _streams(**tasks):
    return {name: Config.from_dict({"task": task}) for name, task in tasks.items()}


def test_a_multi_task_evaluation_reports_each_task_and_their_mean_accuracy(tmp_path):
    """task=multi: each task's metrics prefixed with its name, accuracy the mean of the open and
    multiple-choice tasks' accuracies (count's MSE takes no part), num_examples the sum, and one
    predictions file whose rows name their task."""
    loaders = {
        "frameqa": [batch("open", [0, 1, 2, 3], [[1, 0], [1, 0], [1, 0], [0, 1]],
                          label=[0, 0, 0, 0])],  # 3 of 4
        "action": [batch("mc", [0, 1], [[1, 0], [1, 0]], answer_index=[0, 1])],  # 1 of 2
        "count": [batch("count", [0], [3.0], count=[4.0])],
    }
    streams = _streams(frameqa="open", action="mc", count="count")
    preds = tmp_path / "preds.jsonl"
    texts = {name: (lambda b: {}) for name in loaders}
    metrics = evaluate_tasks(Scores(), loaders, streams, texts, torch.device("cpu"),
                             torch.float32, predictions=preds)
    assert metrics["accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    assert metrics["num_examples"] == 7
    assert metrics["frameqa_accuracy"] == 0.75 and metrics["frameqa_num_examples"] == 4
    assert metrics["action_accuracy"] == 0.5 and metrics["action_num_examples"] == 2
    assert metrics["count_mse"] == 1.0 and metrics["count_num_examples"] == 1
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["frameqa"] * 4 + ["action"] * 2 + ["count"]
    assert tasks_line(metrics, streams) == \
        "accuracy 0.6250 (frameqa 0.7500, action 0.5000; count mse 1.0000)"
    # count alone: no accuracy to average
    only = evaluate_tasks(Scores(), {"count": loaders["count"]}, _streams(count="count"),
                          texts, torch.device("cpu"), torch.float32)
    assert only["accuracy"] != only["accuracy"] and only["num_examples"] == 1
    assert tasks_line(only, _streams(count="count")) == "accuracy nan (count mse 1.0000)"
    assert tasks_line({"accuracy": 0.5, "a_accuracy": 0.5}, _streams(a="mc", b="open")) == \
        "accuracy 0.5000 (a 0.5000)"  # a task without metrics is left out
    # one task: its metrics as they are
    one = evaluate_tasks(Scores(), {"": loaders["action"]}, {"": streams["action"]},
                         {"": texts["action"]}, torch.device("cpu"), torch.float32)
    assert one == {"num_examples": 2, "accuracy": 0.5, "accuracy/what": 0.5}


def test_a_task_that_scored_no_question_is_left_out_of_the_mean_and_said(tmp_path, capsys):
    """A task whose split has no answers (How2QA's hidden-label test) made the multi-task mean NaN,
    silently: no best epoch, no early stop; the mean now covers the tasks that scored, and says
    which did not. A task's NaN from a diverged model still makes the mean NaN."""
    loaders = {
        "frameqa": [batch("open", [0, 1], [[1, 0], [0, 1]], label=[0, 0])],  # 1 of 2
        "how2qa": [batch("mc", [0, 1], [[1, 0], [1, 0]])],  # no answers given
    }
    streams = _streams(frameqa="open", how2qa="mc")
    texts = {name: (lambda b: {}) for name in loaders}
    metrics = evaluate_tasks(Scores(), loaders, streams, texts, torch.device("cpu"),
                             torch.float32)
    assert metrics["accuracy"] == 0.5 and math.isnan(metrics["how2qa_accuracy"])
    assert "task(s) how2qa scored no question" in capsys.readouterr().err
    nan = float("nan")
    loaders["how2qa"] = [batch("mc", [0, 1], [[nan, nan], [1, 0]], answer_index=[0, 0])]
    metrics = evaluate_tasks(Scores(), loaders, streams, texts, torch.device("cpu"),
                             torch.float32)
    assert math.isnan(metrics["accuracy"])


def test_a_split_that_only_some_tasks_have_says_what_its_mean_covers(capsys):
    """task=multi: a test split that one task lacks (no test file) gave a mean over the others,
    shown beside the val mean over every task without a word."""
    loaders = {"frameqa": [batch("open", [0, 1], [[1, 0], [0, 1]], label=[0, 0])],
               "count": [batch("count", [0], [3.0], count=[4.0])]}
    streams = _streams(frameqa="open", how2qa="mc", count="count")
    texts = {name: (lambda b: {}) for name in loaders}
    metrics = evaluate_tasks(Scores(), loaders, streams, texts, torch.device("cpu"),
                             torch.float32, desc="test")
    assert metrics["accuracy"] == 0.5
    assert ("note: test: task(s) how2qa have no data here; the mean accuracy covers frameqa only, "
            "so it is not comparable with one over every task") in capsys.readouterr().err
    evaluate_tasks(Scores(), {**loaders, "how2qa": [batch("mc", [0], [[1, 0]],
                                                          answer_index=[0])]},
                   streams, {**texts, "how2qa": texts["count"]}, torch.device("cpu"),
                   torch.float32, desc="val")
    assert "have no data here" not in capsys.readouterr().err


def test_repeated_question_ids_are_named_once_each():
    examples = [SimpleNamespace(qid=q) for q in ["a", "b", "a", "c", "a", "b"]]
    assert _duplicate_qids(examples) == ["a", "b"]
    assert _duplicate_qids([SimpleNamespace(qid=q) for q in ["a", "b"]]) == []


def test_labels_come_from_the_normalised_answer():
    label_of = LabelLookup({"red": 0, "two cats": 1})
    assert [label_of(SimpleNamespace(answer=a)) for a in ["red", " Red ", "two  Cats", "blue"]] == \
        [0, 0, 1, -1]


@pytest.mark.parametrize("how, answer", [("mean", 1), ("max", 0), ("logsumexp", 0)])
def test_clip_scores_are_pooled_as_eval_aggregation_says(tmp_path, how, answer):
    """eval.aggregation pools the valid clips' scores before the argmax: clips scoring (3, 0)
    and (-4, 1) answer 1 by their mean, 0 by their max; the masked third clip takes no part."""
    b = batch("mc", [0], [[0.0, 0.0]], answer_index=[0])
    b["_scores"] = torch.tensor([[[3.0, 0.0], [-4.0, 1.0], [100.0, -100.0]]])  # [V, N, M]
    b["clip_mask"] = torch.tensor([[True, True, False]])
    _, rows = run("mc", [b], tmp_path, aggregation=how)
    assert rows[0]["prediction"] == answer


class BatchNormScores(Scores):
    """Scores, with a BatchNorm whose running statistics are this process's own."""

    def __init__(self, mean: float):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(2)
        self.bn.running_mean.fill_(mean)
        self.bn.num_batches_tracked.fill_(int(mean))
        self.seen = None

    def forward(self, batch):
        self.seen = self.bn.running_mean.tolist()
        return super().forward(batch)


def batchnorm_dist(rank0_buffers: list, calls: list):
    """torch.distributed stood in for, as process 1 of 2: broadcast gives process 0's tensors in
    the order asked."""
    def broadcast(tensor, src):
        calls.append(src)
        tensor.copy_(rank0_buffers[len(calls) - 1])
    return SimpleNamespace(is_initialized=lambda: True, get_world_size=lambda: 2,
                           get_rank=lambda: 1, broadcast=broadcast,
                           all_gather_object=lambda out, rows: out.__setitem__(slice(None),
                                                                                [rows, {}]))


def test_every_process_evaluates_and_saves_process_0s_batchnorm_statistics(tmp_path,
                                                                         monkeypatch):
    """DeepSpeed keeps the processes' parameters equal, not their buffers: each process's
    BatchNorms track its own batches. The evaluation (its metrics gathered from every process)
    and the checkpoint (process 0's weights) must see process 0's running statistics."""
    rank0 = BatchNormScores(3.0)
    rank0_buffers = [rank0.bn.running_mean, rank0.bn.running_var, rank0.bn.num_batches_tracked]
    calls: list = []
    monkeypatch.setattr(training, "dist", batchnorm_dist(rank0_buffers, calls))
    model = BatchNormScores(7.0)
    evaluate(model, [batch("mc", [0], [[1, 0]], answer_index=[0])],
             Config.from_dict({"task": "mc"}), lambda b: {}, torch.device("cpu"), torch.float32)
    assert calls == [0, 0, 0] and model.seen == [3.0, 3.0]  # before the forward
    assert int(model.bn.num_batches_tracked) == 3

    class Engine:
        module = BatchNormScores(5.0)

        def save_checkpoint(self, save_dir, tag, save_latest=True):
            self.saved_mean = self.module.bn.running_mean.tolist()
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)

        def zero_optimization_stage(self):
            return 0

    calls.clear()
    monkeypatch.setattr(training, "dist", SimpleNamespace(
        **{**vars(batchnorm_dist(rank0_buffers, calls)), "barrier": lambda: None,
           # process 0's answer: the tag was not saved before
           "broadcast_object_list": lambda objects, src: objects.__setitem__(0, False)}))
    engine = Engine()
    training.save_checkpoint(engine, tmp_path, "step1", {}, 1, 1)
    assert calls == [0, 0, 0] and engine.saved_mean == [3.0, 3.0]


def test_summary_json_is_strict_json_when_a_metric_is_nan(tmp_path):
    """A split with nothing to score (How2QA's hidden-label test: accuracy NaN) wrote the bare
    word NaN into summary.json, which JSON.parse and other strict readers refuse (eval --json
    already wrote null)."""
    path = tmp_path / "summary.json"
    training.write_summary(path, {"steps": 3, "test": {"num_examples": 0, "num_unlabeled": 18,
                                                       "accuracy": float("nan")},
                                  "history": [{"val_accuracy": float("inf")}]})

    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    summary = json.loads(path.read_text(), parse_constant=refuse)
    assert summary["test"] == {"num_examples": 0, "num_unlabeled": 18, "accuracy": None}
    assert summary["history"] == [{"val_accuracy": None}]
