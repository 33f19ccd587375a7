"""The answer vocabulary of open-ended VideoQA: the top-K answers of the train split as labels.

Built from train only, saved and loaded as ``ans2label`` JSON ({answer: label}, labels 0..K-1), the
same file ClipBERT ships as ``*_ans2label.json``, so either side's vocabularies load in the other.

Out-of-vocabulary answers follow the literature, stated here as the ``oov`` argument of
:func:`apply_answer_vocab` rather than hidden in a loader:
- train: ``oov="drop"``: examples whose answer is not in the vocabulary are removed, as in Xu et
  al. 2017's preprocessing and Just Ask (the classifier cannot output them); the count is reported.
- val / test: ``oov="keep"``: every example stays and an OOV answer gets :data:`OOV_LABEL`; the
  classifier never predicts it, so the example counts as wrong and accuracy is over all questions,
  as ClipBERT and Xu et al. score it. Give cross-entropy ``ignore_index=OOV_LABEL``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from siasam_fast.data.annotations import normalize_answer
from siasam_fast.data.examples import QAExample

OOV_LABEL = -1
OOV_POLICIES = ("drop", "keep", "error")

log = logging.getLogger(__name__)


def build_answer_vocab(
    examples: Iterable[QAExample], top_k: int | None = None, min_count: int = 1
) -> dict[str, int]:
    """ans2label of the ``top_k`` most frequent answers (all if None) seen at least ``min_count``
    times, label 0 the most frequent. ValueError when that leaves no answer (no examples, or
    ``min_count`` above every answer's count).

    Ties in frequency are broken by the answer string (alphabetical), so the vocabulary depends
    only on the answer counts, not on file order. Pass the train split only.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1, or None for every answer")
    if min_count < 1:
        raise ValueError(f"min_count={min_count}: must be >= 1")
    counts: Counter[str] = Counter()
    for ex in examples:
        _check_open(ex)
        counts[normalize_answer(ex.answer)] += 1
    if not counts:
        raise ValueError("no examples to build the answer vocabulary from (pass the train split)")
    ranked = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
    if not ranked:  # an empty vocabulary: every train example would be dropped as OOV
        top, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        raise ValueError(
            f"data.min_answer_count={min_count}: no answer occurs {min_count} times in the "
            f"{sum(counts.values())} examples (the most frequent, {top!r}, {n} times); lower it"
        )
    return {answer: label for label, answer in enumerate(ranked[:top_k])}


def save_ans2label(ans2label: Mapping[str, int], path: str | PathLike) -> None:
    """Write ``{answer: label}`` as JSON (ClipBERT's ``*_ans2label.json`` layout)."""
    _validate(ans2label, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(ans2label.items(), key=lambda kv: kv[1]))  # label order reads well
    path.write_text(json.dumps(ordered, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


def load_ans2label(path: str | PathLike) -> dict[str, int]:
    """Read an ``ans2label`` JSON file; answers are normalised as the readers normalise them."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_no_repeats)
    except _RepeatedKey as e:
        raise ValueError(f"{path}: answer {e.args[0]!r} appears more than once (JSON keeps only "
                         "its last label); give each answer one label") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); JSON files are "
                         "UTF-8, non-ASCII answers may also be written as \\u escapes") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{answer: label}}, got {type(data)}")
    ans2label: dict[str, int] = {}
    original: dict[str, str] = {}
    for answer, label in data.items():
        key = normalize_answer(answer)
        if key in ans2label:
            raise ValueError(
                f"{path}: answers {original[key]!r} and {answer!r} both normalise to {key!r}; "
                "the vocabulary would be ambiguous"
            )
        ans2label[key], original[key] = label, answer
    _validate(ans2label, str(path))
    return ans2label


def encode_answer(answer: str, ans2label: Mapping[str, int]) -> int:
    """The label of ``answer`` (normalised first), or OOV_LABEL if it is not in the vocabulary."""
    return ans2label.get(normalize_answer(answer), OOV_LABEL)


@dataclass
class EncodedSplit:
    """Examples with their answer labels, and what the OOV policy did to get there."""

    examples: list[QAExample]
    labels: list[int]  # one per example; OOV_LABEL where the answer is out of vocabulary
    num_input: int
    num_dropped: int  # removed by oov="drop"
    num_oov_kept: int  # kept with OOV_LABEL by oov="keep"

    def summary(self) -> str:
        pct = 100.0 * (self.num_dropped + self.num_oov_kept) / max(self.num_input, 1)
        return (
            f"{self.num_input} examples, {self.num_dropped} dropped and {self.num_oov_kept} kept "
            f"as OOV ({pct:.2f}% out of vocabulary)"
        )


def apply_answer_vocab(
    examples: Iterable[QAExample], ans2label: Mapping[str, int], oov: str
) -> EncodedSplit:
    """Label every example's answer; ``oov`` says what happens to out-of-vocabulary answers:
    "drop" (train, as the literature does), "keep" with OOV_LABEL (val/test: scored as wrong),
    or "error". The counts are in the result and logged.
    """
    if oov not in OOV_POLICIES:
        raise ValueError(f"oov={oov!r}: valid policies are {', '.join(OOV_POLICIES)}")
    kept, labels, n, dropped, oov_kept = [], [], 0, 0, 0
    for ex in examples:
        n += 1
        _check_open(ex)
        label = encode_answer(ex.answer, ans2label)
        if label == OOV_LABEL:
            if oov == "error":
                raise ValueError(
                    f"qid={ex.qid!r}: answer {ex.answer!r} is not in the vocabulary "
                    f"({len(ans2label)} answers); use oov='drop' or 'keep'"
                )
            if oov == "drop":
                dropped += 1
                continue
            oov_kept += 1
        kept.append(ex)
        labels.append(label)
    result = EncodedSplit(kept, labels, n, dropped, oov_kept)
    log.info("answer vocabulary (%d answers, oov=%s): %s", len(ans2label), oov, result.summary())
    return result


def _check_open(ex: QAExample) -> None:
    if ex.task != "open":
        raise ValueError(
            f"qid={ex.qid!r}: task={ex.task!r} has no answer vocabulary; only 'open' examples "
            "are labelled by ans2label (multiple choice uses answer_index, count the number)"
        )
    if ex.answer is None:
        raise ValueError(f"qid={ex.qid!r}: no answer to put in the vocabulary")


class _RepeatedKey(Exception):
    pass


def _no_repeats(pairs: list) -> dict:
    """``object_pairs_hook`` of :func:`load_ans2label`: json keeps the last of repeated keys
    silently, which could turn a file into another valid vocabulary."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _validate(ans2label: Mapping[str, int], source: str) -> None:
    for answer, label in ans2label.items():
        if not isinstance(answer, str) or isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"{source}: entry {answer!r}: {label!r}: expected a string -> int")
    if not ans2label:
        raise ValueError(f"{source}: no answers; an answer vocabulary needs at least one")
    labels = sorted(ans2label.values())
    if labels != list(range(len(labels))):
        dup = next((a for a, b in zip(labels, labels[1:]) if a == b), None)
        problem = f"label {dup} is used twice" if dup is not None else "labels have gaps"
        raise ValueError(
            f"{source}: labels must be 0..{len(labels) - 1}, one per answer; {problem}"
        )
