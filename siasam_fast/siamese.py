"""The siamese loss of SiaSamRea (NeurIPS 2021, section 3.3, eq. 1-5 and the first term of eq. 8).

Per video with N clips (clip 0 is the anchor, clips 1..N-1 are siamese clips), clip-text features
f [N, D] and logits z [N, K]:

- SKG (eq. 1-2): A(i, j) = <f_i / |f_i|, f_j / |f_j|> / tau; the diagonal is removed and every row
  is softmax-normalised over j != i, giving Â.
- SKR (eq. 3-5): P = softmax(z) row-wise, R = Â P, and the soft label
  Q = omega * sum_i W1_i R_i + (1 - omega) * sum_i W2_i P_i with W1 = softmax(theta1),
  W2 = softmax(theta2).
- Loss (eq. 8, first term): L_siamese = -sum_k Q_k log softmax(z_0)_k, then reduced over videos.

This module holds the plain PyTorch reference (the oracle of the tests and the fallback wherever
Triton cannot run; it also runs in float64), the dispatch between it and the fused Triton kernels
(``siasam_kernels.siamese``), the functional API and the thin :class:`SiameseReasoning` module.

Conventions shared by both implementations:

- ``clip_mask`` [V, N] (bool, True = valid) marks videos with fewer clips. Masked clips neither give
  nor receive knowledge: their rows and columns of Â are zero, their W1 / W2 are zero (the softmax
  runs over the valid clips only), and their features and logits are ignored (they may hold
  anything, NaN included) and get zero gradients. The anchor (clip 0) is always treated as valid,
  whatever the mask says (checking it would cost a GPU sync).
- A clip with no valid other clip (N = 1, or a video whose only valid clip is the anchor) keeps its
  own prediction: its row of Â is the identity row, R_i = P_i. Such a video has Q = P_anchor, the
  same as N identical copies of the anchor; its loss is the entropy of the anchor's prediction, and
  with ``detach_soft_label`` it gives no gradient at all.
- ``detach_soft_label`` (BAKE-style) treats Q as a constant: only log softmax(z_0) is trained;
  features and theta1 / theta2 then get no gradient (so W1 / W2 stay where they are).
- The loss is float32 for float16 / bfloat16 / float32 inputs (float64 for float64 inputs).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLS = ("auto", "triton", "reference")
REDUCTIONS = ("none", "mean", "sum")
IMPL_ENV = "SIASAM_IMPL"  # overrides impl="auto" (auto | triton | reference)
EPS = 1e-12  # floor on |f| in the l2 normalisation (F.normalize's default; = kernels' EPS)

__all__ = [
    "IMPLS",
    "REDUCTIONS",
    "SiameseReasoning",
    "resolve_impl",
    "siamese_count_loss",
    "siamese_knowledge",
    "siamese_loss",
    "siamese_loss_reference",
    "siamese_soft_label",
    "siamese_soft_label_reference",
]


# ----------------------------------------------------------------------------------------------
# Reference (plain PyTorch, straight from the equations)
# ----------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _valid_clips(clip_mask: Tensor | None, V: int, N: int, device) -> Tensor:
    """[V, N] bool: the mask with the anchor always valid."""
    anchor = torch.arange(N, device=device) == 0
    if clip_mask is None:
        return torch.ones(V, N, dtype=torch.bool, device=device)
    return clip_mask.to(torch.bool) | anchor


def _full_precision(device: torch.device):
    """Autocast off: the loss is computed in float32 / float64 even inside an autocast region."""
    return torch.autocast(device_type=device.type, enabled=False)


def _knowledge(features, valid: Tensor, tau: float, skg: bool, dtype: torch.dtype) -> Tensor:
    """Â [V, N, N] (eq. 1-2) for the valid clips; see :func:`siamese_knowledge`."""
    N = valid.shape[1]
    eye = torch.eye(N, dtype=torch.bool, device=valid.device)
    pair = valid[:, :, None] & valid[:, None, :] & ~eye  # j != i, both valid (eq. 2's support)
    lone = ~pair.any(dim=-1, keepdim=True)
    support = pair | (lone & eye)  # documented fallback: a lone clip keeps its own prediction
    if not skg:
        a_hat = support.to(dtype) / support.sum(dim=-1, keepdim=True)
    else:
        f = torch.where(valid[..., None], features.to(dtype), 0.0)  # masked clips may hold NaN
        f_hat = F.normalize(f, dim=-1, eps=EPS)  # sigma in eq. 1
        a = f_hat @ f_hat.transpose(1, 2) / tau  # eq. 1
        a_hat = torch.softmax(a.masked_fill(~support, float("-inf")), dim=-1)  # eq. 2
    return a_hat * valid[:, :, None]  # masked clips' rows are zero too (their W are zero anyway)


def siamese_knowledge(
    features: Tensor, clip_mask: Tensor | None = None, tau: float = 1.0, skg: bool = True
) -> Tensor:
    """Siamese knowledge Â [V, N, N] (eq. 1-2) of features [V, N, D].

    Valid clips' rows sum to one with a zero diagonal, masked clips' rows and columns are zero, and
    a valid clip without any valid other clip gets the identity row (it keeps its own prediction).
    ``skg=False`` gives the "SKR only" ablation: uniform over the other valid clips.
    """
    if not isinstance(features, Tensor) or features.dim() != 3 or min(features.shape) < 1:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a [V, N, D] tensor with V, N, D >= 1, got {got}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    V, N = features.shape[:2]
    _check_mask(clip_mask, V, N, features.device, "features")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau={tau!r}: must be a finite number > 0 (eq. 1 divides by it)")
    if tau < TAU_MIN:
        raise ValueError(f"tau={tau!r}: 1 / tau overflows fp32, in which the kernels scale the "
                         f"affinities by it (times log2(e)); must be at least {TAU_MIN:.3g}")
    valid = _valid_clips(clip_mask, V, N, features.device)
    with _full_precision(features.device):
        return _knowledge(features, valid, tau, skg, _compute_dtype(features))


def _clip_weights(theta: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """W = softmax(theta) over each video's valid clips, [V, N] (W1 / W2 of eq. 5)."""
    logits = theta.to(dtype).expand(valid.shape).masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _soft_label_and_anchor_log_probs(
    features, logits, theta1, theta2, omega, tau, clip_mask, skg
) -> tuple[Tensor, Tensor]:
    V, N, _ = logits.shape
    dtype = _compute_dtype(features, logits)
    valid = _valid_clips(clip_mask, V, N, logits.device)
    with _full_precision(logits.device):
        z = torch.where(valid[..., None], logits.to(dtype), 0.0)
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()  # P, one row per clip
        a_hat = _knowledge(features, valid, tau, skg, dtype)
        r = a_hat @ p  # eq. 3: R_i = sum_{j != i} Â(i, j) p_j
        w1 = _clip_weights(theta1, valid, dtype)
        w2 = _clip_weights(theta2, valid, dtype)
        q = omega * (w1[:, None, :] @ r)[:, 0] + (1.0 - omega) * (w2[:, None, :] @ p)[:, 0]  # eq. 5
    return q, log_p[:, 0]


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def siamese_soft_label_reference(
    features, logits, theta1, theta2, omega=0.5, tau=1.0, clip_mask=None, skg=True
) -> Tensor:
    """Soft label Q [V, K] (eq. 5), plain PyTorch, differentiable."""
    return _soft_label_and_anchor_log_probs(
        features, logits, theta1, theta2, omega, tau, clip_mask, skg
    )[0]


