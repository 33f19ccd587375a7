"""training.evaluate when videos failed at decode time: their questions are counted as failed."""

from types import SimpleNamespace

import torch

from siasam_fast.config import Config
from siasam_fast.data.examples import QAExample
from siasam_fast.training import evaluate


class Logits(torch.nn.Module):
    def forward(self, batch):
        return {"logits": batch["_logits"]}


def batch(indices, stand_in=()):
    V = len(indices)
    return {
        "_logits": torch.tensor([[[0.0, 1.0]]] * V), "example_index": torch.tensor(indices),
        "qid": [f"q{i}" for i in indices], "question_type": ["what"] * V,
        "clip_mask": torch.ones(V, 1, dtype=torch.bool), "label": torch.tensor([1] * V),
        "answer_index": torch.full((V,), -1), "count": torch.full((V,), float("nan")),
        "stand_in": torch.tensor([i in stand_in for i in range(V)]),
    }


class Loader(list):
    """Batches, and the dataset's example indices as VideoQALoader / DALIVideoLoader have."""

    def __init__(self, batches, indices, examples=()):
        super().__init__(batches)
        self.dataset = SimpleNamespace(indices=indices, examples=list(examples))


def run(loader):
    return evaluate(Logits(), loader, Config.from_dict({"task": "open"}), lambda b: {},
                    torch.device("cpu"), torch.float32, desc="eval test")


def test_questions_of_a_failed_video_are_counted_and_said(capsys):
    """Example 2's video failed: the loader gave example 3 in its place (a stand-in). The metrics
    covered 3 of the 4 questions and said nothing of the fourth."""
    metrics = run(Loader([batch([0, 1, 3, 3], stand_in=(2,))], indices=[0, 1, 2, 3]))
    assert metrics["num_examples"] == 3 and metrics["num_failed"] == 1
    assert "eval test: 1 question(s) not scored, their video failed" in capsys.readouterr().err


def test_accuracy_all_counts_an_open_question_of_a_failed_video_as_wrong(capsys):
    """Open-ended, nothing dropped when the loader was built: example 2's video failed at decode
    time. accuracy_all counts it as answered wrong (an open-ended question always has an answer):
    3 right of 4, where accuracy is 3 of the 3 scored."""
    examples = [QAExample(qid=f"q{i}", video_id=f"v{i}", question="what?", answer="b")
                for i in range(4)]
    metrics = run(Loader([batch([0, 1, 3, 3], stand_in=(2,))], [0, 1, 2, 3], examples))
    assert metrics["accuracy"] == 1.0 and metrics["accuracy_all"] == 0.75


def test_nothing_failed_adds_no_key(capsys):
    metrics = run(Loader([batch([0, 1]), batch([2, 0])], indices=[0, 1, 2]))
    assert metrics == {"num_examples": 3, "accuracy": 1.0, "accuracy/what": 1.0}
    assert "not scored" not in capsys.readouterr().err
