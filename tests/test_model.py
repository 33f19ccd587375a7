"""The ClipBERT-like model and the SiaSamRea objective (eq. 8) on tiny random inputs."""

import pytest
import torch

from siasam_fast.config import ModelConfig, SiameseConfig
from siasam_fast.losses import gt_loss, total_loss
from siasam_fast.model import SiaSamReaModel, aggregate_clips, load_tokenizer

V, N, B, S = 2, 3, 4, 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def make_batch(tokenizer, task, num_unique=(10, 7), M=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = max(num_unique)
    batch = {
        "frames": torch.randn(V, U, 3, S, S, generator=g),
        "num_unique": torch.tensor(num_unique),
        "clip_index": torch.stack([torch.randint(0, n, (N, B), generator=g) for n in num_unique]),
        "frame_mask": torch.ones(V, N, B, dtype=torch.bool),
        "clip_mask": torch.ones(V, N, dtype=torch.bool),
        "label": torch.tensor([3, 1]),
        "answer_index": torch.tensor([1, 3]),
        "count": torch.tensor([2.0, 4.0]),
    }
    if task == "mc":
        enc = tokenizer(["what color is the square?"] * (V * M),
                        ["red", "blue", "green", "cyan"] * V, padding=True, return_tensors="pt")
        batch["input_ids"] = enc["input_ids"].view(V, M, -1)
        batch["attention_mask"] = enc["attention_mask"].view(V, M, -1)
    else:
        enc = tokenizer(["what color is the big square?", "how many rings"], padding=True,
                        return_tensors="pt")
        batch["input_ids"], batch["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    return batch


def make_model(task, seed=0, **kw):
    torch.manual_seed(seed)
    model = SiaSamReaModel(ModelConfig(**kw), task, num_answers=6,
                           vocab_size=len(load_tokenizer(ModelConfig())), num_clips=N)
    return model.eval()


def test_tokenizer_knows_real_words(tokenizer):
    """transformers 5 ignores vocab_file=: the shipped vocabulary must really be used."""
    tokens = tokenizer.tokenize("what color is the blinking frame? how many rings appear")
    assert "[UNK]" not in tokens
    assert tokens[:3] == ["what", "color", "is"]
    # Unknown words fall back to word pieces, never [UNK].
    assert "[UNK]" not in tokenizer.tokenize("zebra xylophone")


@pytest.mark.parametrize("qa_head", ["siasam", "clipbert"])
@pytest.mark.parametrize("task, key, shape", [
    ("open", "logits", (V, N, 6)), ("mc", "scores", (V, N, 4)), ("count", "prediction", (V, N)),
])
def test_output_shapes_and_gradients(tokenizer, task, key, shape, qa_head):
    model = make_model(task, qa_head=qa_head).train()
    if qa_head == "clipbert":  # BERT's init (std 0.02) makes the clips' scores nearly equal
        with torch.no_grad():  # here: theta1's gradient would be ~1e-8, at rounding level
            model.head[3].weight.normal_(std=1.0)
    batch = make_batch(tokenizer, task)
    out = model(batch)
    assert out[key].shape == shape
    assert out["features"].shape == (V, N, model.text.config.hidden_size)
    loss, parts = total_loss(out, batch, task, SiameseConfig(), model.reasoning)
    assert torch.isfinite(loss) and "loss_siamese" in parts
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
               and "pooler" not in n]
    # Position embeddings of unused rows/columns and the theta of fixed W get no gradient; every
    # module on the path does.
    assert not [n for n in missing if not n.startswith(("visual.row", "visual.col"))], missing
    assert model.reasoning.theta1.grad is not None and model.reasoning.theta1.grad.abs().sum() > 0


@pytest.mark.parametrize("task, outputs", [("open", 6), ("mc", 1), ("count", 1)])
def test_clipbert_qa_head_is_clipberts_classifier(task, outputs):
    """model.qa_head=clipbert: ClipBERT's ClipBertForSequenceClassification / MultipleChoice
    classifier (dropout on the pooled [CLS], Linear to 2 x hidden, ReLU, Linear), BERT's init."""
    torch.manual_seed(0)
    head = make_model(task, qa_head="clipbert", dropout=0.25).head
    hidden = 64  # the tiny text preset
    assert [type(m) for m in head] == [torch.nn.Dropout, torch.nn.Linear, torch.nn.ReLU,
                                       torch.nn.Linear]
    assert head[0].p == 0.25
    assert head[1].weight.shape == (2 * hidden, hidden)
    assert head[3].weight.shape == (outputs, 2 * hidden)
    assert abs(head[1].weight.std().item() - 0.02) < 0.002  # normal(0, 0.02), not torch's default
    assert not head[1].bias.any() and not head[3].bias.any()
    x = torch.randn(5, hidden)
    want = torch.relu(x @ head[1].weight.T + head[1].bias) @ head[3].weight.T + head[3].bias
    torch.testing.assert_close(head.eval()(x), want)


@pytest.mark.parametrize("task", ["open", "mc"])
def test_qa_head_default_on_presets_is_siasams(task):
    head = make_model(task).head  # auto: not a converted ClipBERT folder
    assert any(isinstance(m, torch.nn.GELU) for m in head)
    assert any(isinstance(m, torch.nn.LayerNorm) for m in head) == (task == "open")
    with pytest.raises(ValueError, match=r"model.qa_head='relu': valid values are auto, siasam, "
                                         r"clipbert"):
        ModelConfig(qa_head="relu")


def test_padding_does_not_change_outputs(tokenizer):
    """Padded unique frames, padded clip frames and padded text tokens are invisible."""
    model = make_model("open")
    batch = make_batch(tokenizer, "open")
    ref = model(batch)["logits"]
    padded = dict(batch)
    # Garbage in the padded unique frames of video 1 (it has 7 of 10).
    frames = batch["frames"].clone()
    frames[1, 7:] = 1e3
    padded["frames"] = frames
    # One more clip frame per clip, masked out and pointing at garbage.
    padded["clip_index"] = torch.cat([batch["clip_index"], torch.full((V, N, 1), 9)], 2)
    no = torch.zeros(V, N, 1, dtype=torch.bool)
    padded["frame_mask"] = torch.cat([batch["frame_mask"], no], 2)
    # Extra padding tokens.
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(V, 5, dtype=torch.long)], 1)
    pad = torch.zeros(V, 5, dtype=torch.long)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], pad], 1)
    torch.testing.assert_close(model(padded)["logits"], ref, rtol=1e-4, atol=1e-5)


