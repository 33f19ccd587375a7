"""The VideoQA loader: QA examples + video manifest -> batches of de-duplicated frames (DESIGN 4).

Each example's clips come from the one sampling function (``sample_siamese_clips`` with
``example_rng(seed, epoch, example_index)`` for training, ``sample_eval_clips`` otherwise); the
sorted unique frames U of the clips are decoded once and transformed once; clips are positions into
U. Examples whose video is missing or corrupt in the manifest, or that the sampler's short-video
policy skips, are dropped when the dataset is built (logged with counts and reasons), never at
decode time.

Batch contract (every backend yields it; the model consumes it). V videos in the batch, U_max the
largest unique-frame count, N clips, B_max the largest frames-per-clip, S = image_size:

==================  ==========================  ==============================================
key                 type, shape                 meaning
==================  ==========================  ==============================================
``frames``          float [V, U_max, 3, S, S]   each video's unique frames in increasing frame
                                                order, normalised (transforms.py); zeros past
                                                ``num_unique[v]``
``num_unique``      long [V]                    unique frames per video
``clip_index``      long [V, N, B_max]          position in the U axis of clip n's frame b;
                                                0 where ``frame_mask`` is False
``frame_mask``      bool [V, N, B_max]          real frames (B varies per video when the config
                                                gives a range of B: the tail is padding)
``clip_mask``       bool [V, N]                 real clips (all True unless N varies)
``frame_ids``       long [V, N, B_max]          original frame numbers in the video (manifest
                                                numbering: presentation order); -1 at padding
``clips``           float [V, N, B_max, 3,S,S]  only with ``output="clips"``:
                                                ``frames[v, clip_index[v, n, b]]``, zeros at
                                                padding
``example_index``   long [V]                    index into the ``examples`` given to the loader
``answer_index``    long [V]                    correct candidate (mc), -1 if unknown
``label``           long [V]                    ``label_fn(example)``, -1 without a label_fn
``count``           float [V]                   the count answer (count task), NaN otherwise
``stand_in``        bool [V]                    a stand-in for an example whose video failed
                                                at decode time (below)
``video_id``, ``qid``, ``question``, ``question_type``, ``task``, ``answer``: lists of str [V];
``candidates``: list [V] of lists of str (empty unless mc)
==================  ==========================  ==============================================

Videos that fail at decode time (changed, deleted or damaged since the manifest was built) do not
stop a run and do not shrink a batch: the example is replaced by a stand-in, the next example of
the dataset (wrapping around) whose video decodes, marked ``stand_in``, with a warning naming the
failed file. Every rank thus yields the same number of equal batches (a rank that yielded fewer
would hang the others' collectives). The stand-in does not depend on what the process met before
(so not on ``num_workers`` or a resume): files whose size differs from the manifest's are passed
over, other candidates are decoded. Evaluation scores each example once by ``example_index``, so a
stand-in adds no question and the failed one is left out of ``num_examples``. The loader raises
when ``STAND_IN_TRIES`` videos in a row fail for one example, or when more than
``STAND_IN_MAX_SHARE`` of the dataset's videos failed: the fault is then not a few files', and
``siasam-fast index`` must run again.

Clip 0 is the anchor clip (training) or the first evaluation clip. With ``dedup=False`` every clip
is decoded on its own (overlapping frames decoded again: the baseline the benchmarks compare
against); the contract is the same with U = N * B (``clip_index`` is then ``arange``).
"""

from __future__ import annotations

import functools
import logging
import math
import unicodedata
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.manifest import VIDEO_EXTENSIONS, VideoRecord
from siasam_fast.pipeline.pyav_decode import (
    DEFAULT_SEEK_THRESHOLD,
    DecodeError,
    decode_frames,
    file_change,
)
from siasam_fast.pipeline.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_fit,
    frame_resizer,
    normalize,
)
from siasam_fast.sampling import (
    ClipIndices,
    SamplingConfig,
    example_rng,
    sample_eval_clips,
    sample_siamese_clips,
)
from siasam_fast.stopping import defer_stop_signals as _defer_stop_signals

logger = logging.getLogger(__name__)

TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("val", "test", "eval")
OUTPUTS = ("frames", "clips")
BACKENDS = ("pyav",)  # implemented here
OTHER_BACKENDS = ("dali", "auto")  # built by siasam_fast.pipeline.loaders
# Videos decoded for one example, the failed one included, before a loader gives up.
STAND_IN_TRIES = 16
# The share of the dataset's videos that may fail at decode time before a loader gives up.
STAND_IN_MAX_SHARE = 0.1


