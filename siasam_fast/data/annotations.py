"""Annotation readers for the paper's five VideoQA datasets: files in, ``list[QAExample]`` out.

One entry point, :func:`load_annotations`, reads every dataset in its official release format and,
where one exists, in the JSONL that ClipBERT (and VALUE, for How2QA) redistributes:

=================  ===================================  =====================================
dataset            official (``fmt="official"``)         JSONL (``fmt="clipbert"`` / ``"value"``)
=================  ===================================  =====================================
msrvtt_qa          ``{split}_qa.json`` (Xu et al. 2017)  ClipBERT ``{split}.jsonl``
msvd_qa            ``{split}_qa.json`` + mapping file    ClipBERT-style ``{split}.jsonl``
activitynet_qa     ``{split}_q.json`` + ``{split}_a.json``  -
how2qa             ``how2QA_{split}_release.csv``        VALUE JSONL
tgif_action etc.   ``{Train,Test}_{task}_question.csv``  ClipBERT ``{task}_{split}.jsonl``
=================  ===================================  =====================================

Every reader tolerates the quirks real files have (UTF-8 BOM, CRLF, no final newline, blank
lines, ``\\u00e9`` escapes, trailing spaces) and fails on a malformed record with an
:class:`AnnotationError` that names the file, the record (``record N``: 0-based index into a JSON
array) or line (``line N``: 1-based, as editors count) and the field. docs/datasets.md describes
each format in full.

Normalisation is the literature's simple one, and only that: open-ended answers are stripped,
lower-cased and inner whitespace runs collapsed (:func:`normalize_answer`); questions and candidate
answers are stripped and whitespace-collapsed but keep their case. No VQA-style punctuation or
article stripping: these datasets are scored by exact match on the official answer strings.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.manifest import VIDEO_EXTENSIONS

FORMATS = ("official", "clipbert", "value")

# Question words the literature reports per-type accuracy on (MSRVTT-QA / MSVD-QA, ClipBERT's
# ``answer_type``); any other first word becomes "other".
QUESTION_WORDS = ("what", "who", "how", "when", "where")

# ActivityNet-QA ``type`` (dataset/README.md of MILVLG/activitynet-qa): 0-2 are question types,
# 3-8 are the answer types of the "free" questions.
ACTIVITYNET_TYPES = (
    "motion",
    "spatial_relation",
    "temporal_relation",
    "yes_no",
    "color",
    "object",
    "location",
    "number",
    "other",
)

# TGIF-QA FrameQA ``type`` column: 0/1/2/3 = object/number/color/location (COCO-QA generator).
FRAMEQA_TYPES = ("object", "number", "color", "location")

TGIF_NUM_OPTIONS = 5
_VIDEO_SUFFIXES = frozenset(VIDEO_EXTENSIONS)
HOW2QA_CSV_COLUMNS = ("video_id", "timestamps", "wrong1", "wrong2", "wrong3", "question", "answer")


class AnnotationError(ValueError):
    """A malformed annotation file or record; the message names file, record/line and field."""


PathArg = str | PathLike | Sequence[str | PathLike]


def normalize_answer(answer: str) -> str:
    """The answer as compared and counted: stripped, lower-cased, inner whitespace collapsed."""
    return " ".join(str(answer).split()).lower()


def load_annotations(
    dataset: str,
    path: PathArg,
    split: str | None = None,
    fmt: str = "auto",
    **options,
) -> list[QAExample]:
    """Read one split of ``dataset`` into QAExamples.

    ``path`` is an annotation file, or a folder plus ``split`` (the release's file name is then
    looked up, e.g. ``train_qa.json``), or for ActivityNet-QA the pair (questions, answers).
    ``fmt`` is "official", "clipbert", "value" or "auto" (told apart by the file's first
    character: ``[`` JSON array, ``{`` JSONL, anything else CSV/TSV).

    Options by dataset (unknown ones raise):
      msvd_qa official: ``mapping`` = path of youtube_mapping.txt (default: looked up beside the
        annotation file and one folder up); ``mapping=False`` keeps Xu et al.'s ``vid<N>`` names.
      activitynet_qa: ``video_prefix`` (default "v_": ActivityNet videos are ``v_<youtube id>``;
        pass "" if yours are named by the bare id), ``answers_path`` (default: the ``*_a.json``
        beside the ``*_q.json``).
      how2qa official: ``shuffle_candidates`` (default True) and ``seed`` (default 0): the CSV
        always puts the correct answer last, so candidates are put in a fixed per-question random
        order (as Just Ask does) lest a model learn the position.
    """
    spec = _DATASETS.get(dataset)
    if spec is None:
        raise ValueError(f"dataset={dataset!r}: valid datasets are {', '.join(DATASETS)}")
    if fmt != "auto" and fmt not in spec.readers:
        raise ValueError(
            f"fmt={fmt!r} for {dataset}: valid formats are auto, {', '.join(spec.readers)}"
        )
    fmt, paths = _resolve(dataset, spec, path, split, fmt)
    reader = spec.readers[fmt]
    accepted = [
        p.name for p in inspect.signature(reader).parameters.values() if p.kind == p.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {dataset} ({fmt}); "
            f"valid options: {', '.join(accepted) or 'none'}"
        )
    return reader(paths, spec.subtask, **options)


# --------------------------------------------------------------------------------------------
# Locating and sniffing files


def _resolve(dataset, spec, path, split, fmt) -> tuple[str, list[Path]]:
    if isinstance(path, (str, PathLike)):
        paths = [Path(path)]
    else:
        paths = [Path(p) for p in path]
        if not paths:
            raise ValueError(f"{dataset}: no annotation path given")
    if len(paths) == 1 and paths[0].is_dir():
        fmt, found = _find_in_folder(dataset, spec, paths[0], split, fmt)
        paths = [found]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{dataset}: annotation file {p} does not exist")
    if fmt == "auto":
        fmt = _sniff_format(dataset, spec, paths[0])
    if len(paths) > 1 and not (dataset == "activitynet_qa" and len(paths) == 2):
        raise ValueError(
            f"{dataset}: expected one annotation file, got {len(paths)} "
            "(only activitynet_qa takes a (questions, answers) pair)"
        )
    return fmt, paths


def _find_in_folder(dataset, spec, folder: Path, split, fmt) -> tuple[str, Path]:
    if not split:
        raise ValueError(f"{dataset}: {folder} is a folder; pass split= to pick a file in it")
    fmts = list(spec.files) if fmt == "auto" else [fmt]
    tried, found = [], []
    for f in fmts:
        for pattern in spec.files.get(f, ()):
            name = pattern.format(split=split, Split=split.capitalize(), task=spec.subtask)
            tried.append(name)
            if (folder / name).is_file():
                found.append((f, folder / name))
                break
    if not found:
        if not tried:
            raise FileNotFoundError(
                f"{dataset} ({fmt}) has no fixed file names to look up in {folder}; "
                "pass the annotation file itself"
            )
        raise FileNotFoundError(
            f"{dataset} split={split!r}: none of {', '.join(tried)} in {folder}; "
            "or pass the annotation file itself"
        )
    if len(found) > 1:
        raise ValueError(
            f"{dataset} split={split!r}: {folder} holds "
            f"{' and '.join(f'{p.name} ({f})' for f, p in found)}; pass fmt= to choose "
            "(data.format in a config)"
        )
    return found[0]


def _sniff_format(dataset, spec, path: Path) -> str:
    first = _first_char(path)
    if not first:
        raise AnnotationError(f"{path}: file is empty")
    kind = "json_array" if first == "[" else "jsonl" if first == "{" else "text"
    fmt = spec.sniff.get(kind)
    if fmt is None:
        accepted = ", ".join(f"{f} ({_KIND_NAMES[k]})" for k, f in spec.sniff.items())
        raise AnnotationError(
            f"{path}: looks like {_KIND_NAMES[kind]} (starts with {first!r}); "
            f"{dataset} reads {accepted}"
        )
    return fmt


_KIND_NAMES = {"json_array": "a JSON array", "jsonl": "JSONL", "text": "CSV/TSV"}


def _first_char(path: Path) -> str:
    """The first non-whitespace character ('' for an empty file), without reading it all."""
    _check_not_utf16(path)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


# Byte-order marks of the encodings spreadsheet programs write as "Unicode text".
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
              (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def _check_not_utf16(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            raise AnnotationError(f"{path}: not UTF-8 text ({name}, as Excel's \"Unicode text\" "
                                  "saves it); save it as UTF-8")


def _read_text(path: Path) -> str:
    # A leading UTF-8 BOM is dropped; line ends stay as they are ("\r\n" too), so each reader's
    # own line splitting sees the real ones and line numbers stay those an editor shows.
    _check_not_utf16(path)
    data = path.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # The line of the first bad byte (a byte offset alone is no help in a 2 MB file);
        # latin-1 / cp1252 (Excel's "CSV (Comma delimited)" on Windows) are the usual culprits.
        line = len(re.split(rb"\r\n|\r|\n", data[: e.start]))
        raise AnnotationError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}: {e.reason}); "
            "save it as UTF-8"
        ) from None


# --------------------------------------------------------------------------------------------
# Record access with error context


class _Where:
    """Where a record lives, for error messages: '<file> record 17' or '<file> line 18'."""

    def __init__(self, path: Path, unit: str, index: int):
        self.path, self.unit, self.index = path, unit, index

    def __str__(self) -> str:
        return f"{self.path} {self.unit} {self.index}"


def _load_json_array(path: Path) -> list[tuple[_Where, dict]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})"
        ) from None
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON array of records, got {_typename(data)}")
    out = []
    for i, rec in enumerate(data):
        where = _Where(path, "record", i)
        if not isinstance(rec, dict):
            raise AnnotationError(f"{where}: expected a JSON object, got {_typename(rec)}")
        out.append((where, rec))
    return out


def _load_jsonl(path: Path) -> list[tuple[_Where, dict]]:
    out = []
    # split on "\n" only: str.splitlines would also break on U+2028 etc. inside JSON strings. A
    # raw CR cannot be inside a JSON string, so old Mac line ends (a lone CR) are line ends too.
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        where = _Where(path, "line", lineno)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{where} column {e.colno}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise AnnotationError(f"{where}: expected a JSON object, got {_typename(rec)}")
        out.append((where, rec))
    return out


def _load_delimited(path: Path, delimiter: str) -> list[tuple[_Where, list[str]]]:
    """Rows of a CSV/TSV with every field stripped; blank lines skipped; quotes as in Excel."""
    # skipinitialspace: a quoted field preceded by spaces ('a,  "b, c"') is still quoted. A lone
    # CR (Excel's "CSV (Macintosh)") is a line end, as editors count it; the csv module refuses it
    # unquoted. Inside a quoted field it is whitespace, which the fields collapse anyway.
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
    out, next_line = [], 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            hint = " (a quote opened and never closed?)" if "field limit" in str(e) else ""
            raise AnnotationError(f"{path} line {next_line}: {e}{hint}") from None
        start, next_line = next_line, reader.line_num + 1
        row = [field.strip() for field in row]
        if any(row):
            out.append((_Where(path, "line", start), row))
    return out


def _typename(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


_MISSING = object()


def _field(where, rec: dict, name: str, kind: str = "str", default=_MISSING):
    """rec[name] checked against ``kind``: "str" (non-empty after stripping), "int", "text"."""
    value = rec.get(name, _MISSING)
    # An empty CSV cell counts as absent for optional fields.
    blank = isinstance(value, str) and not value.strip()
    if value is _MISSING or value is None or (blank and default is not _MISSING):
        if default is not _MISSING:
            return default
        raise AnnotationError(f"{where}: field {name!r} missing")
    if kind == "int":
        if isinstance(value, bool):
            raise AnnotationError(f"{where}: field {name!r} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise AnnotationError(f"{where}: field {name!r} must be an integer, got {value!r}")
    # Answers/ids stored as JSON numbers are legal data (e.g. "answer": 2); take them as text.
    if isinstance(value, float) and not math.isfinite(value):  # (Python's json reads NaN)
        raise AnnotationError(f"{where}: field {name!r} must be a string, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 2.0 -> "2", the answer written as 2 (as a count's)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise AnnotationError(f"{where}: field {name!r} must be a string, got {_typename(value)}")
    value = " ".join(value.split())
    if not value:
        raise AnnotationError(f"{where}: field {name!r} is empty")
    return value


def _row_dict(where, header: list[str], row: list[str]) -> dict:
    if len(row) < len(header):
        raise AnnotationError(
            f"{where}: {len(row)} fields, the header has {len(header)}: "
            f"field {header[len(row)]!r} missing"
        )
    extra = [v for v in row[len(header) :] if v]
    if extra:
        raise AnnotationError(
            f"{where}: {len(row)} fields, the header has {len(header)} ({header}); "
            f"unexpected {extra[0]!r}"
        )
    return dict(zip(header, row))


def _question_word(question: str) -> str:
    m = re.match(r"[a-z]+", question.lower())
    return m.group(0) if m and m.group(0) in QUESTION_WORDS else "other"


def _answer_index(where, value: int, n: int, name: str) -> int:
    if not 0 <= value < n:
        raise AnnotationError(f"{where}: field {name!r} = {value} out of range 0..{n - 1}")
    return value


def _count_answer(where, value: int, name: str = "answer") -> str:
    if value < 0:
        raise AnnotationError(f"{where}: field {name!r} = {value} is not a count (>= 0)")
    return str(value)


# --------------------------------------------------------------------------------------------
# MSRVTT-QA / MSVD-QA (Xu et al., ACM MM 2017)


def _read_msrvtt_official(paths, subtask) -> list[QAExample]:
    out = []
    for where, rec in _load_json_array(paths[0]):
        vid = _field(where, rec, "video_id", "int")
        question = _field(where, rec, "question")
        extra = {}
        if "category_id" in rec:
            # The MSR-VTT video category of the clip, not a question type.
            extra["category_id"] = _field(where, rec, "category_id", "int")
        out.append(
            QAExample(
                qid=_field(where, rec, "id"),
                video_id=f"video{vid}",  # MSR-VTT ships video0.mp4 ... video9999.mp4
                question=question,
                answer=normalize_answer(_field(where, rec, "answer")),
                question_type=_question_word(question),
                extra=extra,
            )
        )
    return out


def _read_msvd_official(paths, subtask, *, mapping: str | PathLike | bool | None = None):
    records = _load_json_array(paths[0])
    id_to_clip, mapping_path = None, None
    if mapping is not False:
        id_to_clip, mapping_path = _load_youtube_mapping(paths[0], mapping)
    out = []
    for where, rec in records:
        vid = _field(where, rec, "video_id", "int")
        if id_to_clip is None:
            video_id = f"vid{vid}"
        elif vid in id_to_clip:
            video_id = id_to_clip[vid]
        else:
            raise AnnotationError(
                f"{where}: field 'video_id' = {vid} has no line 'vid{vid}' in {mapping_path}"
            )
        question = _field(where, rec, "question")
        out.append(
            QAExample(
                qid=_field(where, rec, "id"),
                video_id=video_id,
                question=question,
                answer=normalize_answer(_field(where, rec, "answer")),
                question_type=_question_word(question),
            )
        )
    return out


def _load_youtube_mapping(annotation: Path, mapping) -> tuple[dict[int, str], Path]:
    """youtube_mapping.txt: '<clip name> vid<N>' per line; MSVD-QA's video_id N is 1-based."""
    if mapping is None or mapping is True:
        candidates = [annotation.parent / "youtube_mapping.txt"]
        candidates.append(annotation.parent.parent / "youtube_mapping.txt")
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"msvd_qa needs youtube_mapping.txt to turn video ids into clip names; not in "
                f"{' or '.join(str(c.parent) for c in candidates)}; set data.options.mapping to "
                "its path (mapping=PATH in Python), or to false (mapping=False) to keep "
                "'vid<N>' names"
            )
        path = found[0]
    else:
        path = Path(mapping)
        if path.is_dir():
            raise FileNotFoundError(f"msvd_qa: mapping {path} is a folder; give the file, e.g. "
                                    f"{path / 'youtube_mapping.txt'}")
        if not path.is_file():
            raise FileNotFoundError(f"msvd_qa: mapping file {path} does not exist")
    table: dict[int, str] = {}
    where: dict[int, int] = {}
    lines = _read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        m = re.fullmatch(r"vid(\d+)", parts[-1]) if len(parts) == 2 else None
        if m is None:
            raise AnnotationError(
                f"{path} line {lineno}: expected '<clip name> vid<N>', got {line.strip()!r}"
            )
        vid, clip = int(m.group(1)), parts[0]
        if Path(clip).suffix.lower() in _VIDEO_SUFFIXES:  # video ids carry no extension
            clip = clip[: -len(Path(clip).suffix)]
        if vid in table:
            raise AnnotationError(
                f"{path} line {lineno}: vid{vid} already maps to {table[vid]!r} (line "
                f"{where[vid]}); each vid<N> must map to one clip")
        table[vid], where[vid] = clip, lineno
    return table, path


def _read_open_jsonl(paths, subtask) -> list[QAExample]:
    """ClipBERT msrvtt_qa JSONL: {video_id, question, answer, answer_type}; also used for MSVD."""
    out = []
    for where, rec in _load_jsonl(paths[0]):
        question = _field(where, rec, "question")
        out.append(
            QAExample(
                qid=_field(where, rec, "question_id", default=f"{paths[0].stem}-{len(out)}"),
                video_id=_field(where, rec, "video_id"),
                question=question,
                answer=normalize_answer(_field(where, rec, "answer")),
                question_type=_field(where, rec, "answer_type", default=_question_word(question)),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# ActivityNet-QA (Yu et al., AAAI 2019)


def _read_activitynet_official(
    paths, subtask, *, video_prefix: str = "v_", answers_path: str | PathLike | None = None
):
    if not isinstance(video_prefix, str):
        raise ValueError(
            f"activitynet_qa: video_prefix={video_prefix!r}: must be text, \"v_\" (the default, "
            "for ActivityNet's v_<youtube id> files) or \"\" (files named by the bare id)"
        )
    q_path = paths[0]
    if len(paths) == 2:
        if answers_path is not None:
            raise ValueError("activitynet_qa: answers given twice (path pair and answers_path)")
        a_path = paths[1]
    elif answers_path is not None:
        a_path = Path(answers_path)
    elif q_path.name.endswith("_q.json"):
        a_path = q_path.with_name(q_path.name[: -len("_q.json")] + "_a.json")
    else:
        raise ValueError(
            f"activitynet_qa: cannot tell the answer file of {q_path} (expected a *_q.json "
            "name); pass (questions, answers) or answers_path= (in a config, where each split "
            "reads its file alone: name the files <split>_q.json and <split>_a.json, or set "
            "data.options.answers_path, which every split then reads)"
        )
    if not a_path.is_file():
        raise FileNotFoundError(f"activitynet_qa: answer file {a_path} does not exist")

    answers: dict[str, tuple[_Where, dict]] = {}
    for where, rec in _load_json_array(a_path):
        qid = _field(where, rec, "question_id")
        if qid in answers:
            raise AnnotationError(
                f"{where}: question_id {qid!r} already answered at {answers[qid][0]}"
            )
        answers[qid] = (where, rec)

    questions = _load_json_array(q_path)
    if questions and "question" not in questions[0][1] and "answer" in questions[0][1]:
        raise AnnotationError(
            f"{questions[0][0]}: an answer record where questions were expected: the files are "
            f"swapped? Give (questions, answers): ({a_path.name}, {q_path.name})")
    out, seen = [], set()
    for where, rec in questions:
        qid = _field(where, rec, "question_id")
        if qid in seen:
            raise AnnotationError(f"{where}: question_id {qid!r} appears twice in {q_path}")
        seen.add(qid)
        if qid not in answers:
            raise AnnotationError(f"{where}: question_id {qid!r} has no answer in {a_path}")
        a_where, a_rec = answers[qid]
        qtype = _field(a_where, a_rec, "type", "int")
        if not 0 <= qtype < len(ACTIVITYNET_TYPES):
            raise AnnotationError(
                f"{a_where}: field 'type' = {qtype} out of range 0..{len(ACTIVITYNET_TYPES) - 1}"
            )
        out.append(
            QAExample(
                qid=qid,
                video_id=video_prefix + _field(where, rec, "video_name"),
                question=_field(where, rec, "question"),
                answer=normalize_answer(_field(a_where, a_rec, "answer")),
                question_type=ACTIVITYNET_TYPES[qtype],
                extra={"type": qtype},
            )
        )
    orphans = [qid for qid in answers if qid not in seen]
    if orphans:
        where = answers[orphans[0]][0]
        raise AnnotationError(
            f"{where}: question_id {orphans[0]!r} has no question in {q_path} "
            f"({len(orphans)} answer(s) without a question)"
        )
    return out


# --------------------------------------------------------------------------------------------
# How2QA (Li et al., HERO, EMNLP 2020)


def _read_how2qa_official(paths, subtask, *, shuffle_candidates: bool = True, seed: int = 0):
    """how2QA_*_release.csv, no header: video id, [start:end], 3 wrong answers, question, answer."""
    out = []
    for where, row in _load_delimited(paths[0], ","):
        if len(row) != len(HOW2QA_CSV_COLUMNS):
            raise AnnotationError(
                f"{where}: {len(row)} fields, expected {len(HOW2QA_CSV_COLUMNS)} "
                f"({', '.join(HOW2QA_CSV_COLUMNS)})"
            )
        rec = dict(zip(HOW2QA_CSV_COLUMNS, row))
        if not out and not re.search(r"\d", rec["timestamps"]):
            raise AnnotationError(
                f"{where}: {rec['timestamps']!r} is not a time span like [7.2:18.0]; the "
                "official How2QA CSV has no header row: remove it if this is one")
        m = re.fullmatch(r"\[\s*([0-9.]+)\s*:\s*([0-9.]+)\s*\]", rec["timestamps"])
        start, end = _segment(where, "timestamps", rec["timestamps"], m)
        candidates = [_field(where, rec, k) for k in ("wrong1", "wrong2", "wrong3", "answer")]
        qid = f"{paths[0].stem}-{len(out)}"  # the CSV has no question id
        order = list(range(len(candidates)))
        if shuffle_candidates:
            # str seeds are hashed with SHA-512 by random.Random: the same order on every run.
            random.Random(f"{seed}:{qid}").shuffle(order)
        candidates = [candidates[i] for i in order]
        answer_index = order.index(3)
        out.append(
            QAExample(
                qid=qid,
                video_id=_field(where, rec, "video_id"),
                question=_field(where, rec, "question"),
                task="mc",
                answer=candidates[answer_index],
                candidates=candidates,
                answer_index=answer_index,
                start=start,
                end=end,
            )
        )
    return out


def _segment(where, name, text, match) -> tuple[float, float]:
    try:
        start, end = float(match.group(1)), float(match.group(2))
    except (AttributeError, ValueError):
        raise AnnotationError(
            f"{where}: field {name!r} = {text!r} is not a time span like "
            f"{'[7.2:18.0]' if name == 'timestamps' else '36.58-58.52'}"
        ) from None
    if end < start:
        raise AnnotationError(f"{where}: field {name!r} = {text!r} ends before it starts")
    return start, end


def _read_how2qa_value(paths, subtask) -> list[QAExample]:
    """VALUE/HERO JSONL: {vid_name, ts "36.58-58.52", qid, q, a0..a3, answer_idx}."""
    out = []
    for where, rec in _load_jsonl(paths[0]):
        candidates = []
        while f"a{len(candidates)}" in rec:
            candidates.append(_field(where, rec, f"a{len(candidates)}"))
        if len(candidates) < 2:
            raise AnnotationError(f"{where}: field 'a{len(candidates)}' missing (need a0..a3)")
        if out and len(candidates) != len(out[0].candidates):
            raise AnnotationError(
                f"{where}: {len(candidates)} candidates (a0..a{len(candidates) - 1}), but the "
                f"file's first record has {len(out[0].candidates)}; every question needs the "
                "same number")
        # answer_idx is absent in hidden-label test files: such examples carry no answer.
        answer_index = _field(where, rec, "answer_idx", "int", default=None)
        if answer_index is not None:
            _answer_index(where, answer_index, len(candidates), "answer_idx")
        start = end = None
        ts = _field(where, rec, "ts", default=None)
        if ts is not None:
            m = re.fullmatch(r"([0-9.]+)\s*-\s*([0-9.]+)", ts)
            start, end = _segment(where, "ts", ts, m)
        out.append(
            QAExample(
                qid=_field(where, rec, "qid"),
                video_id=_field(where, rec, "vid_name"),
                question=_field(where, rec, "q"),
                task="mc",
                answer=None if answer_index is None else candidates[answer_index],
                candidates=candidates,
                answer_index=answer_index,
                start=start,
                end=end,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# TGIF-QA (Jang et al., CVPR 2017)

_TGIF_COLUMNS = {
    "action": ("gif_name", "question", "a1", "a2", "a3", "a4", "a5", "answer"),
    "transition": ("gif_name", "question", "a1", "a2", "a3", "a4", "a5", "answer"),
    "frameqa": ("gif_name", "question", "answer", "type"),
    "count": ("gif_name", "question", "answer"),
}


def _read_tgif_official(paths, subtask) -> list[QAExample]:
    """{Train,Test}_{task}_question.csv: tab-separated despite the name, with a header row."""
    rows = _load_delimited(paths[0], "\t")
    if not rows:
        raise AnnotationError(f"{paths[0]}: no header row")
    header_where, header = rows[0]
    _check_tgif_task(header_where, subtask, set(header))
    missing = [c for c in _TGIF_COLUMNS[subtask] if c not in header]
    if missing:
        hint = (" (TGIF-QA's official files are tab-separated, this one is not)"
                if len(header) == 1 and "," in header[0] else "")
        raise AnnotationError(
            f"{header_where}: header lacks column(s) {', '.join(map(repr, missing))} needed "
            f"for tgif_{subtask} (header: {', '.join(header)}){hint}"
        )
    out = []
    for where, row in rows[1:]:
        rec = _row_dict(where, header, row)
        _check_tgif_vid_id(where, subtask, rec.get("vid_id"))
        out.append(_tgif_example(where, rec, subtask, f"{paths[0].stem}-{len(out)}", official=True))
    return out


# The official files number each question by task (ACTION4, TRANS24, FRAMEQA1159, COUNT12). The
# action and transition files have the same columns, so this prefix is what tells them apart.
_TGIF_VID_ID_TASKS = {"ACTION": "action", "TRANS": "transition", "FRAMEQA": "frameqa",
                      "COUNT": "count"}


def _check_tgif_vid_id(where, subtask: str, vid_id) -> None:
    m = re.fullmatch(r"\s*([A-Z]+)\d+\s*", vid_id) if isinstance(vid_id, str) else None
    task = _TGIF_VID_ID_TASKS.get(m.group(1)) if m else None
    if task is not None and task != subtask:
        raise AnnotationError(
            f"{where}: field 'vid_id' = {vid_id.strip()!r} is a tgif_{task} question, not "
            f"tgif_{subtask} (the official files number each question by task): set "
            f"data.dataset to tgif_{task}, or point data.train / val / test at the "
            f"{subtask} files")


def _read_tgif_clipbert(paths, subtask) -> list[QAExample]:
    out = []
    for where, rec in _load_jsonl(paths[0]):
        _check_tgif_task(where, subtask, set(rec))
        out.append(
            _tgif_example(where, rec, subtask, f"{paths[0].stem}-{len(out)}", official=False)
        )
    return out


# Fields that only another TGIF-QA task's files have: the count and frameqa columns are a subset
# of the others', so without this check their readers take an action file's option index (or a
# frameqa word) for the answer.
_TGIF_FOREIGN = {
    "count": {"a1": "tgif_action or tgif_transition", "options": "tgif_action or tgif_transition",
              "type": "tgif_frameqa", "answer_type": "tgif_frameqa"},
    "frameqa": {"a1": "tgif_action or tgif_transition",
                "options": "tgif_action or tgif_transition"},
}


def _check_tgif_task(where, subtask: str, names: set) -> None:
    for name, dataset in _TGIF_FOREIGN.get(subtask, {}).items():
        if name in names:
            raise AnnotationError(
                f"{where}: field {name!r} belongs to {dataset} files, not tgif_{subtask}: "
                f"set data.dataset to {dataset}")


def _tgif_example(where, rec: dict, subtask: str, fallback_qid: str, official: bool) -> QAExample:
    # The official files' vid_id (ACTION4, FRAMEQA1159, ...) is one id per question.
    qid = _field(where, rec, "vid_id" if official else "question_id", default=fallback_qid)
    common = dict(
        qid=qid,
        video_id=_field(where, rec, "gif_name"),
        question=_field(where, rec, "question"),
    )
    extra = {"key": rec["key"]} if official and rec.get("key") else {}
    if subtask in ("action", "transition"):
        if official:
            candidates = [_field(where, rec, f"a{i}") for i in range(1, TGIF_NUM_OPTIONS + 1)]
        else:
            options = rec.get("options")
            if options is None:
                raise AnnotationError(f"{where}: field 'options' missing")
            if not isinstance(options, list) or len(options) != TGIF_NUM_OPTIONS:
                raise AnnotationError(
                    f"{where}: field 'options' must be a list of {TGIF_NUM_OPTIONS} strings, "
                    f"got {_typename(options)}"
                    + (f" of {len(options)}" if isinstance(options, list) else "")
                )
            candidates = [_field(where, {f"options[{i}]": o}, f"options[{i}]")
                          for i, o in enumerate(options)]
        idx = _answer_index(where, _field(where, rec, "answer", "int"), len(candidates), "answer")
        return QAExample(
            **common,
            task="mc",
            answer=candidates[idx],
            candidates=candidates,
            answer_index=idx,
            extra=extra,
        )
    if subtask == "count":
        answer = _count_answer(where, _field(where, rec, "answer", "int"))
        return QAExample(**common, task="count", answer=answer, question_type="count", extra=extra)
    # frameqa: open-ended
    if official:
        t = _answer_index(where, _field(where, rec, "type", "int"), len(FRAMEQA_TYPES), "type")
        qtype = FRAMEQA_TYPES[t]
    else:
        qtype = _field(where, rec, "answer_type", default="")
    answer = normalize_answer(_field(where, rec, "answer"))
    return QAExample(**common, answer=answer, question_type=qtype, extra=extra)


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Spec:
    subtask: str
    readers: dict[str, Callable]  # fmt -> reader(paths, subtask, **options)
    sniff: dict[str, str]  # what the file looks like -> fmt
    files: dict[str, tuple[str, ...]]  # fmt -> release file names in a folder


def _tgif_spec(subtask: str) -> _Spec:
    return _Spec(
        subtask=subtask,
        readers={"official": _read_tgif_official, "clipbert": _read_tgif_clipbert},
        sniff={"text": "official", "jsonl": "clipbert"},
        files={
            "official": ("{Split}_{task}_question.csv",),
            "clipbert": ("{task}_{split}.jsonl",),
        },
    )


_DATASETS: dict[str, _Spec] = {
    "msrvtt_qa": _Spec(
        subtask="msrvtt_qa",
        readers={"official": _read_msrvtt_official, "clipbert": _read_open_jsonl},
        sniff={"json_array": "official", "jsonl": "clipbert"},
        files={
            "official": ("{split}_qa.json",),
            "clipbert": ("{split}.jsonl", "msrvtt_qa_{split}.jsonl"),
        },
    ),
    "msvd_qa": _Spec(
        subtask="msvd_qa",
        readers={"official": _read_msvd_official, "clipbert": _read_open_jsonl},
        sniff={"json_array": "official", "jsonl": "clipbert"},
        files={"official": ("{split}_qa.json",), "clipbert": ("{split}.jsonl",)},
    ),
    "activitynet_qa": _Spec(
        subtask="activitynet_qa",
        readers={"official": _read_activitynet_official},
        sniff={"json_array": "official"},
        files={"official": ("{split}_q.json",)},
    ),
    "how2qa": _Spec(
        subtask="how2qa",
        readers={"official": _read_how2qa_official, "value": _read_how2qa_value},
        sniff={"text": "official", "jsonl": "value"},
        # VALUE's JSONL names are not fixed by a public release we could check: pass the file.
        files={"official": ("how2QA_{split}_release.csv",)},
    ),
    "tgif_action": _tgif_spec("action"),
    "tgif_transition": _tgif_spec("transition"),
    "tgif_frameqa": _tgif_spec("frameqa"),
    "tgif_count": _tgif_spec("count"),
}

DATASETS = tuple(_DATASETS)