def test_dedup_and_per_clip_frames_agree(tokenizer):
    """Encoding the unique frames once and gathering equals encoding every clip frame apart."""
    model = make_model("open")
    batch = make_batch(tokenizer, "open")
    ref = model(batch)["logits"]
    # The same clips with U = N * B (no de-duplication): frames laid out clip by clip.
    flat = dict(batch)
    rows = torch.arange(V)[:, None, None]
    flat["frames"] = batch["frames"][rows, batch["clip_index"]].reshape(V, N * B, 3, S, S)
    flat["num_unique"] = torch.full((V,), N * B)
    flat["clip_index"] = torch.arange(N * B).view(1, N, B).expand(V, N, B).contiguous()
    torch.testing.assert_close(model(flat)["logits"], ref, rtol=1e-4, atol=1e-5)


def test_question_embedded_once_per_video(tokenizer, monkeypatch):
    model = make_model("open")
    batch = make_batch(tokenizer, "open")
    calls = []
    original = model.text.embeddings.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.shape[0])
        return out

    monkeypatch.setattr(model.text.embeddings, "forward", spy)
    model(batch)
    assert calls == [V]  # one row per video, not V * N


def test_frames_encoded_once(tokenizer, monkeypatch):
    model = make_model("open")
    batch = make_batch(tokenizer, "open", num_unique=(10, 7))
    seen = []
    original = model.visual.encode_frames

    def spy(frames):
        seen.append(frames.shape[0])
        return original(frames)

    monkeypatch.setattr(model.visual, "encode_frames", spy)
    model(batch)
    assert seen == [17]  # 10 + 7 unique frames, padding never encoded


