"""The plain PyTorch siamese loss (SiaSamRea eq. 1-5, 8): equations, gradients, ablations, errors.

The batched reference is checked against a loop-per-video transcription of the paper's equations,
its gradients by gradcheck in float64, and the closed-form gradients the fused kernels implement
(kernels/siamese.py docstring) against its autograd.
"""

import math

import pytest
import torch

from siasam_fast import siamese as S
from siasam_fast.siamese import (
    SiameseReasoning,
    siamese_count_loss,
    siamese_knowledge,
    siamese_loss,
    siamese_loss_reference,
    siamese_soft_label,
)

F64 = torch.float64


def make_inputs(V=3, N=5, D=7, K=6, mask=True, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(V, N, D, generator=g, dtype=F64).to(dtype)
    z = (2 * torch.randn(V, N, K, generator=g, dtype=F64)).to(dtype)
    t1 = torch.randn(N, generator=g, dtype=F64).to(dtype)
    t2 = torch.randn(N, generator=g, dtype=F64).to(dtype)
    m = (torch.rand(V, N, generator=g) > 0.35) if mask else None
    if m is not None and V > 1:
        m[1, 1:] = False  # one anchor-only video
    return f, z, t1, t2, m


def naive_loss(f, z, t1, t2, omega=0.5, tau=1.0, mask=None, skg=True):
    """Loops over videos and clips, written from the paper's equations; float64; no autograd use."""
    V, N, _ = z.shape
    out = []
    for v in range(V):
        valid = [i for i in range(N) if i == 0 or mask is None or bool(mask[v, i])]
        p = {i: torch.softmax(z[v, i].double(), -1) for i in valid}
        w1 = torch.softmax(t1.double()[valid], -1)
        w2 = torch.softmax(t2.double()[valid], -1)
        q = torch.zeros_like(p[0])
        for a, i in enumerate(valid):
            others = [j for j in valid if j != i]
            if not others:  # documented fallback: R_i = P_i
                r = p[i]
            elif skg:
                fi = f[v, i].double() / f[v, i].double().norm().clamp_min(S.EPS)
                scores = []
                for j in others:
                    fj = f[v, j].double() / f[v, j].double().norm().clamp_min(S.EPS)
                    scores.append(float(fi @ fj) / tau)  # eq. 1
                top = max(scores)
                e = [math.exp(s - top) for s in scores]
                r = sum(e[b] / sum(e) * p[j] for b, j in enumerate(others))  # eq. 2-3
            else:
                r = sum(p[j] for j in others) / len(others)
            q = q + omega * w1[a] * r + (1 - omega) * w2[a] * p[i]  # eq. 5
        out.append(-(q * torch.log_softmax(z[v, 0].double(), -1)).sum())  # eq. 8
    return torch.stack(out)


# ---------------------------------------------------------------------------------- equations


@pytest.mark.parametrize("skg", [True, False])
@pytest.mark.parametrize("mask", [False, True])
def test_reference_matches_the_equations(skg, mask):
    f, z, t1, t2, m = make_inputs(V=4, N=5, mask=mask, seed=1)
    got = siamese_loss_reference(f, z, t1, t2, 0.3, 0.7, m, skg, reduction="none")
    want = naive_loss(f, z, t1, t2, 0.3, 0.7, m, skg)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_knowledge_is_row_stochastic_with_zero_diagonal_and_masked_clips():
    f, _, _, _, m = make_inputs(V=4, N=6, seed=2)
    a = siamese_knowledge(f, m, tau=0.5)
    valid = m | (torch.arange(6) == 0)
    torch.testing.assert_close(a.sum(-1), valid.to(F64))
    for v in range(4):
        nv = int(valid[v].sum())
        for i in range(6):
            if not valid[v, i]:
                assert a[v, :, i].abs().max() == 0  # no knowledge flows from a masked clip
                assert a[v, i].abs().max() == 0  # and none flows to it
            if nv > 1 and valid[v, i]:
                assert a[v, i, i] == 0  # eq. 2: no self-loop
    assert a[1, 0, 0] == 1  # anchor-only video: identity row


def test_soft_label_is_a_distribution_and_folds_into_c():
    """Q = c^T P and L = lse_0 - sum_j c_j <P_j, z_0>: the identity the kernels rely on."""
    f, z, t1, t2, m = make_inputs(V=3, N=5, K=9, seed=3)
    q = siamese_soft_label(f, z, t1, t2, 0.5, 1.0, m)
    torch.testing.assert_close(q.sum(-1), torch.ones(3, dtype=F64))
    assert q.min() >= 0
    valid = m | (torch.arange(5) == 0)
    a = siamese_knowledge(f, m)
    w1 = torch.softmax(t1.masked_fill(~valid, -math.inf), -1)
    w2 = torch.softmax(t2.masked_fill(~valid, -math.inf), -1)
    c = 0.5 * (w1[:, :, None] * a).sum(1) + 0.5 * w2
    p = torch.softmax(torch.where(valid[..., None], z, 0.0), -1)
    torch.testing.assert_close(q, (c[:, :, None] * p).sum(1))
    s = (p * z[:, :1]).sum(-1)
    loss = torch.logsumexp(z[:, 0], -1) - (c * s).sum(-1)
    torch.testing.assert_close(siamese_loss_reference(f, z, t1, t2, clip_mask=m, reduction="none"),
                               loss)  # fmt: skip


def test_reductions():
    f, z, t1, t2, m = make_inputs(seed=4)
    per_video = siamese_loss_reference(f, z, t1, t2, clip_mask=m, reduction="none")
    assert per_video.shape == (3,)
    torch.testing.assert_close(siamese_loss_reference(f, z, t1, t2, clip_mask=m), per_video.mean())
    torch.testing.assert_close(
        siamese_loss_reference(f, z, t1, t2, clip_mask=m, reduction="sum"), per_video.sum()
    )


def test_half_inputs_compute_in_float32():
    f, z, t1, t2, m = make_inputs(dtype=torch.float16)
    loss = siamese_loss(f, z, t1, t2, clip_mask=m, impl="reference")
    assert loss.dtype == torch.float32
    want = naive_loss(f.double(), z.double(), t1.double(), t2.double(), mask=m).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "skg, detach, reduction, mask",
    [(True, False, "mean", True), (False, False, "sum", True), (True, False, "none", False)],
)  # fmt: skip
def test_gradcheck(skg, detach, reduction, mask):
    f, z, t1, t2, m = make_inputs(V=3, N=4, D=5, K=6, mask=mask, seed=5)
    ins = [x.clone().requires_grad_() for x in (f, z, t1, t2)]

    def fn(f, z, t1, t2):
        return siamese_loss_reference(f, z, t1, t2, 0.4, 0.8, m, skg, detach, reduction)

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7)