@dataclass
class VideoPlan:
    """What one item reads: its example, its video and the clips' frame indices in that video."""

    position: int  # position in the dataset
    example_index: int  # index into the examples given to the dataset
    example: QAExample
    record: VideoRecord
    clips: ClipIndices  # frame indices already shifted to the example's segment


class VideoQADataset(Dataset):
    """Map-style dataset over QA examples whose videos are ``ok`` in the manifest.

    An item key is a position, or ``(epoch, position)`` as :class:`ShardedSampler` yields with
    ``with_epoch=True`` (persistent DataLoader workers never see ``set_epoch`` on their copy of
    the dataset, so the epoch travels with the key).
    """

    def __init__(
        self,
        examples: Sequence[QAExample],
        manifest: dict[str, VideoRecord],
        sampling_cfg: SamplingConfig | dict,
        split: str = "train",
        image_size: int = 224,
        seed: int = 0,
        dedup: bool = True,
        label_fn: Callable[[QAExample], int] | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        dtype: torch.dtype = torch.float32,
        seek_threshold: int = DEFAULT_SEEK_THRESHOLD,
        decode_threads: int = 1,
        frame_fit: str = "crop",
    ) -> None:
        if isinstance(sampling_cfg, dict):
            sampling_cfg = SamplingConfig.from_dict(sampling_cfg)
        if split not in TRAIN_SPLITS + EVAL_SPLITS:
            raise ValueError(
                f"split={split!r}: valid splits are {', '.join(TRAIN_SPLITS + EVAL_SPLITS)} "
                "(train samples siamese clips, the others evaluation clips)"
            )
        if image_size < 1:
            raise ValueError(f"image_size={image_size}: must be >= 1")
        self.examples = list(examples)
        self.manifest = manifest
        self.cfg = sampling_cfg
        self.split = split
        self.training = split in TRAIN_SPLITS
        self.image_size = int(image_size)
        # how a frame becomes S x S (transforms.py): "crop" (centre crop) or "pad" (ClipBERT's)
        self.frame_fit = check_fit(frame_fit)
        self.seed = int(seed)
        self.dedup = bool(dedup)
        self.label_fn = label_fn
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype
        self.seek_threshold = int(seek_threshold)
        self.decode_threads = int(decode_threads)
        self.epoch = 0
        self.failed: dict[str, str] = {}  # path -> why, videos that failed at decode time here
        self.stand_ins = 0  # stand-ins this process's copy gave (a worker's, or the only one)
        self._filter()
        self.num_videos = len({record.path for record in self.records})

    # -- construction-time filtering ------------------------------------------------------------

    def _filter(self) -> None:
        by_name: dict[str, str | None] = {}
        for vid in self.manifest:  # fallback lookup by file name for nested video folders
            name = vid.rsplit("/", 1)[-1]
            by_name[name] = None if name in by_name else vid
        lookup = _VideoLookup(self.manifest, by_name)
        skip_memo: dict[int, str] = {}
        overrun: list = []  # (example, record): a segment ending well after its video
        self.indices: list[int] = []  # example index of each position
        self.records: list[VideoRecord] = []
        self.segments: list[tuple[int, int]] = []  # (first frame, frame count) per position
        self.dropped: list[tuple[int, str, str]] = []  # (example index, qid, reason)
        self.overlapping_eval_videos = 0  # evaluation: videos (segments) whose clips overlap
        for i, ex in enumerate(self.examples):
            record = lookup.find(ex.video_id)
            if record is None:
                self.dropped.append((i, ex.qid, lookup.why_missing(ex.video_id)))
                continue
            if not record.ok:
                self.dropped.append((i, ex.qid, f"video corrupt: {_first(record.reason)}"))
                continue
            segment = segment_frames(ex, record)
            if isinstance(segment, str):
                self.dropped.append((i, ex.qid, segment))
                continue
            count = segment[1]
            if count not in skip_memo:  # skipping depends on the frame count only
                skip_memo[count] = self._skip_reason(count)
            if skip_memo[count]:
                self.dropped.append((i, ex.qid, f"sampler skipped: {skip_memo[count]}"))
                continue
            self.indices.append(i)
            self.records.append(record)
            self.segments.append(segment)
            if ex.end is not None and 0 < record.duration < ex.end - SEGMENT_OVERRUN_S:
                overrun.append((ex, record))
        self.drop_reasons = Counter(_reason_kind(r) for _, _, r in self.dropped)
        self._warn_overlapping_eval_clips()
        if overrun:  # kept (a segment cut at the video's end), but said: a shorter download
            ex, record = overrun[0]  # than the annotated one answers from what it has
            logger.warning(
                "%s: %d question(s) have a segment ending more than %g s after their video's end "
                "(e.g. qid %s, video %r: [%s s, %s s] of a %.2f s video); each is cut at the "
                "video's end: a video shorter than the annotated one (another download?) is "
                "asked about content it may lack", self.split, len(overrun),
                SEGMENT_OVERRUN_S, ex.qid, ex.video_id, ex.start, ex.end, record.duration)
        self.segments_past_end = len(overrun)
        if self.dropped:
            # each kind with its first question, video and full reason: the kind alone ("sampler
            # skipped", "video missing from the manifest") does not say which id or limit failed
            first: dict[str, tuple[int, str, str]] = {}
            for drop in self.dropped:
                first.setdefault(_reason_kind(drop[2]), drop)
            logger.warning(
                "%s: kept %d of %d examples; dropped %d: %s",
                self.split,
                len(self.indices),
                len(self.examples),
                len(self.dropped),
                ", ".join(f"{n} {k} ({_drop_example(self.examples, first[k], k)})"
                          for k, n in self.drop_reasons.most_common()),
            )
        else:
            logger.info("%s: kept all %d examples", self.split, len(self.indices))

    def _warn_overlapping_eval_clips(self) -> None:
        """Evaluation asks for ``eval_clips`` clips per video, one per equal segment; a video with
        segments shorter than a clip gets clips that share frames (nothing is dropped: the clips
        are still valid input, just not distinct). Says how many videos (How2QA: video segments)
        that hits, each counted once however many questions it has, and how many questions."""
        if self.training or self.cfg.eval_clips <= 1 or not self.segments:
            return
        memo: dict[int, bool] = {}
        clips_of, short = set(), set()  # (video, first frame, frame count): what gets the clips
        questions = 0
        for record, (first, count) in zip(self.records, self.segments):
            if count not in memo:
                clips = sample_eval_clips(count, self.cfg)
                memo[count] = clips.unique.size < clips.clips.size
            clips_of.add((record.video_id, first, count))
            if memo[count]:
                short.add((record.video_id, first, count))
                questions += 1
        if short:
            whole = all(count == record.num_frames
                        for record, (_, count) in zip(self.records, self.segments))
            logger.warning(
                "%s: eval.num_clips=%d: %d of %d %s are too short for %d clips without shared "
                "frames (%d of %d questions; shortest: %d frames); their clips overlap",
                self.split, self.cfg.eval_clips, len(short), len(clips_of),
                "videos" if whole else "video segments", self.cfg.eval_clips, questions,
                len(self.segments), min(count for _, _, count in short),
            )
        self.overlapping_eval_videos = len(short)

    def _skip_reason(self, num_frames: int) -> str:
        if self.training:
            clips = sample_siamese_clips(num_frames, self.cfg, example_rng(0, 0, 0))
        else:
            clips = sample_eval_clips(num_frames, self.cfg)
        return clips.reason if clips.skipped else ""

    # -- items ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for integer keys (in the main process; workers get it with the key)."""
        self.epoch = int(epoch)

    def plan(self, key: int | tuple[int, int]) -> VideoPlan:
        """The example, video and frame indices of one item, without decoding anything."""
        epoch, position = key if isinstance(key, tuple) else (self.epoch, key)
        position = int(position)
        if not 0 <= position < len(self.indices):
            raise IndexError(f"position {position} out of range: the dataset has {len(self)} items")
        index = self.indices[position]
        first, count = self.segments[position]
        if self.training:
            clips = sample_siamese_clips(
                count, self.cfg, example_rng(self.seed, epoch, index),
                keyframes=np.subtract(self.records[position].keyframes, first),  # segment numbering
            )
        else:
            clips = sample_eval_clips(count, self.cfg)
        if first:
            clips.clips = clips.clips + first
            clips.unique = clips.unique + first
            clips.starts = clips.starts + first
            clips.anchor_start += first
        return VideoPlan(position, index, self.examples[index], self.records[position], clips)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, position = key if isinstance(key, tuple) else (self.epoch, key)
        plan = self.plan((epoch, position))
        try:
            return self._decode(plan)
        except DecodeError as err:
            self._failed(plan.record.path, err)
        # Whatever this process met before, the same stand-in: files whose size no longer matches
        # the manifest are passed over (a stat, the same answer everywhere), every other
        # candidate is decoded, and only those decodes count as tries.
        tried = {plan.record.path}
        for candidate in stand_in_positions(position, len(self)):
            record = self.records[candidate]
            if record.path in tried:
                continue
            changed = file_change(record.path, record.size)
            if changed:
                self._failed(record.path, changed)
                continue
            if len(tried) >= STAND_IN_TRIES:
                break
            tried.add(record.path)
            stand_in = self.plan((epoch, candidate))
            try:
                item = self._decode(stand_in)
            except DecodeError as err:
                self._failed(stand_in.record.path, err)
                continue
            item["stand_in"] = True
            self.stand_ins += 1
            return item
        raise DecodeError(no_stand_in(plan.record.path, len(tried), self.failed))

    def _failed(self, path: str, err: Exception | str) -> None:
        reason = str(err).removeprefix(f"{path}: ")
        if path not in self.failed:
            logger.warning("video %s failed (%s): its examples get stand-ins", path, reason)
        self.failed[path] = reason
        check_failed_share(self.failed, self.num_videos, "this loader process")

    def _decode(self, plan: VideoPlan) -> dict:
        ci = plan.clips
        # Each frame resized and cropped (or padded) as it is decoded (transforms.frame_resizer),
        # then the small frames normalised together: what video_transform gives the stacked
        # full-size frames, value for value.
        resize = frame_resizer(self.image_size, self.frame_fit)
        if self.dedup:
            small = decode_frames(
                plan.record,
                ci.unique,
                seek_threshold=self.seek_threshold,
                threads=self.decode_threads,
                convert=resize,
            )
            clip_index = torch.from_numpy(ci.inverse)
        else:  # baseline: every clip decoded on its own, overlapping frames decoded again
            small = [f for clip in ci.clips for f in self._decode_clip(plan.record, clip, resize)]
            clip_index = torch.arange(ci.clips.size, dtype=torch.long).view(ci.clips.shape)
        S = self.image_size
        stacked = torch.stack(small) if small else torch.zeros((0, 3, S, S), dtype=torch.uint8)
        frames = normalize(stacked, self.mean, self.std, self.dtype)
        return {
            "frames": frames,
            "clip_index": clip_index,
            "frame_ids": torch.from_numpy(ci.clips),
            **example_fields(plan.example, plan.example_index, self.label_fn),
        }

    def _decode_clip(self, record: VideoRecord, clip: np.ndarray, convert) -> list:
        unique, inverse = np.unique(clip, return_inverse=True)  # "pad" repeats the last frame
        frames = decode_frames(
            record, unique, seek_threshold=self.seek_threshold, threads=self.decode_threads,
            convert=convert,
        )
        return [frames[k] for k in inverse.reshape(-1)]