def test_gt_losses_by_hand():
    scores = torch.tensor([[[2.0, 0.5, 1.8, -1.0]], [[0.0, 0.0, 0.0, 0.0]]])  # [V=2, N=1, M=4]
    batch = {"clip_mask": torch.ones(2, 1, dtype=torch.bool), "answer_index": torch.tensor([0, 2])}
    # Video 0: positive 2.0; hinge terms max(0, 1 - (2 - s)) for s = 0.5, 1.8, -1 -> 0, 0.8, 0.
    # Video 1: all zero: three negatives, each 1.
    expected = (0.8 + 3.0) / 2
    assert gt_loss({"scores": scores}, batch, "mc").item() == pytest.approx(expected)
    # siamese.mc_loss=ce (ClipBERT's): cross-entropy over the candidates, by hand
    ce0 = -(2.0 - torch.tensor([2.0, 0.5, 1.8, -1.0]).exp().sum().log())
    ce1 = -(0.0 - torch.tensor(4.0).log())
    assert gt_loss({"scores": scores}, batch, "mc", mc_loss="ce").item() == pytest.approx(
        ((ce0 + ce1) / 2).item())
    with pytest.raises(ValueError, match="siamese.mc_loss='bce': valid values are hinge, ce"):
        gt_loss({"scores": scores}, batch, "mc", mc_loss="bce")
    logits = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]]])
    batch = {"clip_mask": torch.ones(2, 1, dtype=torch.bool), "label": torch.tensor([2, -1])}
    ce = torch.nn.functional.cross_entropy(logits[0], torch.tensor([2]))
    # The label -1 (an answer outside the vocabulary) is ignored.
    assert gt_loss({"logits": logits}, batch, "open").item() == pytest.approx(ce.item())
    pred = torch.tensor([[1.0, 5.0], [3.0, 3.0]])
    batch = {"clip_mask": torch.ones(2, 2, dtype=torch.bool), "count": torch.tensor([2.0, 3.0])}
    assert gt_loss({"prediction": pred}, batch, "count").item() == pytest.approx(0.5)
    assert gt_loss({"prediction": pred}, batch, "count", "all").item() == pytest.approx((1 + 9) / 4)
    batch["count"] = torch.tensor([2.0, float("nan")])  # no count given: left out, not NaN
    assert gt_loss({"prediction": pred}, batch, "count").item() == pytest.approx(1.0)


def test_gt_on_pooled_clips_is_clipberts_multi_clip_loss():
    """siamese.gt_clips=pooled: ClipBERT's training loss over several clips. With logsumexp it
    writes the loss as logsumexp over (clips, answers) less logsumexp over the clips of the
    label's logit (run_video_qa.py); a masked clip takes no part."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)  # [V, N, K]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    label = torch.tensor([4, 1])
    batch = {"clip_mask": mask, "label": label}
    want = []
    for v in range(2):
        kept = logits[v][mask[v]]  # [clips, K]
        want.append(kept.flatten().logsumexp(0) - kept[:, label[v]].logsumexp(0))
    got = gt_loss({"logits": logits}, batch, "open", "pooled", gt_pool="logsumexp")
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)
    # mean pooling: cross-entropy of the mean logits
    mean = torch.stack([logits[v][mask[v]].mean(0) for v in range(2)])
    ce = torch.nn.functional.cross_entropy(mean, label)
    got = gt_loss({"logits": logits}, batch, "open", "pooled", gt_pool="mean")
    assert got.item() == pytest.approx(ce.item(), rel=1e-6)
    # count: the mean prediction's squared error
    pred = torch.tensor([[1.0, 3.0, 8.0], [2.0, 4.0, 100.0]])
    batch = {"clip_mask": mask, "count": torch.tensor([4.0, 3.0])}
    got = gt_loss({"prediction": pred}, batch, "count", "pooled", gt_pool="mean")
    assert got.item() == pytest.approx(((4 - 4) ** 2 + (3 - 3) ** 2) / 2)
    with pytest.raises(ValueError, match=r"siamese.gt_pool=logsumexp: task=count predicts a "
                                         r"number per clip"):
        from siasam_fast.config import Config

        Config.from_dict({"task": "count", "siamese": {"gt_clips": "pooled"}})


def test_alpha_zero_is_the_baseline(tokenizer):
    model = make_model("open")
    batch = make_batch(tokenizer, "open")
    out = model(batch)
    loss, parts = total_loss(out, batch, "open", SiameseConfig(alpha=0.0), model.reasoning)
    assert "loss_siamese" not in parts
    assert loss.item() == pytest.approx(gt_loss(out, batch, "open").item())
    loss1, parts1 = total_loss(out, batch, "open", SiameseConfig(alpha=1.0), model.reasoning)
    assert loss1.item() == pytest.approx(loss.item() + parts1["loss_siamese"].item(), rel=1e-5)
    # multiple choice: siamese.mc_loss reaches L_gt
    model, batch = make_model("mc"), make_batch(tokenizer, "mc")
    out = model(batch)
    for how in ("hinge", "ce"):
        loss, _ = total_loss(out, batch, "mc", SiameseConfig(alpha=0.0, mc_loss=how),
                             model.reasoning)
        assert loss.item() == pytest.approx(gt_loss(out, batch, "mc", mc_loss=how).item())


@pytest.mark.parametrize("how", ["mean", "max", "logsumexp"])
def test_aggregate_clips_ignores_masked(how):
    scores = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    got = aggregate_clips(scores, mask, how)
    ref = {"mean": scores[:, :2].mean(1), "max": scores[:, :2].max(1).values,
           "logsumexp": scores[:, :2].logsumexp(1)}[how]
    torch.testing.assert_close(got, ref)


def test_grid_too_large_is_a_clear_error(tokenizer):
    model = make_model("open", max_grid=1, grid_pool=1)
    with pytest.raises(ValueError, match=r"visual grid 4x4 exceeds model.max_grid=1"):
        model(make_batch(tokenizer, "open"))


def test_unknown_presets_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"model.visual='resnet9'.*tiny, resnet18, resnet50"):
        make_model("open", visual="resnet9")


def test_channels_last_computes_the_same_function(tokenizer, monkeypatch):
    """model.memory_format=channels_last runs the CNN in NHWC (frames and weights) and gives the
    NCHW model's outputs and gradients; auto is NCHW on CPU; a bad value names the valid ones."""
    from siasam_fast.model import resolve_channels_last, use_memory_format

    batch = make_batch(tokenizer, "open")
    results = []
    for fmt in ("contiguous", "channels_last"):
        model = use_memory_format(make_model("open", memory_format=fmt).train(), "cpu")
        conv = next(m for m in model.visual.trunk.modules()
                    if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
        nhwc = conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert nhwc == (fmt == "channels_last"), fmt
        seen = []
        monkeypatch.setattr(model.visual.trunk, "forward", _recording(model.visual.trunk, seen))
        torch.manual_seed(1)  # the same dropout masks in both runs
        out = model(batch)
        (out["logits"].square().mean() + out["features"].mean()).backward()
        layout = seen[0].is_contiguous(memory_format=torch.channels_last)
        assert layout == (fmt == "channels_last"), fmt
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-5, msg=name)
    assert resolve_channels_last("auto", "cpu") is False
    assert resolve_channels_last("auto", "cuda") is True
    assert resolve_channels_last("contiguous", "cuda") is False
    with pytest.raises(ValueError, match="model.memory_format='nhwc'.*channels_last"):
        ModelConfig(memory_format="nhwc")