def closed_form_grads(f, z, t1, t2, omega, tau, mask, g):
    """The gradients kernels/siamese.py computes, written in torch (per-video upstream grads g)."""
    V, N, _ = z.shape
    valid = (mask if mask is not None else torch.ones(V, N, dtype=torch.bool)) | (
        torch.arange(N) == 0
    )
    eye = torch.eye(N, dtype=torch.bool)
    pair = valid[:, :, None] & valid[:, None, :] & ~eye
    a = siamese_knowledge(f, mask, tau)
    w1 = torch.softmax(t1.masked_fill(~valid, -math.inf), -1)
    w2 = torch.softmax(t2.masked_fill(~valid, -math.inf), -1)
    c = omega * (w1[:, :, None] * a).sum(1) + (1 - omega) * w2
    zz = torch.where(valid[..., None], z, 0.0)
    p = torch.softmax(zz, -1)
    lse = torch.logsumexp(zz, -1)
    s = (p * zz[:, :1]).sum(-1)
    q = (c[:, :, None] * p).sum(1)
    g = g[:, None]
    dz = c[:, :, None] * p * (s[:, :, None] - zz[:, :1])
    dz[:, 0] += p[:, 0] - q
    dz = dz * g[..., None]
    gc = (lse[:, :1] - s) * g
    r = (a * gc[:, None, :]).sum(-1)
    dth1 = w1 * (omega * r - (w1 * omega * r).sum(-1, keepdim=True))
    dth2 = w2 * ((1 - omega) * gc - (w2 * (1 - omega) * gc).sum(-1, keepdim=True))
    da = torch.where(pair, omega * w1[:, :, None] * a * (gc[:, None, :] - r[:, :, None]), 0.0)
    mm = (da + da.transpose(1, 2)) / tau
    fv = torch.where(valid[..., None], f, 0.0)
    norm = fv.norm(dim=-1).clamp_min(S.EPS)
    f_hat = fv / norm[..., None]
    cos = f_hat @ f_hat.transpose(1, 2)
    h = mm @ f_hat
    proj = (mm * cos).sum(-1)
    df = (h - proj[..., None] * f_hat) / norm[..., None]
    return df, dz, dth1.sum(0), dth2.sum(0)


