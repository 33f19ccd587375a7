"""Fused siamese loss: SKG + SKR + soft cross-entropy (SiaSamRea, NeurIPS 2021, eq. 1-5 and 8).

One program per video. The N x N knowledge (eq. 1-2) lives in registers; the logits are streamed
over K in tiles. Everything rests on one identity: with P = softmax(z) row-wise,

    Q = c^T P,   c_j = omega * sum_i W1_i Â(i, j) + (1 - omega) * W2_j              (eq. 3-5)

and, because every row of Â and both W sum to one (so does Q),

    L = -sum_k Q_k log softmax(z_0)_k = lse_0 - sum_j c_j s_j,   s_j = <P_j, z_0>      (eq. 8)

so the forward needs one online-softmax pass over z that keeps, per clip, the running max, the
sum of exponentials and the exponential-weighted sum of the anchor's logits.

Large logits: every exponent is taken of a difference of logits, z - max (then scaled to log2
units), never of z * log2(e) minus a saved logsumexp, and s_j, lse_0 and the backward's z_0k are
taken relative to the anchor's largest logit, ref (L and dz only need their differences, and the
c_j sum to one). So logits of any size (a clip filled with -1e9, or with the fp32 minimum, as a
hand-made mask might) give the probabilities and gradients the reference gives; with absolute
values the rounding of z near 1e9 (64 in fp32) broke them.

Gradients (g the upstream gradient of the video's loss, gc_j = dL/dc_j = lse_0 - s_j):

    dz_j   = g * (c_j P_j * (s_j - z_0) + [j = 0] (P_0 - Q))
    dW1_i  = omega * r_i,  r_i = sum_j Â(i, j) gc_j;   dW2_j = (1 - omega) * gc_j
    dtheta = W * (dW - <W, dW>)                                             (masked softmax)
    dA_ij  = omega * W1_i * Â(i, j) * (gc_j - r_i)  on j != i, both valid   (row softmax, eq. 2)
    M      = (dA + dA^T) / tau,   h = M f^   (f^ = f / max(|f|, eps); cos = f^ f^T is symmetric)
    df_i   = (h_i - [|f_i| > eps] <f^_i, h_i> f^_i) / max(|f_i|, eps)
             with <f^_i, h_i> = sum_j M_ij cos_ij from the N x N matrices alone

so the features need one pass in each direction, and the backward reads z once and writes dz once:
three passes over the logits per training step. Computing dz inside the forward (as Liger's
cross-entropy does) would save one, but it would round dz to fp16 before the loss scale of fp16
training multiplies it, flushing small gradients, so the scale is applied before the one rounding.

Masking: clips with clip_mask False neither give nor receive knowledge (zero W1 / W2 and zero
columns of Â, so c_j = 0) and their features / logits are never read: they may hold anything.
Clip 0, the anchor, is always treated as valid. A clip with no valid other clip (N = 1, or a video
whose only valid clip is the anchor) keeps its own prediction: Â(i, i) = 1, so such a video has
Q = P_anchor (the limit of N identical clips).

All arithmetic is fp32: fp16 / bf16 inputs are upcast as they are loaded, and the Gram matrix uses
an IEEE fp32 dot (tiny next to the logits stream, exact products, the same on V100, where there is
no bf16 anyway, and in the Triton interpreter). Nothing here needs more than sm_70.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

# Limits of the fused kernels (the reference in siasam_fast.siamese has none).
MAX_CLIPS = 16  # N is padded to one 16-row tile: the smallest tile tl.dot accepts
MAX_FEATURE_DIM = 4096
MAX_CLASSES = 65536
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-12  # floor on |f|: F.normalize's default, = siasam_fast.siamese.EPS

_EPS: tl.constexpr = tl.constexpr(EPS)
BLOCK_N: tl.constexpr = tl.constexpr(16)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _clip_validity(mask_ptr, vid, N, HAS_MASK: tl.constexpr):
    """Valid clips of one video: inside N, marked by clip_mask, and always the anchor."""
    rows = tl.arange(0, BLOCK_N)
    valid = rows < N
    if HAS_MASK:
        marked = tl.load(mask_ptr + vid * N + rows, mask=valid, other=0) != 0
        valid = valid & (marked | (rows == 0))
    return valid


@triton.jit
def _knowledge(cos, valid, inv_tau, SKG: tl.constexpr):
    """Â (eq. 1-2) from the cosine matrix, plus the pair mask j != i over valid clips."""
    rows = tl.arange(0, BLOCK_N)
    diag = rows[:, None] == rows[None, :]
    pair = valid[:, None] & valid[None, :] & (~diag)
    # A clip without any valid other clip keeps its own prediction (documented fallback).
    lone = tl.sum(pair.to(tl.int32), axis=1) == 0
    support = pair | (lone[:, None] & diag)
    if SKG:
        a = tl.where(support, cos * (inv_tau * LOG2E), float("-inf"))  # eq. 1, in log2 units
        e = tl.exp2(a - tl.max(a, axis=1)[:, None])
        a_hat = e / tl.sum(e, axis=1)[:, None]  # eq. 2: softmax over j != i
    else:
        # "SKR only" ablation: uniform average over the other valid clips.
        ones = support.to(tl.float32)
        a_hat = ones / tl.sum(ones, axis=1)[:, None]
    return a_hat, pair


@triton.jit
def _masked_softmax(theta_ptr, valid):
    """W = softmax(theta) over the valid clips (zero on the others)."""
    rows = tl.arange(0, BLOCK_N)
    t = tl.load(theta_ptr + rows, mask=valid, other=float("-inf")).to(tl.float32)
    e = tl.exp2((t - tl.max(t, axis=0)) * LOG2E)  # the anchor is valid: the max is finite
    return e / tl.sum(e, axis=0)


@triton.jit
def _soft_label_coefficients(theta1_ptr, theta2_ptr, a_hat, valid, omega):
    """c with Q = c^T P (eq. 3-5 folded into one length-N vector)."""
    w1 = _masked_softmax(theta1_ptr, valid)
    w2 = _masked_softmax(theta2_ptr, valid)
    c = omega * tl.sum(w1[:, None] * a_hat, axis=0) + (1.0 - omega) * w2
    return c, w1, w2


@triton.jit
def _logits_tile(z_rows, k0, K, valid, BLOCK_K: tl.constexpr):
    """[16, BLOCK_K] logits from column k0 (zeros past K and for invalid clips)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(z_rows + offs_k[None, :], mask=valid[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _stream_tile(z_rows, z_next, k0, K, valid, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """This loop trip's logits tile, and the tile to carry into the next trip: with PREFETCH the
    next tile's load is issued now and is in flight while this one is reduced (z_next holds it;
    before the loop, ``_first_tile``)."""
    if PREFETCH:
        return z_next, _logits_tile(z_rows, k0 + BLOCK_K, K, valid, BLOCK_K)
    else:
        z = _logits_tile(z_rows, k0, K, valid, BLOCK_K)
        return z, z_next


@triton.jit
def _first_tile(z_rows, K, valid, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """The prefetched tile before the first trip (a placeholder without PREFETCH)."""
    if PREFETCH:
        return _logits_tile(z_rows, 0, K, valid, BLOCK_K)
    else:
        return 0.0


@triton.jit
def _anchor_row(z_base, offs_k, in_k, rows, ANCHOR_2D: tl.constexpr):
    """The anchor's logits z_0 at offs_k, fp32, shaped to broadcast against a [16, BLOCK_K] tile.
    ANCHOR_2D loads it once per row (the same addresses: cache hits) in the tile's own layout,
    instead of one row whose layout is converted (through shared memory) to the tile's."""
    if ANCHOR_2D:
        ptrs = z_base + (rows * 0)[:, None] + offs_k[None, :]
        return tl.load(ptrs, mask=(rows >= 0)[:, None] & in_k[None, :], other=0.0).to(tl.float32)
    else:
        return tl.load(z_base + offs_k, mask=in_k, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _finite_or_zero(x):
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def _anchor_ref(z_base, K, BLOCK_K: tl.constexpr):
    """The anchor's largest logit (0 if it is not finite): s_j and lse_0 are kept relative to it.
    Every z_0k - ref is then <= 0, and lse_0 - s_j = sum_k P_jk (lse_0 - z_0k) a sum of terms of
    one sign: no cancellation between two large numbers (with one arbitrary logit of the anchor
    as ref, an answer masked with -1e9 there made every z_0k - ref ~1e9, fp32 step 64). The
    backward reads the same value from the saved per-clip max (m_0)."""
    mx = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        z = tl.load(z_base + offs_k, mask=offs_k < K, other=float("-inf")).to(tl.float32)
        mx = tl.maximum(mx, z)
    return _finite_or_zero(tl.max(mx, axis=0))


@triton.jit
def _online_stats(z_rows, z_base, rows, valid, K, ref, BLOCK_K: tl.constexpr,
                  PREFETCH: tl.constexpr, ANCHOR_2D: tl.constexpr):  # fmt: skip
    """Per clip, over all K: the max m of z, den = sum_k e^(z - m) and
    num = sum_k e^(z - m) (z_0k - ref), with one running value per clip (three row reductions per
    tile)."""
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max
    den = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_k exp(z - m)
    num = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_k exp(z - m) * (z_0k - ref)
    z_next = _first_tile(z_rows, K, valid, BLOCK_K, PREFETCH)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        # Invalid clips read as zeros (finite stats, never used): their memory is never touched.
        z, z_next = _stream_tile(z_rows, z_next, k0, K, valid, BLOCK_K, PREFETCH)
        zf = tl.where(in_k[None, :], z.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m, tl.max(zf, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a clip with only -inf so far
        rescale = tl.exp2((m - m_ref) * LOG2E)
        p = tl.exp2((zf - m_ref[:, None]) * LOG2E)
        den = den * rescale + tl.sum(p, axis=1)
        z0 = _anchor_row(z_base, offs_k, in_k, rows, ANCHOR_2D) - ref
        num = num * rescale + tl.sum(p * z0, axis=1)
        m = m_new
    return m, den, num


@triton.jit
def _online_stats_2d(z_rows, z_base, rows, valid, K, ref, BLOCK_K: tl.constexpr,
                     PREFETCH: tl.constexpr, ANCHOR_2D: tl.constexpr):  # fmt: skip
    """The same three statistics as ``_online_stats``, kept per (clip, column slot) while the
    tiles stream by and reduced over the columns once at the end: no reduction (shuffles,
    barriers) inside the loop. Each update needs a single exp2: of the old and the new maximum,
    one is the element itself, so one of the two rescale factors is exactly 1."""
    m = tl.full((BLOCK_N, BLOCK_K), float("-inf"), dtype=tl.float32)
    den = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    num = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    z_next = _first_tile(z_rows, K, valid, BLOCK_K, PREFETCH)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        z, z_next = _stream_tile(z_rows, z_next, k0, K, valid, BLOCK_K, PREFETCH)
        z0 = _anchor_row(z_base, offs_k, in_k, rows, ANCHOR_2D) - ref
        zf = z.to(tl.float32)
        d = (zf - m) * LOG2E  # +inf on a slot's first element
        grow = d > 0.0
        e = tl.exp2(-tl.abs(d))  # e^(old max - new max) if grow, else e^(z - max)
        # -inf on both sides (a -inf logit in an empty slot) adds nothing; a NaN logit stays NaN
        e = tl.where((d == d) | (zf != zf), e, 0.0)
        den_new = tl.where(grow, den * e + 1.0, den + e)
        num_new = tl.where(grow, num * e + z0, num + e * z0)
        keep = in_k[None, :]  # columns past K leave their slot as it was
        den = tl.where(keep, den_new, den)
        num = tl.where(keep, num_new, num)
        m = tl.where(keep & grow, zf, m)
    m_row = tl.max(m, axis=1)
    w = tl.exp2((m - m_row[:, None]) * LOG2E)  # 0 for slots that never saw a column
    # A slot far below the row's max (w = 0) adds nothing, even if its own num overflowed
    # (columns at the fp32 minimum against anchor logits at it too): 0 * inf would be NaN.
    return m_row, tl.sum(den * w, axis=1), tl.sum(tl.where(w > 0.0, num * w, 0.0), axis=1)


@triton.jit
def _probabilities(z, m, l2):
    """softmax(z) of a [16, BLOCK_K] tile from its rows' max and log2 sum of exponentials."""
    return tl.exp2((z.to(tl.float32) - m[:, None]) * LOG2E - l2[:, None])


@triton.jit
def _siamese_fwd_kernel(
    f_ptr,  # [V, N, D] features
    z_ptr,  # [V, N, K] logits
    theta1_ptr,  # [N]
    theta2_ptr,  # [N]
    mask_ptr,  # [V, N] uint8 (unused without HAS_MASK)
    loss_ptr,  # [V] fp32, already multiplied by `scale`
    q_ptr,  # [V, K] fp32 soft labels (WRITE_Q only)
    cos_ptr,  # [V, 16, 16] fp32 cosine matrix, saved for backward (SKG only)
    norm_ptr,  # [V, 16] fp32 max(|f_i|, eps) (SKG only)
    m_ptr,  # [V, 16] fp32 max of every clip's logits
    l2_ptr,  # [V, 16] fp32 log2 sum_k e^(z - max): P = 2^((z - max) log2(e) - l2)
    s_ptr,  # [V, 16] fp32 s_j - ref = <P_j, z_0 - ref>, ref the anchor's largest logit
    N,
    D,
    K,
    omega,
    inv_tau,
    scale,
    HAS_MASK: tl.constexpr,
    SKG: tl.constexpr,
    WRITE_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    ANCHOR_2D: tl.constexpr = False,
    ACC_2D: tl.constexpr = False,
):
    vid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    diag = rows[:, None] == rows[None, :]
    valid = _clip_validity(mask_ptr, vid, N, HAS_MASK)
    stat_offs = vid * BLOCK_N + rows

    # ---- SKG: Gram matrix over D tiles, then cosine similarities (eq. 1) ----
    if SKG:
        f_rows = f_ptr + vid * N * D + rows[:, None] * D
        gram = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            f = tl.load(
                f_rows + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0
            ).to(tl.float32)
            gram += tl.dot(f, tl.trans(f), input_precision="ieee")
        norm = tl.maximum(tl.sqrt(tl.sum(tl.where(diag, gram, 0.0), axis=1)), _EPS)
        cos = gram / (norm[:, None] * norm[None, :])  # eq. 1: sigma(f_i)^T sigma(f_j)
        tl.store(norm_ptr + stat_offs, norm)
        tl.store(cos_ptr + vid * BLOCK_N * BLOCK_N + rows[:, None] * BLOCK_N + rows[None, :], cos)
    else:
        cos = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    a_hat, pair = _knowledge(cos, valid, inv_tau, SKG)
    c, w1, w2 = _soft_label_coefficients(theta1_ptr, theta2_ptr, a_hat, valid, omega)

    # ---- one pass over the logits: online softmax stats of every clip + s_j ----
    z_base = z_ptr + vid * N * K
    z_rows = z_base + rows[:, None] * K
    ref = _anchor_ref(z_base, K, BLOCK_K)
    if ACC_2D:
        m, den, num = _online_stats_2d(z_rows, z_base, rows, valid, K, ref, BLOCK_K, PREFETCH,
                                       ANCHOR_2D)
    else:
        m, den, num = _online_stats(z_rows, z_base, rows, valid, K, ref, BLOCK_K, PREFETCH,
                                    ANCHOR_2D)
    l2 = tl.log2(den)
    s = num / den  # s_j - ref
    lse0 = tl.sum(tl.where(rows == 0, (m - ref) + l2 * LN2, 0.0), axis=0)  # lse_0 - ref
    # Invalid clips (c_j = 0) read zeros: their uniform P can overflow s_j against huge anchor
    # logits, and 0 * inf would be NaN
    s = tl.where(valid, s, 0.0)
    tl.store(m_ptr + stat_offs, m)
    tl.store(l2_ptr + stat_offs, l2)
    tl.store(s_ptr + stat_offs, s)

    # eq. 8 (first term) through Q = c^T P: sum_j c_j (lse_0 - s_j), each a difference first
    loss = tl.sum(c * (lse0 - s), axis=0)
    tl.store(loss_ptr + vid, loss * scale)

    if WRITE_Q:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < K
            z = _logits_tile(z_rows, k0, K, valid, BLOCK_K)
            p = _probabilities(z, m, l2)
            q = tl.sum(c[:, None] * p, axis=0)  # eq. 5
            tl.store(q_ptr + vid * K + offs_k, q, mask=in_k)


@triton.jit
def _siamese_bwd_kernel(
    f_ptr,
    z_ptr,
    theta1_ptr,
    theta2_ptr,
    mask_ptr,
    cos_ptr,
    norm_ptr,
    m_ptr,
    l2_ptr,
    s_ptr,
    grad_ptr,  # upstream gradient: one value (stride 0) or one per video
    grad_stride,
    dz_ptr,  # [V, N, K], the logits' dtype
    df_ptr,  # [V, N, D], the features' dtype
    dtheta_ptr,  # [V, 2, 16] fp32 per-video partial gradients of theta1 / theta2
    N,
    D,
    K,
    omega,
    inv_tau,
    scale,
    HAS_MASK: tl.constexpr,
    SKG: tl.constexpr,
    DETACH: tl.constexpr,
    NEED_DZ: tl.constexpr,
    NEED_DF: tl.constexpr,
    NEED_DTHETA: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    ANCHOR_2D: tl.constexpr = False,
):
    vid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    valid = _clip_validity(mask_ptr, vid, N, HAS_MASK)
    is_anchor = rows == 0
    stat_offs = vid * BLOCK_N + rows

    # Recompute the small N x N math from the saved cosine matrix (cheaper than storing it all).
    if SKG:
        cos = tl.load(cos_ptr + vid * BLOCK_N * BLOCK_N + rows[:, None] * BLOCK_N + rows[None, :])
    else:
        cos = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    a_hat, pair = _knowledge(cos, valid, inv_tau, SKG)
    c, w1, w2 = _soft_label_coefficients(theta1_ptr, theta2_ptr, a_hat, valid, omega)
    m = tl.load(m_ptr + stat_offs)
    l2 = tl.load(l2_ptr + stat_offs)
    s = tl.load(s_ptr + stat_offs)  # s_j - ref
    g = tl.load(grad_ptr + vid * grad_stride).to(tl.float32) * scale
    z_base = z_ptr + vid * N * K

    if not DETACH:
        ref = _finite_or_zero(tl.sum(tl.where(is_anchor, m, 0.0), axis=0))  # the forward's ref
        lse0 = tl.sum(tl.where(is_anchor, (m - ref) + l2 * LN2, 0.0), axis=0)  # lse_0 - ref
        gc = (lse0 - s) * g  # dL/dc_j = lse_0 - s_j = -<P_j, log softmax(z_0)>
        r = tl.sum(a_hat * gc[None, :], axis=1)  # r_i = sum_j Â(i, j) gc_j
        if NEED_DTHETA:
            dw1 = omega * r
            dw2 = (1.0 - omega) * gc
            dth1 = w1 * (dw1 - tl.sum(w1 * dw1, axis=0))
            dth2 = w2 * (dw2 - tl.sum(w2 * dw2, axis=0))
            tl.store(dtheta_ptr + vid * 2 * BLOCK_N + rows, dth1)
            tl.store(dtheta_ptr + vid * 2 * BLOCK_N + BLOCK_N + rows, dth2)
        if SKG and NEED_DF:
            # Through the row softmax of eq. 2 (lone clips' fixed Â(i, i) = 1 has no gradient).
            da = tl.where(pair, omega * w1[:, None] * a_hat * (gc[None, :] - r[:, None]), 0.0)
            mm = (da + tl.trans(da)) * inv_tau  # cos is symmetric: both (i, j) and (j, i)
            proj = tl.sum(mm * cos, axis=1)  # <f^_i, h_i>
            norm = tl.load(norm_ptr + stat_offs)
            proj = tl.where(norm > _EPS, proj, 0.0)  # below eps, f^ = f / eps is linear in f
            f_rows = f_ptr + vid * N * D + rows[:, None] * D
            df_rows = df_ptr + vid * N * D + rows[:, None] * D
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                in_d = offs_d[None, :] < D
                f = tl.load(f_rows + offs_d[None, :], mask=valid[:, None] & in_d, other=0.0)
                f_hat = f.to(tl.float32) / norm[:, None]
                h = tl.dot(mm, f_hat, input_precision="ieee")
                df = (h - proj[:, None] * f_hat) / norm[:, None]
                tl.store(
                    df_rows + offs_d[None, :],
                    df.to(df_ptr.dtype.element_ty),
                    mask=(rows[:, None] < N) & in_d,
                )

    if NEED_DZ:
        # One pass: read z, write dz. Invalid clips have c_j = 0 and get zeros.
        z_rows = z_base + rows[:, None] * K
        dz_rows = dz_ptr + vid * N * K + rows[:, None] * K
        z_next = _first_tile(z_rows, K, valid, BLOCK_K, PREFETCH)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < K
            z, z_next = _stream_tile(z_rows, z_next, k0, K, valid, BLOCK_K, PREFETCH)
            p = _probabilities(z, m, l2)
            q = tl.sum(c[:, None] * p, axis=0)  # eq. 5
            dz = tl.where(is_anchor[:, None], p - q[None, :], 0.0)  # through log softmax(z_0)
            if not DETACH:
                z0 = _anchor_row(z_base, offs_k, in_k, rows, ANCHOR_2D) - ref  # loaded once
                dz += c[:, None] * p * (s[:, None] - z0)  # through Q (eq. 3-5), s_j - z_0k
            tl.store(
                dz_rows + offs_k[None, :],
                (dz * g).to(dz_ptr.dtype.element_ty),
                mask=(rows[:, None] < N) & in_k[None, :],
            )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30  # the interpreter: wide tiles, i.e. fewer (slow) loop trips
    return torch.cuda.get_device_properties(device).multi_processor_count


CONFIG_ENV = "SIASAM_KERNEL_CONFIG"
TUNED_ENV = "SIASAM_KERNEL_TUNED"
TUNED_FILE = Path(__file__).with_name("tuned.json")
# key: (low, high, power of 2 only). Each may carry a "fwd_" / "bwd_" prefix: one kernel only.
_SETTINGS = {
    "block_d": (16, 4096, True),
    "block_k": (16, 65536, True),
    "num_warps": (1, 32, True),
    "num_stages": (1, 8, False),
    "prefetch": (0, 1, False),
    "anchor_2d": (0, 1, False),
    "acc_2d": (0, 1, False),
}
_FWD_ONLY = ("acc_2d",)
_CONFIG_KEYS = tuple(_SETTINGS) + tuple(
    f"{kind}_{key}" for kind in ("fwd", "bwd") for key in _SETTINGS
    if not (kind == "bwd" and key in _FWD_ONLY)
)  # fmt: skip


def config_override(value: str | None) -> dict:
    """Parse ``SIASAM_KERNEL_CONFIG`` ("block_k=256,num_warps=8,num_stages=2"): settings that
    replace the heuristic's (and a tuned table's), for tuning on a GPU
    (``benchmarks/bench_kernels.py --sweep-configs``). Keys: block_d, block_k, num_warps,
    num_stages and the 0 / 1 switches prefetch (load the next logits tile while reducing this
    one), anchor_2d (see ``_anchor_row``) and acc_2d (forward only: ``_online_stats_2d``); a
    "fwd_" or "bwd_" prefix applies a key to one kernel only ("fwd_block_k=128")."""
    out: dict = {}
    for item in (value or "").replace(";", ",").split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in _CONFIG_KEYS:
            raise ValueError(f"{CONFIG_ENV}: {item.strip()!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(_CONFIG_KEYS)}")  # fmt: skip
        try:
            val = int(raw)
        except ValueError:
            raise ValueError(f"{CONFIG_ENV}: {key}={raw.strip()!r} is not an integer") from None
        lo, hi, power = _SETTINGS[key.removeprefix("fwd_").removeprefix("bwd_")]
        if not lo <= val <= hi or (power and val & (val - 1)):
            kind = "a power of 2 " if power else ""
            raise ValueError(f"{CONFIG_ENV}: {key}={val}: must be {kind}in [{lo}, {hi}]")
        out[key] = val
    return out


@functools.cache
def _tuned_table(path: str) -> dict:
    """A JSON file of launch settings measured on named GPUs (written by
    ``bench_kernels.py --sweep-configs``): {device name: {"2" | "4" (bytes per logit):
    {"fwd": {...}, "bwd": {...}}}}. The shipped file, if missing, is an empty table; a file named
    by the environment variable must exist; either must hold that mapping."""
    import json

    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        if os.environ.get(TUNED_ENV):
            raise ValueError(f"{TUNED_ENV}={path}: no such file (unset it to use the shipped "
                             "table)") from None
        return {}
    except (OSError, ValueError) as err:
        raise ValueError(f"{TUNED_ENV} / {path}: not a readable JSON table of launch settings "
                         f"({err})") from None  # fmt: skip
    if not isinstance(table, dict) or not all(  # "_..." keys are notes
            k.startswith("_") or (isinstance(v, dict) and all(isinstance(x, dict)
                                                               for x in v.values()))
            for k, v in table.items()):
        raise ValueError(f"{TUNED_ENV} / {path}: expected {{GPU name: {{'2' | '4': {{'fwd': "
                         "{...}, 'bwd': {...}}}}}}, as bench_kernels.py --sweep-configs writes")
    return table


def _tuned_settings(V: int, K: int, element_size: int, device: torch.device, kind: str) -> dict:
    """Settings measured on this GPU model, for the regime they were measured in: more videos
    than SMs (one wave of programs or more) and K a multiple of 16 (vectorised loads)."""
    if device.type != "cuda" or V <= _sm_count(device) or K % 16:
        return {}
    path = os.environ.get(TUNED_ENV) or str(TUNED_FILE)
    return _tuned_entry(path, torch.cuda.get_device_name(device), element_size, kind)


@functools.cache
def _tuned_entry(path: str, device_name: str, element_size: int, kind: str) -> dict:
    settings = _tuned_table(path).get(device_name, {}).get(str(element_size), {}).get(kind, {})
    try:
        return config_override(",".join(f"{k}={v}" for k, v in settings.items()))
    except ValueError as err:
        raise ValueError(f"{path}: tuned launch settings ({kind}, {element_size}-byte logits) of "
                         f"{device_name}: {err}") from None  # fmt: skip


def _launch_settings(V: int, D: int, K: int, device: torch.device, kind: str = "fwd",
                     element_size: int = 2) -> dict:  # fmt: skip
    """Keyword arguments of one kernel's launch (kind "fwd" or "bwd"): the heuristic's, then a
    tuned table's for this GPU, then any ``SIASAM_KERNEL_CONFIG``."""
    block_d, block_k, num_warps = _launch_config(V, D, K, _sm_count(device))
    chosen = dict(block_d=block_d, block_k=block_k, num_warps=num_warps)
    chosen.update(_tuned_settings(V, K, element_size, device, kind))  # (a cached dict: not mutated)
    override = config_override(os.environ.get(CONFIG_ENV))
    chosen.update({k: v for k, v in override.items() if not k.startswith(("fwd_", "bwd_"))})
    chosen.update({k[4:]: v for k, v in override.items() if k.startswith(kind + "_")})
    settings = {}
    for key, val in chosen.items():
        if kind == "bwd" and key in _FWD_ONLY:
            continue
        if key in ("block_d", "block_k"):
            val = min(val, max(triton.next_power_of_2(D if key == "block_d" else K), 16))
        settings[key if key.startswith("num_") else key.upper()] = (
            bool(val) if _SETTINGS[key][:2] == (0, 1) else val
        )
    return settings


def _launch_config(V: int, D: int, K: int, sm_count: int) -> tuple[int, int, int]:
    """BLOCK_D, BLOCK_K and num_warps: the built-in heuristic, for GPUs without an entry in
    tuned.json and for the shapes outside a tuned entry's regime (the H100's entry, measured by
    ``bench_kernels.py --sweep-configs``, is 2.6x faster at V=4096, D=768, K=4096 in fp16: four
    warps, 16 x 64 forward tiles with acc_2d, 16 x 1024 backward tiles; see the README).

    The logits dominate the traffic. With K % 16 == 0 Triton vectorises the loads (16 B per thread)
    and a 16 x 256 tile over 8 warps puts two clips on each warp, so the per-row reductions stay
    inside a warp; ptxas reports 58 (forward) / 80 (backward) registers at sm_90 and no spills,
    i.e. 3-4 programs per SM. Other K load element by element; a 16 x 128 tile keeps those at about
    100 registers. With fewer videos than SMs every program has an SM to itself: wide tiles then
    cut the number of (latency-bound) loop trips. The feature tiles only feed a 16 x 16 product.
    """
    few_videos = V <= sm_count
    block_d = min(max(triton.next_power_of_2(D), 16), 128 if few_videos else 64)
    if few_videos:
        block_k = 512
    else:
        block_k = 256 if K % 16 == 0 else 128
    block_k = min(max(triton.next_power_of_2(K), 16), block_k)
    num_warps = 8 if block_k >= 128 else 4
    return block_d, block_k, num_warps


def _launch(kernel, device: torch.device, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on ``device``: Triton launches on the current CUDA device
    and its current stream, not on the arguments' device, so tensors on cuda:1 while cuda:0 is
    current would be read by a kernel on GPU 0 (an illegal address, or unordered with GPU 1's
    stream). PyTorch's own ops switch devices themselves; a Triton launch must be told."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return kernel[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)


def siamese_forward(features, logits, theta1, theta2, clip_mask, omega, tau, skg, scale, write_q):
    """Launch the forward kernel. Inputs are validated by the caller (siasam_fast.siamese).

    Returns (per-video loss * scale [V] fp32, Q [V, K] fp32 or None, saved stats for backward).
    """
    V, N, K = logits.shape
    D = features.shape[-1] if skg else 1
    dev = logits.device
    features = features.contiguous() if skg else logits  # a placeholder pointer without SKG
    logits = logits.contiguous()
    theta1, theta2 = theta1.contiguous(), theta2.contiguous()
    mask = clip_mask.contiguous().view(torch.uint8) if clip_mask is not None else logits
    launch = _launch_settings(V, D, K, dev, "fwd", logits.element_size())

    f32 = dict(dtype=torch.float32, device=dev)
    loss = torch.empty(V, **f32)
    m = torch.empty(V, 16, **f32)
    l2 = torch.empty(V, 16, **f32)
    s = torch.empty(V, 16, **f32)
    cos = torch.empty(V, 16, 16, **f32) if skg else m
    norm = torch.empty(V, 16, **f32) if skg else m
    q = torch.empty(V, K, **f32) if write_q else loss
    _launch(
        _siamese_fwd_kernel, dev, (V,),
        features, logits, theta1, theta2, mask, loss, q, cos, norm, m, l2, s,
        N, D, K, float(omega), 1.0 / float(tau), float(scale),
        HAS_MASK=clip_mask is not None, SKG=skg, WRITE_Q=write_q, **launch,
    )  # fmt: skip
    return loss, (q if write_q else None), (cos, norm, m, l2, s)


def siamese_backward(
    grad, features, logits, theta1, theta2, clip_mask, saved, omega, tau, skg, detach, scale,
    need_dz, need_df, need_dtheta,
):  # fmt: skip
    """Launch the backward kernel; returns (d features, d logits, d theta1, d theta2), None where
    a gradient is not needed (or is zero by construction: features without SKG, detach)."""
    cos, norm, m, l2, s = saved
    V, N, K = logits.shape
    D = features.shape[-1] if skg else 1
    need_df = need_df and skg and not detach
    need_dtheta = need_dtheta and not detach
    if not (need_dz or need_df or need_dtheta):
        return None, None, None, None
    features = features.contiguous() if skg else logits
    logits = logits.contiguous()
    theta1, theta2 = theta1.contiguous(), theta2.contiguous()
    mask = clip_mask.contiguous().view(torch.uint8) if clip_mask is not None else logits
    grad = grad.contiguous()
    grad_stride = 1 if grad.numel() == V and grad.dim() == 1 else 0
    launch = _launch_settings(V, D, K, logits.device, "bwd", logits.element_size())

    dz = torch.empty_like(logits) if need_dz else logits
    df = torch.empty_like(features) if need_df else logits
    dtheta = torch.empty(V, 2, 16, dtype=torch.float32, device=logits.device) if need_dtheta else s
    _launch(
        _siamese_bwd_kernel, logits.device, (V,),
        features, logits, theta1, theta2, mask, cos, norm, m, l2, s, grad, grad_stride,
        dz, df, dtheta,
        N, D, K, float(omega), 1.0 / float(tau), float(scale),
        HAS_MASK=clip_mask is not None, SKG=skg, DETACH=detach,
        NEED_DZ=need_dz, NEED_DF=need_df, NEED_DTHETA=need_dtheta, **launch,
    )  # fmt: skip
    dth1 = dth2 = None
    if need_dtheta:
        dth = dtheta.sum(0)[:, :N]  # a deterministic reduction over videos
        dth1, dth2 = dth[0].to(theta1.dtype), dth[1].to(theta2.dtype)
    return (df if need_df else None), (dz if need_dz else None), dth1, dth2


class SiameseLossFunction(torch.autograd.Function):
    """Fused siamese loss; inputs validated by siasam_fast.siamese.siamese_loss."""

    @staticmethod
    def forward(
        ctx, features, logits, theta1, theta2, clip_mask, omega, tau, skg, detach, reduction
    ):
        V = logits.shape[0]
        scale = 1.0 / V if reduction == "mean" else 1.0
        # Made contiguous once here, so that backward does not copy them again.
        features = features.contiguous() if skg else None
        logits, theta1, theta2 = logits.contiguous(), theta1.contiguous(), theta2.contiguous()
        loss, _, saved = siamese_forward(
            features, logits, theta1, theta2, clip_mask, omega, tau, skg, scale, write_q=False
        )
        ctx.save_for_backward(features, logits, theta1, theta2, clip_mask, *saved)
        ctx.config = (omega, tau, skg, detach, scale)
        return loss if reduction == "none" else loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the kernel's gradients have no graph
            raise RuntimeError("the fused siamese loss (impl='triton') has no second derivative "
                               "(backward with create_graph=True, or autograd.grad of its "
                               "gradients): use impl='reference' for higher-order gradients")
        features, logits, theta1, theta2, clip_mask, *saved = ctx.saved_tensors
        omega, tau, skg, detach, scale = ctx.config
        need = ctx.needs_input_grad
        df, dz, dth1, dth2 = siamese_backward(
            grad_output, features, logits, theta1, theta2, clip_mask, saved,
            omega, tau, skg, detach, scale,
            need_dz=need[1], need_df=need[0], need_dtheta=need[2] or need[3],
        )  # fmt: skip
        return (
            df if need[0] else None,
            dz,
            dth1 if need[2] else None,
            dth2 if need[3] else None,
            None, None, None, None, None, None,
        )  # fmt: skip


def siamese_loss(features, logits, theta1, theta2, clip_mask, omega, tau, skg, detach, reduction):
    """Fused loss with autograd (features may be None without SKG)."""
    return SiameseLossFunction.apply(
        features, logits, theta1, theta2, clip_mask, omega, tau, skg, detach, reduction
    )


def siamese_soft_label(features, logits, theta1, theta2, clip_mask, omega, tau, skg):
    """Q [V, K] fp32 (eq. 5), no autograd."""
    with torch.no_grad():
        _, q, _ = siamese_forward(
            features, logits, theta1, theta2, clip_mask, omega, tau, skg, 1.0, write_q=True
        )
    return q