def _recording(module, seen):
    forward = module.forward

    def record(*args, **kwargs):
        seen.append(kwargs["pixel_values"])
        return forward(*args, **kwargs)

    return record


def test_real_frame_slots_and_host_side_counts():
    """The real frames' flat slots are the boolean mask's, in its order; to_device leaves the
    counts on the host, and the model gives the same outputs either way."""
    from siasam_fast.model import real_frame_slots
    from siasam_fast.training import to_device

    num_unique = torch.tensor([3, 0, 5, 1])
    U = 5
    mask = torch.arange(U)[None, :] < num_unique[:, None]
    want = torch.arange(4 * U).view(4, U)[mask]
    assert real_frame_slots(num_unique, U, torch.device("cpu")).tolist() == want.tolist()
    moved = to_device({"num_unique": num_unique, "frames": torch.zeros(2, 3)}, torch.device("meta"),
                      torch.float16)
    assert moved["num_unique"].device.type == "cpu" and moved["frames"].device.type == "meta"
    assert moved["frames"].dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (device syncs)")
def test_visual_forward_never_waits_for_the_gpu(tokenizer):
    """With the counts on the host, the visual embedding's forward and backward queue their
    kernels without a device synchronisation (boolean-mask indexing would need two)."""
    model = make_model("open").cuda().train()
    batch = make_batch(tokenizer, "open")
    frames = batch["frames"].cuda()
    clip_index, frame_mask = batch["clip_index"].cuda(), batch["frame_mask"].cuda()
    model.visual(frames, batch["num_unique"], clip_index, frame_mask)  # warm-up (cuDNN set-up)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = model.visual(frames, batch["num_unique"], clip_index, frame_mask)
        tokens.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(tokens).all()


FAKE_APEX = {
    "apex/__init__.py": "",
    "apex/normalization/__init__.py": (
        "import torch\n\n"
        "class FusedLayerNorm(torch.nn.LayerNorm):\n"
        "    pass\n"),
    "apex/optimizers/__init__.py": (
        "import torch\n\n"
        "class FusedAdam(torch.optim.AdamW):\n"
        "    def __init__(self, params, lr, adam_w_mode=True, **kwargs):\n"
        "        super().__init__(params, lr=lr)\n"),
    # the compiled CUDA extensions of a full build (--cpp_ext --cuda_ext)
    "amp_C.py": "",
    "fused_layer_norm_cuda.py": "",
}


