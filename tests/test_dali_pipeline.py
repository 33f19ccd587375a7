"""The DALI pipeline: the same graph as on the GPU, run with DALI's CPU decoder (VP9 / MJPEG).

Exact frames (frames show their own index), pixel agreement with the PyAV backend, the batch
contract, order / shards / resume as PyAV, and the fault paths (corrupt in the manifest, a file that
changes or gets damaged after indexing). GPU-only checks (H.264 with B-frames on NVDEC, fp16 on the
device, DLPack without a copy) skip without CUDA.

Pixel tolerance, in grey levels (0..255) after undoing the normalisation, measured on 2026-11
with DALI 2.4 and PyAV 18.1 over sizes 24..96 (downscale, upscale, none), square, wide and tall:

- grey content (the index videos: no chroma, so only resize / crop / normalise and the decoders'
  rounding differ): max 2, mean <= 0.67 (MJPEG), <= 0.26 (VP9), 99th percentile 1. A crop window
  one pixel off would show as differences near 200 at the cells' edges. Tolerance: max 3, mean 1.
- colour texture: the decoders convert 4:2:0 to RGB differently (DALI and swscale upsample the
  chroma differently; the colour matrix agrees, checked on flat colours within 2 levels), so
  differences follow the chroma detail: at 48x80 / 60x84 -> 32 px, mean <= 1.5, 99th percentile
  <= 7, max <= 13 (at native size: mean up to 5, max up to 34). Tolerance: mean 3, p99 12, max 32.
- NVDEC (H.264, grey content, on an H200): max 2, mean 1.08-1.10, 99th percentile 2 (its YUV to
  RGB conversion rounds differently from swscale's). Tolerance: max 4, mean 1.5.
"""

import os
import shutil
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from videos import read_index, read_indices, video_path, write_index_video

from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline import dali as dali_module
from siasam_fast.pipeline import nvdec
from siasam_fast.pipeline.dali import DALIVideoLoader, build_dali_loader
from siasam_fast.pipeline.dataset import build_loader
from siasam_fast.pipeline.loaders import build_video_loader
from siasam_fast.pipeline.manifest import build_manifest, probe_video
from siasam_fast.pipeline.transforms import denormalize
from siasam_fast.sampling import SamplingConfig, example_rng, sample_siamese_clips

pytest.importorskip("nvidia.dali")

