"""ClipBERT's checkpoint as the starting point (siasam_fast/clipbert.py, model.visual_head,
model.cnn_freeze). The checkpoint here is a small one with ClipBERT's tensor names, and the
reference below computes what ClipBERT's modules compute from it, written from ClipBERT's and
detectron2's code (BGR input at 0..255 less the pixel mean, the stride in each stage's first
1x1 convolution, frozen BatchNorms, the grid encoder, the visual embeddings), not from this
package's."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from subprocess_env import cpu_env
from transformers import BertConfig, BertModel, ResNetModel

from siasam_fast.cli import main
from siasam_fast.clipbert import (
    bert_from_clipbert,
    convert_clipbert,
    load_checkpoint,
    resnet_from_detectron2,
    visual_head,
)
from siasam_fast.config import ModelConfig
from siasam_fast.model import FrozenBatchNorm2d, SiaSamReaModel, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)  # detectron2's MSRA R-50 (ClipBERT's, BGR order)
STEM, OUTS, DEPTHS, HIDDEN, GRID_ROWS = 8, (16, 32, 64, 128), (2, 1, 1, 1), 32, 12


def _bn(sd: dict, name: str, n: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(n, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)
    sd[f"{name}.running_mean"] = 0.1 * torch.randn(n, generator=g)
    sd[f"{name}.running_var"] = 0.5 + torch.rand(n, generator=g)


def _conv(sd: dict, name: str, out: int, inp: int, k: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = torch.randn(out, inp, k, k, generator=g) * (2.0 / (inp * k * k)) ** 0.5


def fake_clipbert(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict with ClipBERT's names (ClipBert: cnn = GridFeatBackbone over detectron2,
    transformer = ClipBertForPreTraining) and small sizes."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    b = "cnn.feature.backbone."
    _conv(sd, b + "stem.conv1", STEM, 3, 7, g)
    _bn(sd, b + "stem.conv1.norm", STEM, g)
    inp = STEM
    for s, (out, depth) in enumerate(zip(OUTS, DEPTHS)):
        mid = out // 4
        for j in range(depth):
            blk = f"{b}res{s + 2}.{j}."
            if j == 0:
                _conv(sd, blk + "shortcut", out, inp, 1, g)
                _bn(sd, blk + "shortcut.norm", out, g)
            for k, (o, i, ks) in enumerate(((mid, inp if j == 0 else out, 1), (mid, mid, 3),
                                            (out, mid, 1)), start=1):
                _conv(sd, f"{blk}conv{k}", o, i, ks, g)
                _bn(sd, f"{blk}conv{k}.norm", o, g)
        inp = out
    sd["cnn.grid_encoder.0.weight"] = 0.05 * torch.randn(HIDDEN, OUTS[-1], 3, 3, generator=g)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64, layer_norm_eps=1e-12))
    for k, v in bert.state_dict().items():
        if not k.endswith(("position_ids", "token_type_ids")):
            sd["transformer.bert." + k] = v.clone()
    ve = "transformer.bert.visual_embeddings."
    sd[ve + "position_embeddings.weight"] = torch.randn(64, HIDDEN, generator=g)  # unused there
    sd[ve + "row_position_embeddings.weight"] = torch.randn(GRID_ROWS, HIDDEN, generator=g)
    sd[ve + "col_position_embeddings.weight"] = torch.randn(GRID_ROWS, HIDDEN, generator=g)
    sd[ve + "token_type_embeddings.weight"] = torch.randn(1, HIDDEN, generator=g)
    sd[ve + "LayerNorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    sd[ve + "LayerNorm.bias"] = 0.1 * torch.randn(HIDDEN, generator=g)
    # what a VideoQA model leaves out: pre-training heads, detector parts, detectron2's buffers
    sd["transformer.cls.predictions.bias"] = torch.zeros(vocab)
    sd["transformer.cls.seq_relationship.weight"] = torch.randn(2, HIDDEN, generator=g)
    sd["cnn.feature.roi_heads.box_predictor.cls_score.weight"] = torch.randn(5, 8, generator=g)
    sd["cnn.feature.pixel_mean"] = torch.tensor(PIXEL_MEAN_BGR).view(3, 1, 1)
    return sd


# --- what ClipBERT computes (detectron2's ResNet, GridFeatBackbone, VisualInputEmbedding) -------

def _frozen_bn(x, sd, name):
    scale = sd[f"{name}.weight"] * (sd[f"{name}.running_var"] + 1e-5).rsqrt()
    shift = sd[f"{name}.bias"] - sd[f"{name}.running_mean"] * scale
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def reference_grid(sd: dict, frames: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised RGB frames [F, 3, H, W] -> ClipBERT's grid [F, h, w, hidden]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    rgb255 = (frames * std + mean) * 255  # ClipBERT's frames: RGB at 0..255
    x = rgb255 - torch.tensor(PIXEL_MEAN_BGR[::-1]).view(1, 3, 1, 1)  # its img_pixel_mean (RGB)
    x = x[:, [2, 1, 0]]  # GridFeatBackbone: RGB -> BGR
    b = "cnn.feature.backbone."
    x = F.relu(_frozen_bn(F.conv2d(x, sd[b + "stem.conv1.weight"], stride=2, padding=3), sd,
                          b + "stem.conv1.norm"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for s, depth in enumerate(DEPTHS):
        for j in range(depth):
            blk = f"{b}res{s + 2}.{j}."
            stride = 2 if (j == 0 and s > 0) else 1  # stride_in_1x1: in conv1
            out = F.relu(_frozen_bn(F.conv2d(x, sd[blk + "conv1.weight"], stride=stride), sd,
                                    blk + "conv1.norm"))
            out = F.relu(_frozen_bn(F.conv2d(out, sd[blk + "conv2.weight"], padding=1), sd,
                                    blk + "conv2.norm"))
            out = _frozen_bn(F.conv2d(out, sd[blk + "conv3.weight"]), sd, blk + "conv3.norm")
            short = x
            if blk + "shortcut.weight" in sd:
                short = _frozen_bn(F.conv2d(x, sd[blk + "shortcut.weight"], stride=stride), sd,
                                   blk + "shortcut.norm")
            x = F.relu(out + short)
    x = F.conv2d(x, sd["cnn.grid_encoder.0.weight"], padding=1)  # conv3x3, no bias
    x = F.relu(F.max_pool2d(x, kernel_size=2, stride=2))
    return x.permute(0, 2, 3, 1)


def reference_tokens(sd: dict, grid: torch.Tensor) -> torch.Tensor:
    """One clip's frames' grids [B, h, w, d] -> its visual tokens [h*w, d]."""
    ve = "transformer.bert.visual_embeddings."
    g = grid.mean(0)  # temporal mean pooling
    h, w, d = g.shape
    g = g + sd[ve + "row_position_embeddings.weight"][:h].view(h, 1, d)
    g = g + sd[ve + "col_position_embeddings.weight"][:w].view(1, w, d)
    tokens = g.reshape(h * w, d) + sd[ve + "token_type_embeddings.weight"][0]
    return F.layer_norm(tokens, (d,), sd[ve + "LayerNorm.weight"], sd[ve + "LayerNorm.bias"],
                        eps=1e-12)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipbert")
    tokenizer = load_tokenizer(ModelConfig())  # the shipped tiny vocabulary
    tok_dir = root / "tok"
    tokenizer.save_pretrained(tok_dir)
    sd = fake_clipbert(len(tokenizer))
    ckpt = root / "clipbert_image_text_pretrained.pt"
    torch.save(sd, ckpt)
    folders = convert_clipbert(ckpt, root / "weights", tokenizer=str(tok_dir), num_heads=2,
                               log=lambda *_: None)
    return {"sd": sd, "ckpt": ckpt, "tok": tok_dir, "folders": folders, "root": root,
            "vocab": len(tokenizer)}


def build(folders, **model) -> SiaSamReaModel:
    model.setdefault("max_grid", GRID_ROWS)
    cfg = ModelConfig(visual=str(folders["visual"]), text=str(folders["text"]), dropout=0.0,
                      **model)
    return SiaSamReaModel(cfg, "open", 3, len(load_tokenizer(cfg)), 2)


def clips_batch(seed: int = 1, size: int = 128):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(1, 3, 3, size, size, generator=g)  # [V, U, C, H, W], normalised
    return {"frames": frames, "num_unique": torch.tensor([3]),
            "clip_index": torch.tensor([[[0, 1], [1, 2]]]),  # 2 clips of 2 frames
            "frame_mask": torch.ones(1, 2, 2, dtype=torch.bool)}


def test_converted_visual_tokens_equal_clipberts(converted):
    model = build(converted["folders"])
    sd, batch = converted["sd"], clips_batch()
    assert model.visual.head == "clipbert"
    grids = reference_grid(sd, batch["frames"][0])  # [3, h, w, d]
    assert grids.shape[1:3] == (2, 2)  # 128 px: 4x4 after the trunk, pooled to 2x2
    want = torch.stack([reference_tokens(sd, grids[[0, 1]]), reference_tokens(sd, grids[[1, 2]])])
    for mode in ("eval", "train"):  # frozen BatchNorms: the same in training (no dropout here)
        getattr(model, mode)()
        with torch.no_grad():
            got = model.visual(batch["frames"], batch["num_unique"], batch["clip_index"],
                               batch["frame_mask"])[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_converted_clip_text_features_equal_clipberts(converted):
    """f_i = BERT's pooler over [question tokens ; clip i's visual tokens], as ClipBertBaseModel
    computes it (text embeddings with token type 0, the text mask, visual tokens all valid)."""
    sd, batch = converted["sd"], clips_batch(seed=2)
    model = build(converted["folders"]).eval()
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0]])  # [CLS] three words [SEP] and padding
    mask = (ids != 0).long()
    batch.update(input_ids=ids, attention_mask=mask, clip_mask=torch.ones(1, 2, dtype=torch.bool))
    with torch.no_grad():
        outputs = model(batch)
    got = outputs["features"][0]  # [N, hidden]
    bert = BertModel(BertConfig(vocab_size=converted["vocab"], hidden_size=HIDDEN,
                                num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64,
                                layer_norm_eps=1e-12)).eval()
    bert.load_state_dict({k[len("transformer.bert."):]: v for k, v in sd.items()
                          if k.startswith("transformer.bert.")
                          and not k.startswith("transformer.bert.visual_embeddings.")},
                         strict=False)
    grids = reference_grid(sd, batch["frames"][0])
    want = []
    with torch.no_grad():
        text = bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        for frames in ([0, 1], [1, 2]):
            vis = reference_tokens(sd, grids[frames])[None]
            hidden = torch.cat([text, vis], 1)
            keep = torch.cat([mask, torch.ones(1, vis.shape[1], dtype=torch.long)], 1)
            additive = (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min
            out = bert.encoder(hidden, attention_mask=additive).last_hidden_state
            want.append(bert.pooler(out)[0])
    want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # ClipBERT's classifier over each clip's pooled output (qa_head auto -> clipbert):
    # Linear(hidden, 2 hidden), ReLU, Linear(2 hidden, answers); dropout is off in eval
    w1, b1, w2, b2 = (model.state_dict()[f"head.{k}"] for k in
                      ("1.weight", "1.bias", "3.weight", "3.bias"))
    logits = F.relu(want @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(outputs["logits"][0], logits, rtol=1e-4, atol=1e-4)


def test_clipbert_cnn_trains_as_clipbert_did(converted):
    """cnn_freeze auto -> detectron2: BatchNorms frozen, stem and first stage not trained."""
    model = build(converted["folders"]).train()
    trunk = model.visual.trunk
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules()) == 1 + sum(
        3 * d + 1 for d in DEPTHS)
    frozen = [*trunk.embedder.parameters(), *trunk.encoder.stages[0].parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in trunk.encoder.stages[1].parameters())
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    batch = clips_batch()
    model.visual(batch["frames"], batch["num_unique"], batch["clip_index"],
                 batch["frame_mask"]).sum().backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in trunk.encoder.stages[1].parameters())
    assert all(torch.equal(v, before[k]) for k, v in trunk.state_dict().items())  # no BN update


@pytest.mark.parametrize("freeze", ["none", "batchnorm", "detectron2"])
def test_cnn_freeze_on_the_presets(freeze):
    model = SiaSamReaModel(ModelConfig(cnn_freeze=freeze), "open", 3, 50, 2).train()
    trunk = model.visual.trunk
    stem = trunk.embedder.embedder.convolution.weight
    assert model.visual.head == "proj"
    assert any(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules()) == (freeze != "none")
    assert stem.requires_grad == (freeze != "detectron2")
    assert all(p.requires_grad for p in trunk.encoder.stages[1].parameters())


def test_cli_converts_keeps_and_refuses_another_checkpoint(converted, tmp_path, capsys):
    out, tok, ckpt = tmp_path / "w", str(converted["tok"]), converted["ckpt"]
    args = ["weights", str(out), "--clipbert", str(ckpt), "--text", tok, "--heads", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"visual: {out / 'clipbert-visual'}" in printed
    assert "hidden 32, 2 attention heads (--heads), vocabulary" in printed  # not from the weights
    assert ("not carried over (pre-training heads, detector parts, unused embeddings): "
            "cnn.feature.pixel_mean (1), "
            "cnn.feature.roi_heads.* (1), transformer.bert.visual_embeddings.* (1), "
            "transformer.cls.predictions.* (1), transformer.cls.seq_relationship.* (1)") in printed
    marker = json.loads((out / "clipbert-visual" / "siasam_visual.json").read_text())
    assert marker["source"]["path"] == str(ckpt.resolve())
    assert main(args) == 0 and "kept" in capsys.readouterr().out
    other = tmp_path / "other.pt"
    torch.save(fake_clipbert(converted["vocab"], seed=5), other)
    args[3] = str(other)
    assert main(args) == 2
    assert "not from this --clipbert file" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    marker = json.loads((out / "clipbert-visual" / "siasam_visual.json").read_text())
    assert marker["source"]["path"] == str(other.resolve())
    assert not list(out.glob(".*partial"))


def test_an_fp16_checkpoint_under_a_wrapper_and_module_prefix_converts(converted, tmp_path):
    sd = converted["sd"]
    ckpt = tmp_path / "restore.pt"
    torch.save({"global_step": 3,
                "model_state_dict": {"module." + k: v.half() for k, v in sd.items()}}, ckpt)
    folders = convert_clipbert(ckpt, tmp_path / "w", tokenizer=str(converted["tok"]),
                               num_heads=2, log=lambda *_: None)
    a = build(converted["folders"]).state_dict()
    b = build(folders).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if "reasoning" in k or k.startswith(("head.", "projection_head")):
            continue  # initialised afresh by each build
        # the row embeddings hold a sum (token type folded in): rounded after, not before it
        tol = 2e-3 if k == "visual.row.weight" else 0
        torch.testing.assert_close(b[k], a[k].half().float(), rtol=tol, atol=tol, msg=k)
    # exactly: the fp16 tensors made fp32 first, then summed (not summed, and saved, in fp16)
    from safetensors.torch import load_file

    head = load_file(str(folders["visual"] / "siasam_visual_head.safetensors"))
    ve = "transformer.bert.visual_embeddings."
    assert all(v.dtype == torch.float32 for v in head.values())
    assert torch.equal(head["row.weight"], sd[ve + "row_position_embeddings.weight"].half().float()
                       + sd[ve + "token_type_embeddings.weight"][0].half().float())


def test_bad_checkpoints_and_settings_are_named(converted, tmp_path, capsys):
    tok = str(converted["tok"])
    base = ["weights", str(tmp_path / "w"), "--text", tok, "--heads", "2", "--clipbert"]
    assert main([*base, str(tmp_path / "missing.pt")]) == 2
    assert not (tmp_path / "w").exists()  # the OUT it made for nothing is gone again
    assert "missing.pt': no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main([*base, str(junk)]) == 2
    assert "not a torch checkpoint" in capsys.readouterr().err
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    assert main([*base, str(other)]) == 2
    assert "not a ClipBERT checkpoint (no cnn.feature.backbone.stem.conv1.weight" in (
        capsys.readouterr().err)
    sd = dict(converted["sd"])
    del sd["cnn.feature.backbone.res3.0.conv2.norm.running_var"]
    torch.save(sd, other)
    assert main([*base, str(other)]) == 2
    assert "res3.0.conv2.norm.running_var is missing" in capsys.readouterr().err
    # a tokenizer of another vocabulary
    small = fake_clipbert(converted["vocab"] + 3)
    torch.save(small, other)
    assert main([*base, str(other)]) == 2
    assert "tokens, ClipBERT's word embeddings" in capsys.readouterr().err
    assert main(["weights", str(tmp_path / "w"), "--clipbert", str(converted["ckpt"]),
                 "--visual", "x"]) == 2
    assert "--visual and --clipbert" in capsys.readouterr().err
    folders = converted["folders"]
    with pytest.raises(ValueError, match="valid for this folder: clipbert or auto"):
        build(folders, visual_head="proj")
    with pytest.raises(ValueError, match=r"model.max_grid=16: .* 12 rows / columns only"):
        build(folders, max_grid=16)
    plain = tmp_path / "plain"  # a ResNet folder that is not a converted one
    ResNetModel.from_pretrained(str(folders["visual"])).save_pretrained(plain)
    with pytest.raises(ValueError, match="has no siasam_visual.json"):
        build({"visual": plain, "text": folders["text"]}, visual_head="clipbert")
    assert build({"visual": plain, "text": folders["text"]}).visual.head == "proj"  # auto


def test_qa_head_auto_follows_the_folder(converted, tmp_path):
    folders = converted["folders"]
    assert isinstance(build(folders).head[2], torch.nn.ReLU)  # auto: ClipBERT's
    assert isinstance(build(folders, qa_head="siasam").head[1], torch.nn.GELU)  # asked for
    plain = tmp_path / "plain"
    ResNetModel.from_pretrained(str(folders["visual"])).save_pretrained(plain)
    assert isinstance(build({"visual": plain, "text": folders["text"]}).head[1], torch.nn.GELU)


@pytest.mark.slow
def test_training_from_the_converted_checkpoint_keeps_the_frozen_part(converted, tmp_path):
    from siasam_fast.data.synthetic import generate
    from siasam_fast.pipeline.manifest import build_manifest
    from siasam_fast.training import load_model_weights

    data = tmp_path / "synth"
    generate(data, num_videos=8, seed=3, size=64, workers=1, progress=False)
    build_manifest(data / "videos", data / "manifest.jsonl", workers=1, progress=False)
    out, ann, folders = tmp_path / "run", data / "annotations", converted["folders"]
    sets = {"data.train": ann / "train_qa.json", "data.val": ann / "val_qa.json",
            "data.test": "", "data.manifest": data / "manifest.jsonl", "data.num_workers": 0,
            "train.epochs": 1, "train.batch_size": 4, "train.out_dir": out,
            "sampling.num_clips": 3, "sampling.frames_per_clip": 4, "eval.batch_size": 8,
            "model.visual": folders["visual"], "model.text": folders["text"],
            "data.image_size": 64, "model.max_grid": GRID_ROWS}
    cmd = [sys.executable, "train.py", "--config", str(ROOT / "configs" / "synthetic.yaml")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("model: visual head clipbert (ClipBERT's grid encoder, detectron2's pixel input); the "
            "CNN's BatchNorms, stem and first stage are frozen; answer head clipbert (ClipBERT's: "
            "Linear, ReLU, Linear) (model.visual_head=auto, model.cnn_freeze=auto, "
            "model.qa_head=auto)") in proc.stdout
    assert ("; frames: data.frame_fit=crop, data.image_size=64 (ClipBERT's: pad at 448, or 768 "
            "on TGIF-QA)") in proc.stdout
    tag = (out / "checkpoints" / "latest").read_text().strip()
    trained = load_model_weights(out / "checkpoints" / tag)
    start = build(folders).state_dict()
    stem = "visual.trunk.embedder.embedder."
    for key in (stem + "convolution.weight", stem + "normalization.running_var",
                "visual.trunk.encoder.stages.3.layers.0.shortcut.normalization.running_mean"):
        assert torch.equal(trained[key], start[key]), key  # frozen: as converted
    moved = "visual.trunk.encoder.stages.1.layers.0.layer.1.convolution.weight"
    assert not torch.equal(trained[moved], start[moved])  # trained
    assert not torch.equal(trained["visual.proj.weight"], start["visual.proj.weight"])


def test_an_interrupted_replacement_is_not_kept_as_the_old_conversion(converted, tmp_path,
                                                                       monkeypatch, capsys):
    """--force from another file, stopped (Ctrl-C / SIGTERM) after the new BERT is in place but
    before the new CNN is: the same command with the first file must convert again, not keep a
    CNN of one checkpoint beside the BERT of another."""
    out, tok = tmp_path / "w", str(converted["tok"])
    first = ["weights", str(out), "--text", tok, "--heads", "2", "--clipbert"]
    assert main([*first, str(converted["ckpt"])]) == 0
    bert_a = (out / "clipbert-text" / "model.safetensors").read_bytes()
    other = tmp_path / "other.pt"
    torch.save(fake_clipbert(converted["vocab"], seed=5), other)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ResNetModel, "save_pretrained", interrupted)
        assert main([*first, str(other), "--force"]) == 130
    assert (out / "clipbert-text" / "model.safetensors").read_bytes() != bert_a  # other's BERT
    capsys.readouterr()
    assert main([*first, str(converted["ckpt"])]) == 0
    assert "kept" not in capsys.readouterr().out
    assert (out / "clipbert-text" / "model.safetensors").read_bytes() == bert_a
    assert main([*first, str(converted["ckpt"])]) == 0  # now complete: kept
    assert "kept" in capsys.readouterr().out


def test_a_failed_download_is_named_as_such(converted, tmp_path, capsys):
    """What a failed download leaves under the checkpoint's name: a server's error page, an empty
    file, a truncated one; and a folder given for the file."""
    base = ["weights", str(tmp_path / "w"), "--text", str(converted["tok"]), "--heads", "2",
            "--clipbert"]
    page = tmp_path / "page.pt"
    page.write_text('<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code>')
    assert main([*base, str(page)]) == 2
    err = capsys.readouterr().err
    assert "is text, not a torch checkpoint" in err and "error page" in err
    assert "weights_only" not in err  # torch's advice to unpickle it anyway is not passed on
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main([*base, str(empty)]) == 2
    assert "is empty (0 bytes)" in capsys.readouterr().err
    cut = tmp_path / "cut.pt"
    cut.write_bytes(converted["ckpt"].read_bytes()[:50_000])
    assert main([*base, str(cut)]) == 2
    assert "(50000 bytes): not a torch checkpoint" in capsys.readouterr().err
    assert main([*base, str(tmp_path)]) == 2
    assert "is a folder; give the checkpoint file" in capsys.readouterr().err


def test_without_text_where_the_hub_cannot_be_reached(converted, tmp_path):
    """--clipbert without --text takes bert-base-uncased's tokenizer from the Hub: where it
    cannot be reached (offline mode here), the error says so and names --text, before the
    checkpoint (about 1 GB for the released one) is read."""
    cmd = [sys.executable, "-m", "siasam_fast.cli", "weights", str(tmp_path / "w"),
           "--clipbert", str(converted["ckpt"]), "--heads", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no tokenizer vocabulary came from the Hugging Face Hub" in proc.stderr
    assert "a local folder holding it" in proc.stderr
    assert "reading" not in proc.stdout


def test_a_missing_checkpoint_is_named_before_the_tokenizer_is_fetched(tmp_path, capsys):
    """A mistyped --clipbert path is said first: before, the tokenizer was fetched first, so
    with the default --text (the Hub) on a machine without internet, or a --text folder not
    there yet, the error was about the tokenizer and never named the missing checkpoint."""
    status = main(["weights", str(tmp_path / "w"), "--clipbert", str(tmp_path / "missing.pt"),
                   "--text", str(tmp_path / "no-tokenizer-here")])
    err = capsys.readouterr().err
    assert status == 2
    assert "missing.pt': no such file" in err and "tokenizer" not in err, err
    assert not (tmp_path / "w").exists()


def test_a_pickle_of_other_objects_is_refused_without_torchs_unsafe_advice(tmp_path):
    """torch (2.13 here) begins its weights-only refusal with "Weights only load failed. This
    file can still be loaded, to do so you have two options, <bold>do those steps only if you
    trust the source...": the message quoted it, escape codes and all, and left the two options
    (one being weights_only=False, which unpickles arbitrary code) dangling."""
    import argparse

    ckpt = tmp_path / "objects.pt"
    torch.save({"args": argparse.Namespace(lr=1)}, ckpt)
    with pytest.raises(ValueError) as err:
        load_checkpoint(ckpt)
    msg = str(err.value)
    assert "not a torch checkpoint of tensors that loads safely (UnpicklingError: Weights only " \
           "load failed)" in msg, msg
    assert "\x1b" not in msg and "can still be loaded" not in msg and "weights_only" not in msg
    # the file is whole: it holds a Python object, named, and the way out is a state_dict save
    assert "holds Python objects besides tensors (argparse.Namespace)" in msg, msg
    assert "torch.save(model.state_dict(), PATH)" in msg and "truncated download" not in msg, msg


def test_entries_that_are_not_tensors_are_left_out(converted, tmp_path):
    """A save with a step count or a note beside the tensors (weights_only loads those)."""
    ckpt = tmp_path / "mixed.pt"
    torch.save({**converted["sd"], "epoch": 3, "note": "image-text"}, ckpt)
    assert load_checkpoint(ckpt).keys() == converted["sd"].keys()


def test_resnet_layouts_transformers_cannot_hold_are_named(converted):
    b, sd = "cnn.feature.backbone.", converted["sd"]

    def refused(edit, match):
        bad = dict(sd)
        edit(bad)
        with pytest.raises(ValueError, match=match):
            resnet_from_detectron2(bad)

    def drop_res3(d):
        for k in [k for k in d if k.startswith(b + "res3.")]:
            del d[k]

    def skip_a_block(d):
        for k in [k for k in d if k.startswith(b + "res2.1.")]:
            d[k.replace("res2.1.", "res2.2.")] = d.pop(k)

    refused(lambda d: d.update({b + "stem.conv1.weight": torch.zeros(STEM, 1, 7, 7)}),
            r"stem.conv1.weight has shape \(8, 1, 7, 7\), not a 7x7 RGB stem")
    refused(drop_res3, r"stages \['res2', 'res4', 'res5'\] .*; expected res2, res3, ... in order")
    refused(skip_a_block, r"res2 has blocks \[0, 2\]")
    refused(lambda d: d.update({b + "res2.0.conv1.weight": torch.zeros(OUTS[0] // 2, STEM, 1, 1)}),
            r"res2's bottleneck is 8 channels for 16 out; transformers' ResNet needs 1/4")


def test_bert_settings_the_weights_do_not_tell_and_old_layernorm_names():
    """BERT-base's settings (hidden / 64 heads, LayerNorm eps 1e-12, exact GELU), the position
    table's own length (BERT-base: 512), and the gamma / beta names of old BERT code."""
    torch.manual_seed(3)
    src = BertModel(BertConfig(vocab_size=30, hidden_size=128, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=40))
    own = src.state_dict()
    for k, v in own.items():  # LayerNorms not at ones / zeros: a swap would show
        if "LayerNorm" in k:
            v.copy_(torch.randn_like(v))
    old = {"transformer.bert." + re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                                        re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
           for k, v in own.items()}
    model, taken = bert_from_clipbert(old)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.layer_norm_eps, cfg.hidden_act,
            cfg.max_position_embeddings) == (2, 1e-12, "gelu", 40)
    assert sorted(taken) == sorted(old)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k
    with pytest.raises(ValueError, match="--heads 3: does not divide the hidden size 128"):
        bert_from_clipbert(old, num_heads=3)
    # a checkpoint of today's names without a LayerNorm's weight: named as it lacks it
    modern = {"transformer.bert." + k: v for k, v in own.items()
              if k != "embeddings.LayerNorm.weight"}
    with pytest.raises(ValueError, match=r"transformer\.bert\.embeddings\.LayerNorm\.weight is "
                                         "missing"):
        bert_from_clipbert(modern)