def stand_in_positions(position: int, size: int):
    """The dataset positions, in order, that may stand in for ``position``: the following ones,
    wrapping around. Callers skip the positions of videos already tried (the questions of one
    video are usually consecutive) and of files whose size changed, and decode at most
    ``STAND_IN_TRIES`` videos, the failed one included."""
    for k in range(1, size):
        yield (position + k) % size


def no_stand_in(path: str, tried: int, failed: dict[str, str]) -> str:
    """The error once a failed video's stand-ins failed too."""
    return (f"video {path} failed, and no other video could stand in for it ({tried - 1} more "
            f"decoded without success; {len(failed)} video(s) failed in this process: "
            f"{_failure_kinds(failed)}); with this many, "
            "the fault is likely not the files': moved or re-encoded videos need `siasam-fast "
            "index` again")


def _failure_kinds(failed: dict[str, str]) -> str:
    """'3 unreadable, 1 decoding failed': the commonest kinds of reasons."""
    kinds = Counter(reason.split(" (")[0].split(":")[0] for reason in failed.values())
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(3))


def check_failed_share(failed: dict[str, str], num_videos: int, where: str) -> None:
    """Raise once more than ``STAND_IN_MAX_SHARE`` of the dataset's videos (and more than
    ``STAND_IN_TRIES``) failed: training on the rest's duplicates is not a run worth having, and
    re-indexing marks the damaged files corrupt and drops their questions instead."""
    if len(failed) > STAND_IN_TRIES and len(failed) > STAND_IN_MAX_SHARE * num_videos:
        raise DecodeError(
            f"{len(failed)} of the {num_videos} videos failed at decode time in {where} (more "
            f"than {STAND_IN_MAX_SHARE:.0%}; {_failure_kinds(failed)}"
            "): they changed since the manifest was built; run `siasam-fast index` on the folder "
            "again: it marks damaged files corrupt, and their questions are dropped rather than "
            "given stand-ins (videos moved elsewhere: set data.video_dir to their folder)")


