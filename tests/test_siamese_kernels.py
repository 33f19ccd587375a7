"""Fused Triton siamese loss vs a float64 evaluation of the reference (eq. 1-5, 8).

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no CUDA). Every case draws fresh random inputs, rounds them to the tested dtype, and
compares the loss, Q and every gradient against the reference evaluated in float64 on the same
(rounded) inputs, so the only differences are the kernels' fp32 arithmetic and the rounding of
their half-precision outputs. Errors are max |a - b| <= tol * (max |b| + floor) per tensor (the
floor, 1e-2 for gradients and 1 for the loss, only matters for tensors that are zero by
construction, e.g. every gradient of the logits at K = 1).

Tolerances (relative to the largest entry):
  float32:  loss 1e-5, Q 1e-5, gradients 1e-5
  float16:  loss 1e-5 (fp32 math on exact fp16 inputs), Q 1e-5, gradients 2e-3 (fp16 outputs)
  bfloat16: loss 1e-5, Q 1e-5, gradients 1.6e-2 (bf16 outputs; the interpreter truncates)
"""

import math
import os
import re

import pytest
import torch

from siasam_fast import siamese as S
from siasam_fast.siamese import SiameseReasoning, siamese_loss, siamese_soft_label

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)

TOL = {
    torch.float32: dict(loss=1e-5, q=1e-5, grad=1e-5),
    torch.float16: dict(loss=1e-5, q=1e-5, grad=2e-3),
    torch.bfloat16: dict(loss=1e-5, q=1e-5, grad=1.6e-2),
}
# Added to the scale, for tensors that are zero by construction: with K = 1 the loss and every
# logit gradient vanish, with D = 1 f / |f| is constant and the features' gradient vanishes; the
# kernels then return fp32 rounding noise (of |z| ~ 10 for the loss, of g / |f| for features).
SCALE_FLOOR = 1e-2  # gradients are O(0.01 - 1) here (upstream gradient 0.35 - 1.05)
LOSS_FLOOR = 1.0