def test_a_grid_encoder_of_other_sizes_is_named_before_anything_is_written(converted):
    sd = dict(converted["sd"])
    sd["cnn.grid_encoder.0.weight"] = torch.zeros(HIDDEN, OUTS[-1] // 2, 3, 3)
    with pytest.raises(ValueError, match=r"cnn\.grid_encoder\.0\.weight has shape "
                                         r"\(32, 64, 3, 3\), expected \(32, 128, 3, 3\)"):
        visual_head(sd, HIDDEN, OUTS[-1])


def test_a_smaller_max_grid_takes_the_first_rows_and_columns(converted):
    """ClipBERT has 100 rows / columns; a model.max_grid below that keeps rows 0.. of them."""
    sd, ve = converted["sd"], "transformer.bert.visual_embeddings."
    visual = build(converted["folders"], max_grid=4).visual
    row = sd[ve + "row_position_embeddings.weight"] + sd[ve + "token_type_embeddings.weight"][0]
    torch.testing.assert_close(visual.row.weight.detach(), row[:4], rtol=0, atol=0)
    assert torch.equal(visual.col.weight.detach(), sd[ve + "col_position_embeddings.weight"][:4])


def test_a_conversion_that_no_longer_loads_is_converted_again(converted, tmp_path, capsys):
    out = tmp_path / "w"
    args = ["weights", str(out), "--clipbert", str(converted["ckpt"]), "--text",
            str(converted["tok"]), "--heads", "2"]
    assert main(args) == 0
    head = out / "clipbert-visual" / "siasam_visual_head.safetensors"
    head.unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "kept" not in capsys.readouterr().out
    assert head.is_file()


def test_a_refused_checkpoint_leaves_no_empty_out_behind(converted, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02 not a checkpoint")
    for out in (tmp_path / "new", tmp_path / "there"):
        if out.name == "there":
            out.mkdir()
        with pytest.raises(ValueError, match="not a torch checkpoint"):
            convert_clipbert(junk, out, tokenizer=str(converted["tok"]), num_heads=2,
                             log=lambda *_: None)
        assert out.exists() == (out.name == "there")  # one it made is removed, not another


@pytest.mark.parametrize("heads", [0, -2])
def test_heads_below_one_are_refused(converted, tmp_path, heads, capsys):
    """--heads -2 wrote num_attention_heads: -2 and said it had converted; 0 fell back to the
    default silently."""
    with pytest.raises(ValueError, match=rf"--heads {heads}: must be an integer >= 1"):
        convert_clipbert(converted["ckpt"], tmp_path / "w", tokenizer=str(converted["tok"]),
                         num_heads=heads, log=lambda *_: None)
    assert not (tmp_path / "w").exists()
    from siasam_fast.cli import main

    with pytest.raises(SystemExit):  # argparse: before anything is fetched
        main(["weights", str(tmp_path / "w"), "--clipbert", "x.pt", "--heads", str(heads)])
    assert "--heads: " in capsys.readouterr().err


@pytest.mark.parametrize("key,shape", [("row_position_embeddings.weight", (GRID_ROWS, 16)),
                                       ("col_position_embeddings.weight", (GRID_ROWS, 16)),
                                       ("token_type_embeddings.weight", (1, 16))])
def test_visual_embeddings_of_another_hidden_size_are_named_before_anything_is_written(
        converted, tmp_path, key, shape, capsys):
    """A row table of another width raised torch's RuntimeError (a traceback, exit 1); a column
    table of another width was written into OUT and only then refused."""
    sd = dict(converted["sd"])
    sd["transformer.bert.visual_embeddings." + key] = torch.zeros(shape)
    ckpt = tmp_path / "c.pt"
    torch.save(sd, ckpt)
    out = tmp_path / "w"
    assert main(["weights", str(out), "--clipbert", str(ckpt), "--text", str(converted["tok"]),
                 "--heads", "2"]) == 2
    err = capsys.readouterr().err
    assert f"visual_embeddings.{key} has shape {shape}, expected (" in err, err
    assert not out.exists()


def test_another_heads_converts_the_same_checkpoint_again(converted, tmp_path, capsys):
    """The same file again with another --heads was kept as it was ("already converted"): the
    new --heads was ignored without a word."""
    out = tmp_path / "w"
    args = ["weights", str(out), "--clipbert", str(converted["ckpt"]), "--text",
            str(converted["tok"]), "--heads", "2"]
    assert main(args) == 0
    config = out / "clipbert-text" / "config.json"
    assert json.loads(config.read_text())["num_attention_heads"] == 2
    capsys.readouterr()
    args[-1] = "4"
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kept" not in printed and "2 attention heads, not 4" in printed
    assert json.loads(config.read_text())["num_attention_heads"] == 4
    assert main(args) == 0 and "kept" in capsys.readouterr().out  # now it is what was asked
