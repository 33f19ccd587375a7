"""training.evaluate on hand-made batches (no video, no checkpoint): what it scores and writes."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from siasam_fast.config import Config
from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dataset import _reason_kind
from siasam_fast.training import evaluate


class Scores(torch.nn.Module):
    """A model whose per-clip scores travel in the batch."""

    def forward(self, batch):
        key = {"open": "logits", "mc": "scores", "count": "prediction"}[batch["_task"]]
        return {key: batch["_scores"]}


def batch(task, indices, scores, answer_index=None, count=None, qtype="what"):
    V = len(indices)
    return {
        "_task": task, "_scores": torch.tensor(scores, dtype=torch.float32).unsqueeze(1),
        "example_index": torch.tensor(indices), "qid": [f"q{i}" for i in indices],
        "question_type": [qtype] * V, "clip_mask": torch.ones(V, 1, dtype=torch.bool),
        "label": torch.full((V,), -1), "count": torch.tensor(count or [float("nan")] * V),
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
