"""data.frame_fit: how a frame becomes image_size x image_size.

crop (the default): shorter side to S, centre square crop, unchanged. pad (ClipBERT's): longer side
to S, uint8 0 (black) at the right and bottom before normalisation, so the padding is the
normalised black ``-mean / std``. The geometry, the PyAV backend, the DALI backend (DALI's CPU
decoder: VP9 / MJPEG) against PyAV, and the config key.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from videos import read_indices, video_path, write_index_video

from siasam_fast.config import DataConfig, load_config
from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dataset import VideoQADataset, build_loader
from siasam_fast.pipeline.manifest import build_manifest
from siasam_fast.pipeline.pyav_decode import decode_frames
from siasam_fast.pipeline.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    fitted_shape,
    frame_resizer,
    normalize,
    normalized_black,
    resize_and_crop,
    resized_shape,
    video_transform,
)
from siasam_fast.sampling import SamplingConfig

SIZE = 32
CFG = SamplingConfig(num_clips=3, frames_per_clip=4, stride=4)
# name -> (codec, frames, (height, width)): non-square, so that pad and crop differ
VIDEOS = {
    "wide_vp9": ("vp9", 40, (48, 80)),  # pad at 32: 19 x 32 image, 13 black rows below
    "tall_mjpeg": ("mjpeg", 30, (80, 48)),  # pad at 32: 32 x 19 image, 13 black columns right
    "wide_h264": ("h264", 40, (36, 64)),  # PyAV only (DALI's CPU decoder has no H.264)
}
DALI_NAMES = ["wide_vp9", "tall_mjpeg"]
TOLERANCE_FLOAT = 1e-3  # grey levels: float32 rounding of denormalize (3 reads 3.0000076)


def black_mask(height, width, size):
    """bool [S, S]: True where the pad fit puts black (right of / below the resized frame)."""
    rh, rw = fitted_shape(height, width, size, "pad")
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[:rh, :rw] = False
    return mask


def black_image(size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """[3, S, S] normalised black: (0 - 255 mean) / (255 std) per channel."""
    values = torch.tensor([(0 - 255 * m) / (255 * s) for m, s in zip(mean, std)])
    return values.view(3, 1, 1).expand(3, size, size)


# -- geometry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, size, expected",
    [
        (720, 1280, 224, (126, 224)),  # ActivityNet's 16:9
        (1280, 720, 224, (224, 126)),  # portrait
        (480, 640, 448, (336, 448)),  # 4:3, upscaled
        (48, 80, 32, (19, 32)),  # 19.2 -> 19
        (80, 48, 32, (32, 19)),
        (30, 44, 32, (22, 32)),  # 21.82 -> 22: rounded, as resized_shape rounds
        (44, 30, 32, (32, 22)),
        (64, 64, 32, (32, 32)),  # square
        (20, 20, 32, (32, 32)),  # square, upscaled
        (1, 100, 32, (1, 32)),  # 1-pixel thin: 0.32 -> at least 1
        (100, 1, 32, (32, 1)),
        (3, 1000, 32, (1, 32)),
    ],
)
def test_pad_fits_the_longer_side(height, width, size, expected):
    assert fitted_shape(height, width, size, "pad") == expected
    assert fitted_shape(height, width, size, "crop") == resized_shape(height, width, size)
    assert fitted_shape(height, width, size) == resized_shape(height, width, size)


@pytest.mark.parametrize(
    "height, width, size",
    [(48, 80, 32), (80, 48, 32), (720, 1280, 64), (1, 100, 32), (100, 1, 32), (24, 40, 48),
     (64, 64, 32), (20, 20, 32)],
)
def test_pad_puts_the_image_top_left_and_normalised_black_elsewhere(height, width, size):
    gen = torch.Generator().manual_seed(height * 1000 + width)
    # 1..255: no pixel of the image is black, so only the padding can be
    frames = torch.randint(1, 256, (2, height, width, 3), generator=gen, dtype=torch.uint8)
    out = video_transform(frames.numpy(), size, fit="pad")
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    rh, rw = fitted_shape(height, width, size, "pad")
    # the image region: the frame resized to (rh, rw), nothing else
    x = frames.permute(0, 3, 1, 2)
    if (rh, rw) != (height, width):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(out[:, :, :rh, :rw], normalize(x))
    # the rest: exactly what normalize makes of a black pixel, i.e. -mean / std
    mask = black_mask(height, width, size)
    assert int(mask.sum()) == size * size - rh * rw
    black = torch.tensor(normalized_black()).view(3, 1).expand(3, int(mask.sum()))
    for u in range(2):
        assert torch.equal(out[u][:, mask], black)
    torch.testing.assert_close(out[0][:, mask], black_image(size)[:, mask], atol=1e-6, rtol=0)
    assert torch.equal(normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten(),
                       torch.tensor(normalized_black()))
    # the PyAV backend's per-frame path gives the same values
    resize = frame_resizer(size, "pad")
    assert torch.equal(normalize(torch.stack([resize(f) for f in frames.numpy()])), out)


def test_pad_fill_follows_mean_and_std():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    frames = np.full((1, 10, 40, 3), 200, np.uint8)
    out = video_transform(frames, 16, mean, std, fit="pad")
    mask = black_mask(10, 40, 16)  # 4 x 16 image, 12 black rows
    assert int(mask.sum()) == 12 * 16
    assert torch.equal(out[0][:, mask],
                       torch.tensor(normalized_black(mean, std)).view(3, 1).expand(3, 12 * 16))
    torch.testing.assert_close(out[0][:, mask], black_image(16, mean, std)[:, mask])
    torch.testing.assert_close(out[0][:, ~mask],
                               ((200 / 255 - torch.tensor(mean)) / torch.tensor(std))
                               .view(3, 1).expand(3, 4 * 16))


@pytest.mark.parametrize("height, width", [(48, 80), (80, 48), (64, 64), (20, 30)])
def test_crop_is_unchanged(height, width):
    """The default is the centre crop, value for value: an independent reference (interpolate to
    the shorter-side size, the centred window) and the functions the crop always used."""
    rng = np.random.default_rng(height + width)
    frames = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    size = 32
    rh, rw = resized_shape(height, width, size)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    if (rh, rw) != (height, width):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - size) // 2, (rw - size) // 2
    expected = normalize(x[:, :, top : top + size, left : left + size])
    assert torch.equal(video_transform(frames, size), expected)
    assert torch.equal(video_transform(frames, size, fit="crop"), expected)
    assert torch.equal(
        normalize(resize_and_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), size)), expected)
    for fit in ((), ("crop",)):
        resize = frame_resizer(size, *fit)
        assert torch.equal(normalize(torch.stack([resize(f) for f in frames])), expected)
    if (height, width) != (64, 64):  # a non-square frame: pad shows what crop cuts off
        assert not torch.equal(video_transform(frames, size, fit="pad"), expected)


def test_bad_fit_is_refused():
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    for call in (lambda: video_transform(frames, 8, fit="letterbox"),
                 lambda: frame_resizer(8, "letterbox"),
                 lambda: fitted_shape(8, 8, 8, "letterbox")):
        with pytest.raises(ValueError, match=r"'letterbox'.*crop, pad"):
            call()


# -- config ------------------------------------------------------------------------------------


def test_config_key_and_its_error():
    assert DataConfig().frame_fit == "crop"
    assert load_config(None, ["data.frame_fit=pad"]).data.frame_fit == "pad"
    with pytest.raises(ValueError, match=r"^data\.frame_fit='letterbox': valid values are crop, "
                                         r"pad$"):
        load_config(None, ["data.frame_fit=letterbox"])
    with pytest.raises(ValueError, match=r"data\.frame_fit='Pad'"):
        DataConfig(frame_fit="Pad")


def test_a_resume_must_keep_the_frame_fit():
    """frame_fit changes what the model sees: not in RESUMABLE_CHANGES. A checkpoint from before
    the key existed reads as crop, what it was trained with."""
    from siasam_fast.training import RESUMABLE_CHANGES, config_mismatches, saved_config

    assert "data.frame_fit" not in RESUMABLE_CHANGES
    crop = load_config(None, []).to_dict()
    pad = load_config(None, ["data.frame_fit=pad"]).to_dict()
    assert config_mismatches(crop, pad) == [
        "data.frame_fit: checkpoint has 'crop', this run has 'pad'"]
    older = json.loads(json.dumps(crop))
    del older["data"]["frame_fit"]
    assert config_mismatches(saved_config({"config": older}), crop) == []
    assert config_mismatches(saved_config({"config": older}), pad) != []


# -- PyAV backend ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frame_fit_videos")
    for name, (codec, n, size) in VIDEOS.items():
        write_index_video(video_path(folder, name, codec), n, codec=codec, size=size, gop=10)
    return build_manifest(folder, folder / "manifest.jsonl", workers=1, progress=False)


def examples_for(names):
    return [QAExample(qid=f"q{i}", video_id=v, question="what?") for i, v in enumerate(names)]


def check_padded_batch(batch, manifest, names, size, exact=True):
    """Every video's frames: the image at the top-left shows its frame's index (pad keeps the
    whole frame: the index code survives a non-square frame), normalised black elsewhere, zeros
    past num_unique."""
    for v, index in enumerate(batch["example_index"].tolist()):
        record = manifest[names[index]]
        rh, rw = fitted_shape(record.height, record.width, size, "pad")
        u = int(batch["num_unique"][v])
        frames = batch["frames"][v, :u].float()
        ids = read_indices(denormalize(frames[:, :, :rh, :rw]))
        real = batch["frame_ids"][v][batch["frame_mask"][v]].tolist()
        assert ids == sorted(set(real)), names[index]
        mask = black_mask(record.height, record.width, size)
        assert mask.any()
        black = torch.tensor(normalized_black()).view(3, 1).expand(3, int(mask.sum()))
        for frame in frames:
            if exact:
                assert torch.equal(frame[:, mask], black), names[index]
            else:
                torch.testing.assert_close(frame[:, mask], black, atol=1e-3, rtol=0)
            torch.testing.assert_close(frame[:, mask], black_image(size)[:, mask], atol=1e-3,
                                       rtol=0)
        assert (batch["frames"][v, u:] == 0).all()


@pytest.mark.parametrize("dedup", [True, False])
def test_pyav_pads_non_square_frames(manifest, dedup):
    names = list(VIDEOS)
    loader = build_loader(examples_for(names), manifest, CFG, "val", batch_size=3,
                          image_size=SIZE, num_workers=0, dedup=dedup, frame_fit="pad")
    assert loader.dataset.frame_fit == "pad"
    batch = next(iter(loader))
    if dedup:
        check_padded_batch(batch, manifest, names, SIZE)
    for v, index in enumerate(batch["example_index"].tolist()):
        record = manifest[names[index]]
        ids = batch["frame_ids"][v][batch["frame_mask"][v]].tolist()
        wanted = sorted(set(ids)) if dedup else ids
        unique, inverse = np.unique(wanted, return_inverse=True)
        raw = decode_frames(record, unique)[inverse]  # full-size frames as decoded
        expected = video_transform(raw, SIZE, fit="pad")
        u = int(batch["num_unique"][v])
        assert torch.equal(batch["frames"][v, :u], expected), names[index]
        # and not the crop
        assert not torch.equal(expected, video_transform(raw, SIZE))


def test_pyav_default_is_the_crop(manifest):
    names = ["wide_h264"]
    kwargs = dict(image_size=SIZE, num_workers=0)
    default = next(iter(build_loader(examples_for(names), manifest, CFG, "val", 1, **kwargs)))
    crop = next(iter(build_loader(examples_for(names), manifest, CFG, "val", 1, frame_fit="crop",
                                  **kwargs)))
    assert torch.equal(default["frames"], crop["frames"])
    raw = decode_frames(manifest["wide_h264"], default["frame_ids"][0].unique().numpy())
    assert torch.equal(default["frames"][0], video_transform(raw, SIZE))


def test_dataset_refuses_a_bad_fit(manifest):
    with pytest.raises(ValueError, match=r"'letterbox'.*crop, pad"):
        VideoQADataset(examples_for(["wide_vp9"]), manifest, CFG, split="val",
                       frame_fit="letterbox")


def test_training_loaders_take_the_config_fit(manifest):
    """make_loader (training, evaluation and `siasam-fast ask`, which decodes through it)
    passes data.frame_fit to the loader."""
    from siasam_fast.training import Data, make_loader

    data = Data(examples={"test": examples_for(["wide_vp9"])}, labels={"test": {0: 0}},
                ans2label={}, manifest=manifest)
    for fit in ("crop", "pad"):
        cfg = load_config(None, [f"data.frame_fit={fit}", "data.backend=pyav",
                                 "data.num_workers=0", "task=count",
                                 f"data.image_size={SIZE}"])
        loader = make_loader(cfg, data, "test", 0, 1)
        assert loader.dataset.frame_fit == fit
        batch = next(iter(loader))
        raw = decode_frames(manifest["wide_vp9"], batch["frame_ids"][0].unique().numpy())
        u = int(batch["num_unique"][0])
        assert torch.equal(batch["frames"][0, :u], video_transform(raw, SIZE, fit=fit))


# -- DALI backend (CPU decoder) ----------------------------------------------------------------


def grey_levels(frames):
    return denormalize(frames.float().reshape(-1, *frames.shape[-3:]))


@pytest.mark.parametrize("size", [SIZE, 40, 96])  # downscale; 40: 48x80 -> 24x40; upscale
def test_dali_pad_matches_pyav(manifest, size):
    """The DALI graph pads as PyAV does: the same pixels within test_dali_pipeline's grey-content
    tolerance (max 3, mean 1 grey level; TOLERANCE_FLOAT for undoing the normalisation in float32:
    both backends' values are whole grey levels), normalised black past the frame. Measured
    (DALI 2.4, PyAV, these videos, S = 24..100): max 2 below S = 64, 3 at some upscales (96, 100)
    for pad and for crop alike, inside the image (not at its edge with the padding); mean <= 0.41
    (pad), <= 0.67 (crop)."""
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline.dali import build_dali_loader

    examples = examples_for(DALI_NAMES)
    kwargs = dict(image_size=size, num_workers=0, frame_fit="pad")
    a = next(iter(build_dali_loader(examples, manifest, CFG, "val", 2, device="cpu", **kwargs)))
    b = next(iter(build_loader(examples, manifest, CFG, "val", 2, **kwargs)))
    assert a["frames"].shape == b["frames"].shape
    assert torch.equal(a["frame_ids"], b["frame_ids"])
    diff = (grey_levels(a["frames"]) - grey_levels(b["frames"])).abs()
    assert diff.max() <= 3 + TOLERANCE_FLOAT and diff.mean() <= 1.0, (size, diff.max(),
                                                                       diff.mean())
    check_padded_batch(a, manifest, DALI_NAMES, size, exact=False)
    check_padded_batch(b, manifest, DALI_NAMES, size)


def test_dali_pad_fill_is_the_normalised_black_of_its_mean_and_std(manifest):
    """fill_values are DALI's output values: they follow the loader's mean and std (a dataset
    with other statistics), as PyAV's zero padding does after normalisation."""
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline.dali import build_dali_loader

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    examples = examples_for(["wide_vp9"])
    loader = build_dali_loader(examples, manifest, CFG, "val", 1, image_size=SIZE, num_workers=0,
                               device="cpu", frame_fit="pad")
    loader.dataset.mean, loader.dataset.std = mean, std
    batch = next(iter(loader))
    record = manifest["wide_vp9"]
    mask = black_mask(record.height, record.width, SIZE)
    frames = batch["frames"][0, : int(batch["num_unique"][0])]
    expected = black_image(SIZE, mean, std)[:, mask]
    for frame in frames:
        torch.testing.assert_close(frame[:, mask], expected, atol=1e-5, rtol=0)
    rh, rw = fitted_shape(record.height, record.width, SIZE, "pad")
    ids = read_indices(denormalize(frames[:, :, :rh, :rw], mean, std))
    assert ids == batch["frame_ids"][0].unique().tolist()


def test_dali_crop_is_still_the_centre_crop(manifest):
    """The default graph: the centre crop, within the same tolerance of PyAV's crop, and not
    the padded frame."""
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline.dali import build_dali_loader

    examples = examples_for(DALI_NAMES)
    kwargs = dict(image_size=SIZE, num_workers=0)
    a = next(iter(build_dali_loader(examples, manifest, CFG, "val", 2, device="cpu", **kwargs)))
    b = next(iter(build_loader(examples, manifest, CFG, "val", 2, **kwargs)))
    c = next(iter(build_dali_loader(examples, manifest, CFG, "val", 2, device="cpu",
                                    frame_fit="crop", **kwargs)))
    assert torch.equal(a["frames"], c["frames"])
    diff = (grey_levels(a["frames"]) - grey_levels(b["frames"])).abs()
    assert diff.max() <= 3 and diff.mean() <= 1.0, (diff.max(), diff.mean())
    padded = next(iter(build_loader(examples, manifest, CFG, "val", 2, frame_fit="pad", **kwargs)))
    assert (grey_levels(a["frames"]) - grey_levels(padded["frames"])).abs().max() > 50


def test_dali_jobs_anchor_the_pad_window_at_the_origin(manifest):
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline import dali as dali_module

    record = manifest["wide_vp9"]  # 48 x 80
    wanted = np.array([0, 4], np.int32)
    pad = dali_module._job(0, record, wanted, SIZE, fit="pad")
    assert pad.resize.tolist() == [19, 32] and pad.crop_pos.tolist() == [0, 0]
    crop = dali_module._job(0, record, wanted, SIZE)
    assert crop.resize.tolist() == [32, 53]
    # left (53 - 32) // 2 = 10: DALI's anchor crop_pos * (53 - 32) rounds or floors to 10
    assert int(crop.crop_pos[0] * 21) == 10 and round(float(crop.crop_pos[0]) * 21) == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_pad_matches_pyav(manifest):
    """NVDEC (H.264) and the GPU's crop-mirror-normalize kernel, fp16: test_dali_pipeline's NVDEC
    tolerance (max 4, mean 1.5 grey levels) against PyAV's pad, and the padding within 1e-3 of
    the normalised black (fp16 rounds ImageNet's -mean / std by at most 7.2e-4). Not run where
    the tests were written (no GPU there)."""
    pytest.importorskip("nvidia.dali")
    from siasam_fast.pipeline.dali import build_dali_loader

    names = ["wide_h264"]
    kwargs = dict(image_size=SIZE, num_workers=0, frame_fit="pad")
    a = next(iter(build_dali_loader(examples_for(names), manifest, CFG, "val", 1, device="gpu",
                                    **kwargs)))
    b = next(iter(build_loader(examples_for(names), manifest, CFG, "val", 1, **kwargs)))
    assert a["frames"].is_cuda and a["frames"].dtype == torch.float16
    a = {k: v.cpu() if torch.is_tensor(v) else v for k, v in a.items()}
    diff = (grey_levels(a["frames"]) - grey_levels(b["frames"])).abs()
    assert diff.max() <= 4 and diff.mean() <= 1.5, (diff.max(), diff.mean())
    check_padded_batch(a, manifest, names, SIZE, exact=False)
