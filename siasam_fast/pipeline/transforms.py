"""Frame transforms shared by the decoding backends: resize, centre crop (or pad), normalise, CHW.

What :func:`video_transform` computes, exactly (the DALI backend mirrors it step by step):

1. Input: uint8 RGB frames ``[U, H, W, 3]`` of one video.
2. Resize so the shorter side equals ``image_size``: the longer side becomes
   ``floor(longer * image_size / shorter + 0.5)`` (see :func:`resized_shape`). Bilinear filter with
   antialiasing (a triangle filter widened by the downscale factor, as PIL's BILINEAR), half-pixel
   centres (``align_corners=False``), computed on uint8 and rounded to uint8 (torch's fixed-point
   uint8 kernel: within 1 grey level of the float computation, about 10x faster). Skipped when the
   size already matches. DALI: ``fn.resize(resize_shorter=S, interp_type=INTERP_LINEAR,
   antialias=True)`` on uint8.
3. Centre crop to ``image_size x image_size``: top ``(h - S) // 2``, left ``(w - S) // 2``, the same
   window for every frame of the video.
4. To float: ``x / 255``, then ``(x - mean) / std`` per channel (ImageNet mean and std by default),
   channels first: ``[U, 3, S, S]``. DALI: ``fn.crop_mirror_normalize(mean=255 * mean,
   std=255 * std, output_layout="FCHW")``.

``fit="pad"`` (``data.frame_fit: pad``; ClipBERT's ``ImageResize`` and ``ImagePad``) replaces
steps 2-3:

2'. Resize so the longer side equals ``image_size``: the shorter side becomes
   ``max(1, floor(shorter * image_size / longer + 0.5))`` (see :func:`fitted_shape`: the rounding
   rule of :func:`resized_shape`; ClipBERT's ``get_resize_size`` truncates instead, which differs
   only where the product's fraction is 0.5 or more: not at 16:9 or 4:3 with S = 224 or 448).
   The same filter as step 2; a square frame is resized to ``S x S`` as with the crop.
3'. Pad with uint8 0 (black) at the right and bottom to ``image_size x image_size``: the image keeps
   the top-left corner (ClipBERT's ``get_padding(pad_all=False)``). Padding comes before step 4, so
   a padded pixel normalises to ``-mean / std`` per channel, exactly what a black pixel gives
   (:func:`normalized_black`). DALI: ``fn.resize`` to :func:`fitted_shape`, then
   ``fn.crop_mirror_normalize`` with the window anchored at (0, 0), ``out_of_bounds_policy="pad"``
   and ``fill_values=normalized_black(mean, std)`` (DALI writes ``fill_values`` as output values,
   after normalisation).

No torchvision: it does not import beside our torch build; torch ops only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How a frame becomes a square (data.frame_fit): crop = shorter side to S, centre crop (the
# default); pad = longer side to S, black at the right and bottom (ClipBERT's)
FRAME_FITS = ("crop", "pad")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``size``, keeping the aspect ratio."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size {height}x{width}: both sides must be positive")
    if height <= width:
        return size, max(size, int(np.floor(width * size / height + 0.5)))
    return max(size, int(np.floor(height * size / width + 0.5))), size


def check_fit(fit: str) -> str:
    if fit not in FRAME_FITS:
        raise ValueError(f"frame fit {fit!r}: valid values are {', '.join(FRAME_FITS)}")
    return fit


def fitted_shape(height: int, width: int, size: int, fit: str = "crop") -> tuple[int, int]:
    """(h, w) after the resize of ``fit``: crop = :func:`resized_shape` (shorter side to ``size``);
    pad = longer side to ``size``, the shorter one scaled by the same factor with
    :func:`resized_shape`'s rounding, at least 1 pixel."""
    if check_fit(fit) == "crop":
        return resized_shape(height, width, size)
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size {height}x{width}: both sides must be positive")
    if height >= width:
        return size, min(size, max(1, int(np.floor(width * size / height + 0.5))))
    return min(size, max(1, int(np.floor(height * size / width + 0.5)))), size