@pytest.fixture
def fake_apex(tmp_path, monkeypatch):
    """A stand-in for NVIDIA apex (not on PyPI, not installed here): its two fused classes as
    torch subclasses, to check what the package does when apex is present."""
    import sys

    for name, text in FAKE_APEX.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    ours = ("apex", "amp_C", "fused_layer_norm_cuda")  # apex_problem loads the extensions
    for name in [m for m in sys.modules if m in ours or m.startswith("apex.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m in ours or m.startswith("apex.")]:
        sys.modules.pop(name, None)


def test_apex_is_used_when_installed(fake_apex, tokenizer):
    """DESIGN section 5: apex's FusedAdam and FusedLayerNorm are used where apex is installed
    (on CUDA), never required; the model computes the same function with them."""
    from apex.normalization import FusedLayerNorm

    from siasam_fast.config import Config
    from siasam_fast.model import apex_available, use_apex_layer_norm
    from siasam_fast.training import build_optimizer, fused_layer_norm

    assert apex_available()
    cfg = Config()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_layer_norm(cfg, cuda) and not fused_layer_norm(cfg, cpu)
    cfg.model.layer_norm = "torch"
    assert not fused_layer_norm(cfg, cuda)
    model = make_model("open")
    batch = make_batch(tokenizer, "open")
    before = model(batch)["logits"]
    norms = sum(type(m) is torch.nn.LayerNorm for m in model.modules())
    assert norms > 0 and use_apex_layer_norm(model) == norms
    assert not any(type(m) is torch.nn.LayerNorm for m in model.modules())
    assert sum(isinstance(m, FusedLayerNorm) for m in model.modules()) == norms
    torch.testing.assert_close(model(batch)["logits"], before)
    _, name = build_optimizer(model, cfg, cuda)
    assert name == "apex FusedAdam"
    assert build_optimizer(model, cfg, cpu)[1] == "torch AdamW"


def test_a_python_only_apex_build_is_not_used(fake_apex, tmp_path):
    """apex built without its CUDA extensions imports FusedAdam and FusedLayerNorm but refuses to
    construct them: auto leaves it out, asking for it names the missing extensions, and
    `siasam-fast env` says to rebuild it."""
    import importlib
    import sys

    from siasam_fast import envcheck
    from siasam_fast.config import Config
    from siasam_fast.model import apex_available, apex_problem
    from siasam_fast.training import build_optimizer, fused_layer_norm

    assert apex_available()
    (tmp_path / "amp_C.py").unlink()
    sys.modules.pop("amp_C", None)
    importlib.invalidate_caches()
    assert not apex_available() and "amp_C missing" in apex_problem()
    cfg = Config()
    assert not fused_layer_norm(cfg, torch.device("cuda"))  # auto: torch's LayerNorm
    cfg.model.layer_norm = "apex"
    with pytest.raises(ValueError, match="without its CUDA extensions"):
        fused_layer_norm(cfg, torch.device("cuda"))
    cfg.train.optimizer = "apex"
    with pytest.raises(ValueError, match=r"train.optimizer='apex' but .*amp_C"):
        build_optimizer(make_model("open"), cfg, torch.device("cuda"))
    (row,) = envcheck.check_apex()
    assert row.status == "missing" and "--cuda_ext" in row.hint and "amp_C" in row.detail


def test_apex_asked_for_but_missing_is_a_clear_error(monkeypatch):
    import sys

    from siasam_fast.config import Config
    from siasam_fast.training import fused_layer_norm

    monkeypatch.setitem(sys.modules, "apex", None)  # import apex raises ImportError
    cfg = Config()
    assert not fused_layer_norm(cfg, torch.device("cuda"))  # auto: torch's, silently
    cfg.model.layer_norm = "apex"
    with pytest.raises(ValueError, match="model.layer_norm='apex' but apex is not installed"):
        fused_layer_norm(cfg, torch.device("cuda"))
    with pytest.raises(ValueError, match="model.layer_norm='apex' needs CUDA"):
        fused_layer_norm(cfg, torch.device("cpu"))


def test_an_apex_whose_extensions_do_not_load_is_not_used(fake_apex, tmp_path):
    """apex's CUDA extensions present but built for another torch (ImportError: undefined
    symbol when loaded): apex.multi_tensor_apply swallows that ImportError and FusedAdam then
    refuses to construct, so auto must leave apex out, as for a Python-only build."""
    import importlib
    import sys

    from siasam_fast.config import Config
    from siasam_fast.model import apex_available, apex_problem
    from siasam_fast.training import build_optimizer, fused_layer_norm

    (tmp_path / "amp_C.py").write_text("raise ImportError('amp_C.so: undefined symbol: "
                                       "_ZN3c104cuda9SetDeviceEi')\n")
    sys.modules.pop("amp_C", None)
    importlib.invalidate_caches()
    assert not apex_available() and "undefined symbol" in apex_problem()
    cfg = Config()
    assert not fused_layer_norm(cfg, torch.device("cuda"))  # auto leaves it out
    cfg.train.optimizer = "apex"
    with pytest.raises(ValueError, match="extensions do not load"):
        build_optimizer(make_model("open"), cfg, torch.device("cuda"))


def saved_for_backward(model, batch) -> tuple[int, dict]:
    """Bytes of the tensors the forward keeps for the backward (each storage once), and the
    outputs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    return sum(storages.values()), out


@pytest.mark.parametrize("mode", ["cnn", "all"])
def test_activation_checkpointing_changes_memory_not_results(tokenizer, mode):
    """model.activation_checkpointing recomputes the CNN (and BERT) in the backward: the same
    outputs, gradients (dropout draws included) and BatchNorm statistics as without it (each
    BatchNorm updated once per step, not again by the recomputation), for less memory kept."""
    batch = make_batch(tokenizer, "open")
    plain = make_model("open").train()
    ckpt = make_model("open", activation_checkpointing=mode).train()
    ckpt.load_state_dict(plain.state_dict())
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # the dropout draws
        kept, out = saved_for_backward(model, batch)
        loss, _ = total_loss(out, batch, "open", SiameseConfig(), model.reasoning)
        loss.backward()
        results.append((kept, out["logits"].detach(), loss.item()))
    (kept_plain, logits_plain, loss_plain), (kept_ckpt, logits_ckpt, loss_ckpt) = results
    torch.testing.assert_close(logits_ckpt, logits_plain, rtol=0, atol=0)
    assert loss_ckpt == loss_plain
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert any(n.endswith("num_batches_tracked") and int(b) == 1
               for n, b in ckpt.named_buffers())  # updated once, by the forward
    assert kept_ckpt < 0.5 * kept_plain, (kept_ckpt, kept_plain)
    # Evaluation and no-grad forwards take the plain path.
    with torch.no_grad():
        torch.testing.assert_close(ckpt.eval()(batch)["logits"], plain.eval()(batch)["logits"])



@pytest.mark.parametrize("mode", ["cnn", "all"])
def test_activation_checkpointing_off_counts_no_recomputation(tokenizer, mode):
    """bench_train's model FLOPs (MFU's numerator, "the same in every variant") are counted
    inside activation_checkpointing_off: without it they grew by the recomputation."""
    from torch.utils.flop_counter import FlopCounterMode

    from siasam_fast.model import activation_checkpointing_off

    batch = make_batch(tokenizer, "open")

    def flops(model):
        with FlopCounterMode(display=False) as counter:
            out = model(batch)
            total_loss(out, batch, "open", SiameseConfig(), model.reasoning)[0].backward()
        return counter.get_total_flops()

    plain = make_model("open").train()
    ckpt = make_model("open", activation_checkpointing=mode).train()
    assert flops(ckpt) > flops(plain)  # the recomputation
    with activation_checkpointing_off(ckpt):
        assert flops(ckpt) == flops(plain)
    assert ckpt.visual.checkpoint_cnn
    assert ckpt.text.encoder.layer[0].gradient_checkpointing == (mode == "all")


def test_mc_text_pairs_or_joins_question_and_candidate(tokenizer):
    """data.mc_text: pair = BERT's sentence pair; joined = one sentence "question candidate", as
    ClipBERT's collator builds TGIF-QA action / transition inputs."""
    from siasam_fast.training import TextEncoder

    batch = {"question": ["what color is it?"], "candidates": [["red square", "blue"]]}

    def tokens(mc_text):
        enc = TextEncoder(tokenizer, "mc", 32, mc_text)(batch)
        assert enc["input_ids"].shape[:2] == (1, 2)  # [V, M, L]
        ids = enc["input_ids"][0, 0][enc["attention_mask"][0, 0].bool()]
        return tokenizer.convert_ids_to_tokens(ids.tolist())

    question = ["what", "color", "is", "it", "?"]
    assert tokens("pair") == ["[CLS]", *question, "[SEP]", "red", "square", "[SEP]"]
    assert tokens("joined") == ["[CLS]", *question, "red", "square", "[SEP]"]
    with pytest.raises(ValueError, match="data.mc_text='both': valid values are pair, joined"):
        TextEncoder(tokenizer, "mc", 32, "both")


def test_the_token_count_before_the_cut_counts_the_longest_candidate(tokenizer):
    """`ask` notes a text cut at data.max_question_len; for multiple choice the model reads the
    question with each candidate, so a short question with a long candidate is cut too."""
    from siasam_fast.training import TextEncoder

    question, candidates = "what color is it?", ["red square", "blue " * 40]
    assert TextEncoder(tokenizer, "open", 32).tokens(question) == 7  # [CLS] 5 [SEP]
    for mc_text, extra in (("pair", 1), ("joined", 0)):  # (a pair has one [SEP] more)
        text = TextEncoder(tokenizer, "mc", 32, mc_text)
        assert text.tokens(question, candidates) == 7 + 40 + extra
        assert text.tokens(question, candidates[:1]) == 7 + 2 + extra


def test_a_candidate_is_embedded_as_segment_a_as_clipbert_embeds_text(tokenizer):
    """mc_text=pair: the tokenizer would give the candidate token type 1, but the model embeds
    every text token with type 0 (ClipBERT's text embedding, which the README and config state):
    the encoder passes no token types and the model's embedding ignores segment B's row."""
    from siasam_fast.training import TextEncoder

    batch = {"question": ["what color is it?"], "candidates": [["red square", "blue"]]}
    enc = TextEncoder(tokenizer, "mc", 32, "pair")(batch)
    assert set(enc) == {"input_ids", "attention_mask"}
    assert tokenizer("what color is it?", "red square")["token_type_ids"][-1] == 1
    model = make_model("mc")
    ids = enc["input_ids"].flatten(0, 1)
    with torch.no_grad():
        model.text.embeddings.token_type_embeddings.weight[1].add_(1.0)  # segment B: unused
    torch.testing.assert_close(model.text_embeddings(ids, enc["attention_mask"].flatten(0, 1)),
                               model.text.embeddings(input_ids=ids,
                                                     token_type_ids=torch.zeros_like(ids)))


def test_each_videos_texts_are_its_question_with_each_of_its_candidates(tokenizer):
    """TextEncoder on two videos: mc row [v, m] is video v's question paired with its candidate
    m; a video with another number of candidates is refused; open-ended questions are cut at
    max_len tokens."""
    from siasam_fast.training import TextEncoder

    batch = {"question": ["what color", "where"],
             "candidates": [["red", "blue", "green"], ["left", "right", "up"]]}
    enc = TextEncoder(tokenizer, "mc", 32, "pair")(batch)
    assert enc["input_ids"].shape[:2] == (2, 3)
    for v, question in enumerate(batch["question"]):
        for m, candidate in enumerate(batch["candidates"][v]):
            ids = enc["input_ids"][v, m][enc["attention_mask"][v, m].bool()]
            assert tokenizer.decode(ids) == f"[CLS] {question} [SEP] {candidate} [SEP]"
    with pytest.raises(ValueError, match=r"the same number of candidates, got \[2, 3\]"):
        TextEncoder(tokenizer, "mc", 32)({**batch, "candidates": [["a", "b", "c"], ["a", "b"]]})
    enc = TextEncoder(tokenizer, "open", 6)({"question": ["what is the color of the big one",
                                                         "where"]})
    assert enc["input_ids"].shape == (2, 6)
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]  # [CLS] where [SEP], padding