# A segment that ends this much after its video's end is counted in a warning (kept, cut)
SEGMENT_OVERRUN_S = 1.0


def segment_frames(example: QAExample, record: VideoRecord) -> tuple[int, int] | str:
    """(first frame, frame count) of the example's segment, or why it is empty.

    Seconds map to frames at the video's measured rate, its frames over its duration (the
    container's nominal rate can be far off for variable frame rate video; the manifest's fps
    when the duration is unknown): ``[floor(start * rate), ceil(end * rate))`` clamped to the
    video (approximate for variable frame rate videos). A zero-length segment ``[t:t]`` (How2QA's
    official CSVs have some, e.g. ``[60.0:60.0]``) is the one frame at ``t``.
    """
    T = record.num_frames
    if example.start is None and example.end is None:
        return 0, T
    if (example.start is not None and example.end is not None
            and example.end < example.start):
        return f"segment empty: it ends ({example.end} s) before it starts ({example.start} s)"
    rate = T / record.duration if record.duration > 0 else record.fps
    if rate <= 0:
        return f"segment given but the video's fps is unknown ({record.fps})"
    eps = 1e-6  # 7.2 s * 25 fps is 180.00000000000003: not frame 181
    first = 0 if example.start is None else math.floor(example.start * rate + eps)
    end = T if example.end is None else math.ceil(example.end * rate - eps)
    if example.start is not None and example.end == example.start:
        end = max(end, first + 1)  # an instant: the frame shown at that time
    first, end = max(0, min(first, T)), max(0, min(end, T))
    if end <= first:
        return (
            f"segment empty: [{0 if example.start is None else example.start} s, "
            f"{'end' if example.end is None else f'{example.end} s'}] is outside the video's "
            f"{record.duration:.2f} s"
        )
    return first, end - first