def test_closed_form_gradients_match_autograd():
    f, z, t1, t2, m = make_inputs(V=4, N=6, D=5, K=7, seed=6)
    f[2, 3] = 0.0  # a zero feature vector (the eps branch of the normalisation)
    ins = [x.clone().requires_grad_() for x in (f, z, t1, t2)]
    loss = siamese_loss_reference(*ins, 0.3, 0.6, m, reduction="none")
    g = torch.rand(4, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.5
    loss.backward(g)
    for name, want, got in zip(
        ("features", "logits", "theta1", "theta2"),
        [x.grad for x in ins],
        closed_form_grads(f, z, t1, t2, 0.3, 0.6, m, g),
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------- edge cases


def test_single_clip_and_anchor_only_videos_use_the_anchor_prediction():
    """N = 1, or only the anchor valid: Q = P_anchor, loss = entropy of P_anchor."""
    f, z, t1, t2, _ = make_inputs(V=2, N=1, seed=7)
    q = siamese_soft_label(f, z, t1, t2)
    torch.testing.assert_close(q, torch.softmax(z[:, 0], -1))
    loss = siamese_loss(f, z, t1, t2, reduction="none")
    log_p = torch.log_softmax(z[:, 0], -1)
    torch.testing.assert_close(loss, -(log_p.exp() * log_p).sum(-1))

    f, z, t1, t2, _ = make_inputs(V=2, N=4, seed=8)
    anchor_only = torch.zeros(2, 4, dtype=torch.bool)
    torch.testing.assert_close(
        siamese_soft_label(f, z, t1, t2, clip_mask=anchor_only), torch.softmax(z[:, 0], -1)
    )
    # Detached, such a video gives no gradient at all (dL/dz_0 = P_0 - Q = 0).
    zz = z.clone().requires_grad_()
    siamese_loss(f, zz, t1, t2, clip_mask=anchor_only, detach_soft_label=True).backward()
    assert zz.grad.abs().max() < 1e-15


def test_masked_clips_are_ignored_even_if_nan():
    f, z, t1, t2, m = make_inputs(V=3, N=5, seed=9)
    f2, z2 = f.clone(), z.clone()
    valid = m | (torch.arange(5) == 0)
    f2[~valid] = math.nan
    z2[~valid] = math.nan
    f2.requires_grad_()
    z2.requires_grad_()
    loss = siamese_loss_reference(f2, z2, t1, t2, clip_mask=m, reduction="none")
    torch.testing.assert_close(loss, siamese_loss_reference(f, z, t1, t2, clip_mask=m,
                                                            reduction="none"))  # fmt: skip
    loss.sum().backward()
    assert torch.isfinite(f2.grad).all() and torch.isfinite(z2.grad).all()
    assert f2.grad[~valid].abs().max() == 0 and z2.grad[~valid].abs().max() == 0


def test_skr_only_ignores_features_and_detach_stops_gradients():
    f, z, t1, t2, m = make_inputs(seed=10)
    f = f.requires_grad_()
    t1 = t1.clone().requires_grad_()
    loss = siamese_loss(f, z.requires_grad_(), t1, t2, clip_mask=m, skg=False)
    torch.testing.assert_close(loss, siamese_loss(None, z, t1, t2, clip_mask=m, skg=False))
    loss.backward()
    assert f.grad is None and t1.grad is not None
    z2 = z.detach().clone().requires_grad_()
    t1b = t1.detach().clone().requires_grad_()
    siamese_loss(f, z2, t1b, t2, clip_mask=m, detach_soft_label=True).backward()
    assert t1b.grad is None
    assert z2.grad[:, 1:].abs().max() == 0 and z2.grad[:, 0].abs().max() > 0


def test_omega_extremes():
    f, z, t1, t2, m = make_inputs(seed=11)
    valid = m | (torch.arange(5) == 0)
    p = torch.softmax(torch.where(valid[..., None], z, 0.0), -1)
    w2 = torch.softmax(t2.masked_fill(~valid, -math.inf), -1)
    q0 = siamese_soft_label(f, z, t1, t2, omega=0.0, clip_mask=m)
    torch.testing.assert_close(q0, (w2[..., None] * p).sum(1))  # omega = 0: no propagation


# ---------------------------------------------------------------------------------- count task


def naive_count_loss(f, y, t1, t2, omega, mask):
    V, N = y.shape
    out = []
    for v in range(V):
        valid = [i for i in range(N) if i == 0 or mask is None or bool(mask[v, i])]
        w1 = torch.softmax(t1[valid], -1)
        w2 = torch.softmax(t2[valid], -1)
        a = siamese_knowledge(f[v : v + 1, valid], None)[0]
        ys = y[v, valid]
        q = omega * (w1 @ (a @ ys)) + (1 - omega) * (w2 @ ys)
        out.append((y[v, 0] - q) ** 2)
    return torch.stack(out)


def test_count_loss():
    f, _, t1, t2, m = make_inputs(V=4, N=5, seed=12)
    y = torch.rand(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2)) * 10
    got = siamese_count_loss(f, y, t1, t2, 0.3, 1.0, m, reduction="none")
    torch.testing.assert_close(got, naive_count_loss(f, y, t1, t2, 0.3, m))
    assert got[1] < 1e-24  # the anchor-only video: Q = y_anchor (up to rounding)
    ins = [x.clone().requires_grad_() for x in (f, y, t1, t2)]
    assert torch.autograd.gradcheck(
        lambda f, y, t1, t2: siamese_count_loss(f, y, t1, t2, 0.3, 0.9, m), ins
    )


# ---------------------------------------------------------------------------------- module


def test_module_parameters_buffers_and_forward():
    mod = SiameseReasoning(5, omega=0.3, tau=0.7, learn_w2=False)
    names = dict(mod.named_parameters())
    assert set(names) == {"theta1"} and "theta2" in dict(mod.named_buffers())
    assert mod.theta1.abs().max() == 0 and mod.theta2.abs().max() == 0  # uniform W at start
    f, z, _, _, m = make_inputs(V=3, N=5, seed=13, dtype=torch.float32)
    loss = mod(f, z, m)
    want = siamese_loss_reference(f, z, torch.zeros(5), torch.zeros(5), 0.3, 0.7, m)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert mod.theta1.grad is not None and mod.theta2.grad is None
    want_q = siamese_soft_label(f, z, mod.theta1, mod.theta2, 0.3, 0.7, m)
    torch.testing.assert_close(mod.soft_label(f, z, m), want_q)
    y = torch.rand(3, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        mod.count_loss(f, y, m), siamese_count_loss(f, y, mod.theta1, mod.theta2, 0.3, 0.7, m)
    )
    assert "learn_w2=False" in repr(mod)


def test_module_without_learned_weights_and_state_dict():
    mod = SiameseReasoning(3, learn_w1=False, learn_w2=False, skg=False)
    assert not list(mod.parameters())
    assert set(mod.state_dict()) == {"theta1", "theta2"}


# ---------------------------------------------------------------------------------- errors


def _ok():
    return make_inputs(V=2, N=3, D=4, K=5, dtype=torch.float32)


BOOL = torch.bool
ERRORS = [  # (argument, how to spoil it, what the error must say)
    ("logits", lambda a: a[0], r"logits must be a \[V, N, K\] tensor, got \(3, 5\)"),
    ("logits", lambda a: a.long(), r"logits must be floating point, got torch.int64"),
    ("logits", lambda a: a[:0], r"V, N and K must all be >= 1"),
    ("features", lambda a: a[:, :2], r"features shape \(2, 2, 4\) does not match"),
    ("features", lambda a: None, r"features=None needs skg=False"),
    ("theta1", lambda a: torch.zeros(4), r"theta1 must have shape \[N\] = \[3\].*got \(4,\)"),
    ("theta2", lambda a: a.long(), r"theta2 must be floating point, got torch.int64"),
    ("clip_mask", lambda a: a.float(), r"clip_mask must be a bool tensor \[V, N\], got torch.fl"),
    ("clip_mask", lambda a: torch.ones(2, 4, dtype=BOOL),
     r"clip_mask must have shape \[V, N\] = \[2, 3\], got \(2, 4\)"),
    ("omega", lambda a: 1.5, r"omega=1.5: must be a number in \[0, 1\]"),
    ("tau", lambda a: 0.0, r"tau=0.0: must be a finite number > 0"),
    ("reduction", lambda a: "avg", r"reduction='avg': valid values are \('none', 'mean', 'sum'\)"),
    ("impl", lambda a: "cuda", r"impl='cuda': valid values are \('auto', 'triton', 'reference'\)"),
]  # fmt: skip


@pytest.mark.parametrize("name, spoil, match", ERRORS)
def test_input_errors(name, spoil, match):
    f, z, t1, t2, m = _ok()
    args = dict(features=f, logits=z, theta1=t1, theta2=t2, clip_mask=m, omega=0.5, tau=1.0,
                reduction="mean", impl="auto")  # fmt: skip
    args[name] = spoil(args[name])
    with pytest.raises((ValueError, TypeError), match=match):
        siamese_loss(**args)


def test_module_and_count_errors():
    with pytest.raises(ValueError, match=r"num_clips=0: must be an integer >= 1"):
        SiameseReasoning(0)
    with pytest.raises(ValueError, match=r"omega=-0.1: must be a number in \[0, 1\]"):
        SiameseReasoning(3, omega=-0.1)
    with pytest.raises(ValueError, match=r"impl='fast': valid values are"):
        SiameseReasoning(3, impl="fast")
    f, z, t1, t2, m = _ok()
    with pytest.raises(ValueError, match=r"predictions must be \[V, N\].*got shape \(2, 3, 5\)"):
        siamese_count_loss(f, z, t1, t2)
    with pytest.raises(ValueError, match=r"logits must be a \[V, N, K\] tensor"):
        SiameseReasoning(3)(f, z[0])
    with pytest.raises(ValueError, match=r"SiameseReasoning\(num_clips=4\) got 3 clips per video "
                                         r"\(shape \(2, 3, 5\), clips on dim 1\): build it with "
                                         r"num_clips=3"):
        SiameseReasoning(4)(f, z)
    with pytest.raises(ValueError, match=r"num_clips=True: must be an integer"):
        SiameseReasoning(True)
    with pytest.raises(ValueError, match=r"features must be a \[V, N, D\] tensor .* got \(3, 4\)"):
        siamese_knowledge(f[0])  # [N, D]: one video without its V axis
    with pytest.raises(ValueError, match=r"clip_mask must have shape \[V, N\] = \[2, 3\]"):
        siamese_knowledge(f, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"clip_mask must be a bool tensor"):
        siamese_knowledge(f, torch.ones(2, 3, dtype=torch.uint8))


# ---------------------------------------------------------------------------------- dispatch


def test_dispatch_auto_uses_the_reference_on_cpu(monkeypatch):
    f, z, t1, t2, m = _ok()
    monkeypatch.delenv(S.IMPL_ENV, raising=False)
    assert S.resolve_impl("auto", f, z, t1, t2) == "reference"
    assert S.resolve_impl("reference", f, z, t1, t2) == "reference"
    monkeypatch.setenv(S.IMPL_ENV, "reference")
    assert S.resolve_impl("auto", f, z, t1, t2) == "reference"


def test_dispatch_env_errors_and_triton_without_cuda(monkeypatch):
    f, z, t1, t2, m = _ok()
    monkeypatch.setenv(S.IMPL_ENV, "fastest")
    with pytest.raises(ValueError, match=r"SIASAM_IMPL='fastest': valid values are"):
        siamese_loss(f, z, t1, t2)
    # An explicit impl beats the environment variable.
    siamese_loss(f, z, t1, t2, impl="reference")
    monkeypatch.setenv(S.IMPL_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"impl='triton' needs CUDA tensors, got tensors on cpu"):
        siamese_loss(f, z, t1, t2)
    with pytest.raises(ValueError, match=r"impl='triton' needs CUDA tensors"):
        siamese_loss(f, z, t1, t2, impl="triton")


def test_tolerance_would_catch_a_wrong_soft_label():
    """The float32 tolerance of the kernel tests (1e-5) is far below these plausible bugs."""
    f, z, t1, t2, m = make_inputs(V=4, N=9, D=16, K=50, seed=14)
    right = siamese_soft_label(f, z, t1, t2, 0.5, 1.0, m)
    wrong_omega = siamese_soft_label(f, z, t1, t2, 0.49, 1.0, m)
    wrong_tau = siamese_soft_label(f, z, t1, t2, 0.5, 1.01, m)
    no_mask = siamese_soft_label(f, z, t1, t2, 0.5, 1.0, None)
    for wrong in (wrong_omega, wrong_tau, no_mask):
        assert (wrong - right).abs().max() / right.abs().max() > 1e-4


def test_reference_ignores_autocast():
    f, z, t1, t2, m = make_inputs(dtype=torch.float32, seed=15)
    want = siamese_loss_reference(f, z, t1, t2, clip_mask=m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = siamese_loss_reference(f, z, t1, t2, clip_mask=m)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------- mutation-review additions


def test_count_loss_ignores_masked_predictions_and_detach_trains_the_anchor_only():
    f, _, t1, t2, m = make_inputs(V=3, N=5, seed=16)
    y = torch.rand(3, 5, dtype=F64, generator=torch.Generator().manual_seed(4)) * 10
    valid = m | (torch.arange(5) == 0)
    y_nan = torch.where(valid, y, math.nan)  # masked clips may hold anything
    got = siamese_count_loss(f, y_nan, t1, t2, 0.3, 1.0, m, reduction="none")
    torch.testing.assert_close(got, naive_count_loss(f, y, t1, t2, 0.3, m))
    ins = [x.clone().requires_grad_() for x in (f, y_nan, t1, t2)]
    siamese_count_loss(*ins, 0.3, 1.0, m, detach_soft_label=True).backward()
    assert ins[0].grad is None and ins[2].grad is None and ins[3].grad is None  # Q is a constant
    assert ins[1].grad[:, 1:].abs().max() == 0 and ins[1].grad[:, 0].abs().max() > 0


def test_impl_environment_variable_is_read_as_written():
    """SIASAM_IMPL is read in any case and with blanks around it, as TRITON_INTERPRET is."""
    f, z, t1, t2, _ = _ok()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(S.IMPL_ENV, " Reference\n")
        assert S.requested_impl("auto") == "reference"
        assert S.resolve_impl("auto", f, z, t1, t2) == "reference"
        mp.setenv(S.IMPL_ENV, "")
        assert S.requested_impl("auto") == "auto"


def test_knowledge_checks_tau():
    f, _, _, _, _ = _ok()
    for tau in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"tau=.*: must be a finite number > 0"):
            siamese_knowledge(f, tau=tau)


# ---------------------------------------------------------------------- losses (eq. 8)


def _open_outputs(V=3, N=4, D=6, K=5, seed=17):
    g = torch.Generator().manual_seed(seed)
    outputs = {"features": torch.randn(V, N, D, generator=g),
               "logits": 2 * torch.randn(V, N, K, generator=g)}  # fmt: skip
    mask = torch.ones(V, N, dtype=torch.bool)
    mask[0, 2:] = False
    mask[2, 1:] = False
    batch = {"clip_mask": mask, "label": torch.tensor([1, 4, 0])}
    return outputs, batch


def test_gt_loss_on_every_clip_averages_the_valid_clips_only():
    import torch.nn.functional as F

    from siasam_fast.losses import IGNORE, gt_loss

    outputs, batch = _open_outputs()
    mask, label = batch["clip_mask"], batch["label"]
    logits = outputs["logits"]
    ce = F.cross_entropy(logits.flatten(0, 1), label.repeat_interleave(4), reduction="none")
    want = ce.view(3, 4)[mask].mean()
    assert gt_loss(outputs, batch, "open", "all").item() == pytest.approx(want.item(), rel=1e-6)
    # No usable target anywhere: zero, not 0 / 0
    none = {**batch, "label": torch.full((3,), IGNORE)}
    for clips in ("anchor", "all", "pooled"):
        assert gt_loss(outputs, none, "open", clips).item() == 0.0
    counts = {"clip_mask": mask, "count": torch.full((3,), math.nan)}
    assert gt_loss({"prediction": logits[..., 0]}, counts, "count", "all").item() == 0.0


def test_siamese_term_is_the_masked_mean_and_skipped_for_one_clip():
    from siasam_fast.config import SiameseConfig
    from siasam_fast.losses import gt_loss, siamese_term, total_loss

    outputs, batch = _open_outputs()
    mask = batch["clip_mask"]
    reasoning = SiameseReasoning(4, omega=0.3, tau=0.7, impl="reference")
    with torch.no_grad():
        reasoning.theta1.copy_(torch.linspace(-1, 1, 4))
    nan_outputs = {k: torch.where(mask[..., None], v, math.nan) for k, v in outputs.items()}
    want = siamese_loss_reference(outputs["features"], outputs["logits"], reasoning.theta1,
                                  reasoning.theta2, 0.3, 0.7, mask)  # fmt: skip
    torch.testing.assert_close(siamese_term(nan_outputs, batch, "open", reasoning), want)
    # count: the scalar predictions, masked the same way
    pred = outputs["logits"][..., 0]
    want = siamese_count_loss(outputs["features"], pred, reasoning.theta1, reasoning.theta2, 0.3,
                              0.7, mask)  # fmt: skip
    count_out = {"features": nan_outputs["features"],
                 "prediction": torch.where(mask, pred, math.nan)}  # fmt: skip
    torch.testing.assert_close(siamese_term(count_out, {"clip_mask": mask}, "count", reasoning),
                               want)  # fmt: skip
    # One clip per video (the baseline's sampling): no siamese term, only L_gt
    one = {k: v[:, :1] for k, v in outputs.items()}
    one_batch = {**batch, "clip_mask": mask[:, :1]}
    loss, parts = total_loss(one, one_batch, "open", SiameseConfig(alpha=1.0),
                             SiameseReasoning(1, impl="reference"))  # fmt: skip
    assert "loss_siamese" not in parts
    assert loss.item() == pytest.approx(gt_loss(one, one_batch, "open").item())
