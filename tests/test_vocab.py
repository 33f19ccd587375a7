"""Answer vocabulary: top-K with deterministic ties, ans2label round trip, the OOV policy."""

from __future__ import annotations

import json
import random

import pytest

from siasam_fast.data.annotations import load_annotations
from siasam_fast.data.examples import QAExample
from siasam_fast.data.vocab import (
    OOV_LABEL,
    apply_answer_vocab,
    build_answer_vocab,
    encode_answer,
    load_ans2label,
    save_ans2label,
)


def open_examples(answers):
    return [
        QAExample(qid=str(i), video_id="v", question="q?", answer=a) for i, a in enumerate(answers)
    ]


# man x4, dog x2, cat x2, red x2, blue x1, tree x1
TRAIN = ["man"] * 4 + ["dog", "cat", "red"] * 2 + ["blue", "tree"]


def test_top_k_by_frequency_ties_alphabetical():
    assert build_answer_vocab(open_examples(TRAIN)) == {
        "man": 0,
        "cat": 1,
        "dog": 2,
        "red": 3,
        "blue": 4,
        "tree": 5,
    }
    assert build_answer_vocab(open_examples(TRAIN), top_k=3) == {"man": 0, "cat": 1, "dog": 2}
    assert build_answer_vocab(open_examples(TRAIN), min_count=2) == {
        "man": 0,
        "cat": 1,
        "dog": 2,
        "red": 3,
    }
    # The vocabulary depends on counts only, not on the order of the file.
    shuffled = TRAIN[:]
    random.Random(0).shuffle(shuffled)
    assert build_answer_vocab(open_examples(shuffled), top_k=4) == build_answer_vocab(
        open_examples(TRAIN), top_k=4
    )
    # Answers are counted after normalisation.
    assert build_answer_vocab(open_examples(["Man ", "man", "dog"])) == {"man": 0, "dog": 1}


def test_build_rejects_bad_arguments_and_non_open_tasks():
    with pytest.raises(ValueError, match=r"top_k=0: must be >= 1"):
        build_answer_vocab(open_examples(TRAIN), top_k=0)
    with pytest.raises(ValueError, match=r"min_count=0"):
        build_answer_vocab(open_examples(TRAIN), min_count=0)
    mc = QAExample(
        qid="7",
        video_id="v",
        question="q",
        task="mc",
        candidates=["a", "b"],
        answer_index=0,
        answer="a",
    )
    with pytest.raises(ValueError, match=r"qid='7': task='mc' has no answer vocabulary"):
        build_answer_vocab([mc])


def test_save_load_round_trip_and_clipbert_files(tmp_path):
    vocab = build_answer_vocab(open_examples(TRAIN + ["café"]))
    path = tmp_path / "out" / "train_ans2label.json"
    save_ans2label(vocab, path)
    assert load_ans2label(path) == vocab
    assert "café" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    assert json.loads(path.read_text(encoding="utf-8")) == vocab
    # ClipBERT's layout: one JSON object on one line, in any key order, maybe a BOM.
    clipbert = tmp_path / "frameqa_trainval_ans2label.json"
    clipbert.write_bytes(b"\xef\xbb\xbf" + b'{"dog": 1, "man": 0, "caf\\u00e9": 2}')
    assert load_ans2label(clipbert) == {"man": 0, "dog": 1, "café": 2}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a": 0, "b": 2}', r"labels must be 0\.\.1, one per answer; labels have gaps"),
        ('{"a": 0, "b": 0}', r"label 0 is used twice"),
        ('{"a": "0"}', r"entry 'a': '0': expected a string -> int"),
        # JSON true/false are not labels (Python would take them for 1 and 0)
        ('{"a": false, "b": true}', r"entry 'a': False: expected a string -> int"),
        ('{"Yes": 0, "yes": 1}', r"answers 'Yes' and 'yes' both normalise to 'yes'"),
        ('["a", "b"]', r"expected a JSON object"),
        ('{"a": 0,}', r"line 1: invalid JSON"),
    ],
)
def test_load_rejects_malformed_vocabularies(tmp_path, content, message):
    path = tmp_path / "ans2label.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_ans2label(path)


def test_oov_policy_drop_keep_error():
    vocab = build_answer_vocab(open_examples(TRAIN), top_k=3)  # man, cat, dog
    val = open_examples(["dog", "Tree", "man", "zebra"])

    train = apply_answer_vocab(val, vocab, oov="drop")
    assert [e.qid for e in train.examples] == ["0", "2"]
    assert train.labels == [2, 0]
    assert (train.num_input, train.num_dropped, train.num_oov_kept) == (4, 2, 0)
    assert "2 dropped" in train.summary() and "50.00% out of vocabulary" in train.summary()

    evaluation = apply_answer_vocab(val, vocab, oov="keep")
    assert [e.qid for e in evaluation.examples] == ["0", "1", "2", "3"]
    assert evaluation.labels == [2, OOV_LABEL, 0, OOV_LABEL]
    assert (evaluation.num_dropped, evaluation.num_oov_kept) == (0, 2)
    assert "2 kept as OOV (50.00% out of vocabulary)" in evaluation.summary()

    with pytest.raises(ValueError, match=r"qid='1': answer 'Tree' is not in the vocabulary"):
        apply_answer_vocab(val, vocab, oov="error")
    with pytest.raises(ValueError, match=r"oov='ignore': valid policies are drop, keep, error"):
        apply_answer_vocab(val, vocab, oov="ignore")