def _first(reason: str) -> str:
    return reason.split(":")[0] if reason else "unknown"


def _drop_example(examples: list, drop: tuple[int, str, str], kind: str) -> str:
    """'e.g. qid q1, video 'v_x': the reason's detail' for the log line of dropped examples."""
    index, qid, reason = drop
    detail = reason[len(kind):].lstrip(": ") if reason.startswith(kind) else reason
    return (f"e.g. qid {qid}, video {examples[index].video_id!r}"
            + (f": {detail}" if detail else ""))


class _VideoLookup:
    """An annotation's video id -> its manifest record: the id itself, else the file name (a
    nested video folder), each also as written in another Unicode form (macOS copies write file
    names decomposed: "vide\u0301o" for "vidéo") and without a video extension ("v1.mp4")."""

    def __init__(self, manifest, by_name: dict[str, str | None]):
        self.manifest, self.by_name = manifest, by_name
        self.folded: dict[str, list[str]] = {}  # casefolded NFC id or name -> ids (the hint)
        self.nfc: dict[str, str | None] = {}  # NFC id or name -> id (None: several)
        for vid in manifest:
            for key in {vid, vid.rsplit("/", 1)[-1]}:
                norm = unicodedata.normalize("NFC", key)
                self.nfc[norm] = None if self.nfc.get(norm, vid) != vid else vid
                self.folded.setdefault(norm.casefold(), []).append(vid)

    def _forms(self, video_id: str) -> list[str]:
        stem, dot, ext = video_id.rpartition(".")
        plain = [stem] if dot and f".{ext.lower()}" in VIDEO_EXTENSIONS and stem else []
        return [video_id, *plain]

    def find(self, video_id: str):
        for form in self._forms(video_id):
            if form in self.manifest:
                return self.manifest[form]
            if self.by_name.get(form):
                return self.manifest[self.by_name[form]]
            vid = self.nfc.get(unicodedata.normalize("NFC", form))
            if vid:
                return self.manifest[vid]
        return None

    def why_missing(self, video_id: str) -> str:
        if any(form in self.by_name for form in self._forms(video_id)):
            return ("video name in several subfolders of the manifest (rename the files to "
                    "unique names)")
        for form in self._forms(video_id):
            near = self.folded.get(unicodedata.normalize("NFC", form).casefold())
            if near:
                return (f"video missing from the manifest: no id {video_id!r}, but "
                        f"{near[0]!r} differs only in upper / lower case")
        return "video missing from the manifest"


def _reason_kind(reason: str) -> str:
    """Group drop reasons for the log ("video corrupt: invalid data", "sampler skipped", ...)."""
    return reason if reason.startswith("video corrupt") else reason.split(":")[0]


def example_fields(example: QAExample, example_index: int, label_fn=None) -> dict:
    """The text and labels of one example as carried through a batch (see the batch contract)."""
    count = math.nan
    if example.task == "count" and example.answer is not None:
        try:
            count = float(example.answer)
        except ValueError:
            count = math.nan
    return {
        "example_index": int(example_index),
        "video_id": example.video_id,
        "qid": example.qid,
        "question": example.question,
        "question_type": example.question_type,
        "task": example.task,
        "answer": example.answer if example.answer is not None else "",
        "candidates": list(example.candidates or []),
        "answer_index": -1 if example.answer_index is None else int(example.answer_index),
        "label": -1 if label_fn is None else int(label_fn(example)),
        "count": count,
        "stand_in": False,
    }


