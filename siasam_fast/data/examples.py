"""The one record every annotation reader produces and every pipeline consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TASKS = ("open", "mc", "count")


@dataclass
class QAExample:
    """One (video, question) pair.

    ``task`` is "open" (answer from a vocabulary), "mc" (pick one of ``candidates``; the correct
    one is ``answer_index``) or "count" (``answer`` holds the integer as text). ``video_id`` is the
    key into the video manifest: the video's file name without extension (``video7010``,
    ``-4wsuPCjDBc_5_15``, ``tumblr_nk172bbdPI1u1lr18o1_250``). ``start`` / ``end`` (seconds) limit
    the video to a segment when the dataset gives one (How2QA); None means the whole video.
    """

    qid: str
    video_id: str
    question: str
    task: str = "open"
    answer: str | None = None
    candidates: list[str] | None = None
    answer_index: int | None = None
    question_type: str = ""
    start: float | None = None
    end: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: valid tasks are {', '.join(TASKS)}")

    def to_dict(self) -> dict:
        return asdict(self)