SIZE = 32  # image_size: the 64 px videos are downscaled (antialiased resize)
CFG = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)
# name -> (codec, frames, size, writer options)
VIDEOS = {
    "vp9": ("vp9", 100, 64, dict(gop=10)),
    "vp9_vfr": ("vp9", 90, 64, dict(gop=8, vfr=True)),
    "mjpeg": ("mjpeg", 80, 64, {}),
    "wide": ("vp9", 60, (48, 80), dict(gop=10)),  # centre crop of a non-square frame
    "short": ("vp9", 24, 64, dict(gop=10)),  # shorter than the clips' span: 23 unique frames
}
COLOUR = {"colour_vp9": ("vp9", (48, 80)), "colour_mjpeg": ("mjpeg", (60, 84))}
INDEXED = ["vp9", "vp9_vfr", "mjpeg"]  # square: the crop keeps every cell of the index code
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def write_colour_video(path, num_frames, codec, size, seed=0):
    """A panning colour texture (smooth chroma) with grain: realistic content for pixel checks."""
    import av

    height, width = size
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=gen),
        size=(height + 32, width + 32),
        mode="bicubic",
        align_corners=False,
    )[0].permute(1, 2, 0)
    base = (base.clamp(0, 1) * 255).to(torch.uint8).numpy()
    rng = np.random.default_rng(seed)
    encoder = {"vp9": "libvpx-vp9", "mjpeg": "mjpeg"}[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=25)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if codec == "vp9" else "yuvj420p"
        stream.options = (
            {"g": "10", "crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}
            if codec == "vp9"
            else {"q:v": "3"}
        )
        for t in range(num_frames):
            frame = base[t % 32 : t % 32 + height, (2 * t) % 32 : (2 * t) % 32 + width]
            grain = rng.integers(-8, 9, frame.shape[:2])[..., None]
            frame = np.clip(frame.astype(np.int16) + grain, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dali_videos")
    for name, (codec, n, size, options) in VIDEOS.items():
        write_index_video(video_path(folder, name, codec), n, codec=codec, size=size, **options)
    for name, (codec, size) in COLOUR.items():
        write_colour_video(video_path(folder, name, codec), 40, codec, size)
    (folder / "broken.webm").write_bytes(b"not a video at all")
    return folder


@pytest.fixture(scope="module")
def manifest(folder):
    return build_manifest(folder, folder / "manifest.jsonl", workers=1, progress=False)


def examples_for(names):
    return [QAExample(qid=f"q{i}", video_id=v, question="what?") for i, v in enumerate(names)]


def dali(examples, manifest, split="train", batch_size=2, **kwargs):
    kwargs = {"image_size": SIZE, "num_workers": 0, "device": "cpu", **kwargs}
    return build_dali_loader(examples, manifest, CFG, split, batch_size, **kwargs)


def pyav(examples, manifest, split="train", batch_size=2, **kwargs):
    kwargs = {"image_size": SIZE, "num_workers": 0, **kwargs}
    return build_loader(examples, manifest, CFG, split, batch_size, **kwargs)


def check_batch_frames(batch, dedup=True):
    """Every real clip frame shows the number in frame_ids; frames hold the sorted U (``dedup``)
    or every clip frame in clip order; zeros past num_unique."""
    V, N, B = batch["clip_index"].shape
    for v in range(V):
        u = int(batch["num_unique"][v])
        ids = read_indices(denormalize(batch["frames"][v, :u]))
        real = batch["frame_ids"][v][batch["frame_mask"][v]].tolist()
        assert ids == (sorted(set(real)) if dedup else real)
        assert (batch["frames"][v, u:] == 0).all()
        for n in range(N):
            for b in range(B):
                if batch["frame_mask"][v, n, b]:
                    want = int(batch["frame_ids"][v, n, b])
                    assert ids[int(batch["clip_index"][v, n, b])] == want
                    if "clips" in batch:
                        assert read_index(denormalize(batch["clips"][v, n, b])) == want


def grey_levels(frames):
    """Normalised [..., 3, S, S] -> 0..255 floats."""
    return denormalize(frames.float().reshape(-1, *frames.shape[-3:]))


# -- exact frames ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dedup, output, num_workers",
    [(True, "frames", 0), (True, "clips", 2), (False, "frames", 2), (False, "clips", 0)],
)
def test_frames_are_exactly_the_sampled_frames(manifest, dedup, output, num_workers):
    names = INDEXED * 2
    loader = dali(
        examples_for(names), manifest, batch_size=4, seed=3, epoch=5, dedup=dedup,
        output=output, num_workers=num_workers,
    )
    assert isinstance(loader, DALIVideoLoader) and len(loader) == 2
    seen = []
    for batch in loader:
        assert batch["frames"].dtype == torch.float32 and batch["frames"].device.type == "cpu"
        check_batch_frames(batch, dedup=dedup)
        for v, index in enumerate(batch["example_index"].tolist()):
            record = manifest[names[index]]
            expected = sample_siamese_clips(record.num_frames, CFG, example_rng(3, 5, index))
            assert batch["frame_ids"][v].tolist() == expected.clips.tolist()
            if dedup:
                assert int(batch["num_unique"][v]) == len(expected.unique)
            else:
                assert int(batch["num_unique"][v]) == expected.clips.size
            seen.append(index)
    assert sorted(seen) == list(range(len(names)))
    assert loader.skipped == []


def test_sparse_clips_are_exactly_the_sampled_frames(manifest):
    """ClipBERT's sparse clips (sampling.placement=sparse) through the same DALI graph: clips
    anywhere in the video, overlapping or not, decoded from the sorted unique frames."""
    cfg = SamplingConfig(**{**CFG.__dict__, "placement": "sparse"})
    names = INDEXED
    loader = build_dali_loader(examples_for(names), manifest, cfg, "train", 4, image_size=SIZE,
                               num_workers=0, device="cpu", seed=3, epoch=5)
    seen = []
    for batch in loader:
        check_batch_frames(batch)
        for v, index in enumerate(batch["example_index"].tolist()):
            record = manifest[names[index]]
            expected = sample_siamese_clips(record.num_frames, cfg, example_rng(3, 5, index))
            assert batch["frame_ids"][v].tolist() == expected.clips.tolist()
            assert int(batch["num_unique"][v]) == len(expected.unique)
            seen.append(index)
    assert sorted(seen) == list(range(len(names)))


# -- agreement with the PyAV backend -----------------------------------------------------------


@pytest.mark.parametrize("output, dedup", [("frames", True), ("clips", True), ("clips", False)])
def test_batch_contract_is_the_pyav_one(manifest, output, dedup):
    examples = examples_for(["vp9", "mjpeg", "wide", "vp9_vfr", "colour_vp9"])
    kwargs = dict(batch_size=3, seed=1, output=output, dedup=dedup)
    ours = list(dali(examples, manifest, **kwargs))
    theirs = list(pyav(examples, manifest, **kwargs))
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert list(a) == list(b)  # same keys, same order
        for key in a:
            if isinstance(b[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                if key not in ("frames", "clips"):
                    assert torch.equal(a[key], b[key]) or key == "count", key
            else:
                assert a[key] == b[key], key
        assert torch.equal(a["count"].isnan(), b["count"].isnan())


def test_pixels_match_pyav_on_grey_content(manifest):
    """Resize, crop and normalise mirror transforms.py: within rounding (module docstring)."""
    cfg = SamplingConfig(num_clips=3, frames_per_clip=4, stride=4)
    examples = examples_for(["vp9", "vp9_vfr", "mjpeg", "wide"])
    for size in (SIZE, 40):  # downscale; 40 also crops the wide video off-centre by a half pixel
        kwargs = dict(image_size=size, num_workers=0)
        a = next(iter(build_dali_loader(examples, manifest, cfg, "val", 4, device="cpu", **kwargs)))
        b = next(iter(build_loader(examples, manifest, cfg, "val", 4, **kwargs)))
        diff = (grey_levels(a["frames"]) - grey_levels(b["frames"])).abs()
        assert diff.max() <= 3 and diff.mean() <= 1.0, (size, diff.max(), diff.mean())


def test_pixels_match_pyav_on_colour_content(manifest):
    cfg = SamplingConfig(num_clips=3, frames_per_clip=4, stride=4)
    examples = examples_for(list(COLOUR))
    a = next(iter(build_dali_loader(examples, manifest, cfg, "val", 2, image_size=SIZE,
                                    num_workers=0, device="cpu")))
    b = next(iter(build_loader(examples, manifest, cfg, "val", 2, image_size=SIZE, num_workers=0)))
    diff = (grey_levels(a["frames"]) - grey_levels(b["frames"])).abs()
    assert diff.mean() <= 3 and diff.flatten().quantile(0.99) <= 12 and diff.max() <= 32


# -- order: epochs, shards, resume -------------------------------------------------------------

NAMES = ["vp9", "vp9_vfr", "mjpeg", "wide"] * 2 + ["vp9"]


def order(batches):
    return [b["example_index"].tolist() for b in batches]


@pytest.mark.parametrize("drop_last", [False, True])
def test_order_per_seed_epoch_rank_is_the_pyav_one(manifest, drop_last):
    examples = examples_for(NAMES)
    for rank in range(2):
        for epoch in (0, 1):
            kwargs = dict(batch_size=2, seed=7, rank=rank, world_size=2, epoch=epoch,
                          drop_last=drop_last)
            ours, theirs = dali(examples, manifest, **kwargs), pyav(examples, manifest, **kwargs)
            assert len(ours) == len(theirs)
            a, b = list(ours), list(theirs)
            assert order(a) == order(b)
            assert [x["frame_ids"].tolist() for x in a] == [x["frame_ids"].tolist() for x in b]
            # the same sampler state; DALI's also names the videos it left out (none here)
            assert ours.state_dict() == {**theirs.state_dict(), "bad_videos": {}}


def test_set_epoch_changes_order_and_clips(manifest):
    loader = dali(examples_for(NAMES), manifest, batch_size=3, seed=7, num_workers=2)
    ids = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ids[epoch] = torch.cat([b["frame_ids"].flatten() for b in loader]).tolist()
    assert ids[0] != ids[1]
    reference = pyav(examples_for(NAMES), manifest, batch_size=3, seed=7, epoch=1)
    assert ids[1] == torch.cat([b["frame_ids"].flatten() for b in reference]).tolist()


def test_resume_continues_with_the_remaining_examples(manifest):
    kwargs = dict(batch_size=2, seed=7, num_workers=2)
    loader = dali(examples_for(NAMES), manifest, epoch=1, **kwargs)
    full = order(loader)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    state = loader.state_dict()
    assert state["position"] == 4 and state["epoch"] == 1
    it.close()  # stops this pass's pipeline and its reader processes
    resumed = dali(examples_for(NAMES), manifest, epoch=0, **kwargs)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert order(first + rest) == full
    assert resumed.state_dict()["position"] == len(NAMES)
    assert order(resumed) == full  # the next pass starts the epoch again
    reference = list(pyav(examples_for(NAMES), manifest, batch_size=2, seed=7, epoch=1))[2]
    assert torch.equal(rest[0]["frame_ids"], reference["frame_ids"])


@pytest.mark.parametrize(
    "group, num_workers, drop_last, dedup",
    [(2, 0, False, True), (3, 2, True, True), (2, 2, False, False)],
)
def test_decode_groups_give_the_same_batches(manifest, group, num_workers, drop_last, dedup):
    """Several batches per DALI iteration: the same videos, order, frames and resume positions as
    one batch per iteration; each batch padded to its own largest frame count (the short videos'
    batch holds fewer frames than the rest of its group)."""
    names = ["vp9", "mjpeg", "short", "short", "vp9_vfr", "vp9", "mjpeg"]  # groups end short
    kwargs = dict(batch_size=2, seed=4, epoch=2, dedup=dedup, drop_last=drop_last,
                  shuffle=False)
    one = dali(examples_for(names), manifest, **kwargs)
    grouped = dali(examples_for(names), manifest, decode_group=group, num_workers=num_workers,
                   **kwargs)
    a, positions = [], []
    for batch in grouped:
        a.append(batch)
        positions.append(grouped.state_dict()["position"])
    b = list(one)
    assert order(a) == order(b) and len(a) == len(one)
    assert positions == [2, 4, 6, 7][: len(a)]
    for x, y in zip(a, b):
        assert x["frames"].shape == y["frames"].shape  # not the group's padding
        assert x["frames"].shape[1] == int(x["num_unique"].max())
        assert x["frames"].is_contiguous()
        assert torch.equal(x["frames"], y["frames"]), x["video_id"]
        assert torch.equal(x["frame_ids"], y["frame_ids"])
        check_batch_frames(x, dedup=dedup)
    if dedup:
        assert [int(x["num_unique"].max()) for x in a][:2] == [37, 23]
    assert grouped.skipped == []


def test_decode_groups_feed_several_batches_per_iteration(manifest, monkeypatch):
    sizes = []
    original = dali_module.read_encoded_batch

    def recording(batches, info, *rest):
        if info.iteration < len(batches):
            sizes.append(len(batches[info.iteration]))
        return original(batches, info, *rest)

    monkeypatch.setattr(dali_module, "read_encoded_batch", recording)
    loader = dali(examples_for(INDEXED * 3), manifest, batch_size=2, decode_group=3)
    assert len(list(loader)) == 5
    assert sizes == [6, 3]  # 9 videos: a group of three batches, then two (one short)


def test_decode_groups_skip_a_damaged_video_and_go_on(own_copy, caplog):
    folder, manifest = own_copy
    damaged = video_path(folder, "vp9", "vp9")
    damage(damaged, "hidden")
    names = ["vp9_vfr", "vp9", "mjpeg"] * 2
    loader = dali(examples_for(names), manifest, batch_size=2, shuffle=False, decode_group=2)
    with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dali"):
        batches = list(loader)
    # vp9's examples (1 and 4) get the next examples (2 and 5) as stand-ins, at their batch's end
    assert [b["example_index"].tolist() for b in batches] == [[0, 2], [2, 3], [5, 5]]
    assert [b["stand_in"].tolist() for b in batches] == [[False, True], [False, False],
                                                        [False, True]]
    for batch in batches:
        check_batch_frames(batch)
    assert [path for path, _ in loader.skipped] == [str(damaged)] * 2


def test_frames_outlive_their_pipeline(manifest):
    """Zero-copy tensors keep DALI's buffer alive after the pass (and its pipeline) ended."""
    loader = dali(examples_for(INDEXED), manifest, batch_size=3)
    kept = next(iter(loader))["frames"]
    copy = kept.clone()
    for _ in range(2):
        list(loader)
    assert torch.equal(kept, copy)


class FakeEvent:
    """A CUDA event stood in for: done when the test says torch's stream got past it."""

    made: list = []

    def __init__(self):
        self.done = False
        FakeEvent.made.append(self)

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def test_stream_release_keeps_buffers_until_torch_is_past_them():
    FakeEvent.made = []
    keeper = dali_module._StreamRelease(None, event_factory=FakeEvent)
    first, second, third = torch.zeros(3), torch.ones(3), torch.full((3,), 2.0)
    alive = [weakref.ref(first), weakref.ref(second), weakref.ref(third)]
    keeper.hold(first)
    del first
    keeper.mark()  # the consumer asked for the next batch: an event covers the first
    keeper.hold(second)
    del second
    keeper.mark()
    assert [r() is not None for r in alive] == [True, True, True] and len(FakeEvent.made) == 2
    FakeEvent.made[1].done = True  # events complete in stream order: the first one is waited for
    keeper.mark()
    assert [r() is not None for r in alive] == [True, True, True]
    FakeEvent.made[0].done = True
    keeper.mark()  # nothing new held: no new event, both let go
    assert [r() is None for r in alive[:2]] == [True, True] and len(FakeEvent.made) == 2
    keeper.hold(third)
    del third
    keeper.drain()  # a pass's end: marks, waits for the events, lets everything go
    assert alive[2]() is None and len(keeper) == 0 and FakeEvent.made[2].done


@pytest.mark.parametrize("group", [1, 2])
def test_the_loader_keeps_each_batchs_gpu_buffer_until_its_next_request_is_passed(
        manifest, monkeypatch, group):
    """What DALI hands to torch on the GPU stays referenced by the loader until the consumer has
    asked for the batch after the last one made from it and torch's stream has passed that point,
    including a decode group's later batches (views of the group's output); a pass's end lets go of
    everything. The CPU run stands in for the GPU's (its outputs held as the GPU's are)."""
    FakeEvent.made = []
    loader = dali(examples_for(INDEXED * 2), manifest, batch_size=2, shuffle=False,
                  decode_group=group)
    loader._release = dali_module._StreamRelease(None, event_factory=FakeEvent)
    loader._holds = True  # what device="gpu" sets
    outputs = []
    run = loader._run

    def recording(pipe):
        frames, slots = run(pipe)
        outputs.append(weakref.ref(frames))
        return frames, slots

    monkeypatch.setattr(loader, "_run", recording)
    assert len(INDEXED * 2) // 2 == 3  # three batches: (0, 1) [2] in groups of two
    batches = iter(loader)
    batch = next(batches)
    batch["frames"] = batch["frames"].clone()  # the consumer lets DALI's buffer go at once
    assert outputs[0]() is not None and FakeEvent.made == []  # held: nothing marked yet
    batch = next(batches)  # the request for batch 1: an event covers batch 0's work
    batch["frames"] = batch["frames"].clone()
    FakeEvent.made[0].done = True
    batch = next(batches)  # the request for batch 2: batch 1 gets its event, batch 0 goes
    assert len(FakeEvent.made) == 2
    # one batch per output: the first output goes with batch 0; a group of two: batch 1 (a view
    # of the same output) still holds it until the second event completes
    assert (outputs[0]() is None) == (group == 1)
    FakeEvent.made[1].done = True
    del batch
    assert list(batches) == []  # the pass's end drains
    assert all(out() is None for out in outputs) and len(loader._release) == 0


# -- faults ------------------------------------------------------------------------------------


def test_corrupt_in_manifest_never_reaches_dali(manifest, monkeypatch):
    assert not manifest["broken"].ok
    read = []
    original = dali_module.read_encoded_batch

    def recording(batches, info, *rest):
        if info.iteration < len(batches):
            read.extend(job[1] for job in batches[info.iteration])
        return original(batches, info, *rest)

    monkeypatch.setattr(dali_module, "read_encoded_batch", recording)
    loader = dali(examples_for(["vp9", "broken", "mjpeg"]), manifest, batch_size=3)
    batches = list(loader)
    assert [qid for _, qid, _ in loader.dataset.dropped] == ["q1"]
    assert sorted(batches[0]["video_id"]) == ["mjpeg", "vp9"]
    assert read and not any("broken" in path for path in read)
    assert loader.skipped == []


@pytest.fixture
def own_copy(folder, tmp_path):
    """A folder of its own (three videos) and its manifest: the tests below damage files."""
    for name in ("vp9", "vp9_vfr", "mjpeg"):
        path = video_path(folder, name, VIDEOS[name][0])
        shutil.copy2(path, tmp_path / path.name)
    return tmp_path, build_manifest(tmp_path, tmp_path / "manifest.jsonl", workers=1,
                                    progress=False)


def damage(path, how):
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "overwrite":  # same size, new mtime
        data[len(data) // 3 :] = bytes(len(data) - len(data) // 3)
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:  # "hidden": same size and mtime, damaged stream: only the decoder can tell
        data[len(data) // 5 :] = bytes(len(data) - len(data) // 5)
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    "how, batch_size, num_workers",
    [("truncate", 3, 0), ("overwrite", 3, 2), ("truncate", 1, 2), ("hidden", 3, 0),
     ("hidden", 2, 2)],
)
def test_file_turned_corrupt_after_indexing(own_copy, caplog, how, batch_size, num_workers):
    """The damaged video is skipped with a warning naming it, its examples get stand-ins (the
    next example whose video decodes) and the rest of the epoch goes on, every batch full."""
    folder, manifest = own_copy
    damaged = video_path(folder, "vp9", "vp9")
    damage(damaged, how)
    names = ["vp9", "vp9_vfr", "mjpeg"] * 2
    loader = dali(examples_for(names), manifest, batch_size=batch_size, shuffle=False,
                  num_workers=num_workers)
    with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dali"):
        batches = list(loader)
    assert [len(b["example_index"]) for b in batches] == [batch_size] * (6 // batch_size)
    got = [i for b in batches for i in b["example_index"].tolist()]
    stand_ins = [i for b in batches for i, s in zip(b["example_index"].tolist(),
                                                     b["stand_in"].tolist()) if s]
    assert stand_ins == [1, 4]  # vp9's examples (0 and 3) stand in for by the next ones
    assert sorted(got) == [1, 1, 2, 4, 4, 5] and loader.stand_ins == 2
    for batch in batches:
        check_batch_frames(batch)
    assert [path for path, _ in loader.skipped] == [str(damaged)] * 2
    reason = loader.skipped[0][1]
    if how == "truncate":
        assert reason.startswith("changed since the manifest was built (size ")
    else:  # same size: only the decoder can tell (modification times are not compared)
        assert reason.startswith("decoding failed: ")
    assert f"skipping video {damaged}" in caplog.text
    assert loader.state_dict()["position"] == len(names)  # skipped examples count as consumed
    again = [i for b in loader for i in b["example_index"].tolist()]
    assert again == got  # the next epoch skips the file without trying it
    # the list is the latest pass's: it does not grow with every epoch of a long run
    assert [path for path, _ in loader.skipped] == [str(damaged)] * 2


def test_a_resumed_loader_leaves_out_the_videos_its_state_names(own_copy, caplog):
    """A video that failed in one loader is left out by a loader resumed from its state too,
    without being tried again: both give the same batches (a damaged stream may decode for some
    frame lists and not others, so trying it again could change them)."""
    folder, manifest = own_copy
    damaged = video_path(folder, "vp9", "vp9")
    damage(damaged, "hidden")
    names = ["vp9", "vp9_vfr", "mjpeg"] * 2
    whole = order(dali(examples_for(names), manifest, batch_size=3, shuffle=False))
    first = dali(examples_for(names), manifest, batch_size=3, shuffle=False)
    it = iter(first)
    next(it)  # the batch in which the damaged video fails
    state = first.state_dict()
    it.close()
    assert list(state["bad_videos"]) == [str(damaged)] and state["position"] == 3
    resumed = dali(examples_for(names), manifest, batch_size=3, shuffle=False)
    resumed.load_state_dict(state)
    caplog.clear()  # the first loaders' warnings
    with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dali"):
        rest = list(resumed)
    assert "DALI raised" not in caplog.text  # not decoded again
    assert order(rest) == whole[1:]
    assert [reason for _, reason in resumed.skipped] == [state["bad_videos"][str(damaged)]]


def test_a_resumed_loader_finds_the_videos_its_state_names_after_they_moved(own_copy, caplog,
                                                                           tmp_path_factory):
    """The videos moved (data.video_dir re-roots the manifest's paths) between the save and the
    resume: the state's absolute paths name the old place, and the damaged video was tried (and
    decoded) again. It is found by its path in the manifest, left out, and the resume says so."""
    from siasam_fast.pipeline.manifest import load_manifest

    folder, _ = own_copy
    damaged = video_path(folder, "vp9", "vp9")
    damage(damaged, "hidden")
    names = ["vp9", "vp9_vfr", "mjpeg"] * 2
    first = dali(examples_for(names), load_manifest(folder / "manifest.jsonl"), batch_size=3,
                 shuffle=False)
    it = iter(first)
    next(it)
    state = first.state_dict()
    it.close()
    moved = tmp_path_factory.mktemp("moved")
    for path in folder.iterdir():
        shutil.move(str(path), moved / path.name)
    manifest = load_manifest(moved / "manifest.jsonl", video_dir=moved)
    resumed = dali(examples_for(names), manifest, batch_size=3, shuffle=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dali"):
        resumed.load_state_dict(state)
        list(resumed)
    assert "DALI raised" not in caplog.text  # not decoded again
    assert f"skipping video {moved / damaged.name} for the rest of this run, as before" \
        in caplog.text
    assert list(resumed.state_dict()["bad_videos"]) == [str(moved / damaged.name)]


def test_a_video_put_back_as_indexed_is_not_left_out_after_a_resume(own_copy):
    """A video left out because its size changed, then put back as the manifest measured it
    before the resume: the resumed loader decodes it (it stayed out for good, silently)."""
    folder, manifest = own_copy
    damaged = video_path(folder, "vp9", "vp9")
    good = damaged.read_bytes()
    damage(damaged, "truncate")
    names = ["vp9", "vp9_vfr", "mjpeg"] * 2
    first = dali(examples_for(names), manifest, batch_size=3, shuffle=False)
    it = iter(first)
    next(it)
    state = first.state_dict()
    it.close()
    assert list(state["bad_videos"]) == [str(damaged)]
    damaged.write_bytes(good)
    resumed = dali(examples_for(names), manifest, batch_size=3, shuffle=False)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert resumed.skipped == [] and not any(b["stand_in"].any() for b in rest)


@pytest.mark.parametrize("reason", ["unreadable: Permission denied",
                                    "changed while the batch was read"])
def test_a_video_left_out_for_a_read_error_is_tried_again_after_a_resume(own_copy, reason):
    """A video the reader could not read (a permission taken away, a file rewritten while it was
    read) stayed out for good after a resume, though readable and as indexed by then: only a
    size change was tried again. A video that failed to decode stays out (its content)."""
    folder, manifest = own_copy
    path = str(video_path(folder, "vp9", "vp9"))
    names = ["vp9", "vp9_vfr", "mjpeg"] * 2
    state = dali(examples_for(names), manifest, batch_size=3, shuffle=False).state_dict()
    for why, out in ((reason, False), ("decoding failed: Invalid data", True)):
        resumed = dali(examples_for(names), manifest, batch_size=3, shuffle=False)
        resumed.load_state_dict({**state, "bad_videos": {path: why}})
        rest = list(resumed)
        assert any(b["stand_in"].any() for b in rest) == out
        assert [p for p, _ in resumed.skipped] == ([path] * 2 if out else [])


def test_a_video_that_cannot_be_opened_is_named_unreadable(own_copy, monkeypatch):
    """The reader leaves out a file it cannot open; its size still matches the manifest (a
    permission taken away), so the reason said "changed while the batch was read"."""
    from siasam_fast.pipeline import dali as module

    folder, manifest = own_copy
    path = str(video_path(folder, "vp9", "vp9"))
    job = SimpleNamespace(path=path, size=0)  # (its size unknown: only the open is checked)
    assert module._file_change(job) is None

    def refuse(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(module, "open", refuse, raising=False)
    assert module._file_change(job) == "unreadable: Permission denied"


def test_every_rank_yields_its_batches_when_a_whole_batch_fails(own_copy):
    """A batch whose every video failed was not yielded: that rank then ran fewer steps than the
    others and hung their collectives. It now holds stand-ins, and every rank yields
    len(loader) batches of full size."""
    folder, manifest = own_copy
    damaged = video_path(folder, "vp9", "vp9")
    damage(damaged, "truncate")
    names = ["vp9", "vp9_vfr", "mjpeg", "vp9"] * 2
    for rank in range(2):
        loader = dali(examples_for(names), manifest, batch_size=1, shuffle=False, rank=rank,
                      world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 4
        assert all(len(b["example_index"]) == 1 for b in batches)
        assert "vp9" not in [v for b in batches for v in b["video_id"]]
        for batch in batches:
            check_batch_frames(batch)


def test_copied_videos_with_new_modification_times_are_not_skipped(own_copy, tmp_path_factory):
    """Copies (cp -r, cloud tools) get new modification times: comparing them skipped every
    video and an epoch yielded nothing. Sizes are compared instead."""
    from siasam_fast.pipeline.manifest import load_manifest

    folder, _ = own_copy
    moved = tmp_path_factory.mktemp("moved")
    for path in folder.iterdir():
        shutil.copy(path, moved / path.name)  # not copy2: new modification times
    manifest = load_manifest(folder / "manifest.jsonl", video_dir=moved)
    loader = dali(examples_for(INDEXED), manifest, batch_size=3, shuffle=False)
    (batch,) = list(loader)
    assert loader.skipped == [] and not batch["stand_in"].any()
    check_batch_frames(batch)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_record_without_a_size_is_decoded_as_pyav_decodes_it(own_copy, num_workers):
    """A manifest record of size 0 (unknown: file_change, which PyAV and the stand-in search ask,
    does not compare it) is read, not left out as changed since indexing: every such file was
    skipped and the loader gave up for want of stand-ins."""
    folder, manifest = own_copy
    for record in manifest.values():
        record.size = 0
    loader = dali(examples_for(INDEXED), manifest, batch_size=3, shuffle=False,
                  num_workers=num_workers)
    (batch,) = list(loader)
    assert loader.skipped == [] and not batch["stand_in"].any()
    check_batch_frames(batch)


def test_when_every_stand_in_fails_too_the_loader_says_so(own_copy):
    folder, manifest = own_copy
    for name, codec in (("vp9", "vp9"), ("vp9_vfr", "vp9"), ("mjpeg", "mjpeg")):
        video_path(folder, name, codec).unlink()
    loader = dali(examples_for(INDEXED * 2), manifest, batch_size=3, shuffle=False)
    with pytest.raises(RuntimeError, match=r"no other video could stand in for it \(0 more "
                                           r"decoded without success; 3 video\(s\) failed in "
                                           r"this process: 3 unreadable\)"):
        list(loader)
    assert len(loader.skipped) == 3  # the first batch's examples, once each


def damage_both_vp9(folder):
    """The two VP9 videos damaged after indexing (same size and mtime): mjpeg stays whole."""
    for name in ("vp9", "vp9_vfr"):
        damage(video_path(folder, name, "vp9"), "hidden")


def test_repeated_decode_failures_stop_the_run(own_copy, monkeypatch):
    folder, manifest = own_copy
    damage_both_vp9(folder)
    monkeypatch.setattr(dali_module, "MAX_FAILED_VIDEOS", 2)
    loader = dali(examples_for(["vp9", "vp9_vfr", "mjpeg"]), manifest, batch_size=3,
                  shuffle=False)
    with pytest.raises(RuntimeError, match="failed to decode 2 videos in a row"):
        list(loader)


def test_a_video_the_decoder_cannot_read_is_told_from_damage(own_copy, monkeypatch):
    """DALI's decoder refusing a video's codec (here the CPU decoder and H.264; on a GPU, NVDEC and
    a pixel format or size it lacks, pipeline/nvdec.py) is no damage: the warning and the
    in-a-row error say so and name what decodes it, instead of blaming the files or the GPU."""
    folder, _ = own_copy
    write_index_video(folder / "h264.mp4", 30, codec="h264", size=64, gop=10)
    write_index_video(folder / "h264_b.mp4", 30, codec="h264", size=64, gop=10)
    manifest = build_manifest(folder, folder / "manifest.jsonl", workers=1, progress=False)
    loader = dali(examples_for(["h264", "vp9", "mjpeg"]), manifest, batch_size=3, shuffle=False)
    list(loader)
    (path, reason), = loader.skipped
    assert path.endswith("h264.mp4")
    assert reason.startswith("decoding failed: ") and "not damage" in reason, reason
    assert "data.backend=pyav decodes it" in reason
    monkeypatch.setattr(dali_module, "MAX_FAILED_VIDEOS", 2)
    loader = dali(examples_for(["h264", "h264_b", "vp9"]), manifest, batch_size=3, shuffle=False)
    with pytest.raises(RuntimeError, match="failed to decode 2 videos in a row") as err:
        list(loader)
    assert "not damage" in str(err.value) and "fault is elsewhere" not in str(err.value)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_decode_failures_with_a_success_between_are_not_in_a_row(own_copy, monkeypatch,
                                                                   batch_size):
    """Two damaged videos, a good one decoded between them (in its own batch, or on its own in the
    same batch): not two failures in a row."""
    folder, manifest = own_copy
    damage_both_vp9(folder)
    monkeypatch.setattr(dali_module, "MAX_FAILED_VIDEOS", 2)
    loader = dali(examples_for(["vp9", "mjpeg", "vp9_vfr"]), manifest, batch_size=batch_size,
                  shuffle=False, prefetch_factor=1)
    batches = list(loader)
    assert [i for b in batches for i in b["example_index"].tolist()] == [1, 1, 1]
    assert len(loader.skipped) == 2 and loader.stand_ins == 2


def test_stand_in_tries_are_counted_with_the_failed_video(own_copy, monkeypatch):
    """At most STAND_IN_TRIES videos decoded for one example, the failed one included."""
    folder, manifest = own_copy
    damage_both_vp9(folder)
    monkeypatch.setattr(dali_module, "STAND_IN_TRIES", 2)
    loader = dali(examples_for(["vp9", "vp9_vfr", "mjpeg"]), manifest, batch_size=1,
                  shuffle=False)
    with pytest.raises(RuntimeError, match=r"no other video could stand in for it \(1 more "
                                           r"decoded without success"):
        list(loader)


def test_videos_already_left_out_are_no_stand_in_tries(own_copy, monkeypatch):
    """A video left out earlier is passed over when looking for a stand-in, without being decoded
    again or counting as a try."""
    folder, manifest = own_copy
    damage_both_vp9(folder)
    monkeypatch.setattr(dali_module, "STAND_IN_TRIES", 2)
    loader = dali(examples_for(["vp9", "mjpeg", "vp9_vfr", "vp9"]), manifest, batch_size=1,
                  shuffle=False)
    batches = list(loader)  # vp9_vfr's stand-in: vp9 (left out) passed over, then mjpeg
    assert [b["example_index"].tolist() for b in batches] == [[1], [1], [1], [1]]
    assert loader.stand_ins == 3


def copy_videos(folder, tmp_path, names):
    for name in names:
        path = video_path(folder, name, VIDEOS[name][0])
        shutil.copy2(path, tmp_path / path.name)
    return build_manifest(tmp_path, tmp_path / "manifest.jsonl", workers=1, progress=False)


def test_stand_ins_with_fewer_frames_are_padded_with_zeros(folder, tmp_path):
    """A batch with a stand-in is stacked again: the videos with fewer unique frames than the
    batch's largest are padded with zeros, as the contract says."""
    manifest = copy_videos(folder, tmp_path, ["vp9", "short", "mjpeg"])
    damage(video_path(tmp_path, "vp9", "vp9"), "truncate")
    loader = dali(examples_for(["vp9", "short", "mjpeg"]), manifest, batch_size=3,
                  shuffle=False)
    (batch,) = list(loader)
    assert batch["example_index"].tolist() == [1, 2, 1]
    assert batch["num_unique"].tolist() == [23, 37, 23]
    check_batch_frames(batch)


def test_each_example_left_out_is_listed_once(folder, tmp_path):
    """A pipeline rebuilt after an error plans the rest of the pass again: a video already left
    out there is not listed again for the same example."""
    manifest = copy_videos(folder, tmp_path, ["vp9", "vp9_vfr", "mjpeg", "wide"])
    damage(video_path(tmp_path, "vp9", "vp9"), "truncate")
    for name in ("vp9_vfr", "wide"):
        damage(video_path(tmp_path, name, "vp9"), "hidden")
    names = ["vp9", "vp9_vfr", "mjpeg", "wide", "vp9"]
    loader = dali(examples_for(names), manifest, batch_size=1, shuffle=False)
    batches = list(loader)
    assert [b["example_index"].tolist() for b in batches] == [[2]] * 5
    assert loader.stand_ins == 4
    assert sorted(path for path, _ in loader.skipped) == sorted(
        str(video_path(tmp_path, name, "vp9")) for name in ["vp9", "vp9", "vp9_vfr", "wide"])


# -- arguments ---------------------------------------------------------------------------------


def test_the_factory_builds_it_with_the_pyav_arguments(manifest):
    loader = build_video_loader(
        examples_for(INDEXED), manifest, CFG, "train", 3, backend="dali", device="cpu",
        image_size=SIZE, num_workers=0, seed=0, rank=0, world_size=1, output="frames",
        dedup=True, pin_memory=False, label_fn=None, shuffle=None, drop_last=False, epoch=0,
        prefetch_factor=2, dtype=torch.float32, seek_threshold=8, decode_threads=1,
        multiprocessing_context=None,
    )
    assert isinstance(loader, DALIVideoLoader) and loader.dataset.training
    check_batch_frames(next(iter(loader)))


def test_bad_arguments_name_the_valid_values(manifest):
    args = (examples_for(["vp9"]), manifest, CFG, "train", 1)
    with pytest.raises(ValueError, match="valid devices are gpu, cpu"):
        build_dali_loader(*args, device="tpu")
    with pytest.raises(ValueError, match="torch.float16 or torch.float32"):
        build_dali_loader(*args, device="cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="decode_group=0: must be >= 1"):
        build_dali_loader(*args, device="cpu", decode_group=0)
    from siasam_fast.config import DataConfig

    with pytest.raises(ValueError, match="data.decode_group=0: must be >= 1"):
        DataConfig(decode_group=0)
    with pytest.raises(ValueError, match="valid outputs are frames, clips"):
        build_dali_loader(*args, device="cpu", output="pixels")
    with pytest.raises(ValueError, match="fork or spawn"):
        build_dali_loader(*args, device="cpu", multiprocessing_context="forkserver")
    with pytest.raises(ValueError, match="builds 'dali' loaders only"):
        build_dali_loader(*args, backend="pyav")
    with pytest.raises(ValueError, match="valid splits"):
        build_dali_loader(examples_for(["vp9"]), manifest, CFG, "training", 1, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            build_dali_loader(*args, device="gpu")


# -- trimmed streams ---------------------------------------------------------------------------


def test_default_threads_follow_the_videos_per_iteration_on_the_gpu():
    assert [dali_module.default_num_threads("gpu", v) for v in (1, 4, 8, 16, 40)] == \
        [4, 4, 8, 16, dali_module.MAX_DEFAULT_THREADS]
    assert 1 <= dali_module.default_num_threads("cpu", 40) <= 4


def test_first_line_of_a_dali_error():
    operator = RuntimeError("Critical error in pipeline:\nError in thread 0: [/opt/dali/op.cc:12] "
                            "Assert on \"x\" failed\nError when executing CPU operator "
                            "decoders__Video encountered:\n\n  Frame 99 is out of range\n"
                            "Stacktrace (3 entries):\nC++ context: [/opt/dali/op.cc:12]")
    assert dali_module._first_line(operator) == "Frame 99 is out of range"
    reader = RuntimeError("Traceback (most recent call last):\n  File \"reader.py\", line 3\n"
                          "OSError: [Errno 5] Input/output error\n"
                          "Current pipeline object is no longer valid.")
    assert dali_module._first_line(reader) == "OSError: [Errno 5] Input/output error"
    assert dali_module._first_line(ValueError("")) == "ValueError"


def test_trimming_is_checked_on_the_gpu_before_it_is_used(monkeypatch, caplog):
    """On the GPU, data.dali_trim holds only after NVDEC has decoded a trimmed clip exactly;
    otherwise whole files, with a warning naming what went wrong. On the CPU nothing is checked
    (the tests here check DALI's CPU decoder)."""
    from siasam_fast.pipeline import dali_check

    calls = []

    def check(ok):
        def run(device_id):
            calls.append(device_id)
            return ok, "decoded frames 9, 12, 14: grey levels [1, 2, 3], expected [143, 188, 218]"
        return run

    assert dali_check.resolve_trim(True, "cpu", None, check(False)) is True
    assert dali_check.resolve_trim(False, "gpu", 0, check(False)) is False
    assert calls == []
    assert dali_check.resolve_trim(True, "gpu", 1, check(True)) is True
    with caplog.at_level("WARNING", logger=dali_check.__name__):
        assert dali_check.resolve_trim(True, "gpu", 0, check(False)) is False
    assert calls == [1, 0]
    assert "data.dali_trim is off for this run" in caplog.text and "[1, 2, 3]" in caplog.text

    def broken(on_gpu, trimmed=False, device_id=0):
        raise RuntimeError("no NVDEC here")

    dali_check.gpu_trims_exactly.cache_clear()
    monkeypatch.setattr(dali_check, "decode_check", broken)
    try:
        ok, detail = dali_check.gpu_trims_exactly(0)
    finally:
        dali_check.gpu_trims_exactly.cache_clear()
    assert not ok and "RuntimeError: no NVDEC here" in detail


def test_the_trimmed_decode_check_passes_on_dalis_cpu_decoder():
    """What the loader checks on NVDEC, through DALI's CPU decoder (VP9): the clip is really cut
    (its frames renumbered) and the right frames come out."""
    from siasam_fast.pipeline import dali_check

    ok, detail = dali_check.decode_check(False, trimmed=True)
    assert ok, detail
    # 9, 12, 14 counted from the keyframe at 8
    assert "(frames 1, 4, 6 there) on DALI's CPU decoder" in detail


def test_dali_loaders_trim_by_default():
    import inspect

    from siasam_fast.config import DataConfig

    assert inspect.signature(build_dali_loader).parameters["trim"].default is True
    assert DataConfig().dali_trim is True



def decoded_indices(data: np.ndarray) -> list[int]:
    """The index every picture of an encoded video shows, in presentation order (PyAV)."""
    import io

    import av

    with av.open(io.BytesIO(data.tobytes())) as container:
        frames = sorted(container.decode(video=0), key=lambda f: f.pts)
        return [read_index(f.to_ndarray(format="rgb24")) for f in frames]


H264_TRIM_CASES = [
    ("bframes", dict(num_frames=160, gop=12, bframes=3)),
    ("vfr", dict(num_frames=120, gop=10, bframes=2, vfr=True)),
    ("long_gop", dict(num_frames=200, gop=100, bframes=3)),
    ("open_gop", dict(num_frames=160, gop=12, bframes=3, open_gop=True)),
]


def check_stretch(cut, wanted, whole_size):
    """The stretch decodes to the wanted frames at their renumbered positions, and is smaller."""
    stretch, renumbered = cut
    assert stretch.size < whole_size and renumbered.dtype == np.int32
    shown = decoded_indices(stretch)
    assert [shown[i] for i in renumbered] == wanted.tolist()
    assert shown == sorted(shown) and shown[0] <= wanted.min()


def sampled_frame_lists(n, seeds=4):
    for seed in range(seeds):
        clips = sample_siamese_clips(n, CFG, example_rng(seed, 0, 0))
        yield clips.unique.astype(np.int32)
        yield clips.clips.reshape(-1).astype(np.int32)


@pytest.mark.parametrize("name, options", H264_TRIM_CASES)
def test_trim_keeps_exactly_the_wanted_frames_of_h264(tmp_path, name, options):
    """H.264 with B-frames, variable frame rate and open GOPs (PyAV decodes the stretch here; NVDEC
    does in the GPU check)."""
    path = write_index_video(tmp_path / f"{name}.mp4", codec="h264", size=64, **options)
    data = np.fromfile(path, dtype=np.uint8)
    for wanted in sampled_frame_lists(options["num_frames"]):
        cut = dali_module.trim_stretch(data, wanted)
        if cut is None:  # only when the stretch is nearly the whole file
            assert wanted.min() < options["gop"]
            continue
        check_stretch(cut, wanted, data.size)


@pytest.mark.parametrize("name, options", H264_TRIM_CASES)
def test_trim_from_the_file_with_the_manifests_keyframes(tmp_path, name, options):
    """trim_file seeks with the manifest's keyframes and reads up to the next keyframe's leading
    pictures: the wanted frames, from a path or an open file."""
    path = write_index_video(tmp_path / f"{name}.mp4", codec="h264", size=64, **options)
    record = probe_video(path, tmp_path)
    assert record.ok and len(record.keyframes) > 1
    size = path.stat().st_size
    for k, wanted in enumerate(sampled_frame_lists(options["num_frames"])):
        span = dali_module.keyframe_span(record, wanted)
        key, _, after, after_pts = span.tolist()
        assert key <= wanted.min() and key in record.keyframes
        if after_pts < 0:
            assert after == options["num_frames"]
        else:
            assert after > wanted.max() and after in record.keyframes
        if k % 2:
            with open(path, "rb") as fh:
                cut = dali_module.trim_file(fh, wanted, span)
        else:
            cut = dali_module.trim_file(path, wanted, span)
        if key == 0 and after_pts < 0:
            assert cut is None  # the whole file
            continue
        assert cut is not None
        check_stretch(cut, wanted, size)
    # A span that disagrees with the file: None (the caller reads the whole file), never wrong
    # frames. Frames after the last keyframe (the frame count checks them), then between two.
    n = options["num_frames"]
    whole = np.array([1, n - 2], np.int32)  # the stretch would be the whole file: None
    assert dali_module.keyframe_span(record, whole).tolist()[::2] == [0, n]
    assert dali_module.trim_file(path, whole, dali_module.keyframe_span(record, whole)) is None
    for wanted in (np.array([n - 3, n - 1], np.int32), np.array([1, 3], np.int32) + options["gop"]):
        key, key_pts, after, after_pts = dali_module.keyframe_span(record, wanted).tolist()
        assert dali_module.trim_file(path, wanted, np.array([key, key_pts, after, after_pts]))
        for bad in ([key, key_pts, after + 1, after_pts],  # a frame count the file does not have
                    [key - 1, key_pts, after, after_pts],  # the keyframe's index off by one
                    [key, key_pts + 1, after, after_pts],  # no keyframe at that pts
                    [wanted.max() + 1, key_pts, after, after_pts]):  # key after the wanted frames
            assert dali_module.trim_file(path, wanted, np.array(bad, np.int64)) is None, bad


READER_PROCESS = """
import pickle, sys, types
import numpy as np
sys.modules["siasam_fast"] = None  # a reader process: this package cannot be imported
source = pickle.loads(sys.stdin.buffer.read())
reader = source.__globals__["read_encoded_batch"]

def whole_file_cut(*args):
    raise AssertionError("trim_file failed in the reader process: the whole file was read")

reader.__globals__["trim_stretch"] = whole_file_cut
encoded, frames, _, _, _ = source(types.SimpleNamespace(iteration=0))
print(encoded[0].size, *frames[0].tolist())
"""


def test_reader_processes_trim_from_the_file_without_this_package(tmp_path):
    """What DALI's reader processes run, pickled as DALI pickles it, in a process where
    ``siasam_fast`` cannot be imported: it cuts the stretch with trim_file (a failure there would
    fall back to the whole file silently; here it raises)."""
    import subprocess
    import sys

    from nvidia.dali.pickling import _DaliPickle

    path = write_index_video(tmp_path / "v.mp4", 60, codec="h264", size=32, gop=12, bframes=2)
    record = probe_video(path, tmp_path)
    wanted = np.array([26, 30, 34], np.int32)
    job = dali_module._job(0, record, wanted, 32, trim=True)
    assert job.span.tolist()[::2] == [24, 36]  # keyframes 24 and 36 around the frames
    blob = _DaliPickle.dumps(dali_module.reader_source([(job.as_tuple(),)], trim=True))
    out = subprocess.run([sys.executable, "-c", READER_PROCESS], input=blob, capture_output=True,
                         cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    size, *renumbered = (int(v) for v in out.stdout.split())
    expected, expected_frames = dali_module.trim_file(path, wanted, job.span)
    assert size == expected.size < path.stat().st_size
    assert renumbered == expected_frames.tolist()
    assert renumbered[0] == 2  # frame 26, two after the keyframe (later ones: B-frames cut off)


def test_trim_never_numbers_frames_it_cannot_order(tmp_path):
    """Two files whose pictures cannot be matched to the manifest's numbering by their packets:
    H.264 with B-frames in AVI (no presentation times: PyAV's pts is the decode order) and a
    stream copy that starts 5 packets into a GOP (those packets decode to nothing, so a
    decoding manifest counts fewer frames than there are packets). Neither is trimmed."""
    import av

    avi = write_index_video(tmp_path / "b.avi", 60, codec="h264", gop=12, bframes=2)
    wanted = np.array([26, 27, 28], np.int32)
    assert dali_module.trim_stretch(np.fromfile(avi, np.uint8), wanted) is None
    demuxed = probe_video(avi, tmp_path, mode="demux")  # decoding it marks it corrupt
    assert demuxed.probe == "decode" and not demuxed.ok, demuxed
    mp4 = write_index_video(tmp_path / "whole.mp4", 60, codec="h264", gop=12, bframes=2)
    cut = tmp_path / "cut.mkv"
    with av.open(str(mp4)) as src, av.open(str(cut), "w") as out:
        copy = out.add_stream_from_template(src.streams.video[0])
        for packet in [p for p in src.demux(video=0) if p.size][5:]:
            packet.stream = copy
            out.mux(packet)
    record = probe_video(cut, tmp_path)
    assert record.ok and record.num_frames < 55  # the packets before the first keyframe
    data = np.fromfile(cut, np.uint8)
    wanted = np.array([20, 21, 22], np.int32)
    assert dali_module.trim_stretch(data, wanted, record.num_frames) is None
    cut_file = dali_module.trim_file(cut, wanted, dali_module.keyframe_span(record, wanted))
    assert cut_file is not None
    shown = decoded_indices(cut_file[0])
    with av.open(str(cut)) as container:  # what the manifest's frames 20-22 show
        frames = sorted(container.decode(video=0), key=lambda f: f.pts)
        expected = [read_index(frames[i].to_ndarray(format="rgb24")) for i in wanted]
    assert [shown[i] for i in cut_file[1]] == expected


def test_trim_hands_the_whole_file_back_when_it_cannot_help(folder, manifest):
    data = np.fromfile(manifest["vp9"].path, dtype=np.uint8)
    n = manifest["vp9"].num_frames
    assert dali_module.trim_stretch(data, np.array([0, n - 1], np.int32)) is None  # all of it
    assert dali_module.trim_stretch(data, np.array([n], np.int32)) is None  # past the end
    junk = np.frombuffer(b"not a video at all", dtype=np.uint8)
    assert dali_module.trim_stretch(junk, np.array([3], np.int32)) is None


def test_a_stretch_starts_at_the_wanted_keyframe_itself(tmp_path):
    """The first wanted frame is a keyframe: the stretch starts there (not one GOP earlier), with
    the manifest's keyframes or without; the span needs a keyframe at or before the frames."""
    from dataclasses import replace

    path = write_index_video(tmp_path / "k.mp4", 60, codec="h264", size=32, gop=12, bframes=2)
    record = probe_video(path, tmp_path)
    assert record.keyframes == [0, 12, 24, 36, 48]
    wanted = np.array([24, 26], np.int32)
    span = dali_module.keyframe_span(record, wanted)
    assert span.tolist() == [24, record.keyframe_pts[2], 36, record.keyframe_pts[3]]
    assert dali_module.keyframe_span(record, np.array([30, 36])).tolist()[::2] == [24, 48]
    assert dali_module.keyframe_span(record, np.array([50])).tolist()[::2] == [48, 60]
    for cut in (dali_module.trim_file(path, wanted, span),
                dali_module.trim_stretch(np.fromfile(path, np.uint8), wanted)):
        assert cut is not None and cut[1].tolist() == [0, 2]
        assert decoded_indices(cut[0])[:3] == [24, 25, 26]
    late = replace(record, keyframes=[12, 24, 36, 48], keyframe_pts=record.keyframe_pts[1:])
    assert dali_module.keyframe_span(late, np.array([3, 20])).size == 0


def test_trim_file_stops_reading_after_the_next_keyframe(tmp_path, monkeypatch):
    """trim_file demuxes from the keyframe to the next keyframe's leading pictures, not to the
    end of the file."""
    path = write_index_video(tmp_path / "k.mp4", 160, codec="h264", size=32, gop=12, bframes=2)
    record = probe_video(path, tmp_path)
    demuxed = []
    open_video = dali_module.open_video

    class Counting:
        def __init__(self, source):
            self.container = open_video(source)
            self.format, self.streams = self.container.format, self.container.streams

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def seek(self, *args, **kwargs):
            return self.container.seek(*args, **kwargs)

        def demux(self, *args):
            for packet in self.container.demux(*args):
                demuxed.append(packet.pts)
                yield packet

    monkeypatch.setattr(dali_module, "open_video", Counting)
    wanted = np.array([26, 30], np.int32)
    cut = dali_module.trim_file(path, wanted, dali_module.keyframe_span(record, wanted))
    assert cut is not None and cut[1].tolist() == [2, 6]
    assert 12 < len(demuxed) <= 24, len(demuxed)  # frames 24..35, the next keyframe, a B-frame


@pytest.mark.parametrize("dedup, num_workers", [(True, 0), (False, 0), (True, 2)])
def test_trimmed_streams_give_exactly_the_sampled_frames(manifest, monkeypatch, dedup,
                                                         num_workers):
    """DALI's CPU decoder on the stretches (Matroska for VP9, AVI for MJPEG): the same batches as
    without trim; the stretches are really used, read from the files with the manifest's
    keyframes (in-process reads are counted)."""
    names = [*INDEXED, "short"] * 2
    trimmed = []  # per video: "file" (trim_file), "whole" (trim_stretch) or None (not cut)
    from_file, from_whole = dali_module.trim_file, dali_module.trim_stretch

    def counting_file(source, wanted, span):
        cut = from_file(source, wanted, span)
        if cut is not None:
            trimmed.append("file")
        return cut

    def counting_whole(data, wanted, num_frames=None):
        cut = from_whole(data, wanted, num_frames)
        trimmed.append("whole" if cut is not None else None)
        return cut

    monkeypatch.setattr(dali_module, "trim_file", counting_file)
    monkeypatch.setattr(dali_module, "trim_stretch", counting_whole)
    kwargs = dict(batch_size=4, seed=3, epoch=1, dedup=dedup, output="clips",
                  num_workers=num_workers)
    plain = list(dali(examples_for(names), manifest, trim=False, **kwargs))
    cut = list(dali(examples_for(names), manifest, trim=True, **kwargs))
    assert len(plain) == len(cut) == 2
    for a, b in zip(plain, cut):
        check_batch_frames(b, dedup=dedup)
        assert torch.equal(a["frame_ids"], b["frame_ids"])
        assert torch.equal(a["clips"], b["clips"])  # same frames, decoded from the stretch
    if num_workers == 0:
        assert len(trimmed) == len(names) and trimmed.count("file") >= len(INDEXED) * 2


def test_pipeline_benchmark_compares_whole_and_trimmed_files(manifest, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_pipeline

    # DALI's CPU decoder, on a GPU host too (NVDEC may refuse these 64 px VP9 files)
    monkeypatch.setattr(bench_pipeline, "dali_device", lambda: "cpu")
    records = {k: r for k, r in manifest.items() if k in INDEXED}
    rows = bench_pipeline.run_benchmark(
        ["dali"], [("indexed", records, "vp9")], worker_counts=[], dali_workers=0, batch_size=2,
        image_size=SIZE, min_videos=6, dali_trims=(False, True), dedup_modes=(True,),
        log=lambda text: None)
    assert [r["trim"] for r in rows] == [False, True]
    assert all(r["videos"] >= 6 and r["videos_per_s"] > 0 for r in rows)


def test_pipeline_benchmark_never_labels_whole_files_trimmed(manifest, monkeypatch):
    """On the GPU the loader turns trimming off when its NVDEC check fails (resolve_trim; a
    stand-in here): a cell asked to trim must not measure whole files under the "trim" label."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_pipeline

    monkeypatch.setattr(dali_module, "resolve_trim", lambda trim, device, device_id: False)
    records = {k: r for k, r in manifest.items() if k in INDEXED}
    rows = bench_pipeline.run_benchmark(
        ["dali"], [("indexed", records, "vp9")], worker_counts=[], dali_workers=0, batch_size=2,
        image_size=SIZE, min_videos=6, dali_trims=(True,), dedup_modes=(True,),
        log=lambda text: None)
    (row,) = rows
    assert row["status"] == "failed" and "--dali-trim off" in row["reason"], row


@pytest.mark.skipif(torch.cuda.is_available(), reason="DALI's CPU decoder only")
def test_explicit_dali_backend_refuses_codecs_it_cannot_decode_here(tmp_path):
    from siasam_fast.pipeline.loaders import resolve_backend

    write_index_video(tmp_path / "a.mp4", 12, codec="h264", size=32)
    manifest = build_manifest(tmp_path, tmp_path / "manifest.jsonl", workers=1, progress=False)
    with pytest.raises(ValueError, match=r"DALI's CPU decoder \(no GPU here\) cannot decode h264"):
        resolve_backend("dali", manifest)
    assert resolve_backend("auto", manifest) == "pyav"


# -- GPU (NVDEC) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h264_manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dali_h264")
    write_index_video(folder / "bframes.mp4", 160, codec="h264", size=64, gop=12, bframes=3)
    write_index_video(folder / "vfr.mp4", 120, codec="h264", size=64, gop=10, bframes=2,
                      vfr=True)
    write_index_video(folder / "long_gop.mp4", 200, codec="h264", size=64, gop=100, bframes=3)
    return build_manifest(folder, folder / "manifest.jsonl", workers=1, progress=False)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dedup, output", [(True, "clips"), (False, "clips"), (True, "frames")])
def test_gpu_h264_with_bframes_gives_the_sampled_frames(h264_manifest, dedup, output):
    names = ["bframes", "vfr", "long_gop"] * 2
    loader = build_dali_loader(
        examples_for(names), h264_manifest, CFG, "train", 3, image_size=SIZE, device="gpu",
        num_workers=2, dedup=dedup, output=output, seed=5,
    )
    for batch in loader:
        assert batch["frames"].is_cuda and batch["frames"].dtype == torch.float16
        check_batch_frames({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()},
                           dedup=dedup)
        for v, index in enumerate(batch["example_index"].tolist()):
            record = h264_manifest[names[index]]
            expected = sample_siamese_clips(record.num_frames, CFG, example_rng(5, 0, index))
            assert batch["frame_ids"][v].tolist() == expected.clips.tolist()


@requires_cuda
@pytest.mark.gpu
def test_gpu_frames_arrive_through_dlpack_without_a_copy(h264_manifest):
    loader = build_dali_loader(
        examples_for(["bframes", "vfr"]), h264_manifest, CFG, "train", 2, image_size=SIZE,
        device="gpu", num_workers=0,
    )
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    batch = next(iter(loader))
    frames = batch["frames"]
    assert frames.is_cuda and frames.dtype == torch.float16 and frames.is_contiguous()
    assert frames.__dlpack_device__() == (2, loader.device_id)  # kDLCUDA: device memory
    # A copy into torch's memory would have gone through torch's allocator; DALI's buffer did not.
    assert torch.cuda.memory_allocated() - before < frames.numel() * frames.element_size()
    try:  # where CuPy is installed, ask the CUDA runtime what the pointer is
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None:
        attributes = cupy.cuda.runtime.pointerGetAttributes(frames.data_ptr())
        assert attributes.type == cupy.cuda.runtime.memoryTypeDevice
    reference = build_loader(examples_for(["bframes", "vfr"]), h264_manifest, CFG, "train", 2,
                             image_size=SIZE, num_workers=0)
    expected = next(iter(reference))
    diff = (grey_levels(frames.cpu()) - grey_levels(expected["frames"])).abs()
    assert diff.max() <= 4 and diff.mean() <= 1.5  # NVDEC's colour conversion: module docstring


def test_auto_backend_falls_back_for_codecs_dali_cannot_decode(monkeypatch):
    from types import SimpleNamespace

    from siasam_fast.pipeline import loaders

    monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    h264 = {"a": SimpleNamespace(ok=True, codec="h264")}
    gif = {**h264, "b": SimpleNamespace(ok=True, codec="gif")}
    assert loaders.resolve_backend("auto", h264) == "dali"
    assert loaders.resolve_backend("auto", gif) == "pyav"
    with pytest.raises(ValueError, match="valid backends are auto, pyav, dali"):
        loaders.resolve_backend("opencv")


def test_close_loaders_ends_a_pass_in_progress(manifest, monkeypatch):
    """An iterator held in a variable (a failing run's traceback holds one) kept its pipeline
    and reader processes alive until garbage collection: close_loaders() ends it."""
    from siasam_fast.pipeline.dataset import close_loaders

    closed = []
    original = dali_module._close
    monkeypatch.setattr(dali_module, "_close", lambda pipe: (closed.append(pipe),
                                                             original(pipe)))
    loader = dali(examples_for(INDEXED * 2), manifest, batch_size=2, num_workers=2)
    running = iter(loader)
    next(running)
    assert closed == []
    close_loaders()
    assert len(closed) == 1
    assert len(list(loader)) == 3  # a later pass starts a new pipeline


def test_a_video_with_many_consecutive_questions_gets_stand_ins(own_copy):
    folder, manifest = own_copy
    video_path(folder, "vp9", "vp9").unlink()
    names = ["vp9"] * 20 + ["vp9_vfr"] * 4 + ["mjpeg"] * 4
    loader = dali(examples_for(names), manifest, batch_size=4, shuffle=False)
    batches = list(loader)
    assert len(batches) == 7 and loader.stand_ins == 20
    assert "vp9" not in [v for b in batches for v in b["video_id"]]


def test_a_saved_path_is_matched_to_the_video_it_named_and_no_other():
    """A loader state's path is found again after the videos moved (same relpath under another
    folder; of two relpaths ending it, the longest), but a video that left the data set while the
    videos stayed put is not taken for another one whose relpath ends its path (x.mp4 for
    b/x.mp4), and many moved entries against many records take no time."""
    import time
    from types import SimpleNamespace

    def index(root, rels):
        return dali_module._relpath_index({f"{root}/{r}": SimpleNamespace(relpath=r)
                                           for r in rels})

    moved = dali_module._moved_path
    new = index("/new", ["x.mp4", "a/x.mp4", "b/y.mp4"])
    assert moved("/old/a/x.mp4", *new) == "/new/a/x.mp4"
    assert moved("/old/b/y.mp4", *new) == "/new/b/y.mp4"
    assert moved("/old/x.mp4", *new) == "/new/x.mp4"
    assert moved("/old/c/z.mp4", *new) is None
    same = index("/data", ["x.mp4", "a/x.mp4"])
    assert moved("/data/b/x.mp4", *same) is None  # b/x.mp4 left the data set: not /data/x.mp4
    assert moved("/data/a/x.mp4", *same) == "/data/a/x.mp4"
    many = index("/new", [f"d{i % 100}/v{i}.mp4" for i in range(20_000)])
    started = time.perf_counter()
    assert all(moved(f"/old/d{i % 100}/v{i}.mp4", *many) == f"/new/d{i % 100}/v{i}.mp4"
               for i in range(2_000))
    assert time.perf_counter() - started < 2.0


def test_a_clip_cut_with_an_edit_list_gives_the_manifests_frames(tmp_path):
    """A clip cut without re-encoding: the frames its mp4 edit list hides are no frames for the
    manifest, and DALI (whole and trimmed files) returns the frames that numbering names. The
    same check runs on NVDEC with H.264 in scripts/gpu_check_dali.py (section 3b); here DALI's
    CPU decoder reads VP9 in mp4."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check_dali.py"
    spec = importlib.util.spec_from_file_location("gpu_check_dali", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    detail = script.check_cut_clip(tmp_path, "cpu", "vp9")
    assert "keyframes [0, 7, 19, 31]" in detail, detail


def test_the_gpu_checks_cut_clip_is_large_enough_for_nvdec(monkeypatch, tmp_path):
    """Section 3b of scripts/gpu_check_dali.py writes its H.264 clip at a size NVDEC decodes (a
    stand-in for the GPU: the clip's size is read where it is written, nothing is decoded)."""
    import importlib.util
    from pathlib import Path

    import videos

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check_dali.py"
    spec = importlib.util.spec_from_file_location("gpu_check_dali", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = []

    class Written(Exception):
        pass

    def write(path, num_frames, codec="h264", size=64, **options):
        written.append((codec, size))
        raise Written

    monkeypatch.setattr(videos, "write_index_video", write)
    with pytest.raises(Written):
        script.check_cut_clip(tmp_path, "gpu", "h264")
    (codec, size), = written
    height, width = (size, size) if isinstance(size, int) else size
    assert codec == "h264"
    # NVDEC's smallest H.264 frame is 48x16 (DALI: "Video is too small in at least one dimension")
    clip = SimpleNamespace(codec=codec, pix_fmt="yuv420p", width=width, height=height)
    assert nvdec.problem(clip, (9, 0)) is None and nvdec.problem(clip, (7, 0)) is None, size


def test_the_decode_check_fails_on_missing_frames_or_an_uncut_clip(monkeypatch):
    """Fewer frames than asked for (the first ones right) fail the check, and so does a trimmed
    check whose clip trim_stretch did not cut."""
    from nvidia.dali import fn

    from siasam_fast.pipeline import dali_check

    decode = fn.decoders.video
    with monkeypatch.context() as patch:
        patch.setattr(fn.decoders, "video", lambda *a, **k: decode(*a, **k)[0:2])
        ok, detail = dali_check.decode_check(False)
    assert not ok and "expected [53, 113, 173]" in detail
    monkeypatch.setattr(dali_module, "trim_stretch", lambda data, wanted, num_frames: None)
    ok, detail = dali_check.decode_check(False, trimmed=True)
    assert not ok and "the clip was not cut" in detail


def test_the_gpu_trim_check_decodes_a_trimmed_clip_on_that_gpu(monkeypatch):
    from siasam_fast.pipeline import dali_check

    calls = []

    def recorded(on_gpu, trimmed=False, device_id=0):
        calls.append((on_gpu, trimmed, device_id))
        return True, "the right frames"

    dali_check.gpu_trims_exactly.cache_clear()
    monkeypatch.setattr(dali_check, "decode_check", recorded)
    try:
        assert dali_check.gpu_trims_exactly(1) == (True, "the right frames")
        dali_check.gpu_trims_exactly(1)  # once per process and GPU
    finally:
        dali_check.gpu_trims_exactly.cache_clear()
    assert calls == [(True, True, 1)]


def test_a_video_decoded_alone_is_copied_before_its_pipeline_closes(monkeypatch):
    """A stand-in's frames are DALI's buffer until cloned: the clone must come before the
    throw-away pipeline shuts down (it came after, relying on DALI keeping a closed pipeline's
    output alive: on the GPU, never run). Stand-ins for the pipeline and its output."""
    events = []

    class Frame:
        def clone(self):
            events.append("clone")
            return "copy"

    class Loader:
        def _build(self, jobs, parallel, batch_size):
            return "pipe"

        def _run(self, pipe):
            return [Frame()], [0]

    class Job:
        def as_tuple(self):
            return ()

    monkeypatch.setattr(dali_module, "_close", lambda pipe: events.append("close"))
    assert DALIVideoLoader._decode_alone(Loader(), Job()) == "copy"
    assert events == ["clone", "close"]


@requires_cuda
@pytest.mark.gpu
def test_gpu_outputs_stay_held_until_torch_is_past_them(h264_manifest):
    """On the GPU the loader holds each DALI output until torch's stream has passed the request
    for the next batch (a real CUDA event), and lets it go after that, not before."""
    loader = build_dali_loader(
        examples_for(["bframes", "vfr", "long_gop"] * 2), h264_manifest, CFG, "train", 2,
        image_size=SIZE, device="gpu", num_workers=0, shuffle=False,
    )
    batches = iter(loader)
    first = weakref.ref(next(batches)["frames"])  # the batch itself is dropped at once
    assert first() is not None and len(loader._release) >= 1
    next(batches)  # the request records the event; the consumer's stream is idle
    torch.cuda.synchronize()
    next(batches)  # the first output's event has completed: let go
    assert first() is None
    assert len(loader._release) <= 4  # at most two batches' (an output and its batch's frames)
    list(batches)
    assert len(loader._release) == 0  # the pass's end lets go of everything


def test_a_video_left_out_in_a_stand_in_search_is_left_out_of_the_pass_as_after_a_resume(
        folder, tmp_path):
    """A stand-in search can leave a video out (it failed alone) while the pipeline, planned at
    the pass's start, still holds its later examples: they were decoded (their frames missed the
    damage), while a loader resumed from a state taken in between (which names the video) gave
    them stand-ins. The pipeline is now rebuilt without it, so both give the same batches."""
    for name in ("vp9", "vp9_vfr", "mjpeg", "wide"):
        path = video_path(folder, name, VIDEOS[name][0])
        shutil.copy2(path, tmp_path / path.name)
    manifest = build_manifest(tmp_path, tmp_path / "manifest.jsonl", workers=1, progress=False)
    vp9 = video_path(tmp_path, "vp9", "vp9")  # damaged past 30%, same size and time: its early
    st = os.stat(vp9)  # frames decode, its late ones fail
    data = bytearray(vp9.read_bytes())
    data[int(len(data) * 0.3):] = bytes(len(data) - int(len(data) * 0.3))
    vp9.write_bytes(bytes(data))
    os.utime(vp9, ns=(st.st_atime_ns, st.st_mtime_ns))
    wide = video_path(tmp_path, "wide", "vp9")  # its size changed: the reader leaves it out
    wide.write_bytes(wide.read_bytes()[: wide.stat().st_size // 2])
    cfg = SamplingConfig(num_clips=1, frames_per_clip=2, stride=1)
    # rank 0 of 2 reads positions 0, 2, 4, ...: wide at 2 needs a stand-in, whose first candidate
    # is vp9 at 3 (late frames: fails alone); vp9 at 4 has early frames (decodes)
    names = ["mjpeg", "vp9_vfr", "wide", "vp9", "vp9", "mjpeg", "vp9_vfr", "mjpeg", "mjpeg",
             "vp9_vfr"]

    def loader():
        return build_dali_loader(examples_for(names), manifest, cfg, "train", 2, image_size=SIZE,
                                 num_workers=0, device="cpu", seed=1, shuffle=False, rank=0,
                                 world_size=2)

    def signature(batches):
        return [(b["example_index"].tolist(), b["stand_in"].tolist()) for b in batches]

    whole = signature(loader())
    first = loader()
    batches = iter(first)
    head = [next(batches)]
    state = first.state_dict()
    batches.close()
    assert str(vp9) in state["bad_videos"]  # left out during the first batch's stand-in search
    resumed = loader()
    resumed.load_state_dict(state)
    assert signature(head) + signature(resumed) == whole
    assert all(names[i] != "vp9" for b in whole for i in b[0])  # its examples: stand-ins