# ----------------------------------------------------------------------------------------------
# Collation


TEXT_KEYS = ("video_id", "qid", "question", "question_type", "task", "answer", "candidates")


def collate_videos(items: Sequence[dict], output: str = "frames") -> dict:
    """Pad and stack items into the batch contract (module docstring)."""
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}: valid outputs are {', '.join(OUTPUTS)}")
    if not items:
        raise ValueError("cannot collate an empty batch")
    V = len(items)
    U = max(it["frames"].shape[0] for it in items)
    N = max(it["clip_index"].shape[0] for it in items)
    B = max(it["clip_index"].shape[1] for it in items)
    _, C, H, W = items[0]["frames"].shape
    frames = _batch_tensor((V, U, C, H, W), items[0]["frames"].dtype)
    num_unique = torch.zeros(V, dtype=torch.long)
    clip_index = torch.zeros((V, N, B), dtype=torch.long)
    frame_mask = torch.zeros((V, N, B), dtype=torch.bool)
    clip_mask = torch.zeros((V, N), dtype=torch.bool)
    frame_ids = torch.full((V, N, B), -1, dtype=torch.long)
    for v, it in enumerate(items):
        u = it["frames"].shape[0]
        n, b = it["clip_index"].shape
        frames[v, :u] = it["frames"]
        frames[v, u:] = 0
        num_unique[v] = u
        clip_index[v, :n, :b] = it["clip_index"]
        frame_mask[v, :n, :b] = True
        clip_mask[v, :n] = True
        frame_ids[v, :n, :b] = it["frame_ids"]
    batch = {
        "frames": frames,
        "num_unique": num_unique,
        "clip_index": clip_index,
        "frame_mask": frame_mask,
        "clip_mask": clip_mask,
        "frame_ids": frame_ids,
        "example_index": torch.tensor([it["example_index"] for it in items], dtype=torch.long),
        "answer_index": torch.tensor([it["answer_index"] for it in items], dtype=torch.long),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "count": torch.tensor([it["count"] for it in items], dtype=torch.float32),
        "stand_in": torch.tensor([it.get("stand_in", False) for it in items], dtype=torch.bool),
    }
    for key in TEXT_KEYS:
        batch[key] = [it[key] for it in items]
    if output == "clips":
        batch["clips"] = gather_clips(frames, clip_index, frame_mask)
    return batch


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a DataLoader worker (as default_collate
    does): the batch then reaches the main process without another copy."""
    if torch.utils.data.get_worker_info() is not None:
        try:
            numel = math.prod(shape)
            storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
            return torch.empty(0, dtype=dtype).set_(storage).view(shape)
        except (AttributeError, RuntimeError):  # private API: fall back to a plain tensor
            pass
    return torch.empty(shape, dtype=dtype)


def gather_clips(
    frames: torch.Tensor, clip_index: torch.Tensor, frame_mask: torch.Tensor
) -> torch.Tensor:
    """[V, U, C, H, W] frames -> [V, N, B, C, H, W] clips, zeros where ``frame_mask`` is False."""
    V = frames.shape[0]
    rows = torch.arange(V, device=frames.device).view(V, 1, 1)
    clips = frames[rows, clip_index]
    return clips * frame_mask.view(*frame_mask.shape, 1, 1, 1).to(clips.dtype)


# ----------------------------------------------------------------------------------------------
# Sampling order


def shard_length(num_examples: int, world_size: int, drop_last: bool) -> int:
    """Examples in each of ``world_size`` equal shards (:class:`ShardedSampler`)."""
    return num_examples // world_size if drop_last else math.ceil(num_examples / world_size)


def resharded_position(position: int, old_world: int, new_world: int, num_examples: int,
                       drop_last: bool, align: int = 1) -> int:
    """The position in a shard of ``new_world`` shards that continues an epoch stopped at
    ``position`` of ``old_world`` shards: the shards are interleaved, so the examples given out
    are the order's first ``position x old_world``; the new shards restart at the last multiple
    of ``new_world x align`` at or before that point (``align``: the examples of one optimizer
    step per process, so that the run resumes at a step's start; up to ``new_world x align - 1``
    examples are given again, none is skipped). An epoch that was complete stays complete."""
    if old_world < 1 or new_world < 1:
        raise ValueError(f"world sizes must be >= 1, got {old_world} and {new_world}")
    old_len = shard_length(num_examples, old_world, drop_last)
    new_len = shard_length(num_examples, new_world, drop_last)
    if not 0 <= position <= old_len:
        raise ValueError(f"sampler state position={position}: must be in 0..{old_len} "
                         f"(shards of {old_world} processes)")
    if position == old_len and old_len > 0:
        return new_len
    if align < 1:
        raise ValueError(f"align={align}: must be >= 1")
    return min(position * old_world // (new_world * align) * align, new_len)


class ShardedSampler(Sampler):
    """Deterministic shuffle per (seed, epoch), split into ``world_size`` equal shards.

    Like ``DistributedSampler``: shards are interleaved (rank r takes positions r, r + W, ...) and
    made equal by wrapping around to the start of the order (or by dropping the tail with
    ``drop_last``). ``state_dict`` holds the epoch and the position within this rank's shard, so a
    resumed run continues with exactly the remaining examples. Used through :func:`build_loader`,
    the position counts the examples the training loop has received (not those prefetched).
    """

    def __init__(
        self,
        num_examples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        with_epoch: bool = False,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: must be in 0..{world_size - 1} (world_size)")
        if num_examples < 0:
            raise ValueError(f"num_examples={num_examples}: must be >= 0")
        self.num_examples = int(num_examples)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.drop_last, self.with_epoch = bool(shuffle), bool(drop_last), with_epoch
        self.num_samples = shard_length(self.num_examples, self.world_size, drop_last)
        self.epoch = 0
        self.position = 0  # examples of this epoch's shard already consumed
        self._resume_from = 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (a restored state for it is kept)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self._resume_from = 0

    def rewind(self, position: int) -> None:
        """Start the current epoch again at ``position`` of the shard, at or before where it
        stands: the examples in between are given again (a resume's alignment)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"rewind to position={position}: must be in 0..{self.position}")
        self.position = self._resume_from = int(position)

    def shard(self, epoch: int | None = None) -> np.ndarray:
        """This rank's dataset positions for ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self.num_examples
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        total = self.num_samples * self.world_size
        if total > n and n > 0:
            order = np.resize(order, total)  # wraps around: the start of the order again
        order = order[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self):
        start, self._resume_from = self._resume_from, 0
        self.position = start
        for position in self.shard()[start:]:
            self.position += 1
            yield (self.epoch, int(position)) if self.with_epoch else int(position)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "world_size": self.world_size,
            "rank": self.rank,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict, align: int = 1) -> None:
        """Continue from ``state``. A state saved with another ``world_size`` (a run resumed on
        more or fewer processes) continues at the same point of the epoch's order: the shards
        are interleaved, so the first ``position`` examples of every old shard are the order's
        first ``position x old world_size``, and the new shards start at or just before that
        point, at a multiple of ``align`` examples per shard; up to ``world_size x align - 1``
        examples are given again, none is skipped (:func:`resharded_position`)."""
        for key in ("seed", "num_examples", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}: resume with the same data"
                )
        old_world = int(state.get("world_size", self.world_size))
        position = int(state["position"])
        if old_world != self.world_size:
            position = resharded_position(position, old_world, self.world_size,
                                          self.num_examples, self.drop_last, align)
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"sampler state position={position}: must be in 0..{self.num_samples}")
        self.epoch = int(state["epoch"])
        self.position = self._resume_from = position


# ----------------------------------------------------------------------------------------------
# The loader


# Every loader alive (VideoQALoader, DALIVideoLoader), so that close_loaders() can end their
# workers on the way out.
_LOADERS: weakref.WeakSet = weakref.WeakSet()


def close_loaders() -> None:
    """Shut down the worker processes of every live loader now. For a failing run: its traceback
    keeps the loaders alive past the point where Python's exit handler waits for their workers."""
    for loader in list(_LOADERS):
        loader.close()


class VideoQALoader(DataLoader):
    """A DataLoader that tracks how many examples the caller received (for exact resume)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _LOADERS.add(self)

    def close(self) -> None:
        """End the worker processes now (they also end when the loader is freed); a later
        iteration starts new ones."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._iterator = None

    def __iter__(self):
        sampler = self.sampler
        start = sampler._resume_from
        consumed = 0
        for batch in super().__iter__():
            consumed += len(batch["example_index"])
            sampler.position = start + consumed
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict, align: int = 1) -> None:
        """``align``: see :meth:`ShardedSampler.load_state_dict`."""
        self.sampler.load_state_dict(state, align)
        self.dataset.set_epoch(self.sampler.epoch)