def siamese_loss_reference(
    features,
    logits,
    theta1,
    theta2,
    omega=0.5,
    tau=1.0,
    clip_mask=None,
    skg=True,
    detach_soft_label=False,
    reduction="mean",
) -> Tensor:
    """L_siamese (eq. 8, first term), plain PyTorch: the oracle and the CPU fallback."""
    q, log_p_anchor = _soft_label_and_anchor_log_probs(
        features, logits, theta1, theta2, omega, tau, clip_mask, skg
    )
    if detach_soft_label:
        q = q.detach()
    return _reduce(-(q * log_p_anchor).sum(dim=-1), reduction)  # eq. 8: soft cross-entropy


def siamese_count_loss(
    features: Tensor | None,
    predictions: Tensor,
    theta1: Tensor,
    theta2: Tensor,
    omega: float = 0.5,
    tau: float = 1.0,
    clip_mask: Tensor | None = None,
    skg: bool = True,
    detach_soft_label: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Siamese term of the count task: predictions [V, N] are scalars, so is Q; (y_anchor - Q)^2.

    The same Â (eq. 1-2) and weights propagate the clips' predicted counts: Q = omega * W1^T Â y +
    (1 - omega) * W2^T y (eq. 3-5 with K = 1 and no softmax), and the anchor's prediction is pulled
    towards Q. A video whose only valid clip is the anchor has Q = y_anchor, hence zero loss.
    Plain PyTorch (there is no kernel: it is O(V N^2 + V N D)).
    """
    if predictions.dim() != 2:
        raise ValueError(
            f"predictions must be [V, N] (one count per clip), got shape {tuple(predictions.shape)}"
        )
    _check_inputs(
        features, predictions[..., None], theta1, theta2, omega, tau, clip_mask, skg, reduction,
        logits_name="predictions",
    )  # fmt: skip
    V, N = predictions.shape
    dtype = _compute_dtype(features, predictions)
    valid = _valid_clips(clip_mask, V, N, predictions.device)
    with _full_precision(predictions.device):
        y = torch.where(valid, predictions.to(dtype), 0.0)
        a_hat = _knowledge(features, valid, tau, skg, dtype)
        r = (a_hat @ y[..., None])[..., 0]  # eq. 3 with scalar predictions
        w1 = _clip_weights(theta1, valid, dtype)
        w2 = _clip_weights(theta2, valid, dtype)
        q = omega * (w1 * r).sum(-1) + (1.0 - omega) * (w2 * y).sum(-1)  # eq. 5
    if detach_soft_label:
        q = q.detach()
    return _reduce((y[:, 0] - q) ** 2, reduction)


# ----------------------------------------------------------------------------------------------
# Validation and dispatch
# ----------------------------------------------------------------------------------------------


def _check_mask(clip_mask, V: int, N: int, device, other: str) -> None:
    """clip_mask: None or a bool [V, N] tensor on ``other``'s device."""
    if clip_mask is None:
        return
    if not isinstance(clip_mask, Tensor) or clip_mask.dtype != torch.bool:
        got = clip_mask.dtype if isinstance(clip_mask, Tensor) else type(clip_mask).__name__
        raise TypeError(f"clip_mask must be a bool tensor [V, N], got {got}")
    if tuple(clip_mask.shape) != (V, N):
        raise ValueError(f"clip_mask must have shape [V, N] = [{V}, {N}], got "
                         f"{tuple(clip_mask.shape)}")  # fmt: skip
    if clip_mask.device != device:
        raise ValueError(f"clip_mask is on {clip_mask.device} but {other} on {device}")


def _check_inputs(
    features, logits, theta1, theta2, omega, tau, clip_mask, skg, reduction, logits_name="logits"
) -> None:
    """Shape / dtype / device / value checks shared by both implementations (no GPU sync)."""
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{logits_name} must be a [V, N, K] tensor, got {got}")
    V, N, K = logits.shape
    if V < 1 or N < 1 or K < 1:
        raise ValueError(f"{logits_name} shape {tuple(logits.shape)}: V, N and K must all be >= 1")
    if not logits.is_floating_point():
        raise TypeError(f"{logits_name} must be floating point, got {logits.dtype}")
    device = logits.device
    if features is None:
        if skg:
            raise ValueError("features=None needs skg=False (SKG, eq. 1-2, is built from features)")
    else:
        if not isinstance(features, Tensor) or features.dim() != 3:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must be a [V, N, D] tensor, got {got}")
        if tuple(features.shape[:2]) != (V, N):
            raise ValueError(
                f"features shape {tuple(features.shape)} does not match {logits_name} "
                f"[V, N] = {(V, N)}: need [{V}, {N}, D]"
            )
        if features.shape[2] < 1:
            raise ValueError(f"features shape {tuple(features.shape)}: D must be >= 1")
        if not features.is_floating_point():
            raise TypeError(f"features must be floating point, got {features.dtype}")
        if features.device != device:
            raise ValueError(f"features are on {features.device} but {logits_name} on {device}")
    for name, theta in (("theta1", theta1), ("theta2", theta2)):
        if not isinstance(theta, Tensor) or tuple(theta.shape) != (N,):
            got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
            raise ValueError(f"{name} must have shape [N] = [{N}] (one weight per clip), got {got}")
        if not theta.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {theta.dtype}")
        if theta.device != device:
            raise ValueError(f"{name} is on {theta.device} but {logits_name} on {device}")
    _check_mask(clip_mask, V, N, device, logits_name)
    if not (isinstance(omega, (int, float)) and 0.0 <= omega <= 1.0):
        raise ValueError(f"omega={omega!r}: must be a number in [0, 1] (eq. 5)")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau={tau!r}: must be a finite number > 0 (eq. 1 divides by it)")
    if tau < TAU_MIN:
        raise ValueError(f"tau={tau!r}: 1 / tau overflows fp32, in which the kernels scale the "
                         f"affinities by it (times log2(e)); must be at least {TAU_MIN:.3g}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: valid values are {REDUCTIONS}")


FP32_MAX = float(torch.finfo(torch.float32).max)
# The smallest tau accepted: the kernels scale cos by log2(e) / tau in fp32 (exp2), and cos may
# round a little above 1; with 1 / tau <= FP32_MAX / 2 neither they nor the reference overflow
# (1 / FP32_MAX let a tau below 4.2e-39 through, and the kernels' loss came out NaN).
TAU_MIN = 2.0 / FP32_MAX


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (kernels on CPU tensors), read as
    Triton reads it (1, true, on, yes in any case; anything else is off)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _version_tuple(version: str) -> tuple[int, ...]:
    """(3, 8, 0) of "3.8.0+git..." (the leading numbers only)."""
    import re

    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


TRITON_FOR_SM70 = "triton==3.8.0"  # the newest Triton whose ptxas compiles for a V100


def triton_gpu_problem(capability: tuple[int, int], triton_version: str) -> str | None:
    """Why Triton ``triton_version`` cannot compile the kernels for a GPU of ``capability``, or
    None: from Triton 3.9 its PTX (ISA 9.4) is more than its bundled ptxas 12.9 takes for sm_70
    ("Unsupported .version 9.4"), and CUDA 13's ptxas no longer targets sm_70."""
    if tuple(capability) < (7, 5) and _version_tuple(triton_version) >= (3, 9):
        return (f"Triton {triton_version} cannot compile for sm_{capability[0]}{capability[1]} "
                "(its bundled ptxas rejects the PTX it emits)")
    return None


def _triton_unsupported(features, logits, theta1, theta2, skg) -> str | None:
    """Why the fused kernels cannot run these inputs (None if they can)."""
    if logits.device.type != "cuda" and not interpreting():
        # Checked before the import: the kernels must not be compiled for a GPU in a process
        # that may still turn on the interpreter.
        return (
            f"impl='triton' needs CUDA tensors, got tensors on {logits.device}; set "
            "TRITON_INTERPRET=1 before importing siasam_kernels to run the Triton interpreter on "
            "CPU, or use impl='reference'"
        )
    try:
        from siasam_kernels import siamese as kern
    except ImportError as err:  # triton missing or broken
        return f"impl='triton' needs Triton ({err}); use impl='reference'"
    if logits.device.type != "cuda" and \
            type(kern._siamese_fwd_kernel).__name__ != "InterpretedFunction":
        return ("impl='triton' on CPU tensors: TRITON_INTERPRET=1 was set after siasam_kernels "
                "was imported, so its kernels were built for a GPU; set it before the first "
                "import (e.g. in the shell), or use impl='reference'")
    if logits.device.type == "cuda":
        import triton

        problem = triton_gpu_problem(torch.cuda.get_device_capability(logits.device),
                                     triton.__version__)
        if problem:
            return (f"impl='triton': {problem}: pip install {TRITON_FOR_SM70} (README, V100 "
                    "notes), or use impl='reference'")
    V, N, K = logits.shape
    if N > kern.MAX_CLIPS:
        return (
            f"impl='triton' supports up to {kern.MAX_CLIPS} clips per video (N <= "
            f"{kern.MAX_CLIPS}), got N={N}; use impl='reference' for more"
        )
    if K > kern.MAX_CLASSES:
        return (
            f"impl='triton' supports up to {kern.MAX_CLASSES} classes (K), got K={K}; "
            "use impl='reference'"
        )
    named = [("logits", logits), ("theta1", theta1), ("theta2", theta2)]
    if skg:
        D = features.shape[2]
        if D > kern.MAX_FEATURE_DIM:
            return (
                f"impl='triton' supports feature sizes up to D={kern.MAX_FEATURE_DIM}, got "
                f"D={D}; use impl='reference'"
            )
        named.insert(0, ("features", features))
    for name, t in named:
        if t.dtype not in kern.SUPPORTED_DTYPES:
            return (
                f"impl='triton' supports float32, float16 and bfloat16, got {name} dtype "
                f"{t.dtype}; use impl='reference' (it also runs float64)"
            )
    return None


def requested_impl(impl: str) -> str:
    """``impl`` with the ``SIASAM_IMPL`` environment variable applied (it overrides "auto" only);
    a ValueError names a bad value of either."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: valid values are {IMPLS}")
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
        if impl not in IMPLS:
            raise ValueError(
                f"environment variable {IMPL_ENV}={os.environ[IMPL_ENV]!r}: valid values are "
                f"{IMPLS}"
            )
    return impl


def resolve_impl(impl: str, features, logits, theta1, theta2, skg: bool = True) -> str:
    """'triton' or 'reference' for these inputs.

    "auto" (or the ``SIASAM_IMPL`` environment variable, which overrides "auto" only) picks the
    fused kernels for CUDA tensors they support and the reference otherwise (with a warning when a
    CUDA input is outside the kernels' limits; float64 falls back silently, it is a testing dtype).
    An explicit "triton" raises ValueError when the kernels cannot run the inputs.
    """
    asked = impl
    impl = requested_impl(impl)
    if impl == "reference" or (impl == "auto" and logits.device.type != "cuda"):
        return "reference"  # (without importing Triton)
    reason = _triton_unsupported(features, logits, theta1, theta2, skg)
    if impl == "triton":
        if reason:
            source = "" if asked == "triton" else \
                f" (impl='triton' comes from {IMPL_ENV}={os.environ[IMPL_ENV]!r})"
            raise ValueError(reason + source)
        return impl
    if reason:
        if not any(t is not None and t.dtype == torch.float64 for t in (features, logits)):
            warnings.warn(f"siamese loss falls back to the reference: {reason}", stacklevel=3)
        return "reference"
    return "triton"


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def siamese_loss(
    features: Tensor | None,
    logits: Tensor,
    theta1: Tensor,
    theta2: Tensor,
    omega: float = 0.5,
    tau: float = 1.0,
    clip_mask: Tensor | None = None,
    skg: bool = True,
    detach_soft_label: bool = False,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """L_siamese (SiaSamRea eq. 8, first term): soft cross-entropy of the anchor against Q (eq. 5).

    Args:
        features: [V, N, D] clip-text features f (clip 0 is the anchor); may be None if skg=False.
        logits: [V, N, K] the clips' logits z (K answers, or M candidates for multiple choice).
            Mask an answer with a large finite negative number (``torch.finfo(dtype).min``, or
            -1e4 in fp16), not -inf: a -inf in the anchor's logits makes 0 x -inf in the soft
            cross-entropy: a NaN or infinite loss (-inf outside the anchor is fine).
        theta1, theta2: [N] parameters of W1 = softmax(theta1), W2 = softmax(theta2) (eq. 5),
            softmax taken over each video's valid clips.
        omega: weight of the propagated term in eq. 5, in [0, 1].
        tau: temperature of the affinities (eq. 1 divided by tau).
        clip_mask: [V, N] bool, True for valid clips; masked clips neither give nor receive
            knowledge and get zero gradients; the anchor is always valid.
        skg: False is the "SKR only" ablation (Â = uniform over the other valid clips).
        detach_soft_label: treat Q as a constant (no gradient to features, theta1, theta2, nor to
            the non-anchor logits).
        reduction: "none" ([V]), "mean" or "sum" over videos.
        impl: "auto" (fused Triton kernels on CUDA, the reference elsewhere; ``SIASAM_IMPL``
            overrides it), "triton" or "reference".

    N = 1, or a video whose only valid clip is the anchor: Q = P_anchor (see the module docstring).
    Returns a float32 loss (float64 for float64 inputs).
    """
    _check_inputs(features, logits, theta1, theta2, omega, tau, clip_mask, skg, reduction)
    if resolve_impl(impl, features, logits, theta1, theta2, skg) == "reference":
        return siamese_loss_reference(
            features, logits, theta1, theta2, omega, tau, clip_mask, skg, detach_soft_label,
            reduction,
        )  # fmt: skip
    from siasam_kernels import siamese as kern

    return kern.siamese_loss(
        features if skg else None, logits, theta1, theta2, clip_mask, float(omega), float(tau),
        bool(skg), bool(detach_soft_label), reduction,
    )  # fmt: skip


def siamese_soft_label(
    features: Tensor | None,
    logits: Tensor,
    theta1: Tensor,
    theta2: Tensor,
    omega: float = 0.5,
    tau: float = 1.0,
    clip_mask: Tensor | None = None,
    skg: bool = True,
    impl: str = "auto",
) -> Tensor:
    """Soft label Q [V, K] (eq. 5): a distribution over the K answers per video.

    The fused kernel computes Q without autograd, so "auto" uses it only when no gradient is
    needed (under torch.no_grad() or when no input requires grad); an explicit impl="triton" in a
    grad-recording context raises. Q is float32 (float64 for float64 inputs).
    """
    _check_inputs(features, logits, theta1, theta2, omega, tau, clip_mask, skg, "none")
    chosen = resolve_impl(impl, features, logits, theta1, theta2, skg)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (features, logits, theta1, theta2)
    )
    if chosen == "triton" and wants_grad:
        if impl == "triton":
            needing = [n for n, t in zip(("features", "logits", "theta1", "theta2"),
                                         (features, logits, theta1, theta2))
                       if t is not None and t.requires_grad]
            raise ValueError(
                "impl='triton' computes the soft label without autograd, but "
                f"{', '.join(needing)} {'requires' if len(needing) == 1 else 'require'} grad "
                "(SiameseReasoning's theta1 / theta2 are parameters): call it under "
                "torch.no_grad(), train with siamese_loss, or use impl='reference'"
            )
        chosen = "reference"
    if chosen == "reference":
        return siamese_soft_label_reference(
            features, logits, theta1, theta2, omega, tau, clip_mask, skg
        )
    from siasam_kernels import siamese as kern

    return kern.siamese_soft_label(
        features if skg else None, logits, theta1, theta2, clip_mask, float(omega), float(tau),
        bool(skg),
    )  # fmt: skip


class SiameseReasoning(nn.Module):
    """SKG + SKR + L_siamese (SiaSamRea, NeurIPS 2021, sec. 3.3, eq. 1-5 and 8), holding W1 / W2.

    theta1 / theta2 start at zero (uniform W1 / W2). ``learn_w1`` / ``learn_w2`` = False are the
    "without W1 / W2" ablations: fixed uniform weights, kept as buffers instead of parameters.
    """

    def __init__(
        self,
        num_clips: int,
        omega: float = 0.5,
        tau: float = 1.0,
        skg: bool = True,
        learn_w1: bool = True,
        learn_w2: bool = True,
        detach_soft_label: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
            raise ValueError(f"num_clips={num_clips!r}: must be an integer >= 1 (anchor included)")
        if not (isinstance(omega, (int, float)) and 0.0 <= omega <= 1.0):
            raise ValueError(f"omega={omega!r}: must be a number in [0, 1] (eq. 5)")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau={tau!r}: must be a finite number > 0")
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r}: valid values are {IMPLS}")
        self.num_clips = num_clips
        self.omega = float(omega)
        self.tau = float(tau)
        self.skg = skg
        self.detach_soft_label = detach_soft_label
        self.impl = impl
        for name, learn in (("theta1", learn_w1), ("theta2", learn_w2)):
            init = torch.zeros(num_clips)
            if learn:
                self.register_parameter(name, nn.Parameter(init))
            else:
                self.register_buffer(name, init)

    def forward(
        self, features: Tensor | None, logits: Tensor, clip_mask: Tensor | None = None,
        reduction: str = "mean", count: bool = False,
    ) -> Tensor:  # fmt: skip
        """L_siamese for features [V, N, D] and logits [V, N, K] (N = num_clips); ``count``: the
        count task's term for scalar predictions [V, N] (:meth:`count_loss`). Called as a module
        (not through ``count_loss``), ZeRO-3 gathers theta1 / theta2 first."""
        self._check_clips(logits, 2 if count else 3)
        if count:
            return self.count_loss(features, logits, clip_mask, reduction)
        return siamese_loss(
            features, logits, self.theta1, self.theta2, self.omega, self.tau, clip_mask,
            self.skg, self.detach_soft_label, reduction, self.impl,
        )  # fmt: skip

    def _check_clips(self, logits, dims: int = 3) -> None:
        """Its theta1 / theta2 hold one weight per clip: N must be num_clips (other shapes are
        left to the functions' own checks)."""
        if isinstance(logits, Tensor) and logits.dim() == dims and \
                logits.shape[1] != self.num_clips:
            raise ValueError(
                f"SiameseReasoning(num_clips={self.num_clips}) got {logits.shape[1]} clips per "
                f"video (shape {tuple(logits.shape)}, clips on dim 1): build it with num_clips="
                f"{logits.shape[1]} (sampling.num_clips in a config)")

    def soft_label(self, features, logits, clip_mask=None) -> Tensor:
        """Q [V, K] (eq. 5)."""
        self._check_clips(logits)
        return siamese_soft_label(
            features, logits, self.theta1, self.theta2, self.omega, self.tau, clip_mask,
            self.skg, self.impl,
        )  # fmt: skip

    def count_loss(self, features, predictions, clip_mask=None, reduction="mean") -> Tensor:
        """Siamese term of the count task, (y_anchor - Q)^2 (see :func:`siamese_count_loss`)."""
        self._check_clips(predictions, 2)
        return siamese_count_loss(
            features, predictions, self.theta1, self.theta2, self.omega, self.tau, clip_mask,
            self.skg, self.detach_soft_label, reduction,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"num_clips={self.num_clips}, omega={self.omega}, tau={self.tau}, skg={self.skg}, "
            f"learn_w1={isinstance(self.theta1, nn.Parameter)}, "
            f"learn_w2={isinstance(self.theta2, nn.Parameter)}, "
            f"detach_soft_label={self.detach_soft_label}, impl={self.impl!r}"
        )