def _changed(a, b):
    """[V, N] bools: where two per-clip outputs differ at all (the tiny random model barely
    responds to its input, ~1e-6; rows computed from the same inputs come out bit for bit the
    same)."""
    diff = (a - b).abs()
    return diff.flatten(2).amax(2) > 0 if diff.dim() > 2 else diff > 0


@pytest.mark.parametrize("task, key", [("open", "logits"), ("mc", "scores"),
                                       ("count", "prediction")])
def test_each_clips_output_is_its_own_frames_and_its_videos_question(tokenizer, task, key):
    """Clip n of video v is scored from its own frames and video v's question: other frames for
    one clip change that clip's outputs only; another question for one video changes that
    video's clips only."""
    model = make_model(task)
    batch = make_batch(tokenizer, task)
    ref = model(batch)[key]
    moved = dict(batch)
    moved["clip_index"] = batch["clip_index"].clone()
    moved["clip_index"][1, 2] = (batch["clip_index"][1, 2] + 1) % 7
    want = torch.zeros(V, N, dtype=torch.bool)
    want[1, 2] = True
    assert _changed(model(moved)[key], ref).tolist() == want.tolist()
    asked = dict(batch)
    ids = batch["input_ids"].clone()
    ids[0, ..., 1] = tokenizer.convert_tokens_to_ids("where")
    asked["input_ids"] = ids
    want = torch.tensor([[True] * N, [False] * N])
    assert _changed(model(asked)[key], ref).tolist() == want.tolist()


