"""Annotation readers on small files in each release format, quirks included."""

from __future__ import annotations

import json

import pytest

from siasam_fast.data.annotations import (
    DATASETS,
    AnnotationError,
    load_annotations,
    normalize_answer,
)

BOM = "\ufeff"


def write(path, text: str, *, crlf: bool = False, bom: bool = False):
    """Write text byte for byte: CRLF / BOM on request, no final newline unless the text has one."""
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes(((BOM if bom else "") + text).encode("utf-8"))
    return path


# ---------------------------------------------------------------- MSRVTT-QA / MSVD-QA official

MSRVTT_JSON = (
    "[\n"
    '  {"answer": "  Couch ", "category_id": 5, "id": 0, "question": "what are three people '
    'sitting on?", "video_id": 7010},\n'
    '  {"answer": "caf\\u00e9", "category_id": 5, "id": 1, "question": "who is in the '
    '\\u00e9cole? ", "video_id": 7010},\n'
    '  {"answer": "two", "category_id": 12, "id": 2, "question": "  is there  a dog?", '
    '"video_id": 9}\n'
    "]"  # no final newline
)


def test_msrvtt_official_fields_and_quirks(tmp_path):
    path = write(tmp_path / "test_qa.json", MSRVTT_JSON, crlf=True, bom=True)
    exs = load_annotations("msrvtt_qa", path)
    assert len(exs) == 3
    a, b, c = exs
    assert (a.qid, a.video_id, a.task) == ("0", "video7010", "open")
    assert a.question == "what are three people sitting on?"
    assert a.answer == "couch"  # stripped + lower-cased
    assert a.question_type == "what"
    assert a.extra == {"category_id": 5}
    assert a.candidates is None and a.answer_index is None and a.start is None
    assert b.answer == "café" and b.question == "who is in the école?"
    assert b.question_type == "who"
    assert c.video_id == "video9" and c.question == "is there a dog?"
    assert c.question_type == "other"


def test_msrvtt_official_missing_field_names_file_record_field(tmp_path):
    recs = [
        {"answer": "a", "id": 0, "question": "what?", "video_id": 1},
        {"id": 1, "question": "what?", "video_id": 1},
    ]
    path = write(tmp_path / "train_qa.json", json.dumps(recs))
    with pytest.raises(AnnotationError, match=r"train_qa\.json record 1: field 'answer' missing"):
        load_annotations("msrvtt_qa", path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"answer": ["a"], "id": 0, "question": "q", "video_id": 1}, "'answer' must be a string"),
        ({"answer": "  ", "id": 0, "question": "q", "video_id": 1}, "'answer' is empty"),
        ({"answer": "a", "id": 0, "question": "q", "video_id": "v1"}, "'video_id' must be an int"),
        ({"answer": "a", "id": 0, "question": "q", "video_id": True}, "'video_id' must be an int"),
        ({"answer": float("nan"), "id": 0, "question": "q", "video_id": 1},  # (json writes NaN)
         "'answer' must be a string, got nan"),
    ],
)
def test_msrvtt_official_bad_values(tmp_path, record, message):
    path = write(tmp_path / "val_qa.json", json.dumps([record]))
    with pytest.raises(AnnotationError, match=rf"val_qa\.json record 0: field {message}"):
        load_annotations("msrvtt_qa", path)


def test_answers_written_as_json_numbers_read_as_written_whole_numbers(tmp_path):
    """A JSON answer 2.0 (pandas writes whole numbers so) became the answer "2.0", another class
    than the "2" of the same count written as 2; NaN became the answer "nan"."""
    recs = [{"answer": a, "id": i, "question": "how many?", "video_id": 1}
            for i, a in enumerate((2, 2.0, 2.5, "2"))]
    path = write(tmp_path / "val_qa.json", json.dumps(recs))
    assert [ex.answer for ex in load_annotations("msrvtt_qa", path)] == ["2", "2", "2.5", "2"]


def test_invalid_json_reports_line_and_column(tmp_path):
    path = write(tmp_path / "train_qa.json", '[\n{"answer": "a",\n "id": }\n]')
    with pytest.raises(AnnotationError, match=r"train_qa\.json line 3 column \d+: invalid JSON"):
        load_annotations("msrvtt_qa", path)
    path = write(tmp_path / "x_qa.json", '[1, {"a": 1}]')
    with pytest.raises(AnnotationError, match=r"record 0: expected a JSON object, got int"):
        load_annotations("msrvtt_qa", path)