def test_encode_answer_normalises():
    vocab = {"ice cream": 0, "man": 1}
    assert encode_answer(" Ice  Cream", vocab) == 0
    assert encode_answer("woman", vocab) == OOV_LABEL


def test_readers_to_labels_end_to_end(tmp_path):
    train = [
        {"answer": a, "category_id": 0, "id": i, "question": "what is it?", "video_id": i}
        for i, a in enumerate(["Couch", "couch", "man", "dog", "man", "rare"])
    ]
    test = [
        {"answer": a, "category_id": 0, "id": i, "question": "who?", "video_id": 7010 + i}
        for i, a in enumerate(["man", "unicorn"])
    ]
    (tmp_path / "train_qa.json").write_text(json.dumps(train), encoding="utf-8")
    (tmp_path / "test_qa.json").write_text(json.dumps(test), encoding="utf-8")
    vocab = build_answer_vocab(load_annotations("msrvtt_qa", tmp_path, split="train"), top_k=3)
    assert vocab == {"couch": 0, "man": 1, "dog": 2}
    tr = apply_answer_vocab(load_annotations("msrvtt_qa", tmp_path, split="train"), vocab, "drop")
    te = apply_answer_vocab(load_annotations("msrvtt_qa", tmp_path, split="test"), vocab, "keep")
    assert (len(tr.examples), tr.num_dropped) == (5, 1)
    assert te.labels == [1, OOV_LABEL]


def test_load_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "ans2label.json"
    path.write_bytes('{"café": 0}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"ans2label\.json: not UTF-8 text .*byte 5"):
        load_ans2label(path)


@pytest.mark.parametrize(
    "content",
    ['{"a": 0, "b": 1, "a": 1, "b": 0}',  # would load as a valid {"a": 1, "b": 0}
     '{"a": 0, "b": 1, "a": 2}'],  # would say "labels have gaps"
)
def test_load_refuses_an_answer_given_twice(tmp_path, content):
    path = tmp_path / "ans2label.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"answer 'a' appears more than once"):
        load_ans2label(path)


def test_an_empty_vocabulary_is_refused(tmp_path):
    path = tmp_path / "ans2label.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ans2label\.json: no answers"):
        load_ans2label(path)
    with pytest.raises(ValueError, match=r"no answers"):
        save_ans2label({}, tmp_path / "out.json")
    # min_count above every answer's count: the error says so, not a 0-answer head later
    with pytest.raises(ValueError, match=r"data.min_answer_count=5: no answer occurs 5 times "
                                         r".*'man', 4 times"):
        build_answer_vocab(open_examples(TRAIN), min_count=5)
    with pytest.raises(ValueError, match=r"no examples"):
        build_answer_vocab([])


# ---------------------------------------------------------------- mutation-review gaps


def test_oov_label_is_the_label_the_loss_ignores():
    """An OOV answer kept for evaluation must not train: its label is the one gt_loss skips."""
    import torch

    from siasam_fast.losses import gt_loss

    vocab = {"man": 0, "dog": 1}
    labels = apply_answer_vocab(open_examples(["dog", "zebra"]), vocab, oov="keep").labels
    assert labels == [1, OOV_LABEL]
    logits = torch.tensor([[[0.5, 2.0]], [[3.0, -1.0]]])  # [V=2, N=1, answers]
    both = gt_loss({"logits": logits}, {"label": torch.tensor(labels),
                                        "clip_mask": torch.ones(2, 1, dtype=torch.bool)}, "open")
    first = gt_loss({"logits": logits[:1]}, {"label": torch.tensor(labels[:1]),
                                             "clip_mask": torch.ones(1, 1, dtype=torch.bool)},
                    "open")
    assert torch.allclose(both, first)


def test_saved_vocabulary_is_in_label_order(tmp_path):
    path = tmp_path / "ans2label.json"
    save_ans2label({"zebra": 0, "apple": 2, "man": 1}, path)
    assert list(json.loads(path.read_text(encoding="utf-8"))) == ["zebra", "man", "apple"]


def test_examples_without_an_open_answer_are_refused():
    """A missing answer would be counted as the answer "none"; a count example has no label."""
    (none,) = open_examples([None])
    with pytest.raises(ValueError, match=r"qid='0': no answer to put in the vocabulary"):
        build_answer_vocab([none])
    with pytest.raises(ValueError, match=r"qid='0': no answer"):
        apply_answer_vocab([none], {"none": 0}, oov="keep")
    count = QAExample(qid="9", video_id="v", question="how many?", task="count", answer="3")
    with pytest.raises(ValueError, match=r"qid='9': task='count' has no answer vocabulary"):
        build_answer_vocab([count])


def test_an_example_with_an_unknown_task_is_refused():
    with pytest.raises(ValueError, match=r"task='choice': valid tasks are open, mc, count"):
        QAExample(qid="1", video_id="v", question="q?", task="choice")
    example = QAExample(qid="1", video_id="v", question="q?", task="count", answer="3")
    assert example.to_dict()["task"] == "count" and example.to_dict()["extra"] == {}
