"""The DALI backend: encoded bytes in, normalised frames out on the GPU (DESIGN section 4).

Same planning as the PyAV backend, different decoder. The examples are filtered and their clips
planned by :class:`~siasam_fast.pipeline.dataset.VideoQADataset` (``plan(key)``: the one sampling
function, no decoding), the order, shards, epochs and resume come from
:class:`~siasam_fast.pipeline.dataset.ShardedSampler`, and the batch contract (the dataset module's
docstring) is built by the same ``collate_videos`` / ``gather_clips``. Only the pixels differ in
origin. The graph, one DALI pipeline per pass over the epoch:

1. ``fn.external_source(parallel=True, batch=True)``: DALI's Python workers (``num_workers``; 0
   reads in this process) read each video's file once (one ``open``, its ``fstat``, one read; the
   manifest gave the path and size, so no probe) and hand over its encoded bytes, its frame
   list (the sorted unique frames U of its clips; with ``dedup=False`` every clip's frames in clip
   order, overlaps decoded again), the resized size and the crop position. A file whose size no
   longer matches the manifest is left out of its batch (the loader warns, naming it, and puts a
   stand-in in its place: below).
   With ``trim=True`` (``data.dali_trim``) they hand over only the stretch of the file that the
   frames need, copied packet by packet by PyAV, and the frame list renumbered to it: read alone
   after a seek to the manifest's keyframe (:func:`trim_file`), or cut from the whole file
   (:func:`trim_stretch`) when the manifest's keyframes do not match the file.
2. ``fn.decoders.video(frames=U, pad_mode="none")`` on NVDEC (``device="mixed"``) or on the CPU
   (``device="cpu"``: VP8 / VP9 / MJPEG only, for tests). Frame ``i`` is the i-th frame in
   presentation order, as in the manifest. ``pad_mode="none"`` turns a frame past the end of the
   stream (a stale manifest, a damaged file) into an error instead of a black frame.
3. transforms.py step by step, on the GPU: ``fn.resize`` to the size that
   :func:`~siasam_fast.pipeline.transforms.fitted_shape` gives (bilinear, antialiased, uint8);
   ``fn.crop_mirror_normalize`` at the window of
   :func:`~siasam_fast.pipeline.transforms.center_crop_box` (passed as a crop position that lands on
   the same pixel whether DALI rounds or floors), ``(x - 255 mean) / (255 std)``, fp16, ``FCHW``;
   ``fn.pad`` of the frame axis to the batch's largest U (zeros, as the contract wants). With
   ``frame_fit="pad"`` the resize takes the longer side to S and the S x S window is anchored at
   (0, 0) with ``out_of_bounds_policy="pad"``: what lies past the resized frame (right, bottom) is
   filled with ``fill_values``, which DALI writes as they are into the output (after the
   normalisation), so they are the normalised black of
   :func:`~siasam_fast.pipeline.transforms.normalized_black`, what PyAV's zero padding becomes. The
   fit is a build argument of the graph (one per run); the crop graph is the one it always was.
4. The frames reach torch through DLPack with no copy (``torch.from_dlpack`` of the pipeline's
   output; DALI's dynamic executor gives every iteration its own output buffer, which the tensor
   keeps alive). The index tensors are built on the CPU from the plans, exactly as for PyAV.
   DALI's documentation promises that the buffer lives as long as a tensor refers to it, not that
   its reuse after the last one dies waits for kernels queued on torch's stream since (a copy the
   loader made from it, or the consumer's step), into which a prefetched iteration might otherwise
   be decoded. So the loader keeps its own reference to each output until torch's stream has
   passed the point where the consumer asked for the next batch (:class:`_StreamRelease`: a CUDA
   event, no host sync). Not observed on a GPU; a guard, at the cost of one or two batches' frames
   held a little longer.

Clips (``output="clips"``) are gathered in torch from the unique frames, by the same
``gather_clips`` as the PyAV backend: one indexing kernel on the GPU. Gathering in DALI with
``fn.sequence_rearrange`` would need a second per-sample input, and since the contract carries the
unique frames as well, a second pipeline output of N x B frames per video, and the padding masks
would still be applied in torch afterwards.

Faults. Files marked corrupt in the manifest never reach DALI (the dataset drops their examples, as
for PyAV). A file changed since indexing (its size differs; modification times are not compared,
copies rarely keep them) is left out with a warning. If DALI raises during a run (a file whose
stream is damaged, although its size did not change), the loader warns with the error, decodes the
batch's videos one at a time in a throw-away pipeline to find the bad ones, and rebuilds the
pipeline (DALI's pipeline is unusable after an error) for the rest of the pass. Each example left
out gets a stand-in, as with PyAV (``siasam_fast.pipeline.dataset``): the next example of the
dataset whose video decodes, decoded alone and put at the batch's end, so that every batch keeps
its size and every rank its number of batches. The bad files are skipped for the rest of the
loader's life (unlike PyAV, which tries a file whose size did not change again for each example:
a failed DALI pipeline is rebuilt, and some damaged streams crash its decoder; so after a stream
fails, DALI's batches could differ from those of a fresh process: ``state_dict`` carries the
videos left out, so a resumed run leaves them out too).
``loader.skipped`` lists ``(path, reason)`` per example left out in the latest pass (the list
starts again with each pass, so it does not grow with every epoch of a long run; the files left
out stay in ``state_dict``) and ``loader.stand_ins`` counts the stand-ins. Skipped examples still
count as consumed for ``state_dict`` (a resume does not replay them). Limits:
damage inside a frame's payload may decode into artefacts without any error, and a decoder that
crashes the process (DALI's video decoder can on some corrupt input) cannot be caught in-process:
building the manifest with its default full-decode probe is what keeps such files away.

Decode groups (``decode_group=G``, default 1): one DALI iteration decodes G consecutive batches
(pipeline batch G x batch_size, one thread per video by default), and the loader hands them out one
by one as views of the iteration's output, each cut to its own largest frame count. The mixed
video decoder runs an iteration's videos in parallel and the iteration lasts as long as its
slowest video, so a group puts more NVDEC sessions in flight. Order, contents, resume positions
and fault handling are those of G = 1 (after an error the group's other batches are re-fed).

Costs: each pass (each epoch, or the rest of an epoch after a resume) plans all its batches up front
(the sampler is microseconds per example), builds one pipeline and, with ``num_workers > 0``,
starts its reader processes. With CUDA initialised in the process (any GPU run) they are spawned,
not forked (DALI refuses to fork then). The reader function is pickled by value, so they need not
import this package or torch; like any spawned process they do re-import the main script, which
must keep its work under ``if __name__ == "__main__":``. Measured on an H200 host (2026-11, 4
readers, batches of 8): the first batch arrives 2-4 s after the pass starts (spawn, pipeline
build, NVDEC set-up), then the rate is steady.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dali_check import resolve_trim
from siasam_fast.pipeline.dataset import (
    _LOADERS,
    OUTPUTS,
    STAND_IN_TRIES,
    ShardedSampler,
    VideoQADataset,
    check_failed_share,
    collate_videos,
    example_fields,
    gather_clips,
    no_stand_in,
    plan_epochs,
    stand_in_positions,
)
from siasam_fast.pipeline.loaders import DALI_CPU_CODECS
from siasam_fast.pipeline.manifest import VideoRecord, open_video
from siasam_fast.pipeline.pyav_decode import (
    CHANGED_SINCE_INDEXING,
    DEFAULT_SEEK_THRESHOLD,
    DecodeError,
    file_change,
)
from siasam_fast.pipeline.transforms import (
    center_crop_box,
    check_fit,
    fitted_shape,
    normalized_black,
)
from siasam_fast.sampling import SamplingConfig
from siasam_fast.stopping import defer_stop_signals

logger = logging.getLogger(__name__)

DEVICES = ("gpu", "cpu")
DTYPES = (torch.float16, torch.float32)
START_METHODS = ("fork", "spawn")
# After this many videos in a row failed to decode on their own (files unchanged, no success in
# between), the fault is likely not in the files (out of GPU memory, a broken driver...): raise
# rather than skip the rest of the epoch.
MAX_FAILED_VIDEOS = 16


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# What DALI's reader processes run. Self-contained (numpy and os; PyAV to trim) and pickled by
# value: the processes never import this package or torch.


# Containers trim_stretch writes (libavformat muxer names), by the demuxer's name.
TRIM_MUXERS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "matroska", "avi": "avi"}
# Trim only when the stretch keeps at most this share of the packets (else the remux costs more
# than it saves).
TRIM_MAX_SHARE = 0.9


def trim_stretch(data, wanted, num_frames=None):
    """The stretch of one encoded video that the frames ``wanted`` need, or None (feed it whole).

    The stretch is the packets, in decode order, from the keyframe at or before the first wanted
    frame to the last packet that holds a wanted frame, without the keyframe's leading pictures
    (open GOP: shown before it, they reference the GOP before). A picture's references always come
    before it in decode order, so every picture kept decodes, wanted ones included. The packets are
    copied as they are (no decoding, no re-encoding) by PyAV into an in-memory file of the same
    container family, with their timestamps. Returns (its bytes as uint8, ``wanted`` renumbered: a
    frame's position among the kept pictures in presentation order, as the manifest counts frames)
    or None when the stream cannot be put in presentation order (a packet without pts), the
    container has no muxer here, a wanted frame is past the end (the decoder then reports it), the
    stretch would keep more than ``TRIM_MAX_SHARE`` of the packets, the file holds another number
    of pictures than ``num_frames`` (the manifest's count, when given: e.g. packets before the
    first keyframe, which decode to nothing), or PyAV fails (DALI then sees the whole file and
    reports what is wrong with it).

    Why: DALI's video decoder builds its frame index by demuxing the whole file, per sample and
    per iteration, and decodes from a keyframe (or, without an index, from the first frame); a
    stretch makes both proportional to what the clips need. This demuxes all of ``data``; with the
    manifest's keyframes, :func:`trim_file` reads only the stretch."""
    import io

    try:
        with open_video(io.BytesIO(memoryview(data))) as src:
            muxer, stream = _trimmable(src)
            if muxer is None:
                return None
            packets = [p for p in src.demux(stream) if p.size]
            if not packets or any(p.pts is None for p in packets):
                return None
            rank = {pts: i for i, pts in enumerate(sorted(p.pts for p in packets))}
            if len(rank) != len(packets):
                return None  # two pictures with one pts: no presentation order
            if num_frames is not None and len(rank) != num_frames:
                return None  # not the manifest's frames (e.g. packets before the first keyframe)
            need = {int(f) for f in wanted}
            if max(need) >= len(rank) or min(need) < 0:
                return None
            first = min(need)
            starts = [i for i, p in enumerate(packets) if p.is_keyframe and rank[p.pts] <= first]
            if not starts:
                return None
            start = max(starts, key=lambda i: rank[packets[i].pts])
            key_pts = packets[start].pts
            kept = [p for p in packets[start:] if p.pts >= key_pts]
            return _mux_stretch(stream, muxer, kept, rank, wanted, max_packets=TRIM_MAX_SHARE *
                                len(packets))
    except Exception:  # noqa: BLE001 - any PyAV failure: DALI gets the whole file, as without trim
        return None


def trim_file(source, wanted, span):
    """:func:`trim_stretch` for a file on disk whose keyframes the manifest knows: it seeks to the
    keyframe and reads only the stretch (and the container's index), not the whole file.
    ``source``: its path, or the file opened in binary mode.

    ``span`` (int64 [4], from the manifest, :func:`keyframe_span`): the frame index and pts of the
    keyframe at or before the first wanted frame, then the frame index and pts of the first
    keyframe after the last one, or the frame count and -1 when there is none (read to the end).
    Reading stops after that next keyframe's leading pictures (the first packet shown after it).
    The frames from the keyframe to the next one (or the end) must number exactly what the manifest
    says, else (and whenever :func:`trim_stretch` would) it returns None, and the caller reads the
    whole file."""
    key_index, key_pts, next_index, next_pts = (int(v) for v in span)
    to_end = next_pts < 0  # next_index is then the frame count
    need = {int(f) for f in wanted}
    if min(need) < key_index or max(need) >= next_index:
        return None
    if key_index == 0 and to_end:
        return None  # the stretch is the whole file
    try:
        with open_video(source if hasattr(source, "read") else str(source)) as src:
            muxer, stream = _trimmable(src)
            if muxer is None:
                return None
            src.seek(key_pts, stream=stream, backward=True, any_frame=False)
            kept, started, past_next = [], False, False
            for p in src.demux(stream):
                if not p.size:
                    continue
                if p.pts is None:
                    return None
                if not started:  # packets before the keyframe (the seek may land earlier)
                    if p.pts == key_pts and p.is_keyframe:
                        started = True
                    elif not to_end and p.pts >= next_pts:
                        return None  # the seek went past it: the index disagrees with the file
                    else:
                        continue
                if past_next and p.pts > next_pts:
                    break  # the next keyframe's leading pictures are over
                if p.pts >= key_pts:
                    kept.append(p)
                if p.pts == next_pts:
                    past_next = True
            if not started or not (to_end or past_next):
                return None
            shown = sorted(p.pts for p in kept)
            if len(set(shown)) != len(shown):
                return None
            rank = {pts: key_index + i for i, pts in enumerate(shown)}
            if (key_index + len(shown) if to_end else rank[next_pts]) != next_index:
                return None  # not the manifest's frame count from the keyframe
            return _mux_stretch(stream, muxer, kept, rank, wanted)
    except Exception:  # noqa: BLE001 - any PyAV failure: the whole file, as without the manifest
        return None


def _trimmable(src):
    """(the muxer a stretch of ``src`` is written with, its video stream), or (None, None) when it
    is not trimmed: no video, a container without a muxer here, or AVI with a codec that is not
    intra-only (AVI stores no presentation times: PyAV's pts is the decode order there, so
    pictures that B-frames reorder cannot be numbered)."""
    muxer = TRIM_MUXERS.get(src.format.name)
    if muxer is None or not src.streams.video:
        return None, None
    stream = src.streams.video[0]
    if muxer == "avi" and not stream.codec_context.codec.intra_only:
        return None, None
    return muxer, stream


def _mux_stretch(stream, muxer, kept, rank, wanted, max_packets=None):
    """The end of :func:`trim_stretch` and :func:`trim_file`: ``kept`` (decode order, from the
    keyframe, its leading pictures out) cut after the last wanted picture, muxed into memory.
    ``rank``: frame index by pts. Returns (bytes uint8, ``wanted`` renumbered) or None."""
    import io

    import av

    need = {int(f) for f in wanted}
    ends = [i for i, p in enumerate(kept) if rank[p.pts] in need]
    if not ends:
        return None
    kept = kept[: max(ends) + 1]
    if max_packets is not None and len(kept) > max_packets:
        return None
    position = {pts: i for i, pts in enumerate(sorted(p.pts for p in kept))}
    by_rank = {rank[p.pts]: position[p.pts] for p in kept}
    if not need <= by_rank.keys():
        return None
    out_buf = io.BytesIO()
    with av.open(out_buf, "w", format=muxer) as out:
        copy = out.add_stream_from_template(stream)
        for packet in kept:
            packet.stream = copy
            out.mux(packet)
    renumbered = np.array([by_rank[int(f)] for f in wanted], dtype=np.int32)
    return np.frombuffer(out_buf.getvalue(), dtype=np.uint8), renumbered


def keyframe_span(record, wanted) -> np.ndarray:
    """``span`` for :func:`trim_file`, from the manifest: the keyframe at or before
    ``min(wanted)``, and the first keyframe after ``max(wanted)`` or (frame count, -1) (int64 [4];
    empty when the manifest has no usable keyframe list)."""
    keys, pts = record.keyframes, record.keyframe_pts
    if not keys or len(keys) != len(pts) or keys[0] > int(np.min(wanted)):
        return np.zeros(0, np.int64)
    i = int(np.searchsorted(keys, int(np.min(wanted)), side="right")) - 1
    j = int(np.searchsorted(keys, int(np.max(wanted)), side="right"))
    after = (keys[j], pts[j]) if j < len(keys) else (int(record.num_frames), -1)
    return np.array([keys[i], pts[i], *after], np.int64)


def read_encoded_batch(batches, info, trim=False, defer_signals=False):
    """The external source: the inputs of DALI iteration ``info.iteration``.

    ``batches[k]`` is a tuple of jobs ``(slot, path, size, frames int32, resize float32 [2],
    crop_pos float32 [2], span int64 [4] or [0], the manifest's frame count)``. Returns five
    lists (encoded uint8 bytes, frames, resize, crop_pos, slot int32) without the jobs whose file
    no longer matches the manifest; raises ``RuntimeError`` when none is left (DALI refuses empty
    batches) and ``StopIteration`` past the last batch. ``trim``: each video's bytes are cut to the
    stretch its frames need and its frames renumbered to match: read from the file alone with the
    manifest's keyframes (``span``, :func:`trim_file`), else cut from the whole file
    (:func:`trim_stretch`). A ``size`` of 0 is unknown (as for
    :func:`~siasam_fast.pipeline.pyav_decode.file_change`): the file is read, not compared.
    """
    if defer_signals:  # a scheduler's SIGTERM reaches DALI's readers too: the main process
        # decides (training saves a checkpoint first) and ends them (siasam_fast.stopping)
        try:
            defer_stop_signals()
        except ValueError:  # not the process's main thread: signals are not ours to set here
            pass
    k = info.iteration
    if k >= len(batches):
        raise StopIteration
    encoded, frames, sizes, crops, slots, changed = [], [], [], [], [], []
    for slot, path, size, wanted, resize, crop, span, num_frames in batches[k]:
        cut = None
        try:
            with open(path, "rb") as fh:
                if size and os.fstat(fh.fileno()).st_size != size:
                    changed.append(path)
                    continue
                if trim and len(span):
                    cut = trim_file(fh, wanted, span)
                    if size and os.fstat(fh.fileno()).st_size != size:  # rewritten meanwhile?
                        changed.append(path)
                        continue
                if cut is None:
                    fh.seek(0)
                    data = np.fromfile(fh, dtype=np.uint8)
                    if size and data.size != size:  # rewritten between fstat and read
                        changed.append(path)
                        continue
        except OSError:
            changed.append(path)
            continue
        if trim and cut is None:
            cut = trim_stretch(data, wanted, num_frames)
        if cut is not None:
            data, wanted = cut
        encoded.append(data)
        frames.append(wanted)
        sizes.append(resize)
        crops.append(crop)
        slots.append(np.array(slot, dtype=np.int32))
    if not encoded:
        raise RuntimeError(
            f"every video of batch {k} changed since the manifest was built: {changed}"
        )
    return encoded, frames, sizes, crops, slots


def reader_source(batches, trim=False, defer_signals=False):
    """``read_encoded_batch`` bound to ``batches``: a local function, which DALI pickles by value
    (a ``functools.partial`` would not do: DALI wants a one-argument signature), and so are the
    module's functions it calls, so that the reader processes need not import this package.
    ``defer_signals``: it runs in DALI's reader processes, which then leave the stop signals to
    this process (:func:`~siasam_fast.stopping.defer_stop_signals`)."""
    from nvidia.dali.pickling import pickle_by_value

    for function in (read_encoded_batch, trim_stretch, trim_file, _trimmable, _mux_stretch,
                     open_video, defer_stop_signals):
        pickle_by_value(function)

    def source(info):
        return read_encoded_batch(batches, info, trim, defer_signals)

    return source


# ----------------------------------------------------------------------------------------------
# The graph


def _define_graph(source, *, device, parallel, source_prefetch, image_size, mean, std, dtype,
                  frame_fit="crop"):
    """Build the nodes inside an active ``Pipeline``; returns (frames, slot). ``frame_fit="pad"``:
    the window (at crop_pos (0, 0), see :func:`_job`) reaches past the resized frame's right or
    bottom edge, and DALI fills what lies outside with ``fill_values``: output values, written
    after the normalisation (DALI's slice-flip-normalize kernels, CPU and GPU, store them
    unchanged), so they must be the normalised black that PyAV's zero padding becomes."""
    from nvidia.dali import fn, types

    pad = {}
    if check_fit(frame_fit) == "pad":
        pad = {"out_of_bounds_policy": "pad", "fill_values": normalized_black(mean, std)}

    extra = {"prefetch_queue_depth": source_prefetch} if parallel else {}
    encoded, frames, size, crop_pos, slot = fn.external_source(
        source=source,
        num_outputs=5,
        batch=True,
        batch_info=True,
        parallel=parallel,
        dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32],
        ndim=[1, 1, 1, 1, 0],
        **extra,
    )
    video = fn.decoders.video(
        encoded, device="mixed" if device == "gpu" else "cpu", frames=frames, pad_mode="none"
    )  # uint8 FHWC
    video = fn.resize(video, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
    video = fn.crop_mirror_normalize(
        video,
        crop=(image_size, image_size),
        crop_pos_x=crop_pos[0],
        crop_pos_y=crop_pos[1],
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
        dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT,
        output_layout="FCHW",
        **pad,
    )
    video = fn.pad(video, axis_names="F", fill_value=0)  # [U_max, 3, S, S] per sample
    return video, slot


@dataclass
class _Job:
    """One video of one batch, as the reader gets it (a plain tuple crosses the process border)."""

    slot: int  # position in its batch
    path: str
    size: int  # the manifest's: a file of another size has changed since (mtimes are not
    # compared: copies made with cp -r or cloud tools rarely keep them)
    frames: np.ndarray  # int32, the frames to decode in output order
    resize: np.ndarray  # float32 [h, w] after resizing
    crop_pos: np.ndarray  # float32 [x, y] in 0..1
    span: np.ndarray  # int64 [4] for trim_file (keyframes around the frames), or [0]: none
    num_frames: int  # the manifest's frame count

    def as_tuple(self) -> tuple:
        return (self.slot, self.path, self.size, self.frames, self.resize, self.crop_pos,
                self.span, self.num_frames)


@dataclass
class _Step:
    """One batch of the sampler's order: its keys, their batch items (frames left out) and jobs."""

    keys: list
    items: list[dict]
    jobs: list[_Job]
    live: list[_Job] | None = None  # the jobs fed to the current pipeline (known-bad files out)
    first: bool = False  # the first step of its decode group: running the pipeline decodes it
    offset: int = 0  # its place in the group: its videos' slots are offset * batch_size + slot
    skipped: set = field(default_factory=set)  # slots left out (each gets a stand-in)


class _StreamRelease:
    """References to DALI output buffers, dropped only once torch's stream has passed the work
    queued on them.

    ``hold(tensor)`` for each GPU output as it reaches torch (zero-copy) and for the frames of each
    batch handed out (a decode group's later batches are views of an output held since the group
    ran). ``mark()`` when the consumer asks for the next batch: an event recorded on torch's
    current stream of the loader's GPU then covers every kernel queued so far, on the batches
    handed out and on the copies the loader made from DALI's buffers (stand-ins, a decode group's
    trimmed copy); what was held before it is let go once that event has completed (``query``: no
    host sync). ``drain()`` at a pass's end waits for those events and lets everything go, so that
    no batch stays held while another loader runs (one wait per pass).

    Its limit: work queued on a batch after the consumer asked for the next one is not covered. A
    consumer that keeps a batch past its next request, queues more work on it and drops it without
    waiting for the GPU could still see its memory reused; the training loop and the benchmarks do
    not (each step reads its loss on the host)."""

    def __init__(self, device_id: int | None, event_factory=None) -> None:
        self.device_id = device_id
        self._event_factory = event_factory
        self._held: list[torch.Tensor] = []  # since the last mark
        self._pending: list[tuple[object, list[torch.Tensor]]] = []  # (event, tensors), in order

    def hold(self, tensor: torch.Tensor) -> None:
        self._held.append(tensor)

    def _event(self):
        if self._event_factory is not None:
            return self._event_factory()
        event = torch.cuda.Event()
        with torch.cuda.device(self.device_id):
            event.record(torch.cuda.current_stream())
        return event

    def mark(self) -> None:
        if self._held:
            self._pending.append((self._event(), self._held))
            self._held = []
        while self._pending and self._pending[0][0].query():
            self._pending.pop(0)

    def drain(self) -> None:
        self.mark()
        for event, _ in self._pending:
            event.synchronize()
        self._pending.clear()

    def __len__(self) -> int:  # tensors still referenced
        return len(self._held) + sum(len(held) for _, held in self._pending)


# ----------------------------------------------------------------------------------------------
# The loader


class DALIVideoLoader:
    """Batches of the batch contract decoded by DALI; the interface of ``VideoQALoader``.

    ``len``, ``set_epoch``, ``state_dict`` / ``load_state_dict``, ``.sampler``, ``.dataset``; built
    by :func:`build_dali_loader`. ``skipped`` lists ``(path, reason)`` of the examples left out in
    the latest pass (their video changed since indexing, or failed to decode).
    """

    backend = "dali"

    def __init__(
        self,
        dataset: VideoQADataset,
        sampler: ShardedSampler,
        *,
        batch_size: int,
        output: str,
        drop_last: bool,
        device: str,
        device_id: int | None,
        dtype: torch.dtype,
        num_workers: int,
        num_threads: int,
        prefetch_factor: int,
        start_method: str | None,
        decode_group: int = 1,
        trim: bool = False,
        defer_stop_signals: bool = False,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.output = output
        self.drop_last = bool(drop_last)
        self.device = device
        self.device_id = device_id
        self.dtype = dtype
        self.num_workers = int(num_workers)
        self.num_threads = int(num_threads)
        self.prefetch_factor = int(prefetch_factor)
        self.start_method = start_method
        self.decode_group = int(decode_group)
        self.trim = bool(trim)
        self.defer_stop_signals = bool(defer_stop_signals)
        self.skipped: list[tuple[str, str]] = []  # (path, reason) per example left out (a pass's)
        self.stand_ins = 0  # stand-ins yielded in their place
        self._passes: weakref.WeakSet = weakref.WeakSet()  # iterations in progress
        _LOADERS.add(self)  # close_loaders() ends them on a failing run's way out
        self._bad: dict[str, str] = {}  # path -> why it is left out for the rest of the run
        self._newly_bad: set[str] = set()  # left out while the current batch was made
        self._failed_in_a_row = 0
        self._release = _StreamRelease(device_id)  # DALI's GPU buffers until torch is past them
        self._holds = device == "gpu"  # (the CPU decoder's buffers are read synchronously)

    # -- the VideoQALoader interface -------------------------------------------------------------

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        """The sampler's position, and the videos this loader has left out (a resumed loader
        leaves them out too, as the uninterrupted one would have: a damaged stream can decode for
        some frame lists and not others)."""
        return {**self.sampler.state_dict(), "bad_videos": dict(self._bad)}

    def load_state_dict(self, state: dict, align: int = 1) -> None:
        """``align``: see :meth:`ShardedSampler.load_state_dict`."""
        state = dict(state)
        carried = state.pop("bad_videos", {})
        self.sampler.load_state_dict(state, align)
        self.dataset.set_epoch(self.sampler.epoch)
        records = {r.path: r for r in self.dataset.records}
        by_relpath = None
        for saved, reason in carried.items():
            if saved in records:
                path = saved
            else:
                by_relpath = by_relpath or _relpath_index(records)
                path = _moved_path(saved, *by_relpath)
            if path is None:  # not a video of this data set (any more)
                continue
            if (reason.startswith(READ_REASONS) and file_change(path, records[path].size) is None
                    and _open_error(path) is None):
                continue  # the file is the one indexed again (put back, indexed again, readable)
            if path not in self._bad:
                self._bad[path] = reason
                logger.warning("skipping video %s for the rest of this run, as before the resume "
                               "(its examples get stand-ins): %s", path, reason)

    def close(self) -> None:
        """End the passes in progress now: their pipelines and reader processes go (as they do
        when a pass ends or is freed); a later iteration starts a new one."""
        for running in list(self._passes):
            running.close()

    def __iter__(self):
        running = self._iterate()
        self._passes.add(running)
        return running

    def _iterate(self):
        self.skipped = []  # this pass's: a list kept over every epoch would only grow
        sampler = self.sampler
        start = sampler._resume_from  # the same resume protocol as VideoQALoader
        keys = list(sampler)  # (epoch, position) of the rest of this epoch's shard
        sampler.position = start
        bs = self.batch_size
        chunks = [keys[i : i + bs] for i in range(0, len(keys), bs)]
        if self.drop_last and chunks and len(chunks[-1]) < bs:
            chunks.pop()
        steps = [self._step(chunk) for chunk in chunks]
        consumed = 0
        pipe, planned = None, False  # planned: the live jobs of the steps ahead are fed to pipe
        decoded: dict[int, tuple[torch.Tensor | None, list[int]]] = {}  # the group's, by offset
        try:
            for i, step in enumerate(steps):
                if not planned:
                    pipe, planned = self._pipeline(steps[i:]), True
                frames, slots = None, []
                if step.live:
                    try:
                        if step.first:  # one DALI iteration decodes the whole group
                            decoded = self._split(*self._run(pipe))
                    except StopIteration as err:  # cannot happen: one DALI batch per group
                        raise RuntimeError("DALI ran out of batches before the sampler") from err
                    except Exception as err:  # noqa: BLE001 - DALI raises plain RuntimeError
                        _close(pipe)
                        pipe, planned = None, False  # unusable after an error: rebuilt, and
                        frames, slots = self._recover(step, err)  # the group's others re-fed
                    else:
                        frames, slots = decoded.pop(step.offset, (None, []))
                        self._report_missing(step, slots)
                        if slots:
                            self._failed_in_a_row = 0
                if frames is not None:
                    self._hold(frames)  # a decode group's later batches too
                batch = self._batch(step, frames, slots)  # stand-ins for the videos left out
                if pipe is not None and self._fed_later(steps[i + 1:]):
                    # a file left out just now (a stand-in that failed alone) is still fed to the
                    # pipeline for later batches: left out from here on, as a resumed loader
                    # (its state names the file) would do
                    _close(pipe)
                    pipe, planned, decoded = None, False, {}
                self._newly_bad.clear()
                consumed += len(step.keys)
                sampler.position = start + consumed
                yield batch
                self._release.mark()  # the consumer asks for the next batch
        finally:
            try:
                self._release.drain()
            except Exception:  # noqa: BLE001 - e.g. a pass finalised while CUDA shuts down
                logger.debug("releasing DALI's buffers at the end of a pass failed", exc_info=True)
            if pipe is not None:
                _close(pipe)

    # -- planning --------------------------------------------------------------------------------

    def _step(self, keys: list) -> _Step:
        """Plan one batch with the dataset's ``plan`` (the one sampling function)."""
        planned = [self._plan(key, slot) for slot, key in enumerate(keys)]
        return _Step(keys, [item for item, _ in planned], [job for _, job in planned])

    def _plan(self, key, slot: int) -> tuple[dict, _Job]:
        """One video's batch item (frames left out) and its reader job."""
        dataset = self.dataset
        plan = dataset.plan(key)
        ci, record = plan.clips, plan.record
        if dataset.dedup:
            wanted = ci.unique
            clip_index = torch.from_numpy(ci.inverse)
        else:  # baseline: every clip's frames in clip order, overlaps decoded again
            wanted = ci.clips.reshape(-1)
            clip_index = torch.arange(ci.clips.size, dtype=torch.long).view(ci.clips.shape)
        item = {
            # A size-0 placeholder: collate_videos builds every index tensor and mask of the
            # contract from it; the real frames come from DALI already batched.
            "frames": torch.empty((len(wanted), 0, 0, 0), dtype=self.dtype),
            "clip_index": clip_index,
            "frame_ids": torch.from_numpy(ci.clips),
            **example_fields(plan.example, plan.example_index, dataset.label_fn),
        }
        return item, _job(slot, record, wanted, dataset.image_size, self.trim,
                          fit=dataset.frame_fit)

    # -- running ---------------------------------------------------------------------------------

    def _pipeline(self, steps: Sequence[_Step]):
        """A built pipeline fed with the live jobs of ``steps`` (known-bad files left out), or
        None when no job is left."""
        feed: list[list[tuple]] = []
        offset = self.decode_group  # the group so far is full: the next live step opens one
        for step in steps:
            step.live = []
            for job in step.jobs:
                if job.path in self._bad:
                    self._skip(job, step, self._bad[job.path])
                else:
                    step.live.append(job)
            if not step.live:
                continue
            if offset == self.decode_group:
                feed.append([])
                offset = 0
            step.first, step.offset = offset == 0, offset
            base = offset * self.batch_size
            feed[-1].extend((base + job.slot, *job.as_tuple()[1:]) for job in step.live)
            offset += 1
        if not feed:
            return None
        return self._build([tuple(group) for group in feed], parallel=self.num_workers > 0,
                           batch_size=self.batch_size * self.decode_group)

    def _build(self, feed: list, *, parallel: bool, batch_size: int):
        from nvidia.dali import Pipeline

        source = reader_source(feed, self.trim,
                               defer_signals=parallel and self.defer_stop_signals)
        kwargs = {}
        if parallel:
            kwargs = {
                "py_num_workers": self.num_workers,
                "py_start_method": self.start_method or _default_start_method(self.device),
            }
        pipe = Pipeline(
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id if self.device == "gpu" else None,
            prefetch_queue_depth=self.prefetch_factor,
            exec_dynamic=True,  # an output buffer per iteration: zero-copy tensors stay valid
            **kwargs,
        )
        with pipe:
            pipe.set_outputs(
                *_define_graph(
                    source,
                    device=self.device,
                    parallel=parallel,
                    source_prefetch=max(self.prefetch_factor, self.num_workers),
                    image_size=self.dataset.image_size,
                    mean=self.dataset.mean,
                    std=self.dataset.std,
                    dtype=self.dtype,
                    frame_fit=self.dataset.frame_fit,
                )
            )
        pipe.build()
        return pipe

    def _run(self, pipe) -> tuple[torch.Tensor, list[int]]:
        frames_tl, slots_tl = pipe.run()
        slots = [int(np.asarray(slots_tl[i])) for i in range(len(slots_tl))]
        if self.device == "gpu":
            with torch.cuda.device(self.device_id):
                frames = torch.from_dlpack(frames_tl.as_tensor())
        else:
            frames = torch.from_dlpack(frames_tl.as_tensor())
        self._hold(frames)  # not DALI's to reuse while torch's stream may read it
        return frames, slots

    def _hold(self, frames: torch.Tensor) -> None:
        if self._holds:
            self._release.hold(frames)

    def _split(self, frames: torch.Tensor, slots: list[int]) -> dict:
        """One DALI iteration's output -> {offset: (frames, slots)} per step of its group. The
        reader keeps the feed's order, so each step's videos are consecutive rows: a view, cut to
        the step's own largest frame count (the contract pads to the batch's, not the group's)."""
        bs = self.batch_size
        if self.decode_group == 1:
            return {0: (frames, slots)}  # the zero-copy tensor as it came
        out: dict[int, tuple[torch.Tensor, list[int]]] = {}
        start = 0
        while start < len(slots):
            offset = slots[start] // bs
            end = start
            while end < len(slots) and slots[end] // bs == offset:
                end += 1
            if offset in out:
                raise RuntimeError(f"DALI returned the videos of step {offset} of a decode group "
                                   f"out of order: slots {slots}")
            part = frames.narrow(0, start, end - start)
            out[offset] = (part, [slot % bs for slot in slots[start:end]])
            start = end
        return out

    def _report_missing(self, step: _Step, slots: list[int]) -> None:
        """Jobs the reader left out: their file changed since the manifest was built."""
        returned = set(slots)
        for job in step.live:
            if job.slot not in returned:
                self._skip(job, step, _file_change(job) or READ_RACE)

    def _batch(self, step: _Step, frames: torch.Tensor | None, slots: list[int]) -> dict:
        """The step's batch: DALI's frames of the videos in ``slots`` and a stand-in (decoded on
        its own) for each video left out, so that every batch keeps its size."""
        items = [step.items[s] for s in slots]
        missing = [s for s in range(len(step.jobs)) if s not in set(slots)]
        if missing:
            parts = [] if frames is None else [
                frames[v, : item["frames"].shape[0]] for v, item in enumerate(items)]
            for slot in missing:
                item, alone = self._stand_in(step, slot)
                items.append(item)
                parts.append(alone)
            frames = _pad_stack(parts)
            slots = slots + missing
        return self._assemble(items, frames, [step.jobs[s].path for s in slots])

    def _assemble(self, items: list[dict], frames: torch.Tensor, paths: list[str]) -> dict:
        """The batch contract from DALI's padded frames [V, U_max, 3, S, S] and the plans."""
        batch = collate_videos(items, output="frames")
        u_max = int(batch["num_unique"].max())
        if self.decode_group > 1 and frames.shape[1] > u_max:  # padded to the group's largest
            frames = frames[:, :u_max].contiguous()  # a device copy; dense as the contract says
        if frames.shape[1] != u_max:
            raise RuntimeError(
                f"DALI returned {frames.shape[1]} frames for a video that asked for "
                f"{int(batch['num_unique'].max())}: files {paths}"
            )
        batch["frames"] = frames
        if self.output == "clips":
            device = frames.device
            batch["clips"] = gather_clips(
                frames, batch["clip_index"].to(device), batch["frame_mask"].to(device)
            )
        return batch

    # -- faults ----------------------------------------------------------------------------------

    def _recover(self, step: _Step, err: Exception) -> tuple[torch.Tensor | None, list[int]]:
        """DALI raised on ``step``: find its bad videos one by one; the frames and slots of the
        others.

        The error may come from a batch prefetched after this one (a reader error surfaces early):
        then every video here decodes on its own and the next pipeline meets the error again.
        """
        logger.warning(
            "DALI raised while the batch of %s was in flight: %s; decoding its videos one by one",
            ", ".join(job.path for job in step.live),
            _first_line(err),
        )
        good: list[tuple[int, torch.Tensor]] = []
        for job in step.live:
            reason = _file_change(job)
            if reason is None:
                try:
                    frames = self._decode_alone(job)
                except Exception as alone:  # noqa: BLE001 - whatever DALI raised for this file
                    limit = self._decoder_limit(job.path)
                    reason = decode_failure(alone, limit)
                    self._failed_in_a_row += 1
                    if self._failed_in_a_row >= MAX_FAILED_VIDEOS:
                        raise RuntimeError(
                            f"DALI failed to decode {self._failed_in_a_row} videos in a row, the "
                            f"last {job.path}: {reason.removeprefix('decoding failed: ')}"
                            + ("" if limit or refused_by_decoder(alone) else "; if these files "
                               "are fine, the fault is elsewhere (GPU memory, driver)")
                        ) from alone
                else:
                    self._failed_in_a_row = 0
            if reason is not None:
                self._skip(job, step, reason)
            else:
                good.append((job.slot, frames))
        if not good:
            return None, []
        return _pad_stack([f for _, f in good]), [slot for slot, _ in good]

    def _decode_alone(self, job: _Job) -> torch.Tensor:
        """One video through a throw-away pipeline (read in this process): [U, 3, S, S]."""
        pipe = self._build([(job.as_tuple(),)], parallel=False, batch_size=1)
        try:
            frames, _ = self._run(pipe)
            # A copy owned by torch, queued on torch's stream while the pipeline is alive; DALI's
            # buffer stays referenced (self._release) until torch's stream has run the copy.
            return frames[0].clone()
        finally:
            _close(pipe)

    def _decoder_limit(self, path: str) -> str | None:
        """What keeps this loader's decoder from reading the video at ``path``, by its manifest
        record (None: nothing known; only asked after a failure)."""
        record = next((r for r in self.dataset.records if r.path == path), None)
        if record is None:
            return None
        if self.device == "gpu":
            from siasam_fast.pipeline import nvdec

            return nvdec.problem(record, tuple(torch.cuda.get_device_capability(self.device_id)))
        if record.codec not in DALI_CPU_CODECS:
            return (f"codec {record.codec}: DALI's CPU decoder reads "
                    f"{', '.join(sorted(DALI_CPU_CODECS))}")
        return None

    def _skip(self, job: _Job, step: _Step, reason: str) -> None:
        """Leave one example out (it gets a stand-in); its file is left out for the rest of the
        run. Once per example: a pipeline rebuilt after an error plans its steps again."""
        if job.slot in step.skipped:
            return
        step.skipped.add(job.slot)
        self._mark_bad(job.path, reason)
        logger.debug("skipping video %s (question %s): %s", job.path,
                     step.items[job.slot]["qid"], reason)
        self.skipped.append((job.path, reason))

    def _fed_later(self, steps: Sequence[_Step]) -> bool:
        """Whether a file left out since the last batch is fed to the pipeline for ``steps``."""
        return bool(self._newly_bad) and any(
            job.path in self._newly_bad for step in steps for job in step.live or ())

    def _mark_bad(self, path: str, reason: str) -> None:
        if path not in self._bad:
            self._newly_bad.add(path)
            self._bad[path] = reason
            logger.warning("skipping video %s for the rest of this run (its examples get "
                           "stand-ins): %s", path, reason)
            check_failed_share(self._bad, self.dataset.num_videos, "this DALI loader")

    def _stand_in(self, step: _Step, slot: int) -> tuple[dict, torch.Tensor]:
        """A stand-in for the video left out of ``slot``: the next example of the dataset
        (wrapping) whose video decodes, decoded on its own; its batch item and frames. Videos
        already left out, or whose size changed, are passed over without counting as tries."""
        epoch, position = step.keys[slot]
        records = self.dataset.records
        tried = {step.jobs[slot].path}
        for candidate in stand_in_positions(position, len(self.dataset)):
            path = records[candidate].path
            if path in tried or path in self._bad:
                continue
            changed = file_change(path, records[candidate].size)
            if changed:
                self._mark_bad(path, changed)
                continue
            if len(tried) >= STAND_IN_TRIES:
                break
            tried.add(path)
            item, job = self._plan((epoch, candidate), slot)
            try:
                frames = self._decode_alone(job)
            except Exception as err:  # noqa: BLE001 - whatever DALI raised for this file
                self._mark_bad(path, decode_failure(err, self._decoder_limit(path)))
                continue
            item["stand_in"] = True
            self.stand_ins += 1
            return item, frames
        raise DecodeError(no_stand_in(step.jobs[slot].path, len(tried), self._bad))


def _relpath_index(records: dict) -> tuple[dict, set]:
    """For :func:`_moved_path`: each record's path by its manifest-relative path's parts, and the
    folders the records lie in now (each path less its relpath)."""
    by_rel, roots = {}, set()
    for path, record in records.items():
        rel = Path(record.relpath).parts
        if rel:
            by_rel[rel] = path
            full = Path(path).parts
            if full[-len(rel):] == rel:
                roots.add(full[:-len(rel)])
    return by_rel, roots


def _moved_path(saved: str, by_rel: dict, roots: set) -> str | None:
    """The path of the video a loader state named ``saved`` before the videos moved
    (``data.video_dir`` re-roots the manifest's paths): the record whose manifest-relative path
    ends ``saved``, the longest such; None if there is none, or if ``saved`` lies in a folder the
    records lie in now (the videos did not move: that video left the data set)."""
    parts = Path(saved).parts
    for root in roots:
        if root and parts[:len(root)] == root:
            return by_rel.get(parts[len(root):])
    for i in range(len(parts)):  # the longest suffix first
        if parts[i:] in by_rel:
            return by_rel[parts[i:]]
    return None


def _pad_stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[U_v, 3, S, S] per video -> [V, U_max, 3, S, S], zeros past each video's frames."""
    u_max = max(p.shape[0] for p in parts)
    out = parts[0].new_zeros((len(parts), u_max, *parts[0].shape[1:]))
    for v, p in enumerate(parts):
        out[v, : p.shape[0]] = p
    return out


def _job(slot: int, record: VideoRecord, wanted: np.ndarray, image_size: int,
         trim: bool = False, fit: str = "crop") -> _Job:
    rh, rw = fitted_shape(record.height, record.width, image_size, fit)
    if fit == "pad":
        # The window at (0, 0): DALI's anchor crop_pos * (extent - crop) is 0 (the extent is at
        # most the crop), and the graph pads what lies past the frame (right, bottom).
        crop_pos = (0.0, 0.0)
    else:
        top, left = center_crop_box(rh, rw, image_size)
        # DALI's anchor is crop_pos * (extent - crop); +0.25 lands on `left` / `top` whether DALI
        # rounds or floors it.
        crop_pos = ((left + 0.25) / max(rw - image_size, 1),
                    (top + 0.25) / max(rh - image_size, 1))
    return _Job(
        slot=slot,
        path=record.path,
        size=int(record.size),
        frames=np.ascontiguousarray(wanted, dtype=np.int32),
        resize=np.array([rh, rw], dtype=np.float32),
        crop_pos=np.array(crop_pos, dtype=np.float32),
        span=keyframe_span(record, wanted) if trim and len(wanted) else np.zeros(0, np.int64),
        num_frames=int(record.num_frames),
    )


def _file_change(job: _Job) -> str | None:
    """Why the file no longer matches its manifest record or cannot be read (a permission
    taken away: its size still matches), or None if it is fine."""
    return file_change(job.path, job.size) or _open_error(job.path)


def _open_error(path: str) -> str | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as err:
        return f"unreadable: {err.strerror or err}"


# The reasons the reader leaves a file out for (not its content's): a resumed run tries the file
# again if it is readable and the one indexed by then
READ_RACE = "changed while the batch was read"
READ_REASONS = (CHANGED_SINCE_INDEXING, "unreadable", READ_RACE)


def _first_line(err: BaseException) -> str:
    """The informative line of a DALI error: what follows "encountered:" (operator errors), else
    the last line (an exception raised in a reader process, with its traceback before it)."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1].split("C++ context:", 1)[0]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        line = lines[0] if lines else ""
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("Current pipeline object")]
        line = lines[-1] if lines else ""
    line = line or type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


# DALI's words when its decoder cannot decode a video that is not damaged: NVDEC lacks the codec,
# chroma format or bit depth, or the frame is outside its sizes (frames_decoder_gpu.cc); the CPU
# decoder lacks the codec (frames_decoder_cpu.cc)
DECODER_REFUSALS = ("not supported on this GPU", "Video is too small", "Video is too large",
                    "not supported by the CPU variant")


def refused_by_decoder(err: BaseException) -> bool:
    return any(words in str(err) for words in DECODER_REFUSALS)


def decode_failure(err: BaseException, limit: str | None = None) -> str:
    """Why a video was left out after DALI raised ``err`` decoding it alone. A decoder that cannot
    read the video (``limit``: what its manifest record says the decoder lacks; or DALI's words)
    is told from damage, with what decodes it."""
    hint = ""
    if limit or refused_by_decoder(err):
        what = limit or "the video's codec, pixel format or frame size"
        hint = (f" (not damage: this decoder cannot read {what}; data.backend=pyav decodes it; "
                "README: 'Backends')")
    return f"decoding failed: {_first_line(err)}{hint}"


def _close(pipe) -> None:
    """Release a pipeline and stop its reader processes now rather than at garbage collection
    (what ``Pipeline.__del__`` and its finaliser do; both are idempotent)."""
    try:
        pipe._shutdown()
        pool = getattr(pipe, "_py_pool", None)
        if pool is not None:
            pool.close()
    except Exception:  # noqa: BLE001 - closing a failed pipeline must not mask its error
        logger.debug("closing a DALI pipeline failed", exc_info=True)


def _default_start_method(device: str) -> str:
    """Fork when nothing holds a CUDA context (CPU tests: fast start), else spawn (DALI refuses
    to fork a process with CUDA initialised, and a GPU pipeline initialises it)."""
    if device == "gpu":
        return "spawn"
    try:
        from nvidia.dali import backend

        initialised = backend.IsDriverInitialized()
    except (ImportError, AttributeError):
        initialised = torch.cuda.is_initialized()
    return "spawn" if initialised else "fork"


# ----------------------------------------------------------------------------------------------
# The factory


def build_dali_loader(
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
    backend: str = "dali",
    output: str = "frames",
    dedup: bool = True,
    pin_memory: bool | None = None,
    label_fn: Callable[[QAExample], int] | None = None,
    shuffle: bool | None = None,
    drop_last: bool = False,
    epoch: int = 0,
    prefetch_factor: int = 2,
    dtype: torch.dtype | None = None,
    seek_threshold: int = DEFAULT_SEEK_THRESHOLD,
    decode_threads: int = 1,
    multiprocessing_context=None,
    *,
    device: str | None = None,
    device_id: int | None = None,
    num_threads: int | None = None,
    decode_group: int = 1,
    trim: bool = True,
    defer_stop_signals: bool = False,
    frame_fit: str = "crop",
) -> DALIVideoLoader:
    """A DALI loader for ``split`` on this rank; the arguments of ``build_loader``, plus:

    ``device``: "gpu" (NVDEC, the default when CUDA is available) or "cpu" (DALI's CPU decoder:
    VP8 / VP9 / MJPEG only; frames come back as CPU tensors). ``device_id``: the GPU (default: the
    current torch device). ``num_threads``: DALI's threads (default: ``default_num_threads``: on
    the GPU one per video of the batch, 4 to 16, each driving one NVDEC session; on the CPU up to
    4).
    ``num_workers``: DALI's file-reading processes (0: read in this process).
    ``prefetch_factor``: batches DALI prepares ahead. ``dtype``: of the frames, float16 (the
    default on the GPU) or float32 (the default on the CPU). ``multiprocessing_context``: how the
    reader processes start, "fork" or "spawn" (default: fork unless CUDA is initialised).
    ``decode_group``: batches decoded together in one DALI iteration (default 1). The mixed
    decoder runs the videos of one iteration in parallel, one per thread, and the iteration lasts
    as long as its slowest video; a group of 2 puts 16 videos in flight for batches of 8. The
    batches still come one by one, the same videos in the same order; with a group above 1 each
    batch's frames are a view (or, when the group's videos need more frames than the batch's, a
    device copy) of the group's output.
    ``trim``: the reader processes hand DALI only the stretch of each file that its frames need
    (:func:`trim_file`: packets copied by PyAV, nothing decoded). Default on: DALI 2.4's video
    decoder does not seek, it decodes every file from its first frame up to the last frame
    wanted (README, "Trimmed files for DALI"), so a whole file costs in proportion to where the
    clips lie, a stretch only what they need. On the GPU the loader first checks, once per
    process, that NVDEC decodes a trimmed clip exactly (:mod:`~siasam_fast.pipeline.dali_check`),
    and hands over whole files, with a warning, if it does not.
    ``defer_stop_signals``: the reader processes leave SIGTERM, SIGINT and SIGUSR1 to this process
    (:mod:`siasam_fast.stopping`; training sets it).
    ``frame_fit``: "crop" (the default) or "pad", as ``build_loader``'s (``data.frame_fit``).
    ``pin_memory``, ``seek_threshold`` and ``decode_threads`` only concern the PyAV backend and are
    accepted so that both factories take the same arguments.
    """
    del pin_memory, seek_threshold, decode_threads  # PyAV-only knobs
    if backend != "dali":
        raise ValueError(f"backend={backend!r}: build_dali_loader builds 'dali' loaders only; "
                         "use siasam_fast.pipeline.loaders.build_video_loader to choose")
    if not dali_available():
        raise ImportError("the DALI backend needs nvidia-dali: pip install 'siasam-fast[gpu]' "
                          "(CUDA 13) or 'siasam-fast[gpu-cu120]' (CUDA 12)")
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}: valid outputs are {', '.join(OUTPUTS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: must be >= 0 (0 reads in this process)")
    if prefetch_factor < 1:
        raise ValueError(f"prefetch_factor={prefetch_factor}: must be >= 1")
    if decode_group < 1:
        raise ValueError(f"decode_group={decode_group}: must be >= 1 (batches per DALI iteration)")
    if device is None:
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: valid devices are {', '.join(DEVICES)} "
                         "('gpu' decodes on NVDEC, 'cpu' with DALI's CPU decoder)")
    if device == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("device='gpu' but torch sees no CUDA device; use device='cpu' "
                             "(VP8 / VP9 / MJPEG videos only) or the pyav backend")
        device_id = torch.cuda.current_device() if device_id is None else int(device_id)
    if dtype is None:
        dtype = torch.float16 if device == "gpu" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype}: the DALI backend yields torch.float16 or torch.float32")
    start_method = _start_method(multiprocessing_context)
    trim = resolve_trim(bool(trim), device, device_id)
    if num_threads is None:
        num_threads = default_num_threads(device, batch_size * decode_group)
    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads}: must be >= 1")
    dataset, sampler = plan_epochs(
        examples, manifest, sampling_cfg, split, seed=seed, rank=rank, world_size=world_size,
        shuffle=shuffle, drop_last=drop_last, epoch=epoch, image_size=image_size, dedup=dedup,
        label_fn=label_fn, dtype=dtype, frame_fit=frame_fit,
    )
    return DALIVideoLoader(
        dataset,
        sampler,
        batch_size=batch_size,
        output=output,
        drop_last=drop_last,
        device=device,
        device_id=device_id if device == "gpu" else None,
        dtype=dtype,
        num_workers=num_workers,
        num_threads=num_threads,
        prefetch_factor=prefetch_factor,
        start_method=start_method,
        decode_group=decode_group,
        trim=trim,
        defer_stop_signals=defer_stop_signals,
    )


MAX_DEFAULT_THREADS = 16


def default_num_threads(device: str = "cpu", videos: int = 1) -> int:
    """DALI's threads when ``num_threads`` is not given.

    On the CPU they decode and transform: up to 4, at most the cores. On the GPU the mixed video
    decoder gives each sample of a batch to one thread of its own pool, and each thread drives
    one NVDEC session (DALI's ``VideoDecoderBase``: decoders are created and run per sample on
    that pool); with fewer threads than ``videos`` per DALI iteration (a batch, or a decode group
    of batches), an iteration takes several rounds of decodes. There the threads mostly wait on
    NVDEC, so the default is one per video, at least 4 and at most ``MAX_DEFAULT_THREADS``,
    whatever the core count."""
    if device == "gpu":
        return max(4, min(int(videos), MAX_DEFAULT_THREADS))
    return max(1, min(4, os.cpu_count() or 1))


def _start_method(context) -> str | None:
    if context is None:
        return None
    name = context if isinstance(context, str) else getattr(context, "get_start_method", None)
    if callable(name):
        name = name()
    if name not in START_METHODS:
        raise ValueError(f"multiprocessing_context={context!r}: DALI's reader processes start "
                         f"with {' or '.join(START_METHODS)}")
    return name