def test_each_candidates_score_is_its_own_text(tokenizer):
    """Multiple choice: score [v, n, m] is candidate m's; reordering the candidates reorders
    the scores and leaves the clip features (the mean over the candidates) as they are."""
    model = make_model("mc")
    batch = make_batch(tokenizer, "mc")
    out = model(batch)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = dict(batch)
    shuffled["input_ids"] = batch["input_ids"][:, order]
    shuffled["attention_mask"] = batch["attention_mask"][:, order]
    got = model(shuffled)
    torch.testing.assert_close(got["scores"], out["scores"][..., order], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["features"], out["features"], rtol=1e-4, atol=1e-5)
    other = dict(batch)  # one candidate's text changed: its score only, and the features
    other["input_ids"] = batch["input_ids"].clone()
    other["input_ids"][0, 3, 1] = tokenizer.convert_tokens_to_ids("where")
    changed = _changed(model(other)["scores"].transpose(1, 2), out["scores"].transpose(1, 2))
    assert changed.tolist() == [[False, False, False, True], [False] * 4]
    assert not torch.allclose(model(other)["features"][0], out["features"][0])


def test_a_padded_clip_without_frames_changes_nothing(tokenizer):
    """A video with fewer clips than the batch's N (clip_mask False, no frame): the real clips'
    outputs are those of the video without it, and every output stays finite (a NaN in a masked
    clip would still poison the masked mean over clips, NaN x 0)."""
    model = make_model("open")
    batch = make_batch(tokenizer, "open")
    ref = model(batch)["logits"]
    padded = dict(batch)
    padded["frame_mask"] = batch["frame_mask"].clone()
    padded["frame_mask"][1, 2] = False
    padded["clip_mask"] = batch["clip_mask"].clone()
    padded["clip_mask"][1, 2] = False
    got = model(padded)["logits"]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1, :2], ref[1, :2])
    pooled = aggregate_clips(got, padded["clip_mask"], "mean")
    torch.testing.assert_close(pooled[1], ref[1, :2].mean(0))