def normalized_black(
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> list[float]:
    """What :func:`normalize` makes of a black (0) pixel, per channel: ``-mean / std`` as the
    float32 values it computes (the value of the padding of ``fit="pad"``)."""
    return [-float(np.float32(m / s)) for m, s in zip(mean, std)]


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred ``size x size`` window."""
    return (height - size) // 2, (width - size) // 2


def resize_and_crop(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """Steps 2-3 on uint8 ``[U, 3, H, W]``: shorter side to ``image_size``, centre square crop."""
    _, _, h, w = frames.shape
    rh, rw = resized_shape(h, w, image_size)
    if (rh, rw) != (h, w):
        frames = F.interpolate(
            frames, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False
        )
    top, left = center_crop_box(rh, rw, image_size)
    return frames[:, :, top : top + image_size, left : left + image_size]


def resize_and_pad(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """Steps 2'-3' on uint8 ``[U, 3, H, W]``: longer side to ``image_size``, zeros (black) at the
    right and bottom to ``image_size x image_size``, the image at the top-left corner."""
    u, c, h, w = frames.shape
    rh, rw = fitted_shape(h, w, image_size, "pad")
    if (rh, rw) != (h, w):
        frames = F.interpolate(
            frames, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False
        )
    if (rh, rw) == (image_size, image_size):
        return frames
    out = frames.new_zeros((u, c, image_size, image_size))
    out[:, :, :rh, :rw] = frames
    return out


def resize_and_fit(frames: torch.Tensor, image_size: int, fit: str = "crop") -> torch.Tensor:
    """Steps 2-3 (``fit="crop"``) or 2'-3' (``fit="pad"``) on uint8 ``[U, 3, H, W]``."""
    if check_fit(fit) == "crop":
        return resize_and_crop(frames, image_size)
    return resize_and_pad(frames, image_size)


def normalize(
    frames: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Step 4 on uint8 ``[U, 3, S, S]``: ``(x / 255 - mean) / std`` as ``dtype``, contiguous."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, 3, 1, 1)
    # Contiguous uint8 first (1 byte per value), then one converting copy: 3x faster than
    # converting the strided crop.
    out = torch.empty(frames.shape, dtype=torch.float32)
    out.copy_(frames.contiguous())
    out.mul_(scale).sub_(shift)
    return out if dtype == torch.float32 else out.to(dtype)


def video_transform(
    frames: np.ndarray | torch.Tensor,
    image_size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    fit: str = "crop",
) -> torch.Tensor:
    """uint8 RGB ``[U, H, W, 3]`` -> normalised ``[U, 3, S, S]`` (see the module docstring;
    ``fit``: "crop" or "pad")."""
    if image_size < 1:
        raise ValueError(f"image_size={image_size}: must be >= 1")
    check_fit(fit)
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 RGB [U, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)  # channels-last strides: what the uint8 resize kernel likes
    if x.shape[0] == 0:
        return torch.zeros((0, 3, image_size, image_size), dtype=dtype)
    return normalize(resize_and_fit(x, image_size, fit), mean, std, dtype)


def frame_resizer(image_size: int, fit: str = "crop"):
    """Steps 2-3 (or 2'-3' with ``fit="pad"``) for one decoded frame as it comes: uint8 RGB
    ``[H, W, 3]`` -> uint8 ``[3, S, S]``, exactly what :func:`resize_and_fit` gives that frame
    within a batch. The PyAV
    backend applies it to each frame while decoding, then :func:`normalize` to their stack: the
    same values as :func:`video_transform`, without stacking a video's full-size frames first (at
    1280x720: 100 MB for 37 frames, and about 12% of a worker's time per video on one CPU core)."""
    if image_size < 1:
        raise ValueError(f"image_size={image_size}: must be >= 1")
    check_fit(fit)

    def resize(frame: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(frame)
        if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"frame: expected uint8 RGB [H, W, 3], got {x.dtype} "
                             f"{tuple(x.shape)}")
        return resize_and_fit(x.permute(2, 0, 1).unsqueeze(0), image_size, fit)[0]

    return resize


def denormalize(
    frames: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """Inverse of :func:`normalize` back to 0..255 floats (for tests and visualisation)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (frames.float() * s + m) * 255.0