def rel_err(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def check(actual, expected, tol, name, floor=SCALE_FLOOR):
    """max |actual - expected| <= tol * (max |expected| + floor)."""
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * (scale + floor), f"{name}: max error {err:.3g} (scale {scale:.3g})"


def make_inputs(V, N, D, K, dtype, mask, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(V, N, D, generator=g).to(dtype)
    z = (scale * torch.randn(V, N, K, generator=g)).to(dtype)
    t1 = torch.randn(N, generator=g)
    t2 = torch.randn(N, generator=g)
    m = None
    if mask:
        m = torch.rand(V, N, generator=g) > 0.4
        if V > 1:
            m[-1, 1:] = False  # an anchor-only video
    return [x.to(DEVICE) if x is not None else None for x in (f, z, t1, t2, m)]


def run_both(f, z, t1, t2, m, *, reduction="mean", grad_scale=0.7, seed=0, **kw):
    """Loss and gradients of the fused kernels and of the float64 reference on the same inputs."""
    outs = {}
    for impl in ("triton", "reference"):
        ins = [None if x is None else x.detach().clone() for x in (f, z, t1, t2)]
        if impl == "reference":
            ins = [None if x is None else x.double() for x in ins]
        for x in ins:
            if x is not None:
                x.requires_grad_()
        loss = siamese_loss(*ins, clip_mask=m, reduction=reduction, impl=impl, **kw)
        g = torch.Generator().manual_seed(seed + 1)
        grad = grad_scale * (0.5 + torch.rand(loss.shape, generator=g, dtype=torch.float64))
        loss.backward(grad.to(loss.dtype).to(loss.device))
        outs[impl] = (loss.detach(), [None if x is None else x.grad for x in ins])
    return outs["triton"], outs["reference"]


def assert_matches(tri, ref, dtype, names=("features", "logits", "theta1", "theta2")):
    tol = TOL[dtype]
    assert tri[0].dtype == torch.float32
    check(tri[0], ref[0], tol["loss"], "loss", floor=LOSS_FLOOR)
    for name, a, b in zip(names, tri[1], ref[1]):
        assert (a is None) == (b is None), f"{name}: gradient presence differs"
        if a is not None:
            assert a.dtype == (dtype if name in ("features", "logits") else torch.float32), name
            check(a, b, tol["grad"], name)


# A covering set of (V, N, D, K, dtype, mask, reduction): every N in {2, 9, 16}, D in {1, 33, 768}
# and K in {1, 5, 1000, 1537} appears, with both dtypes, masks and every reduction.
CASES = [
    (3, 2, 33, 5, torch.float32, False, "mean"),
    (2, 9, 768, 1000, torch.float32, True, "sum"),
    (2, 16, 1, 1537, torch.float32, True, "none"),
    (4, 9, 33, 1, torch.float32, True, "mean"),
    (2, 16, 768, 5, torch.float16, True, "mean"),
    (3, 2, 1, 1000, torch.float16, False, "none"),
    (2, 9, 33, 1537, torch.float16, True, "sum"),
    (3, 16, 33, 1, torch.float16, False, "mean"),
    (2, 9, 768, 1537, torch.bfloat16, True, "mean"),
]


@pytest.mark.parametrize("V, N, D, K, dtype, mask, reduction", CASES)
def test_loss_and_gradients_match_reference(V, N, D, K, dtype, mask, reduction):
    f, z, t1, t2, m = make_inputs(V, N, D, K, dtype, mask, seed=V * 1000 + N * 10 + K)
    tri, ref = run_both(f, z, t1, t2, m, reduction=reduction, omega=0.4, tau=0.8)
    assert_matches(tri, ref, dtype)


# Shapes and weights the covering set above leaves out: N neither 2, 9 nor 16 (with masks), K = 2,
# one video, and omega at both ends of [0, 1] (eq. 5: only W2's term, only W1's).
@pytest.mark.parametrize("V, N, K, omega", [(3, 3, 2, 0.5), (2, 5, 37, 0.0), (1, 5, 2, 1.0),
                                            (1, 3, 37, 0.0)])
def test_odd_clip_counts_one_video_and_omega_at_its_ends(V, N, K, omega):
    f, z, t1, t2, m = make_inputs(V, N, 17, K, torch.float32, True, seed=V + 10 * N + K)
    tri, ref = run_both(f, z, t1, t2, m, reduction="mean", omega=omega, tau=0.8)
    assert_matches(tri, ref, torch.float32)


@pytest.mark.parametrize("N, D, K, dtype", [(9, 33, 1000, torch.float32),
                                            (16, 768, 1537, torch.float16),
                                            (2, 1, 1, torch.float32)])  # fmt: skip
def test_soft_label_matches_reference(N, D, K, dtype):
    f, z, t1, t2, m = make_inputs(3, N, D, K, dtype, True, seed=7)
    q = siamese_soft_label(f, z, t1, t2, 0.3, 0.5, m, impl="triton")
    ref = siamese_soft_label(f.double(), z.double(), t1.double(), t2.double(), 0.3, 0.5, m,
                             impl="reference")  # fmt: skip
    assert q.dtype == torch.float32 and q.shape == (3, K)
    check(q, ref, TOL[dtype]["q"], "Q")
    if K == 1:
        return  # Q = 1 whatever the weights
    # The tolerance can fail: a plausible bug (omega off by 0.01) is far outside it.
    wrong = siamese_soft_label(f.double(), z.double(), t1.double(), t2.double(), 0.31, 0.5, m,
                               impl="reference")  # fmt: skip
    assert rel_err(wrong, ref) > 20 * TOL[dtype]["q"]


def test_wrong_gradient_would_be_caught():
    """The fp32 gradient tolerance rejects a gradient computed with tau off by 1%."""
    f, z, t1, t2, m = make_inputs(2, 9, 33, 100, torch.float32, True, seed=8)
    tri, ref = run_both(f, z, t1, t2, m, tau=1.0)
    _, ref_wrong = run_both(f, z, t1, t2, m, tau=1.01)
    assert rel_err(tri[1][0], ref[1][0]) <= TOL[torch.float32]["grad"]
    assert rel_err(tri[1][0], ref_wrong[1][0]) > 20 * TOL[torch.float32]["grad"]


# ---------------------------------------------------------------------------------- ablations


@pytest.mark.parametrize(
    "kw",
    [dict(skg=False), dict(detach_soft_label=True), dict(skg=False, detach_soft_label=True)],
    ids=["skr_only", "detach", "skr_only_detach"],
)
def test_ablation_switches(kw):
    f, z, t1, t2, m = make_inputs(3, 9, 33, 300, torch.float32, True, seed=9)
    tri, ref = run_both(f, z, t1, t2, m, reduction="sum", **kw)
    assert_matches(tri, ref, torch.float32)
    if kw.get("detach_soft_label"):
        assert tri[1][2] is None and tri[1][0] is None
        assert tri[1][1][:, 1:].abs().max() == 0


def test_features_may_be_none_without_skg():
    _, z, t1, t2, m = make_inputs(2, 5, 4, 50, torch.float32, True, seed=10)
    a = siamese_loss(None, z, t1, t2, clip_mask=m, skg=False, impl="triton")
    b = siamese_loss(None, z.double(), t1.double(), t2.double(), clip_mask=m, skg=False,
                     impl="reference")  # fmt: skip
    check(a, b, 1e-5, "loss", floor=LOSS_FLOOR)


def test_fixed_weights_and_logits_only_gradients():
    """Without W1 / W2 learning (theta without grad) and with features that need no grad."""
    f, z, t1, t2, m = make_inputs(2, 9, 33, 200, torch.float32, True, seed=11)
    outs = []
    for impl, dt in (("triton", torch.float32), ("reference", torch.float64)):
        zz = z.detach().to(dt).requires_grad_()
        loss = siamese_loss(f.to(dt), zz, t1.to(dt), t2.to(dt), clip_mask=m, impl=impl)
        loss.backward()
        outs.append(zz.grad)
    check(outs[0], outs[1], 1e-5, "logits")


def test_module_with_fixed_weights_matches_reference():
    f, z, _, _, m = make_inputs(2, 9, 33, 64, torch.float32, True, seed=12)
    impls = ("triton", "reference")
    mods = [SiameseReasoning(9, learn_w1=False, impl=impl).to(DEVICE) for impl in impls]
    with torch.no_grad():
        for mod in mods:
            mod.theta2.copy_(torch.linspace(-1, 1, 9))
    losses = [mod(f, z, m) for mod in mods]
    for loss in losses:
        loss.backward()
    check(losses[0], losses[1], 1e-5, "loss", floor=LOSS_FLOOR)
    check(mods[0].theta2.grad, mods[1].theta2.grad, 1e-5, "theta2")
    assert mods[0].theta1.grad is None


# ---------------------------------------------------------------------------------- edge cases


def test_single_clip_videos():
    f, z, t1, t2, _ = make_inputs(3, 1, 33, 100, torch.float32, False, seed=13)
    tri, ref = run_both(f, z, t1, t2, None, reduction="none")
    assert_matches(tri, ref, torch.float32)
    p = torch.softmax(z[:, 0].double(), -1)
    check(tri[0], -(p * p.log()).sum(-1), 1e-5, "entropy", floor=LOSS_FLOOR)  # Q = P_anchor


def test_anchor_only_and_masked_nan_clips():
    f, z, t1, t2, _ = make_inputs(3, 9, 33, 100, torch.float32, False, seed=14)
    m = torch.rand(3, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    m[0] = False  # anchor only (the anchor's own mask entry is ignored)
    m = m.to(DEVICE)
    valid = m | (torch.arange(9, device=DEVICE) == 0)
    f2, z2 = f.clone(), z.clone()
    f2[~valid] = math.nan
    z2[~valid] = math.inf
    tri, ref = run_both(f2, z2, t1, t2, m, reduction="none")
    _, ref_clean = run_both(f, z, t1, t2, m, reduction="none")
    assert torch.isfinite(tri[0]).all()
    check(tri[0], ref_clean[0], 1e-5, "loss", floor=LOSS_FLOOR)
    for a in tri[1]:
        assert torch.isfinite(a).all()
    assert tri[1][0][~valid].abs().max() == 0 and tri[1][1][~valid].abs().max() == 0
    q = siamese_soft_label(f2, z2, t1, t2, clip_mask=m, impl="triton")
    check(q[0], torch.softmax(z[0, 0].double(), -1), 1e-5, "Q of the anchor-only video")


@pytest.mark.parametrize("config", ["", "acc_2d=1,block_k=16", "anchor_2d=1,block_k=16"])
def test_minus_infinity_logits_outside_the_anchor(monkeypatch, config):
    """Masked answers (logit -inf) in siamese clips: zero probability, finite loss and gradients,
    also where a whole tile of a clip is -inf (empty column slots of the 2-D statistics)."""
    from siasam_kernels import siamese as ks

    monkeypatch.setenv(ks.CONFIG_ENV, config)
    f, z, t1, t2, m = make_inputs(2, 9, 33, 100, torch.float32, False, seed=21)
    z[:, 1:, 7] = -math.inf  # one answer masked in every siamese clip
    z[0, 3, :40] = -math.inf  # the first tiles of one clip
    z[1, 5, ::3] = -math.inf
    tri, ref = run_both(f, z, t1, t2, None, reduction="none")
    assert torch.isfinite(tri[0]).all() and all(torch.isfinite(a).all() for a in tri[1])
    assert_matches(tri, ref, torch.float32)


def test_zero_feature_vector_and_large_logits():
    f, z, t1, t2, m = make_inputs(2, 9, 33, 500, torch.float32, True, seed=15, scale=30.0)
    f[0, 2] = 0.0
    tri, ref = run_both(f, z, t1, t2, m)
    assert_matches(tri, ref, torch.float32)


@pytest.mark.parametrize("config", ["", "acc_2d=1,block_k=16", "anchor_2d=1,block_k=16"])
@pytest.mark.parametrize("fill", [-1e9, torch.finfo(torch.float32).min, 1e9])
def test_huge_logits_as_hand_made_masks_keep_the_references_gradients(monkeypatch, config, fill):
    """Logits filled with -1e9 or the fp32 minimum (a hand-made mask instead of clip_mask), in a
    whole siamese clip, a whole anchor, or an answer of every clip: the reference's loss and
    gradients (exponents of z * log2(e) minus a saved logsumexp lost them: 0.73 off in dz at -1e9,
    NaN at the fp32 minimum)."""
    from siasam_kernels import siamese as ks

    monkeypatch.setenv(ks.CONFIG_ENV, config)
    f, z, t1, t2, _ = make_inputs(3, 4, 9, 37, torch.float32, False, seed=23)
    z[0, 2, :] = fill  # a whole siamese clip
    z[1, 0, :] = fill  # a whole anchor
    if fill > 0:
        z[2, :, 5] = fill  # one answer of every clip (their shared prediction)
    else:
        z[2, :, 5:] = fill  # all but five answers of every clip
    tri, ref = run_both(f, z, t1, t2, None, reduction="none")
    assert torch.isfinite(tri[0]).all() and all(torch.isfinite(a).all() for a in tri[1])
    assert_matches(tri, ref, torch.float32)


@pytest.mark.parametrize("config", ["", "acc_2d=1,block_k=16", "anchor_2d=1,block_k=16"])
@pytest.mark.parametrize("fill", [-1e4, -1e9, torch.finfo(torch.float32).min])
def test_a_masked_first_answer_keeps_the_references_loss(monkeypatch, config, fill):
    """Answer 0 masked by hand (-1e9, the fp32 minimum) in every clip, or in the anchor only, the
    other logits ordinary: s_j and lse_0 were kept relative to the anchor's first logit, so every
    z_0k - ref was ~1e9 (fp32 step 64) and the loss came out negative (-67 for 7.08)."""
    from siasam_kernels import siamese as ks

    monkeypatch.setenv(ks.CONFIG_ENV, config)
    f, z, t1, t2, _ = make_inputs(2, 4, 9, 37, torch.float32, False, seed=29)
    z[0, :, 0] = fill  # every clip
    z[1, 0, 0] = fill  # the anchor only
    tri, ref = run_both(f, z, t1, t2, None, reduction="none")
    assert torch.isfinite(tri[0]).all() and all(torch.isfinite(a).all() for a in tri[1])
    assert_matches(tri, ref, torch.float32)


@pytest.mark.parametrize("config", ["", "acc_2d=1,block_k=16", "anchor_2d=1,block_k=16"])
def test_a_nan_logit_in_a_valid_clip_gives_a_nan_loss_as_the_reference_does(monkeypatch, config):
    """A NaN logit in a valid siamese clip (a diverged step) must show in that video's loss, as
    the reference's does (fp16 loss scaling and users watch for it); the column-slot statistics
    (acc_2d) used to drop it and give a finite loss."""
    from siasam_kernels import siamese as ks

    monkeypatch.setenv(ks.CONFIG_ENV, config)
    f, z, t1, t2, _ = make_inputs(2, 4, 9, 37, torch.float32, False, seed=31)
    z[0, 2, 20] = float("nan")
    tri, ref = run_both(f, z, t1, t2, None, reduction="none")
    assert torch.isnan(ref[0][0]) and torch.isfinite(ref[0][1])
    assert torch.isnan(tri[0][0]) and torch.isfinite(tri[0][1])
    torch.testing.assert_close(tri[0][1].double(), ref[0][1], rtol=1e-5, atol=1e-6)


def test_non_contiguous_and_mixed_dtype_inputs():
    f, z, t1, t2, m = make_inputs(3, 9, 66, 200, torch.float32, True, seed=16)
    f_nc = f.half()[:, :, ::2]  # D = 33, strided
    z_nc = z.transpose(1, 2).contiguous().transpose(1, 2)  # same values, K-major storage
    assert not f_nc.is_contiguous() and not z_nc.is_contiguous()
    tri, ref = run_both(f_nc, z_nc, t1, t2, m)
    assert tri[1][0].dtype == torch.float16 and tri[1][1].dtype == torch.float32
    check(tri[0], ref[0], 1e-5, "loss", floor=LOSS_FLOOR)
    check(tri[1][1], ref[1][1], 1e-5, "logits")
    check(tri[1][0], ref[1][0], 2e-3, "features")


def test_expanded_grad_output_of_reduction_none():
    f, z, t1, t2, m = make_inputs(3, 9, 33, 100, torch.float32, True, seed=17)
    outs = []
    for impl, dt in (("triton", torch.float32), ("reference", torch.float64)):
        zz = z.detach().to(dt).requires_grad_()
        siamese_loss(f.to(dt), zz, t1.to(dt), t2.to(dt), clip_mask=m, reduction="none",
                     impl=impl).sum().backward()  # fmt: skip
        outs.append(zz.grad)
    check(outs[0], outs[1], 1e-5, "logits")


# ---------------------------------------------------------------------------- errors + dispatch


def test_triton_limits_are_errors_that_say_what_is_supported():
    f, z, t1, t2, _ = make_inputs(1, 17, 4, 5, torch.float32, False, seed=18)
    with pytest.raises(ValueError, match=r"supports up to 16 clips per video .*got N=17"):
        siamese_loss(f, z, t1, t2, impl="triton")
    f, z, t1, t2, _ = make_inputs(1, 2, 4097, 5, torch.float32, False, seed=18)
    with pytest.raises(ValueError, match=r"feature sizes up to D=4096, got D=4097"):
        siamese_loss(f, z, t1, t2, impl="triton")
    f, z, t1, t2, _ = make_inputs(1, 1, 4, 65537, torch.float32, False, seed=18)
    with pytest.raises(ValueError, match=r"up to 65536 classes \(K\), got K=65537"):
        siamese_loss(f, z, t1, t2, impl="triton")
    f, z, t1, t2, _ = make_inputs(1, 2, 4, 5, torch.float32, False, seed=18)
    with pytest.raises(ValueError, match=r"got logits dtype torch.float64; use impl='reference'"):
        siamese_loss(f, z.double(), t1, t2, impl="triton")
    with pytest.raises(ValueError, match=r"without autograd, but theta1 requires grad"):
        siamese_soft_label(f, z, t1.requires_grad_(), t2, impl="triton")
    with torch.no_grad():
        siamese_soft_label(f, z, t1, t2, impl="triton")


@pytest.mark.parametrize(
    "config",
    [
        "block_k=16,num_warps=2,num_stages=1",
        "block_d=16;block_k=64",
        "block_k=32,prefetch=1,anchor_2d=1",
        "block_k=16,prefetch=1",
        "anchor_2d=1",
        "acc_2d=1,block_k=32",
        "acc_2d=1,anchor_2d=1,prefetch=1,block_k=16",
        "fwd_acc_2d=1,fwd_block_k=64,bwd_block_k=16,bwd_num_warps=2",
    ],
)
def test_launch_config_override_keeps_results(monkeypatch, config):
    """SIASAM_KERNEL_CONFIG replaces the heuristic's tiles (several K and D loop trips here)."""
    from siasam_kernels import siamese as ks

    monkeypatch.setenv(ks.CONFIG_ENV, config)
    want = ks.config_override(config)
    for kind in ("fwd", "bwd"):
        launch = ks._launch_settings(2, 40, 100, torch.device(DEVICE), kind)
        for key, val in want.items():
            if key.startswith(("fwd_", "bwd_")):
                if not key.startswith(kind):
                    continue
                key = key[4:]
            if kind == "bwd" and key == "acc_2d":
                assert "ACC_2D" not in launch  # a forward-only switch
                continue
            assert launch[key if key.startswith("num_") else key.upper()] == val, (kind, key)
    f, z, t1, t2, m = make_inputs(2, 9, 40, 100, torch.float32, True, seed=5)
    tri, ref = run_both(f, z, t1, t2, m)
    assert_matches(tri, ref, torch.float32)


def test_tuned_table_applies_to_its_gpu_and_regime(monkeypatch, tmp_path):
    """Settings measured on a named GPU (SIASAM_KERNEL_TUNED) replace the heuristic's only on
    that GPU, for more videos than SMs and K a multiple of 16; SIASAM_KERNEL_CONFIG still wins."""
    import json

    from siasam_kernels import siamese as ks

    table = {"FakeGPU": {"2": {"fwd": {"block_k": 128, "acc_2d": 1, "num_warps": 4},
                               "bwd": {"block_k": 512, "anchor_2d": 1}},
                         "4": {"fwd": {"block_k": 64}}}}  # fmt: skip
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(ks.TUNED_ENV, str(path))
    monkeypatch.delenv(ks.CONFIG_ENV, raising=False)
    monkeypatch.setattr(ks, "_sm_count", lambda device: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    gpu = torch.device("cuda")
    fwd = ks._launch_settings(8, 768, 4096, gpu, "fwd", 2)
    assert (fwd["BLOCK_K"], fwd["ACC_2D"], fwd["num_warps"]) == (128, True, 4)
    bwd = ks._launch_settings(8, 768, 4096, gpu, "bwd", 2)
    assert bwd["BLOCK_K"] == 512 and bwd["ANCHOR_2D"] and "ACC_2D" not in bwd
    assert ks._launch_settings(8, 768, 4096, gpu, "fwd", 4)["BLOCK_K"] == 64
    heuristic = dict(zip(("BLOCK_D", "BLOCK_K", "num_warps"), ks._launch_config(4, 768, 4096, 4)))
    for V, K in ((4, 4096), (8, 4100)):  # one wave or fewer; K not a multiple of 16
        few = ks._launch_settings(V, 768, K, gpu, "fwd", 2)
        assert "ACC_2D" not in few and few == dict(
            zip(("BLOCK_D", "BLOCK_K", "num_warps"), ks._launch_config(V, 768, K, 4)))
    assert heuristic["BLOCK_K"] != 128
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "OtherGPU")
    assert "ACC_2D" not in ks._launch_settings(8, 768, 4096, gpu, "fwd", 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    monkeypatch.setenv(ks.CONFIG_ENV, "fwd_block_k=256")
    assert ks._launch_settings(8, 768, 4096, gpu, "fwd", 2)["BLOCK_K"] == 256
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(ks.TUNED_ENV, str(bad))
    with pytest.raises(ValueError, match="bad.json: not a readable JSON table"):
        ks._launch_settings(8, 768, 4096, gpu, "fwd", 2)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"FakeGPU": {"2": {"fwd": {"tile": 3}}}}))
    monkeypatch.setenv(ks.TUNED_ENV, str(wrong))
    want = r"wrong.json: tuned launch settings \(fwd, 2-byte logits\) of FakeGPU: .*'tile=3'"
    with pytest.raises(ValueError, match=want):
        ks._launch_settings(8, 768, 4096, gpu, "fwd", 2)
    listing = tmp_path / "listing.json"
    listing.write_text("[1, 2]")
    monkeypatch.setenv(ks.TUNED_ENV, str(listing))
    with pytest.raises(ValueError, match=r"listing.json: expected \{GPU name"):
        ks._launch_settings(8, 768, 4096, gpu, "fwd", 2)
    monkeypatch.setenv(ks.TUNED_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"missing.json: no such file"):
        ks._launch_settings(8, 768, 4096, gpu, "fwd", 2)
    assert ks._tuned_table(str(ks.TUNED_FILE))  # the shipped table, its "_about" note included


def test_shipped_tuned_table_is_valid():
    """Every entry of kernels/tuned.json holds settings SIASAM_KERNEL_CONFIG would accept."""
    import json

    from siasam_kernels import siamese as ks

    table = json.loads(ks.TUNED_FILE.read_text())
    for gpu, by_size in table.items():
        if gpu.startswith("_"):
            continue
        for size, kinds in by_size.items():
            assert size in ("2", "4"), (gpu, size)
            for kind in ("fwd", "bwd"):
                text = ",".join(f"{kind}_{k}={v}" for k, v in kinds.get(kind, {}).items())
                ks.config_override(text)


@pytest.mark.parametrize(
    "value, message",
    [
        ("block_k=100", "block_k=100: must be a power of 2 in"),
        ("num_warps=64", "num_warps=64: must be a power of 2 in"),
        ("block_d=8", "block_d=8: must be a power of 2 in"),
        ("num_stages=0", "num_stages=0: must be in"),
        ("tile=16", "'tile=16' is not KEY=VALUE with KEY one of block_d"),
        ("block_k=big", "block_k='big' is not an integer"),
        ("prefetch=2", "prefetch=2: must be in [0, 1]"),
        ("bwd_acc_2d=1", "'bwd_acc_2d=1' is not KEY=VALUE"),
        ("fwd_block_k=48", "fwd_block_k=48: must be a power of 2 in"),
    ],
)
def test_launch_config_override_errors_name_the_value(value, message):
    from siasam_kernels import siamese as ks

    with pytest.raises(ValueError, match=re.escape(message)):
        ks.config_override(value)
    assert ks.config_override("") == {} and ks.config_override(None) == {}
    assert ks.config_override(" block_k=256, num_stages=3 ") == {"block_k": 256, "num_stages": 3}


def test_dispatch_env_override(monkeypatch):
    f, z, t1, t2, _ = make_inputs(2, 3, 4, 5, torch.float32, False, seed=19)
    monkeypatch.setenv(S.IMPL_ENV, "triton")
    assert S.resolve_impl("auto", f, z, t1, t2) == "triton"
    assert S.resolve_impl("reference", f, z, t1, t2) == "reference"
    called = []
    from siasam_kernels import siamese as kern

    real = kern.siamese_loss
    monkeypatch.setattr(kern, "siamese_loss", lambda *a: called.append(1) or real(*a))
    siamese_loss(f, z, t1, t2)
    assert called == [1]
    monkeypatch.setenv(S.IMPL_ENV, "auto")
    siamese_loss(f, z, t1, t2)
    assert called == ([1, 1] if CUDA else [1])  # auto: the kernels on CUDA, the reference on CPU


def test_errors_name_what_caused_them(monkeypatch):
    f, z, t1, t2, _ = make_inputs(2, 3, 4, 5, torch.float32, False, seed=24)
    reasoning = SiameseReasoning(3, impl="triton").to(DEVICE)
    with pytest.raises(ValueError, match=r"theta1, theta2 require grad \(SiameseReasoning's "):
        reasoning.soft_label(f, z)
    with torch.no_grad():
        assert reasoning.soft_label(f, z).shape == (2, 5)
    if CUDA:
        return
    monkeypatch.setenv(S.IMPL_ENV, "triton")
    for value in ("false", "off", "0", ""):  # off, as Triton itself reads the variable
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert not S.interpreting()
        with pytest.raises(ValueError, match=r"needs CUDA tensors.*\(impl='triton' comes from "
                                             r"SIASAM_IMPL='triton'\)"):
            siamese_loss(f, z, t1, t2)
    monkeypatch.setenv("TRITON_INTERPRET", "TRUE")
    assert S.interpreting()


def test_a_tau_whose_inverse_overflows_fp32_is_refused():
    """1 / tau scales the affinities in fp32 inside the kernels: a tau of 1e-39 passed the
    finite-and-positive check and gave a NaN loss and gradients (the reference stays finite)."""
    f, z, t1, t2, m = make_inputs(2, 3, 5, 4, torch.float32, False, seed=1)
    with pytest.raises(ValueError, match=r"tau=1e-39: 1 / tau overflows fp32.*at least 5.88e-39"):
        siamese_loss(f, z, t1, t2, tau=1e-39)
    assert torch.isfinite(siamese_loss(f, z, t1, t2, tau=1e-38, impl="reference"))


def test_the_smallest_accepted_tau_keeps_the_kernels_finite():
    """The kernels scale cos by log2(e) / tau in fp32: the bound 1 / FP32_MAX (2.94e-39) let
    taus up to 4.2e-39 through, and there the fused loss and gradients were NaN (also at the
    bound itself, for the duplicate clips of the "N copies of the anchor" ablation)."""
    f, z, t1, t2, _ = make_inputs(2, 4, 6, 5, torch.float32, False, seed=44)
    with pytest.raises(ValueError, match=r"tau=4e-39: .*at least 5.88e-39"):
        siamese_loss(f, z, t1, t2, tau=4e-39, impl="triton")
    copies = f[:, :1].expand(f.shape).clone()
    tri, ref = run_both(copies, z, t1, t2, None, reduction="none", tau=S.TAU_MIN)
    assert torch.isfinite(tri[0]).all() and all(torch.isfinite(a).all() for a in tri[1])
    check(tri[0], ref[0], 1e-5, "loss", floor=LOSS_FLOOR)


def test_a_second_derivative_is_refused_with_the_way_out():
    f, z, t1, t2, _ = make_inputs(2, 3, 4, 5, torch.float32, False, seed=25)
    z.requires_grad_()
    loss = siamese_loss(f, z, t1, t2, impl="triton")
    with pytest.raises(RuntimeError, match=r"has no second derivative .* use impl='reference'"):
        torch.autograd.grad(loss, z, create_graph=True)
    loss = siamese_loss(f, z, t1, t2, impl="reference")
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    g.sum().backward()  # the reference has one


LATE_INTERPRETER = """
import os, torch
import siasam_kernels.siamese  # built for a GPU: TRITON_INTERPRET is not set yet
os.environ["TRITON_INTERPRET"] = "1"
from siasam_fast.siamese import siamese_loss
try:
    siamese_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 4), torch.zeros(2), torch.zeros(2),
                 impl="triton")
except ValueError as err:
    print(err)
"""


@pytest.mark.skipif(CUDA, reason="CPU tensors and the interpreter")
def test_an_interpreter_asked_for_after_the_import_is_named():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", LATE_INTERPRETER], capture_output=True,
                         text=True, env=env, timeout=300)
    assert "TRITON_INTERPRET=1 was set after siasam_kernels was imported" in out.stdout, \
        out.stdout + out.stderr[-2000:]