def test_msvd_official_maps_ids_through_youtube_mapping(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    recs = [
        {"answer": "Man ", "id": 7, "question": "who is cutting?", "video_id": 1},
        {"answer": "onion", "id": 8, "question": "what is sliced?", "video_id": 2},
    ]
    write(ann / "train_qa.json", json.dumps(recs))
    # Mapping one folder up, CRLF, a blank line, no final newline: found automatically.
    write(tmp_path / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\n\nabc_0_9 vid2", crlf=True)
    exs = load_annotations("msvd_qa", ann, split="train")
    assert [e.video_id for e in exs] == ["-4wsuPCjDBc_5_15", "abc_0_9"]
    assert [e.qid for e in exs] == ["7", "8"]
    assert exs[0].answer == "man" and exs[0].question_type == "who"
    assert "category_id" not in exs[0].extra
    # mapping=False keeps the vid<N> names of Xu et al.'s preprocessing.
    exs = load_annotations("msvd_qa", ann / "train_qa.json", mapping=False)
    assert [e.video_id for e in exs] == ["vid1", "vid2"]
    # Old Mac line ends (a lone CR), as the CSV / TSV / JSON readers accept them.
    write(tmp_path / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\r\rabc_0_9 vid2\r")
    exs = load_annotations("msvd_qa", ann, split="train")
    assert [e.video_id for e in exs] == ["-4wsuPCjDBc_5_15", "abc_0_9"]


def test_msvd_mapping_errors(tmp_path):
    recs = [{"answer": "a", "id": 0, "question": "what?", "video_id": 3}]
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub" / "test_qa.json", json.dumps(recs))
    with pytest.raises(FileNotFoundError, match=r"youtube_mapping\.txt.*mapping=False") as err:
        load_annotations("msvd_qa", path)
    # A config user sets the mapping as data.options.mapping: the message names that form too.
    assert "data.options.mapping" in str(err.value) and "mapping=PATH" in str(err.value)
    mapping = write(tmp_path / "map.txt", "clip_a vid1\nclip_b vid2\n")
    with pytest.raises(AnnotationError, match=r"test_qa\.json record 0: field 'video_id' = 3"):
        load_annotations("msvd_qa", path, mapping=mapping)
    bad = write(tmp_path / "bad.txt", "clip_a vid1\nclip_b 2\n")
    with pytest.raises(AnnotationError, match=r"bad\.txt line 2: expected '<clip name> vid<N>'"):
        load_annotations("msvd_qa", path, mapping=bad)


# ---------------------------------------------------------------- ClipBERT-style JSONL (open)


def test_msrvtt_clipbert_jsonl(tmp_path):
    lines = [
        '{"answer": "Couch", "question": "what are three people sitting on?", '
        '"video_id": "video6513", "answer_type": "what"}',
        "",
        '  {"answer": "man", "question": "\\u00e9 who talks? ", "video_id": "video6514"}  ',
    ]
    path = write(tmp_path / "val.jsonl", "\n".join(lines), crlf=True, bom=True)
    exs = load_annotations("msrvtt_qa", path)
    assert [(e.qid, e.video_id, e.answer) for e in exs] == [
        ("val-0", "video6513", "couch"),
        ("val-1", "video6514", "man"),
    ]
    assert exs[0].question_type == "what"
    assert exs[1].question == "é who talks?"
    assert exs[1].question_type == "other"  # first word is not a question word
    write(tmp_path / "bad.jsonl", '{"answer": "a", "video_id": "video1"}\n')
    with pytest.raises(AnnotationError, match=r"bad\.jsonl line 1: field 'question' missing"):
        load_annotations("msrvtt_qa", tmp_path / "bad.jsonl")
    write(tmp_path / "bad2.jsonl", '{"answer": "a", "question": "q", "video_id": "v"}\n\n{"a": }')
    with pytest.raises(AnnotationError, match=r"bad2\.jsonl line 3 column \d+: invalid JSON"):
        load_annotations("msrvtt_qa", tmp_path / "bad2.jsonl")


# ---------------------------------------------------------------- ActivityNet-QA


def _anet_files(tmp_path, questions, answers, split="val"):
    q = write(tmp_path / f"{split}_q.json", json.dumps(questions), crlf=True)
    a = write(tmp_path / f"{split}_a.json", json.dumps(answers), bom=True)
    return q, a


ANET_Q = [
    {"video_name": "LDIemY9nO-4", "question": "are they drifting indoors ", "question_id": "q2"},
    {"video_name": "-7wfTI8Qv1Q", "question": "what color is the car", "question_id": "q1"},
]
ANET_A = [
    {"answer": "Red", "type": 4, "question_id": "q1"},
    {"answer": "no", "type": 3, "question_id": "q2"},
]


def test_activitynet_joins_questions_and_answers(tmp_path):
    q, a = _anet_files(tmp_path, ANET_Q, ANET_A)
    exs = load_annotations("activitynet_qa", q)  # the *_a.json beside it is found
    assert [e.qid for e in exs] == ["q2", "q1"]  # question-file order
    first, second = exs
    assert first.video_id == "v_LDIemY9nO-4"
    assert first.question == "are they drifting indoors"
    assert (first.answer, first.question_type, first.extra) == ("no", "yes_no", {"type": 3})
    assert (second.answer, second.question_type) == ("red", "color")
    # An explicit pair, a bare-id video naming and a folder + split give the same records.
    assert [e.video_id for e in load_annotations("activitynet_qa", (q, a), video_prefix="")] == [
        "LDIemY9nO-4",
        "-7wfTI8Qv1Q",
    ]
    assert load_annotations("activitynet_qa", tmp_path, split="val") == exs


@pytest.mark.parametrize(
    ("questions", "answers", "message"),
    [
        (ANET_Q, ANET_A[:1], r"val_q\.json record 0: question_id 'q2' has no answer in .*val_a"),
        (ANET_Q[:1], ANET_A, r"val_a\.json record 0: question_id 'q1' has no question"),
        (ANET_Q + ANET_Q[:1], ANET_A, r"val_q\.json record 2: question_id 'q2' appears twice"),
        (ANET_Q, ANET_A + ANET_A[:1], r"val_a\.json record 2: question_id 'q1' already answered"),
        (
            ANET_Q,
            [ANET_A[0], {"answer": "x", "type": 9, "question_id": "q2"}],
            r"val_a\.json record 1: field 'type' = 9 out of range 0\.\.8",
        ),
        (
            ANET_Q,
            [ANET_A[0], {"answer": "x", "question_id": "q2"}],
            r"val_a\.json record 1: field 'type' missing",
        ),
    ],
)
def test_activitynet_join_errors(tmp_path, questions, answers, message):
    q, _ = _anet_files(tmp_path, questions, answers)
    with pytest.raises(AnnotationError, match=message):
        load_annotations("activitynet_qa", q)


def test_activitynet_needs_its_answer_file(tmp_path):
    q = write(tmp_path / "questions.json", json.dumps(ANET_Q))
    with pytest.raises(ValueError, match=r"cannot tell the answer file.*answers_path") as err:
        load_annotations("activitynet_qa", q)
    # A config loads each split's file alone, with one data.options for every split.
    assert "data.options.answers_path" in str(err.value) and "_q.json" in str(err.value)
    q = write(tmp_path / "test_q.json", json.dumps(ANET_Q))
    with pytest.raises(FileNotFoundError, match=r"test_a\.json does not exist"):
        load_annotations("activitynet_qa", q)


# ---------------------------------------------------------------- How2QA

HOW2QA_CSV = (
    "NOuQuofjk44,[7.2:18.0],10,12,16,how many knife is there?,1\n"
    "\n"
    'DUEyiEnMVj4,[12.6:13.2],"his channel is called ""graphix""",b,c ,'
    '"How poisonous, based on the clip?",  "the ""real"" one"  \n'
    "ZCvwmQPIQCo,[60.0:60.0],Two,Three,Four,How many pots?,One"
)


def test_how2qa_csv(tmp_path):
    path = write(tmp_path / "how2QA_val_release.csv", HOW2QA_CSV, crlf=True, bom=True)
    exs = load_annotations("how2qa", path)
    assert len(exs) == 3
    for e in exs:
        assert e.task == "mc" and len(e.candidates) == 4
        assert e.candidates[e.answer_index] == e.answer
    a, b, c = exs
    assert (a.qid, a.video_id, a.start, a.end) == ("how2QA_val_release-0", "NOuQuofjk44", 7.2, 18.0)
    assert a.question == "how many knife is there?" and a.answer == "1"
    assert sorted(a.candidates) == ["1", "10", "12", "16"]
    assert b.question == "How poisonous, based on the clip?"
    assert b.answer == 'the "real" one'  # case kept for multiple choice
    assert set(b.candidates) == {'his channel is called "graphix"', "b", "c", 'the "real" one'}
    assert (c.start, c.end) == (60.0, 60.0)
    # Same order on every call; the correct answer is not always last.
    assert load_annotations("how2qa", path) == exs
    assert {e.answer_index for e in exs} != {3}
    plain = load_annotations("how2qa", path, shuffle_candidates=False)
    assert [e.answer_index for e in plain] == [3, 3, 3]
    assert plain[0].candidates == ["10", "12", "16", "1"]
    assert load_annotations("how2qa", tmp_path, split="val") == exs


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("vid,[7.2-18.0],a,b,c,q,d", r"line 2: field 'timestamps' = '\[7\.2-18\.0\]' is not"),
        ("vid,[18.0:7.2],a,b,c,q,d", r"line 2: field 'timestamps' .* ends before it starts"),
        ("vid,[1:2],a,b,c,q", r"line 2: 6 fields, expected 7"),
        ("vid,[1:2],a,,c,q,d", r"line 2: field 'wrong2' is empty"),
    ],
)
def test_how2qa_csv_errors(tmp_path, line, message):
    path = write(tmp_path / "h.csv", "v0,[0:1],a,b,c,q,d\n" + line + "\n")
    with pytest.raises(AnnotationError, match=r"h\.csv " + message):
        load_annotations("how2qa", path)


def test_how2qa_value_jsonl(tmp_path):
    recs = [
        {
            "vid_name": "clip_1",
            "ts": "36.58-58.52",
            "qid": 11,
            "q": "What is he holding? ",
            "a0": "a pen",
            "a1": "a cup",
            "a2": "a knife",
            "a3": "a phone",
            "answer_idx": 2,
        },
        {
            "vid_name": "clip_2",
            "qid": "12",
            "q": "Where?",
            "a0": "x",
            "a1": "y",
            "a2": "z",
            "a3": "w",
        },
    ]
    path = write(tmp_path / "how2qa_test.jsonl", "\n".join(map(json.dumps, recs)), crlf=True)
    a, b = load_annotations("how2qa", path)
    assert (a.qid, a.video_id, a.question, a.task) == ("11", "clip_1", "What is he holding?", "mc")
    assert a.candidates == ["a pen", "a cup", "a knife", "a phone"]
    assert (a.answer_index, a.answer, a.start, a.end) == (2, "a knife", 36.58, 58.52)
    # Hidden-label test files: no answer_idx, no ts.
    assert (b.answer_index, b.answer, b.start, b.end) == (None, None, None, None)
    recs[0]["answer_idx"] = 4
    write(path, json.dumps(recs[0]))
    with pytest.raises(
        AnnotationError, match=r"line 1: field 'answer_idx' = 4 out of range 0\.\.3"
    ):
        load_annotations("how2qa", path)


# ---------------------------------------------------------------- TGIF-QA official TSV

ACTION_TSV = (
    "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\n"
    "tumblr_nk172bbdPI1u1lr18o1_250\tWhat does the butterfly do 10 or more than 10 times ?\t"
    "stuff marshmallow\tholds a phone towards face\tfall over\ttalk\tflap wings\t4\tACTION4\t26\n"
    'tumblr_x \t"What does the man say ""hi"" to ?"  \ta \tb\tc\td\te\t 0 \tACTION5\t27'
)


def test_tgif_action_official(tmp_path):
    path = write(tmp_path / "Test_action_question.csv", ACTION_TSV, crlf=True, bom=True)
    a, b = load_annotations("tgif_action", path)
    assert (a.qid, a.video_id, a.task) == ("ACTION4", "tumblr_nk172bbdPI1u1lr18o1_250", "mc")
    assert a.question == "What does the butterfly do 10 or more than 10 times ?"
    assert a.candidates == [
        "stuff marshmallow",
        "holds a phone towards face",
        "fall over",
        "talk",
        "flap wings",
    ]
    assert (a.answer_index, a.answer, a.extra) == (4, "flap wings", {"key": "26"})
    assert (b.video_id, b.question) == ("tumblr_x", 'What does the man say "hi" to ?')
    assert (b.answer_index, b.answer) == (0, "a")
    assert load_annotations("tgif_action", tmp_path, split="test") == [a, b]


def test_tgif_transition_frameqa_count_official(tmp_path):
    trans = write(
        tmp_path / "Train_transition_question.csv",
        "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\n"
        "g1\tWhat does the man do after stand ?\tdance\twink\tx\ty\tz\t0\tTRANS88\t80\n",
    )
    (t,) = load_annotations("tgif_transition", trans)
    assert (t.qid, t.answer, t.answer_index) == ("TRANS88", "dance", 0)

    frameqa = write(
        tmp_path / "Train_frameqa_question.csv",
        "gif_name\tquestion\tanswer\ttype\tvid_id\tkey\tdescription\n"
        "g2\twhat is the color of the shirt ?\tBlack \t2\tFRAMEQA4460\t87751\ta man in black .\n"
        "g3\thow many men are sitting ?\ttwo\t1\tFRAMEQA51329\t67414\t\n",
        crlf=True,
    )
    f1, f2 = load_annotations("tgif_frameqa", frameqa)
    assert (f1.task, f1.answer, f1.question_type, f1.qid) == (
        "open",
        "black",
        "color",
        "FRAMEQA4460",
    )
    assert (f2.answer, f2.question_type) == ("two", "number")

    count = write(
        tmp_path / "Train_count_question.csv",
        "gif_name\tquestion\tanswer\tvid_id\tkey\n"
        "g4\tHow many times does the woman chew food ?\t4\tCOUNT1\t5",
    )
    (c,) = load_annotations("tgif_count", count)
    assert (c.task, c.answer, c.video_id, c.qid) == ("count", "4", "g4", "COUNT1")


@pytest.mark.parametrize(
    ("dataset", "text", "message"),
    [
        (
            "tgif_action",
            "gif_name\tquestion\ta1\ta2\ta3\ta4\tanswer\n",
            r"line 1: header lacks column\(s\) 'a5' needed for tgif_action",
        ),
        (
            "tgif_action",
            "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\ng\tq\ta\tb\tc\td\te\t5\n",
            r"line 2: field 'answer' = 5 out of range 0\.\.4",
        ),
        (
            "tgif_action",
            "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\ng\tq\ta\tb\tc\n",
            r"line 2: 5 fields, the header has 8: field 'a4' missing",
        ),
        (
            "tgif_count",
            "gif_name\tquestion\tanswer\n\ng\tq\tfour\n",
            r"line 3: field 'answer' must be an integer, got 'four'",
        ),
        (
            "tgif_count",
            "gif_name\tquestion\tanswer\ng\tq\t-1\n",
            r"line 2: field 'answer' = -1 is not a count",
        ),
        (
            "tgif_frameqa",
            "gif_name\tquestion\tanswer\ttype\ng\tq\ta\t7\n",
            r"line 2: field 'type' = 7 out of range 0\.\.3",
        ),
        (
            "tgif_frameqa",
            "gif_name\tquestion\tanswer\ttype\ng\tq\ta\t0\textra\n",
            r"line 2: 5 fields, the header has 4 .* unexpected 'extra'",
        ),
    ],
)
def test_tgif_official_errors(tmp_path, dataset, text, message):
    path = write(tmp_path / "Train_x_question.csv", text, crlf=True)
    with pytest.raises(AnnotationError, match=r"Train_x_question\.csv " + message):
        load_annotations(dataset, path)


# ---------------------------------------------------------------- TGIF-QA ClipBERT JSONL


def test_tgif_clipbert_jsonl(tmp_path):
    action = {
        "gif_name": "tumblr_nk172bbdPI1u1lr18o1_250",
        "question": "What does the butterfly do 10 or more than 10 times ?",
        "options": [
            "stuff marshmallow",
            "holds a phone towards face",
            "fall over",
            "talk",
            "flap wings",
        ],
        "answer": 4,
    }
    path = write(tmp_path / "action_train.jsonl", json.dumps(action) + "\n\n", crlf=True)
    (a,) = load_annotations("tgif_action", path)
    assert (a.qid, a.video_id, a.answer_index, a.answer) == (
        "action_train-0",
        "tumblr_nk172bbdPI1u1lr18o1_250",
        4,
        "flap wings",
    )
    assert a.candidates == action["options"] and a.extra == {}
    assert load_annotations("tgif_action", tmp_path, split="train") == [a]

    frameqa = {
        "gif_name": "g",
        "question": "what is placed ?",
        "answer": "Cookie",
        "answer_type": "object",
    }
    path = write(tmp_path / "frameqa_val.jsonl", json.dumps(frameqa, ensure_ascii=True))
    (f,) = load_annotations("tgif_frameqa", path)
    assert (f.task, f.answer, f.question_type) == ("open", "cookie", "object")

    path = write(
        tmp_path / "count_val.jsonl", json.dumps({"gif_name": "g", "question": "q", "answer": 3})
    )
    assert load_annotations("tgif_count", path)[0].answer == "3"

    action["options"] = action["options"][:4]
    path = write(tmp_path / "transition_val.jsonl", json.dumps(action))
    with pytest.raises(AnnotationError, match=r"line 1: field 'options' must be a list of 5"):
        load_annotations("tgif_transition", path)


# ---------------------------------------------------------------- entry point


def test_registry_and_entry_point_errors(tmp_path):
    assert set(DATASETS) == {
        "msrvtt_qa",
        "msvd_qa",
        "activitynet_qa",
        "how2qa",
        "tgif_action",
        "tgif_transition",
        "tgif_frameqa",
        "tgif_count",
    }
    path = write(tmp_path / "train_qa.json", MSRVTT_JSON)
    with pytest.raises(ValueError, match=r"dataset='msrvtt'.*msrvtt_qa, msvd_qa, activitynet_qa"):
        load_annotations("msrvtt", path)
    with pytest.raises(
        ValueError,
        match=r"fmt='csv' for msrvtt_qa: valid formats are auto, "
        r"official, clipbert",
    ):
        load_annotations("msrvtt_qa", path, fmt="csv")
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'mapping' for msrvtt_qa"):
        load_annotations("msrvtt_qa", path, mapping="x")
    with pytest.raises(AnnotationError, match=r"looks like a JSON array.*how2qa reads official"):
        load_annotations("how2qa", path)
    with pytest.raises(ValueError, match=r"is a folder; pass split="):
        load_annotations("msrvtt_qa", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"none of val_qa\.json, val\.jsonl"):
        load_annotations("msrvtt_qa", tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_annotations("msrvtt_qa", tmp_path / "nope.json")
    write(tmp_path / "train.jsonl", '{"answer": "a", "question": "q", "video_id": "video1"}')
    with pytest.raises(
        ValueError,
        match=r"train_qa\.json \(official\) and train\.jsonl "
        r"\(clipbert\); pass fmt=.*data\.format",
    ):
        load_annotations("msrvtt_qa", tmp_path, split="train")
    assert len(load_annotations("msrvtt_qa", tmp_path, split="train", fmt="clipbert")) == 1
    write(tmp_path / "empty.json", BOM + "\r\n  \n")
    with pytest.raises(AnnotationError, match=r"empty\.json: file is empty"):
        load_annotations("msrvtt_qa", tmp_path / "empty.json")
    with pytest.raises(ValueError, match=r"expected one annotation file, got 2"):
        load_annotations("msrvtt_qa", [path, path])


def test_normalize_answer():
    assert normalize_answer("  Ice  Cream \t") == "ice cream"
    assert normalize_answer("Café") == "café"
    assert normalize_answer("3") == "3"


# ---------------------------------------------------------------- files of the wrong kind

FRAMEQA_TSV = ("gif_name\tquestion\tanswer\ttype\tvid_id\tkey\tdescription\n"
               "tumblr_b\thow many dogs are there ?\t2\t1\tFRAMEQA1\t7\ttwo dogs\n")


@pytest.mark.parametrize("dataset, text, name, fits", [
    ("tgif_count", ACTION_TSV, "a1", "tgif_action or tgif_transition"),
    ("tgif_frameqa", ACTION_TSV, "a1", "tgif_action or tgif_transition"),
    ("tgif_count", FRAMEQA_TSV, "type", "tgif_frameqa"),
])
def test_tgif_count_and_frameqa_refuse_another_tasks_file(tmp_path, dataset, text, name, fits):
    """The count (and frameqa) columns are a subset of the action ones: without a check an action
    file's option index became the count, silently."""
    path = write(tmp_path / "Train_x_question.csv", text)
    with pytest.raises(AnnotationError, match=rf"line 1: field '{name}' belongs to {fits} files, "
                                              rf"not {dataset}: set data.dataset to {fits}"):
        load_annotations(dataset, path)


# Real rows: Test_transition_question.csv and dataset/README.md's action example
# (YunseokJANG/tgif-qa). Both tasks have the same ten columns; only vid_id tells them apart.
TRANS_TSV = ("gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\n"
             "tumblr_n9y2jhq01L1rts5xfo1_250\tWhat does the man do after sing passionately ?\t"
             "point to the camera\tdance in black\tlick out tongue\tdrift into turn\tflicker\t0\t"
             "TRANS24\t23\n")
ACTION_README_TSV = ("gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\n"
                     "tumblr_nqc2mbmU2J1uxhtnwo1_400\tWhat does the woman do 4 times ?\tflick\t"
                     "do gymnastic\tchew food\tshake hips left and right\t"
                     "pat the back of the other man\t2\tACTION1\t5\n")


@pytest.mark.parametrize("dataset, text, vid_id, fits", [
    ("tgif_action", TRANS_TSV, "TRANS24", "tgif_transition"),
    ("tgif_transition", ACTION_README_TSV, "ACTION1", "tgif_action"),
])
def test_tgif_official_vid_id_names_the_task(tmp_path, dataset, text, vid_id, fits):
    """action and transition files have the same columns: a config pointing tgif_action at
    Train_transition_question.csv trained transition and reported it as action, silently."""
    path = write(tmp_path / "Train_x_question.csv", text)
    with pytest.raises(AnnotationError, match=rf"line 2: field 'vid_id' = '{vid_id}' is a "
                                              rf"{fits} question.*set data.dataset to {fits}"):
        load_annotations(dataset, path)
    # The right dataset reads it; ids of another form (a hand-made file) are not checked.
    assert load_annotations(fits, path)[0].qid == vid_id
    other = write(tmp_path / "Train_y_question.csv", text.replace(vid_id, "Q7"))
    assert load_annotations(dataset, other)[0].qid == "Q7"


@pytest.mark.parametrize("dataset", ["tgif_count", "tgif_frameqa"])
def test_tgif_jsonl_with_options_is_not_count_or_frameqa(tmp_path, dataset):
    line = {"gif_name": "tumblr_a", "question": "what?", "options": list("abcde"), "answer": 3}
    path = write(tmp_path / "action_train.jsonl", json.dumps(line) + "\n")
    with pytest.raises(AnnotationError, match="line 1: field 'options' belongs to tgif_action"):
        load_annotations(dataset, path)


def test_tgif_comma_separated_file_says_it_must_be_tabs(tmp_path):
    path = write(tmp_path / "Train_count_question.csv",
                 "gif_name,question,answer,vid_id,key\ntumblr_a,how many?,3,COUNT1,1\n")
    with pytest.raises(AnnotationError, match="tab-separated, this one is not"):
        load_annotations("tgif_count", path)


def test_tgif_clipbert_bad_option_is_named_by_position(tmp_path):
    line = {"gif_name": "g", "question": "what?", "options": ["a", "b", "c", "d", " "],
            "answer": 0}
    path = write(tmp_path / "action_train.jsonl", json.dumps(line) + "\n")
    with pytest.raises(AnnotationError, match=r"field 'options\[4\]' is empty"):
        load_annotations("tgif_action", path)


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_wide_unicode_files_are_named_as_such(tmp_path, encoding, name):
    """Excel's "Unicode text" is UTF-16 with a BOM: said so, not "looks like CSV (starts with
    '\ufffd')"."""
    path = tmp_path / "Train_count_question.csv"
    path.write_bytes("gif_name\tquestion\tanswer\n".encode(encoding))
    for fmt in ("auto", "official"):
        with pytest.raises(AnnotationError, match=f"not UTF-8 text \\({name}"):
            load_annotations("tgif_count", path, fmt=fmt)


def test_unclosed_quote_gets_a_hint(tmp_path):
    text = "gif_name\tquestion\tanswer\n" + 'g\t"what is it\t3\n' + ("x" * 140_000) + "\n"
    path = write(tmp_path / "Train_count_question.csv", text)
    with pytest.raises(AnnotationError, match="a quote opened and never closed"):
        load_annotations("tgif_count", path)


def write_activitynet_pair(folder):
    """val_q.json / val_a.json: one ActivityNet-QA question and its answer."""
    write(folder / "val_q.json", json.dumps(
        [{"question": "is it?", "question_id": "v_1_0", "video_name": "1"}]))
    write(folder / "val_a.json", json.dumps([{"answer": "yes", "question_id": "v_1_0",
                                              "type": 3}]))


def test_activitynet_swapped_files_are_named(tmp_path):
    write_activitynet_pair(tmp_path)
    with pytest.raises(AnnotationError, match=r"the files are swapped\? Give \(questions, "
                                              r"answers\): \(val_q.json, val_a.json\)"):
        load_annotations("activitynet_qa", [tmp_path / "val_a.json", tmp_path / "val_q.json"])


def test_value_jsonl_needs_one_candidate_count(tmp_path):
    rec = {"vid_name": "v", "ts": "1-2", "qid": "q0", "q": "what?", "a0": "a", "a1": "b",
           "a2": "c", "a3": "d", "answer_idx": 0}
    short = {k: v for k, v in rec.items() if k != "a3"} | {"qid": "q1"}
    path = write(tmp_path / "how2qa_val.jsonl", json.dumps(rec) + "\n" + json.dumps(short) + "\n")
    with pytest.raises(AnnotationError, match="line 2: 3 candidates .* first record has 4"):
        load_annotations("how2qa", path)


def test_msvd_mapping_duplicates_folders_and_extensions(tmp_path):
    write(tmp_path / "test_qa.json", json.dumps(
        [{"answer": "a", "id": 0, "question": "what?", "video_id": 1}]))
    mapping = write(tmp_path / "youtube_mapping.txt", "clipA.avi vid1\n")
    (ex,) = load_annotations("msvd_qa", tmp_path / "test_qa.json")
    assert ex.video_id == "clipA"  # a video id has no extension
    write(mapping, "clipA vid1\nclipB vid1\n")
    with pytest.raises(AnnotationError, match=r"line 2: vid1 already maps to 'clipA' \(line 1\)"):
        load_annotations("msvd_qa", tmp_path / "test_qa.json")
    with pytest.raises(FileNotFoundError, match="is a folder; give the file"):
        load_annotations("msvd_qa", tmp_path / "test_qa.json", mapping=tmp_path)


def test_jsonl_with_old_mac_line_ends(tmp_path):
    lines = [json.dumps({"video_id": f"video{i}", "question": "what?", "answer": "a"})
             for i in range(3)]
    path = tmp_path / "train.jsonl"
    path.write_bytes("\r".join(lines).encode())
    assert [ex.video_id for ex in load_annotations("msrvtt_qa", path)] == [
        "video0", "video1", "video2"]


def test_how2qa_csv_header_row_gets_a_hint(tmp_path):
    path = write(tmp_path / "how2QA_val_release.csv",
                 "video_id,timestamps,wrong1,wrong2,wrong3,question,answer\n"
                 "v1,[1.0:2.0],a,b,c,what?,d\n")
    with pytest.raises(AnnotationError, match="line 1: .* has no header row: remove it"):
        load_annotations("how2qa", path)


def test_csv_and_tsv_with_old_mac_line_ends(tmp_path):
    """Excel's "CSV (Macintosh)" ends lines with a lone CR; line numbers count them as editors
    do."""
    how2qa = tmp_path / "how2QA_val_release.csv"
    how2qa.write_bytes(b"v1,[1.0:2.0],a,b,c,what?,d\rv2,[1.0:2.0],a,b,c,who?,e\r")
    assert [ex.video_id for ex in load_annotations("how2qa", how2qa)] == ["v1", "v2"]
    tgif = tmp_path / "Test_count_question.csv"
    tgif.write_bytes(b"gif_name\tquestion\tanswer\rg1\thow many?\t3\rg2\thow many?\tx\r")
    with pytest.raises(AnnotationError, match=r"line 3: field 'answer' must be an integer"):
        load_annotations("tgif_count", tgif)


def test_non_utf8_file_names_the_line(tmp_path):
    """Excel on Windows saves "CSV (Comma delimited)" as cp1252: the error names the line of the
    first bad byte (not only its byte offset) and what to do."""
    path = tmp_path / "how2QA_val_release.csv"
    path.write_bytes("v1,[1.0:2.0],a,b,c,what?,d\nv2,[1.0:2.0],a,b,c,who?,e\n"
                     "v3,[1.0:2.0],a,b,c,what\u2019s this?,f\n".encode("cp1252"))
    with pytest.raises(AnnotationError, match=r"how2QA_val_release.csv line 3: not UTF-8 "
                                              r"text \(byte 0x92: invalid start byte\); save it "
                                              r"as UTF-8"):
        load_annotations("how2qa", path)


def test_activitynet_video_prefix_must_be_text(tmp_path):
    """A config's `options: {video_prefix: }` gives None: said so, not a TypeError."""
    write_activitynet_pair(tmp_path)
    with pytest.raises(ValueError, match=r"video_prefix=None: .*\"v_\".*\"\""):
        load_annotations("activitynet_qa", tmp_path / "val_q.json", video_prefix=None)
    (ex,) = load_annotations("activitynet_qa", tmp_path / "val_q.json", video_prefix="")
    assert ex.video_id == "1"


# ---------------------------------------------------------------- mutation-review gaps


def test_json_array_after_leading_blank_lines_is_still_json(tmp_path):
    """fmt=auto reads the first non-blank character: a release file that starts with a newline
    or indentation (pretty-printers, concatenation) is still a JSON array."""
    path = write(tmp_path / "val_qa.json", "\n  \n\t" + MSRVTT_JSON, bom=True)
    assert [e.qid for e in load_annotations("msrvtt_qa", path)] == ["0", "1", "2"]


def test_folder_lookup_takes_the_first_release_name_of_a_format(tmp_path):
    """Two names of the same (ClipBERT) format in one folder are not ambiguous: the first listed
    name ({split}.jsonl) is read; only files of two formats need fmt=."""
    rec = {"video_id": "video1", "question": "what?", "answer": "a"}
    write(tmp_path / "train.jsonl", json.dumps(rec))
    write(tmp_path / "msrvtt_qa_train.jsonl", json.dumps({**rec, "video_id": "video2"}))
    (ex,) = load_annotations("msrvtt_qa", tmp_path, split="train")
    assert ex.video_id == "video1"


def test_non_utf8_file_with_old_mac_line_ends_names_the_line(tmp_path):
    """The line of the first bad byte counts lone CRs as line ends, as the readers do."""
    path = tmp_path / "how2QA_val_release.csv"
    path.write_bytes("v1,[1.0:2.0],a,b,c,what?,d\rv2,[1.0:2.0],a,b,c,who?,e\r"
                     "v3,[1.0:2.0],a,b,c,what\u2019s this?,f\r".encode("cp1252"))
    with pytest.raises(AnnotationError, match=r"how2QA_val_release.csv line 3: not UTF-8"):
        load_annotations("how2qa", path)


def test_rows_of_only_separators_are_blank_lines(tmp_path):
    """A spreadsheet row cleared in Excel is saved as ',,,,,,' (tabs in a TSV): skipped like a
    blank line, not read as a record with every field empty; line numbers still count it."""
    how2qa = write(tmp_path / "how2QA_val_release.csv",
                   "v1,[1.0:2.0],a,b,c,what?,d\n,,,,,,\n , ,,,,, \nv2,[1.0:2.0],a,b,c,who?,e\n")
    assert [ex.video_id for ex in load_annotations("how2qa", how2qa)] == ["v1", "v2"]
    tgif = write(tmp_path / "Test_count_question.csv",
                 "gif_name\tquestion\tanswer\n\t\t\ng1\thow many?\t3\n\t\t\ng2\thow many?\tx\n")
    with pytest.raises(AnnotationError, match=r"line 5: field 'answer' must be an integer"):
        load_annotations("tgif_count", tgif)


def test_tgif_official_blank_optional_cells(tmp_path):
    """An empty vid_id cell gives the fallback id (file stem and example number, 0-based, as when
    the column is absent); an empty key cell gives no 'key'."""
    path = write(tmp_path / "Test_count_question.csv",
                 "gif_name\tquestion\tanswer\tvid_id\tkey\n"
                 "g1\thow many?\t3\tCOUNT7\t\n"
                 "g2\thow many?\t0\t\t12\n")
    a, b = load_annotations("tgif_count", path)
    assert (a.qid, a.extra, b.qid, b.extra) == ("COUNT7", {}, "Test_count_question-1",
                                                {"key": "12"})
    assert (b.answer, b.task, b.question_type) == ("0", "count", "count")  # a count of 0 is one
    path = write(tmp_path / "Test_count_question.csv",
                 "gif_name\tquestion\tanswer\ng1\thow many?\t3\ng2\thow many?\t4\n")
    assert [e.qid for e in load_annotations("tgif_count", path)] == [
        "Test_count_question-0", "Test_count_question-1"]


@pytest.mark.parametrize(("dataset", "text", "message"), [
    ("tgif_action", "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\ng\tq\ta\tb\tc\td\te\t-1\n",
     r"line 2: field 'answer' = -1 out of range 0\.\.4"),
    ("tgif_frameqa", "gif_name\tquestion\tanswer\ttype\ng\tq\ta\t-1\n",
     r"line 2: field 'type' = -1 out of range 0\.\.3"),
    # one field short, the last (optional) one: still refused, not read as absent
    ("tgif_action", "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\n"
                    "g\tq\ta\tb\tc\td\te\t1\tACTION1\n",
     r"line 2: 9 fields, the header has 10: field 'key' missing"),
])
def test_tgif_official_more_errors(tmp_path, dataset, text, message):
    path = write(tmp_path / "Train_x_question.csv", text)
    with pytest.raises(AnnotationError, match=r"Train_x_question\.csv " + message):
        load_annotations(dataset, path)


def test_tgif_clipbert_negative_answer_is_out_of_range(tmp_path):
    rec = {"gif_name": "g", "question": "q", "options": list("abcde"), "answer": -1}
    path = write(tmp_path / "action_val.jsonl", json.dumps(rec))
    with pytest.raises(AnnotationError, match=r"line 1: field 'answer' = -1 out of range"):
        load_annotations("tgif_action", path)


def test_tgif_clipbert_frameqa_without_answer_type_has_no_type(tmp_path):
    path = write(tmp_path / "frameqa_val.jsonl",
                 json.dumps({"gif_name": "g", "question": "what is it ?", "answer": "Dog"}))
    (ex,) = load_annotations("tgif_frameqa", path)
    assert (ex.answer, ex.question_type) == ("dog", "")


def test_msvd_mapping_beside_the_file_wins_and_lines_are_two_words(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    write(ann / "test_qa.json", json.dumps(
        [{"answer": "a", "id": 0, "question": "what?", "video_id": 1}]))
    write(tmp_path / "youtube_mapping.txt", "up_clip vid1\n")
    write(ann / "youtube_mapping.txt", "beside_clip.MP4 vid1\n")  # extension in any case
    (ex,) = load_annotations("msvd_qa", ann / "test_qa.json")
    assert ex.video_id == "beside_clip"
    write(ann / "youtube_mapping.txt", "beside_clip vid1\nclip with spaces vid2\n")
    with pytest.raises(AnnotationError, match=r"youtube_mapping\.txt line 2: expected "
                                              r"'<clip name> vid<N>', got 'clip with spaces"):
        load_annotations("msvd_qa", ann / "test_qa.json")


def test_clipbert_answer_type_is_read_not_derived(tmp_path):
    """ClipBERT's answer_type is the record's, even where the question's first word differs."""
    path = write(tmp_path / "val.jsonl", json.dumps(
        {"video_id": "video1", "question": "how many dogs?", "answer": "2",
         "answer_type": "what"}))
    assert load_annotations("msrvtt_qa", path)[0].question_type == "what"


def test_how2qa_candidate_order_depends_on_seed_and_question(tmp_path):
    """Each question's candidates get an order of their own (not one order for the whole file),
    and seed= changes them."""
    rows = "".join(f"v{i},[0:1],a,b,c,q{i}?,d\n" for i in range(12))
    path = write(tmp_path / "how2QA_val_release.csv", rows)
    seed0 = load_annotations("how2qa", path)
    assert len({tuple(e.candidates) for e in seed0}) > 1
    assert all(e.candidates[e.answer_index] == "d" for e in seed0)
    seed1 = load_annotations("how2qa", path, seed=1)
    assert [e.candidates for e in seed1] != [e.candidates for e in seed0]
    assert load_annotations("how2qa", path, seed=1) == seed1


def test_how2qa_value_spaced_span_and_too_few_candidates(tmp_path):
    rec = {"vid_name": "v", "ts": "1.5 - 2", "qid": "q0", "q": "what?", "a0": "a", "a1": "b",
           "answer_idx": 1}
    path = write(tmp_path / "how2qa_val.jsonl", json.dumps(rec))
    (ex,) = load_annotations("how2qa", path)
    assert (ex.start, ex.end, ex.answer) == (1.5, 2.0, "b")
    write(path, json.dumps({k: v for k, v in rec.items() if k not in ("a1", "answer_idx")}))
    with pytest.raises(AnnotationError, match=r"line 1: field 'a1' missing \(need a0\.\.a3\)"):
        load_annotations("how2qa", path)


def test_activitynet_answer_file_name_replaces_only_the_q_suffix(tmp_path):
    q = write(tmp_path / "anetqa_val_q.json", json.dumps(ANET_Q))
    write(tmp_path / "anetqa_val_a.json", json.dumps(ANET_A))
    assert [e.answer for e in load_annotations("activitynet_qa", q)] == ["no", "red"]