def plan_epochs(
    examples: Sequence[QAExample],
    manifest: dict[str, VideoRecord],
    sampling_cfg: SamplingConfig | dict,
    split: str,
    *,
    seed: int,
    rank: int,
    world_size: int,
    shuffle: bool | None,
    drop_last: bool,
    epoch: int,
    **dataset_kwargs,
) -> tuple[VideoQADataset, ShardedSampler]:
    """The dataset (filtered examples, per-item plans) and this rank's sampler at ``epoch``: what
    every backend shares before it decodes anything."""
    dataset = VideoQADataset(examples, manifest, sampling_cfg, split=split, seed=seed,
                             **dataset_kwargs)
    sampler = ShardedSampler(
        len(dataset),
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=dataset.training if shuffle is None else shuffle,
        drop_last=drop_last,
        with_epoch=True,
    )
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    return dataset, sampler


def build_loader(
    examples: Sequence[QAExample],
    manifest: dict[str, VideoRecord],
    sampling_cfg: SamplingConfig | dict,
    split: str,
    batch_size: int,
    image_size: int = 224,
    num_workers: int = 4,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    backend: str = "pyav",
    output: str = "frames",
    dedup: bool = True,
    pin_memory: bool | None = None,
    label_fn: Callable[[QAExample], int] | None = None,
    shuffle: bool | None = None,
    drop_last: bool = False,
    epoch: int = 0,
    prefetch_factor: int = 2,
    dtype: torch.dtype = torch.float32,
    seek_threshold: int = DEFAULT_SEEK_THRESHOLD,
    decode_threads: int = 1,
    multiprocessing_context=None,
    defer_stop_signals: bool = False,
    frame_fit: str = "crop",
) -> VideoQALoader:
    """A loader of batches in the contract of the module docstring, one shard per rank.

    Deterministic per (seed, epoch, rank) whatever ``num_workers``. ``shuffle`` defaults to True
    for training. ``drop_last``: equal shards by dropping the tail (instead of wrapping) and no
    partial last batch. ``pin_memory`` defaults to whether CUDA is available. Call
    ``loader.set_epoch(e)`` before each epoch; ``loader.state_dict()`` / ``load_state_dict()``
    save and restore the position within the epoch. ``label_fn`` must be picklable (a module-level
    function) when workers do not fork. ``defer_stop_signals``: the workers leave SIGTERM, SIGINT
    and SIGUSR1 to this process (:mod:`siasam_fast.stopping`; training sets it). ``frame_fit``:
    how a frame becomes ``image_size x image_size`` (``data.frame_fit``): "crop" (shorter side to
    the size, centre crop) or "pad" (longer side to the size, black at the right and bottom;
    ClipBERT's), see :mod:`siasam_fast.pipeline.transforms`.
    """
    if backend in OTHER_BACKENDS:  # one factory for every backend: loaders.build_video_loader
        from siasam_fast.pipeline.loaders import build_video_loader

        return build_video_loader(
            examples, manifest, sampling_cfg, split, batch_size, backend=backend,
            image_size=image_size, num_workers=num_workers, seed=seed, rank=rank,
            world_size=world_size, output=output, dedup=dedup, pin_memory=pin_memory,
            label_fn=label_fn, shuffle=shuffle, drop_last=drop_last, epoch=epoch,
            prefetch_factor=prefetch_factor, dtype=dtype, seek_threshold=seek_threshold,
            decode_threads=decode_threads, multiprocessing_context=multiprocessing_context,
            defer_stop_signals=defer_stop_signals, frame_fit=frame_fit,
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"backend={backend!r}: valid backends are {', '.join(BACKENDS + OTHER_BACKENDS)}"
        )
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}: valid outputs are {', '.join(OUTPUTS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: must be >= 0")
    dataset, sampler = plan_epochs(
        examples, manifest, sampling_cfg, split, seed=seed, rank=rank, world_size=world_size,
        shuffle=shuffle, drop_last=drop_last, epoch=epoch, image_size=image_size, dedup=dedup,
        label_fn=label_fn, dtype=dtype, seek_threshold=seek_threshold,
        decode_threads=decode_threads, frame_fit=frame_fit,
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {}
    if num_workers > 0:
        extra = {
            "persistent_workers": True,
            "prefetch_factor": prefetch_factor,
            "multiprocessing_context": multiprocessing_context,
        }
        if defer_stop_signals:
            # A scheduler's SIGTERM reaches the workers too: the main process decides (training
            # saves a checkpoint first) and shuts them down (siasam_fast.stopping).
            extra["worker_init_fn"] = _defer_stop_signals
    return VideoQALoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_videos, output=output),
        pin_memory=pin_memory,
        drop_last=drop_last,
        # A private generator: creating worker iterators must not draw from the global torch RNG,
        # or dropout masks after a mid-epoch resume would differ from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed * 1009 + rank),
        **extra,
    )