# ---------------------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.gpu
def test_gpu_auto_dispatch_uses_triton_and_falls_back_with_a_warning():
    f, z, t1, t2, _ = make_inputs(2, 3, 4, 5, torch.float16, False, seed=20)
    assert S.resolve_impl("auto", f, z, t1, t2) == "triton"
    f, z, t1, t2, _ = make_inputs(2, 17, 4, 5, torch.float16, False, seed=20)
    with pytest.warns(UserWarning, match="falls back to the reference"):
        assert S.resolve_impl("auto", f, z, t1, t2) == "reference"
    f, z, t1, t2, _ = make_inputs(2, 3, 4, 5, torch.float64, False, seed=20)
    assert S.resolve_impl("auto", f, z, t1, t2) == "reference"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "V, N, D, K", [(64, 9, 768, 1500), (256, 9, 768, 4096), (8, 16, 4096, 65536), (33, 5, 100, 37)]
)
def test_gpu_large_shapes(V, N, D, K, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    f, z, t1, t2, m = make_inputs(V, N, D, K, dtype, True, seed=V + K)
    tri, ref = run_both(f, z, t1, t2, m, reduction="mean")
    tol = dict(TOL[dtype])
    assert_matches(tri, ref, dtype)
    q = siamese_soft_label(f, z, t1, t2, clip_mask=m)
    ref_q = siamese_soft_label(f.double(), z.double(), t1.double(), t2.double(), clip_mask=m)
    check(q, ref_q, tol["q"], "Q")


# ---------------------------------------------------------------------------------- GPU compile

AOT_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from siasam_kernels import siamese as ks

OFF_BY_DEFAULT = ("PREFETCH", "ANCHOR_2D", "ACC_2D")
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
if not os.path.exists(ptxas):
    print("SKIP no ptxas in this Triton wheel")
    sys.exit(0)

# Shared memory one block may use (opt-in), by compute capability: Triton refuses a launch above
# it ("out of resource: shared memory"): V100 96 KB, A100 163 KB, H100 227 KB.
SHARED_LIMIT = {70: 96 * 1024, 80: 163 * 1024, 90: 227 * 1024}
compiled = {}

def compile_one(kernel, dtype, consts, cap, warps, K, stages=None, ptxas_v=True):
    consts = {k: v for k, v in consts.items() if v is not False or k not in OFF_BY_DEFAULT}
    key = (kernel.__name__, dtype, tuple(sorted(consts.items())), cap, warps, K % 16 == 0,
           stages)
    if key in compiled and (compiled[key][0] is not None or not ptxas_v):
        return compiled[key]
    sig, attrs = {}, {}
    for i, n in enumerate(kernel.arg_names):
        if n in ("f_ptr", "z_ptr", "dz_ptr", "df_ptr"):
            sig[n] = "*" + dtype
        elif n == "mask_ptr":
            sig[n] = "*u8"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32"
        elif n in ("N", "D", "K", "grad_stride"):
            sig[n] = "i32"
        elif n in ("omega", "inv_tau", "scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "constexpr"
        if n.endswith("_ptr") or n == "D" or (n == "K" and K % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the launcher's specialisation sees
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps} if stages is None else {"num_warps": warps,
                                                            "num_stages": stages}
    c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    assert c.metadata.num_warps == warps, (key, c.metadata.num_warps)
    assert c.metadata.shared <= SHARED_LIMIT[cap], \
        f"sm_{cap} {kernel.__name__} {dtype} {consts} num_warps={warps}: " \
        f"{c.metadata.shared} bytes of shared memory, over the card's {SHARED_LIMIT[cap]}"
    if not ptxas_v:  # (triton.compile ran ptxas already: the cubin exists)
        compiled[key] = (None, None, c.metadata.shared)
        return compiled[key]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        open(path, "w").write(c.asm["ptx"])
        arch = "sm_90a" if cap == 90 else f"sm_{cap}"
        out = subprocess.run([ptxas, "-v", "--gpu-name=" + arch, path, "-o", path + ".cubin"],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    regs = int(re.findall(r"Used (\d+) registers", text)[0])
    spill = int(re.findall(r"(\d+) bytes spill stores", text)[0])
    compiled[key] = (regs, spill, c.metadata.shared)
    return compiled[key]

for cap, dtype in ((70, "fp16"), (70, "fp32"), (90, "fp16"), (90, "bf16")):
    for K in (4096, 1500):
        bd, bk, warps = ks._launch_config(4096, 768, K, sm_count=132)  # target B on an H100
        fwd = compile_one(ks._siamese_fwd_kernel, dtype, dict(HAS_MASK=True, SKG=True,
                          WRITE_Q=False, BLOCK_D=bd, BLOCK_K=bk), cap, warps, K)
        bwd = compile_one(ks._siamese_bwd_kernel, dtype, dict(HAS_MASK=True, SKG=True,
                          DETACH=False, NEED_DZ=True, NEED_DF=True, NEED_DTHETA=True,
                          BLOCK_D=bd, BLOCK_K=bk), cap, warps, K)
        # the switches the tuning sweep tries, at the largest tiles it pairs them with
        fwd2 = compile_one(ks._siamese_fwd_kernel, dtype, dict(HAS_MASK=True, SKG=True,
                           WRITE_Q=False, BLOCK_D=bd, BLOCK_K=256, ACC_2D=True, ANCHOR_2D=True,
                           PREFETCH=True), cap, 8, K)
        bwd2 = compile_one(ks._siamese_bwd_kernel, dtype, dict(HAS_MASK=True, SKG=True,
                           DETACH=False, NEED_DZ=True, NEED_DF=True, NEED_DTHETA=True,
                           BLOCK_D=bd, BLOCK_K=512, ANCHOR_2D=True, PREFETCH=True), cap, 8, K)
        print(f"sm_{cap} {dtype} K={K}: fwd regs={fwd[0]} spill={fwd[1]}, "
              f"bwd regs={bwd[0]} spill={bwd[1]}; switches on: fwd regs={fwd2[0]} "
              f"spill={fwd2[1]}, bwd regs={bwd2[0]} spill={bwd2[1]}")
        # The backward keeps each clip's max and log-sum (exact for huge logits) where it kept one
        # logsumexp: a few bytes spill at two settings (4 at sm_90 K=4096; 40 at sm_70 with
        # every switch on, a sweep candidate already at the 255-register cap before); more is a
        # regression.
        assert fwd[1] == fwd2[1] == 0 and bwd[1] <= 8 and bwd2[1] <= 64, "register spills"
# What training launches on a V100: a per-GPU batch of videos (V = 8) below its 80 SMs takes the
# few-videos settings (16 x 512 logit tiles, 128-wide feature tiles, 8 warps); the soft-label and
# detached variants too.
for dtype in ("fp16", "fp32"):
    for K in (1500, 5):
        bd, bk, warps = ks._launch_config(8, 768, K, sm_count=80)
        for kernel, consts in (
                (ks._siamese_fwd_kernel, dict(WRITE_Q=False)), (ks._siamese_fwd_kernel,
                dict(WRITE_Q=True)), (ks._siamese_bwd_kernel, dict(DETACH=False, NEED_DZ=True,
                NEED_DF=True, NEED_DTHETA=True)), (ks._siamese_bwd_kernel, dict(DETACH=True,
                NEED_DZ=True, NEED_DF=False, NEED_DTHETA=False))):
            regs, spill, _ = compile_one(kernel, dtype, dict(HAS_MASK=True, SKG=True, BLOCK_D=bd,
                                      BLOCK_K=bk, **consts), 70, warps, K)
            print(f"sm_70 {dtype} V=8 K={K} {kernel.__name__} {consts}: regs={regs} "
                  f"spill={spill}")
            assert spill == 0, "register spills at the V100's training launch settings"
# What each card really chooses (ks._launch_settings: the heuristic, tuned.json's entry for the
# card's name), for a training batch (V = 8, fewer videos than SMs) and a large one (V = 4096),
# K = 1500 and 4096 answers (K only matters through K % 16: tiles are clamped to 512 at most; at
# V = 8 both K take the same tiles, and use the same shared memory), is within the card's shared
# memory (checked in compile_one; registers cannot stop a launch: the
# PTX's .reqntid makes ptxas fit them to the block).
import torch
from unittest import mock

for env in (ks.CONFIG_ENV, ks.TUNED_ENV):
    os.environ.pop(env, None)
FWD = (ks._siamese_fwd_kernel, dict(HAS_MASK=True, SKG=True, WRITE_Q=False))
BWD = (ks._siamese_bwd_kernel, dict(HAS_MASK=True, SKG=True, DETACH=False, NEED_DZ=True,
                                    NEED_DF=True, NEED_DTHETA=True))
tuned_used = set()
for cap, name, sms in ((70, "Tesla V100-SXM2-32GB", 80), (80, "NVIDIA A100-SXM4-80GB", 108),
                       (90, "NVIDIA H100 80GB HBM3", 132)):
    with mock.patch.object(ks, "_sm_count", lambda device, n=sms: n), \
            mock.patch.object(torch.cuda, "get_device_name", lambda device=None, n=name: n):
        for dtype, size in (("fp16", 2), ("fp32", 4)):  # bf16: fp16's settings and layouts
            for V in (8, 4096):
                for K in ((1500, 4096) if V > sms else (4096,)):
                    for kind, (kernel, consts) in (("fwd", FWD), ("bwd", BWD)):
                        launch = ks._launch_settings(V, 768, K, torch.device("cuda", 0), kind,
                                                     size)
                        warps, stages = launch.pop("num_warps"), launch.pop("num_stages", None)
                        if ks._tuned_settings(V, K, size, torch.device("cuda", 0), kind):
                            tuned_used.add((cap, dtype, kind))
                        shared = compile_one(kernel, dtype, dict(consts, **launch), cap, warps, K,
                                             stages, ptxas_v=False)[2]
                        print(f"{name} {dtype} V={V} K={K} {kind} {launch} num_warps={warps}: "
                              f"shared={shared}")
assert tuned_used == {(90, d, k) for d in ("fp16", "fp32") for k in ("fwd", "bwd")}, tuned_used
print("OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_v100_and_h100_without_spills():
    """The interpreter accepts code the GPU compiler may reject: compile to cubin for sm_70 (V100)
    and sm_90 (H100) with Triton's bundled ptxas, no GPU needed, at the large-V launch configs;
    and the settings V100, A100 (sm_80) and H100 would choose (heuristic, tuned.json) within each
    card's shared memory per block."""
    import subprocess
    import sys

    if CUDA:
        pytest.skip("the GPU tests compile the kernels for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    if "SKIP" in out.stdout:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]


# ------------------------------------------------------------------- mutation-review additions


@pytest.mark.parametrize("tau, theta_scale", [(0.01, 1.0), (0.8, 100.0)],
                         ids=["sharp_affinities", "large_theta"])  # fmt: skip
def test_sharp_affinities_and_large_clip_weights_stay_finite(tau, theta_scale):
    """Both softmaxes of the N x N math subtract their max: near-duplicate clips (cos ~ 0.99, as
    siamese clips of one video are) at tau = 0.01 put cos / tau * log2(e) ~ 143 past fp32's 2^128,
    and theta ~ 100 does the same to W = softmax(theta); the reference's softmax handles both."""
    f, z, t1, t2, m = make_inputs(3, 9, 33, 50, torch.float32, True, seed=41)
    f = f[:, :1] + 0.1 * f  # every clip close to its anchor
    t1, t2 = theta_scale * t1, theta_scale * t2
    tri, ref = run_both(f, z, t1, t2, m, reduction="none", tau=tau)
    assert torch.isfinite(tri[0]).all() and all(torch.isfinite(a).all() for a in tri[1])
    # fp32 rounding of cos (~6e-8) reaches the affinities multiplied by 1 / tau
    tol = 1e-5 * max(1.0, 0.1 / tau)
    check(tri[0], ref[0], tol, "loss", floor=LOSS_FLOOR)
    for name, a, b in zip(("features", "logits", "theta1", "theta2"), tri[1], ref[1]):
        check(a, b, tol, name)


def test_features_below_the_norm_floor_take_the_linear_gradient():
    """|f| < eps: f^ = f / eps is linear in f, so the features' gradient has no projection term
    (the reference's clamp_min passes no gradient to |f|); a zero vector cannot tell the two."""
    f, z, t1, t2, m = make_inputs(2, 5, 33, 40, torch.float32, False, seed=42)
    f[0, 2] = 0.5 * S.EPS * f[0, 2] / f[0, 2].norm()  # |f| = eps / 2: f^ has norm 1/2
    tri, ref = run_both(f, z, t1, t2, m, reduction="none")
    assert_matches(tri, ref, torch.float32)


def test_dispatch_limits_are_inclusive_and_name_unsupported_dtypes():
    """D = 4096 and K = 65536 are inside the kernels' limits (no launch here); float64
    features or theta are outside them, named in the error of an explicit impl='triton'."""
    from siasam_kernels import siamese as ks

    g = torch.Generator().manual_seed(43)
    f = torch.randn(1, 2, ks.MAX_FEATURE_DIM, generator=g).to(DEVICE)
    z = torch.randn(1, 2, ks.MAX_CLASSES, generator=g).to(DEVICE)
    t = torch.zeros(2, device=DEVICE)
    assert S._triton_unsupported(f, z, t, t, True) is None
    assert S._triton_unsupported(f[..., :4], z[..., :5], t, t, True) is None
    assert "up to D=4096" in S._triton_unsupported(torch.cat([f, f[..., :1]], -1), z, t, t, True)
    assert "up to 65536 classes" in S._triton_unsupported(f, torch.cat([z, z[..., :1]], -1), t, t,
                                                           True)  # fmt: skip
    f, z = f[..., :4], z[..., :5]
    for name, args in (("features", (f.double(), z, t, t)), ("theta1", (f, z, t.double(), t)),
                       ("theta2", (f, z, t, t.double()))):  # fmt: skip
        with pytest.raises(ValueError, match=rf"got {name} dtype torch.float64; use impl='ref"):
            siamese_loss(*args, impl="triton")
        assert S.resolve_impl("auto", *args) == "reference"  # (warns on CUDA for theta)


def test_launch_tiles_are_clamped_to_the_problem(monkeypatch):
    """A tile wider than the data is cut to the next power of 2 of D (features) and K (logits),
    16 at least: tuning for K = 4096 must not launch 4096-wide tiles for 100 answers."""
    from siasam_kernels import siamese as ks

    cpu = torch.device("cpu")
    monkeypatch.setenv(ks.CONFIG_ENV, "block_d=4096,block_k=65536")
    for kind in ("fwd", "bwd"):
        launch = ks._launch_settings(2, 40, 100, cpu, kind)
        assert (launch["BLOCK_D"], launch["BLOCK_K"]) == (64, 128), (kind, launch)
        launch = ks._launch_settings(2, 1, 3, cpu, kind)
        assert (launch["BLOCK_D"], launch["BLOCK_K"]) == (16, 16), (kind, launch)


def test_tuned_regime_is_any_multiple_of_16(monkeypatch, tmp_path):
    """The tuned settings cover every K that is a multiple of 16 (vectorised loads), not only
    multiples of 32 or of the tile."""
    import json

    from siasam_kernels import siamese as ks

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"FakeGPU": {"2": {"fwd": {"block_k": 64}}}}))
    monkeypatch.setenv(ks.TUNED_ENV, str(path))
    monkeypatch.delenv(ks.CONFIG_ENV, raising=False)
    monkeypatch.setattr(ks, "_sm_count", lambda device: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    gpu = torch.device("cuda")
    assert ks._launch_settings(8, 768, 16 * 257, gpu, "fwd", 2)["BLOCK_K"] == 64
    assert ks._launch_settings(8, 768, 16 * 257 + 8, gpu, "fwd", 2)["BLOCK_K"] != 64


def test_kernels_launch_on_the_inputs_gpu_not_the_current_one(monkeypatch):
    """Triton launches on the current CUDA device and its stream, not on the tensors' device:
    siamese_loss on cuda:1 while cuda:0 was current ran the kernel on GPU 0 with GPU 1's
    pointers (an illegal address, or unordered with GPU 1's stream). Each launch makes the
    logits' device current for its duration (torch.cuda.device stood in for: no GPU here)."""
    import contextlib

    from siasam_kernels import siamese as ks

    current = ["cuda:0"]

    @contextlib.contextmanager
    def device(d):
        saved, current[0] = current[0], str(torch.device(d))
        try:
            yield
        finally:
            current[0] = saved

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs, current[0]))

    ks._launch(Kernel(), torch.device("cuda", 1), (3,), 1, 2, X=3)
    assert seen == [((3,), (1, 2), dict(X=3), "cuda:1")] and current == ["cuda:0"]
    # the forward and backward launch through it, with the logits' device
    calls, real = [], ks._launch

    def spy(kernel, dev, grid, *args, **kwargs):
        calls.append((kernel, dev))
        return real(kernel, dev, grid, *args, **kwargs)

    monkeypatch.setattr(ks, "_launch", spy)
    f, z, t1, t2, m = make_inputs(2, 3, 8, 5, torch.float32, True, seed=50)
    z.requires_grad_()
    siamese_loss(f, z, t1, t2, clip_mask=m, impl="triton").backward()
    assert calls == [(ks._siamese_fwd_kernel, z.device), (ks._siamese_bwd_kernel, z.device)]


def test_a_triton_that_cannot_compile_for_a_v100_falls_back_to_the_reference(monkeypatch):
    """Triton 3.9+ cannot compile for sm_70 (its bundled ptxas rejects the PTX it emits): the
    first training step on a V100 failed inside Triton's compiler. impl=auto now takes the
    reference with a warning naming the fix, impl=triton refuses by name; `siasam-fast env`
    says the same (one check, siamese.triton_gpu_problem). A stand-in for a CUDA tensor:
    nothing is launched."""
    import triton

    class OnTheGpu:
        device, dtype = torch.device("cuda", 0), torch.float16

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    with pytest.warns(UserWarning, match=r"falls back to the reference: impl='triton': Triton "
                                         r"3\.9\.0 cannot compile for sm_70 .*triton==3\.8\.0"):
        assert S.resolve_impl("auto", None, OnTheGpu(), None, None, skg=False) == "reference"
    with pytest.raises(ValueError, match=r"Triton 3\.9\.0 cannot compile for sm_70"):
        S.resolve_impl("triton", None, OnTheGpu(), None, None, skg=False)
    assert S.triton_gpu_problem((7, 0), "3.8.0") is None
    assert S.triton_gpu_problem((7, 5), "3.10.1") is None
    assert S.triton_gpu_problem((7, 0), "3.10.1+git12ab") is not None
