"""training.evaluate on hand-made batches (no video, no checkpoint): what it scores and writes."""

import json

import pytest
import torch

from siasam_fast.config import Config
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


def run(task, batches, tmp_path):
    preds = tmp_path / "preds.jsonl"
    metrics = evaluate(Scores(), batches, Config.from_dict({"task": task}), lambda b: {},
                       torch.device("cpu"), torch.float32, predictions=preds)
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
                       "mse/what": pytest.approx(8 / 3)}