def test_visual_grid_pooling_keeps_the_border_and_fits_max_grid_exactly(tokenizer):
    """model.visual_head=proj pools the grid with ceil (an odd grid keeps its last row and
    column: 5x5 -> 3x3); a grid of exactly model.max_grid rows is allowed."""
    model = make_model("open", max_grid=3)
    batch = make_batch(tokenizer, "open")
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(V, batch["frames"].shape[1], 3, 80, 80, generator=g)  # 5x5 grid
    tokens = model.visual(frames, batch["num_unique"], batch["clip_index"], batch["frame_mask"])
    assert tokens.shape[2] == 9
    model = make_model("open", max_grid=2)  # 64 px frames: a 2x2 grid
    assert model(batch)["logits"].shape == (V, N, 6)


def test_the_question_is_one_bert_segment(tokenizer):
    """The text side embeds the question as BERT does a single sentence (token type 0)."""
    model = make_model("open")
    batch = make_batch(tokenizer, "open")
    ids = batch["input_ids"]
    torch.testing.assert_close(model.text_embeddings(ids, batch["attention_mask"]),
                               model.text.embeddings(input_ids=ids))


def test_projection_head_is_g_of_the_clip_text_features(tokenizer):
    """model.projection_head: features are g(f_i) with a learned linear g, identity without."""
    batch = make_batch(tokenizer, "open")
    plain = make_model("open")(batch)["features"]
    model = make_model("open", projection_head=True)  # same seed: the same BERT and CNN
    assert isinstance(model.projection_head, torch.nn.Linear)
    torch.testing.assert_close(model(batch)["features"], model.projection_head(plain))


def test_frozen_batchnorm_normalises_as_batchnorm_in_eval_mode():
    """FrozenBatchNorm2d (model.cnn_freeze) is BatchNorm2d's eval-mode function, eps included
    (a channel of running variance 0 stays finite)."""
    from siasam_fast.model import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(4, generator=g))
        bn.bias.copy_(torch.randn(4, generator=g))
        bn.running_mean.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.tensor([0.0, 1e-5, 0.5, 2.0]))
    x = torch.randn(2, 4, 3, 3, generator=g)
    got = FrozenBatchNorm2d(bn)(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, bn(x))


def test_a_bad_head_or_answer_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_answers=0: an open-ended head needs >= 1 answer"):
        SiaSamReaModel(
            ModelConfig(), "open", num_answers=0, vocab_size=len(load_tokenizer(ModelConfig())),
            num_clips=N)
    model = SiaSamReaModel(ModelConfig(), "multi", num_answers=6,
                           vocab_size=len(load_tokenizer(ModelConfig())), num_clips=N,
                           heads={"frameqa": "open", "count": "count"})
    assert model.task_of({"head": "count"}) == "count"
    for bad in ("action", None):
        with pytest.raises(ValueError, match=rf"batch\['head'\]={bad!r}: this model's heads "
                                             r"are frameqa, count"):
            model.task_of({"head": bad} if bad else {})
