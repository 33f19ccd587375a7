"""``siasam-fast weights --clipbert CKPT``: ClipBERT's image-text pre-trained checkpoint as this
package's starting point, the paper's own initialisation (SiaSamRea section 4.1: "We use the
pretrained model trained on the COCO Captions and Visual Genome Captions from ClipBert as our
initial weights").

ClipBERT (github.com/jayleicn/ClipBERT) releases ``clipbert_image_text_pretrained.pt``, a plain
``state_dict`` of its ``ClipBert`` module (its ``scripts/download_pretrained.sh`` fetches it):

- ``cnn.feature.backbone.{stem,res2..res5}.*``: a detectron2 ResNet-50 (grid-feats-vqa), frozen
  BatchNorms (weight, bias, running_mean, running_var), the stride of each stage in its first 1x1
  convolution, fed BGR frames at 0..255 less the pixel mean;
- ``cnn.grid_encoder.0.weight``: a 3x3 convolution 2048 -> 768 without bias (then 2x2 max
  pooling and ReLU);
- ``transformer.bert.{embeddings,encoder,pooler}.*``: BERT-base (uncased vocabulary);
- ``transformer.bert.visual_embeddings.*``: row and column position embeddings, a one-row
  token-type embedding and a LayerNorm for the grid tokens;
- pre-training heads (``transformer.cls.*``, ITM) and detector parts, which a VideoQA model does
  not use.

This module renames those tensors into two folders that ``model.visual`` and ``model.text`` read:
the ResNet as transformers' ``ResNetModel`` (``downsample_in_bottleneck=True``, the first
convolution's input channels reordered so that it takes RGB), with the grid encoder, position
embeddings (the token-type row folded into the row embeddings: both are added to every grid
token) and LayerNorm beside it in VisualEmbeddings' names; BERT as ``BertModel`` with the
tokenizer. With those folders ``model.visual_head``, ``model.cnn_freeze`` and ``model.qa_head``
resolve (auto) to ClipBERT's: its grid encoder and input, its frozen BatchNorms, stem and first
stage, its answer classifier (not in the file: it starts fresh). The pixel mean
and BGR order need no change in the data pipelines: the model maps their ImageNet-normalised RGB
frames back (model.py, VisualEmbeddings).

Nothing else is approximated: a test builds a checkpoint with ClipBERT's names from an independent
detectron2-style implementation and checks the converted model's visual tokens and clip-text
features against it. This repository has not seen the released file itself (it is not on a
package registry); the keys and shapes follow ClipBERT's and detectron2's code.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

CNN = "cnn.feature.backbone."
GRID = "cnn.grid_encoder.0.weight"
BERT = "transformer.bert."
VISUAL_EMB = BERT + "visual_embeddings."
WRAPPERS = ("model", "model_state_dict", "state_dict")  # other saves put the state_dict under these
VISUAL_FOLDER = "clipbert-visual"
TEXT_FOLDER = "clipbert-text"
# Beside the text folder's BERT: the checkpoint it was converted from (the visual folder's marker
# says the same of the CNN), so that two folders of different conversions are never kept as one
TEXT_SOURCE = "siasam_clipbert_source.json"


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """ClipBERT's state_dict from ``path`` as fp32 tensors (its saves may hold fp16), with a
    wrapper dict or DistributedDataParallel's ``module.`` prefix removed."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--clipbert {str(path)!r} is a folder; give the checkpoint file in it "
                         "(clipbert_image_text_pretrained.pt)")
    if not path.is_file():
        raise ValueError(f"--clipbert {str(path)!r}: no such file")
    with path.open("rb") as fh:
        head = fh.read(256)
    if not head:
        raise ValueError(f"--clipbert {str(path)!r} is empty (0 bytes): delete it and download "
                         "it again (ClipBERT's script, wget -nc -O, leaves an empty file when the "
                         "download fails and keeps it on the next run)")
    if all(32 <= c < 127 or c in b"\t\r\n" for c in head):  # e.g. a server's error page
        text = " ".join(head.decode("ascii").split())[:120]
        raise ValueError(f"--clipbert {str(path)!r} is text, not a torch checkpoint (it begins "
                         f"{text!r}"
                         + (": a web server's error page?" if text.startswith("<") else "")
                         + "); download it again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch's own errors: all mean "not such a file"
        # (torch's own advice, weights_only=False, would unpickle arbitrary code: not given)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        first = re.sub(r"\x1b\[[0-9;]*m", "", first)  # torch's bold text
        # its advice: after ". In PyTorch 2.6" (older torch) or ". This file can still be loaded"
        first = re.split(r"\. (?:In PyTorch 2\.6|This file can still be loaded)", first,
                         maxsplit=1)[0]
        # a whole pickle that names a class or function: a save of objects, not of a state dict
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        hint = ("; it holds Python objects besides tensors (" + found.group(1) + "): save the "
                "weights alone, torch.save(model.state_dict(), PATH)" if found
                else "; a truncated download?")
        raise ValueError(f"--clipbert {str(path)!r} ({path.stat().st_size} bytes): not a torch "
                         f"checkpoint of tensors that loads safely ({type(err).__name__}"
                         f"{': ' + first if first else ''}){hint}") from None
    for key in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"--clipbert {str(path)!r}: holds a {type(state).__name__}, not a "
                         "state_dict")
    tensors = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            key = key[len("module."):] if key.startswith("module.") else key
            tensors[key] = value.float() if value.is_floating_point() else value
    needed = (CNN + "stem.conv1.weight", GRID, BERT + "embeddings.word_embeddings.weight")
    absent = [k for k in needed if k not in tensors]
    if absent:
        sample = ", ".join(map(str, sorted(tensors or state, key=str)[:3])) or "nothing"
        raise ValueError(f"--clipbert {str(path)!r}: not a ClipBERT checkpoint (no "
                         f"{', '.join(absent)}; its keys begin {sample})")
    return tensors


def _require(sd: dict, key: str, shape: tuple | None = None) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"ClipBERT checkpoint: {key} is missing")
    if shape is not None and tuple(sd[key].shape) != tuple(shape):
        raise ValueError(f"ClipBERT checkpoint: {key} has shape {tuple(sd[key].shape)}, "
                         f"expected {tuple(shape)}")
    return sd[key]


def resnet_from_detectron2(sd: dict[str, torch.Tensor]):
    """(transformers ResNetModel, the checkpoint keys it took) from ``cnn.feature.backbone.*``."""
    from transformers import ResNetConfig, ResNetModel

    stem = _require(sd, CNN + "stem.conv1.weight")
    if stem.dim() != 4 or stem.shape[1] != 3 or tuple(stem.shape[2:]) != (7, 7):
        raise ValueError(f"ClipBERT checkpoint: {CNN}stem.conv1.weight has shape "
                         f"{tuple(stem.shape)}, not a 7x7 RGB stem")
    blocks: dict[int, set[int]] = {}
    for key in sd:
        m = re.match(re.escape(CNN) + r"res(\d+)\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    if not stages or stages != list(range(2, 2 + len(stages))):
        raise ValueError(f"ClipBERT checkpoint: stages {[f'res{s}' for s in stages]} under "
                         f"{CNN}; expected res2, res3, ... in order")
    depths, hidden = [], []
    for s in stages:
        if sorted(blocks[s]) != list(range(len(blocks[s]))):
            raise ValueError(f"ClipBERT checkpoint: res{s} has blocks {sorted(blocks[s])}")
        depths.append(len(blocks[s]))
        out = _require(sd, f"{CNN}res{s}.0.conv3.weight")  # bottleneck blocks only
        inner = _require(sd, f"{CNN}res{s}.0.conv1.weight")
        if out.shape[0] != 4 * inner.shape[0]:
            raise ValueError(f"ClipBERT checkpoint: res{s}'s bottleneck is {inner.shape[0]} "
                             f"channels for {out.shape[0]} out; transformers' ResNet needs 1/4")
        hidden.append(out.shape[0])
    config = ResNetConfig(num_channels=3, embedding_size=stem.shape[0], hidden_sizes=hidden,
                          depths=depths, layer_type="bottleneck", hidden_act="relu",
                          downsample_in_first_stage=False, downsample_in_bottleneck=True)
    model = ResNetModel(config)
    norm = {"normalization": "norm"}
    converted, taken = {}, []
    for key, own in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] == "embedder":  # embedder.embedder.{convolution,normalization}.X
            src = "stem.conv1" + ("" if parts[2] == "convolution" else ".norm") + "." + parts[3]
        else:  # encoder.stages.S.layers.J.{layer.K|shortcut}.{convolution,normalization}.X
            s, j = int(parts[2]), int(parts[4])
            if parts[5] == "shortcut":
                conv, rest = "shortcut", parts[6:]
            else:
                conv, rest = f"conv{int(parts[6]) + 1}", parts[7:]
            src = f"res{s + 2}.{j}.{conv}" + ("" if rest[0] == "convolution" else
                                                 "." + norm[rest[0]]) + "." + rest[1]
        value = _require(sd, CNN + src, own.shape)
        if src == "stem.conv1.weight":  # detectron2 takes BGR: reorder the input channels
            value = value[:, [2, 1, 0]]
        converted[key] = value.contiguous()
        taken.append(CNN + src)
    model.load_state_dict(converted, strict=False)
    return model, taken


def bert_from_clipbert(sd: dict[str, torch.Tensor], num_heads: int | None = None):
    """(transformers BertModel, the checkpoint keys it took) from ``transformer.bert.*`` less
    its visual embeddings. ``num_heads`` (the weights do not tell): hidden / 64 by default."""
    from transformers import BertConfig, BertModel

    words = _require(sd, BERT + "embeddings.word_embeddings.weight")
    vocab, hidden = words.shape
    numbers = [int(m.group(1)) for k in sd
               if (m := re.match(re.escape(BERT) + r"encoder\.layer\.(\d+)\.", k))]
    if not numbers:
        raise ValueError(f"ClipBERT checkpoint: no {BERT}encoder.layer.* tensors")
    layers = 1 + max(numbers)
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int)
                                  or num_heads < 1):
        raise ValueError(f"--heads {num_heads}: must be an integer >= 1 (BERT's attention heads)")
    heads = num_heads if num_heads is not None else max(1, hidden // 64)
    if hidden % heads:
        raise ValueError(f"--heads {heads}: does not divide the hidden size {hidden}")
    def rows(key: str) -> int:
        return _require(sd, BERT + key).shape[0]

    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=rows("encoder.layer.0.intermediate.dense.weight"),
        max_position_embeddings=rows("embeddings.position_embeddings.weight"),
        type_vocab_size=rows("embeddings.token_type_embeddings.weight"),
        layer_norm_eps=1e-12, hidden_act="gelu")
    model = BertModel(config, add_pooling_layer=True)
    converted, taken = {}, []
    for key, own in model.state_dict().items():
        src = BERT + key
        if src not in sd:  # checkpoints of old BERT code name LayerNorm's tensors gamma / beta
            src = BERT + re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                                re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", key))
        if src not in sd and key.endswith(("position_ids", "token_type_ids")):
            continue  # index buffers: the model makes its own
        converted[key] = _require(sd, src if src in sd else BERT + key, own.shape)
        taken.append(src)
    model.load_state_dict(converted, strict=False)
    return model, taken


def visual_head(sd: dict[str, torch.Tensor], hidden: int, channels: int):
    """(VisualEmbeddings' tensors, the checkpoint keys they took): the grid encoder, the row and
    column position embeddings (the token-type row added to the rows) and the LayerNorm."""
    grid = _require(sd, GRID)
    if grid.dim() != 4 or grid.shape[:2] != (hidden, channels) or grid.shape[2:] != (3, 3):
        raise ValueError(f"ClipBERT checkpoint: {GRID} has shape {tuple(grid.shape)}, expected "
                         f"({hidden}, {channels}, 3, 3)")

    def table(name: str, rows: int | None = None) -> torch.Tensor:
        """An embedding table of ``hidden`` columns (and ``rows`` rows, where given)."""
        value = _require(sd, VISUAL_EMB + name)
        if value.dim() != 2 or value.shape[1] != hidden or rows not in (None, value.shape[0]):
            raise ValueError(f"ClipBERT checkpoint: {VISUAL_EMB}{name} has shape "
                             f"{tuple(value.shape)}, expected ({rows or 'rows'}, {hidden})")
        return value

    token_type = table("token_type_embeddings.weight", 1)[0]  # ClipBERT's: one row
    tensors = {
        "proj.weight": grid,
        "row.weight": table("row_position_embeddings.weight") + token_type,
        "col.weight": table("col_position_embeddings.weight"),
        "norm.weight": _require(sd, VISUAL_EMB + "LayerNorm.weight", (hidden,)),
        "norm.bias": _require(sd, VISUAL_EMB + "LayerNorm.bias", (hidden,)),
    }
    taken = [GRID] + [VISUAL_EMB + k for k in (
        "token_type_embeddings.weight", "row_position_embeddings.weight",
        "col_position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")]
    return {k: v.contiguous() for k, v in tensors.items()}, taken


def _left_out(sd: dict, taken: set[str]) -> str:
    """The checkpoint's tensors not carried over, counted by their first three name parts."""
    groups = Counter(".".join(k.split(".")[:3]) + (".*" if k.count(".") > 2 else "")
                     for k in sd if k not in taken)
    return ", ".join(f"{g} ({n})" for g, n in sorted(groups.items())) or "none"


def _source_id(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def convert_clipbert(ckpt: str | Path, out: str | Path, tokenizer: str, force: bool = False,
                     num_heads: int | None = None, log=print) -> dict[str, Path]:
    """:func:`_convert`; an OUT folder that it made and that stayed empty (a refused file, an
    interruption before anything was written) is removed again."""
    made = not Path(out).exists()
    try:
        return _convert(ckpt, out, tokenizer, force, num_heads, log)
    except BaseException:
        folder = Path(out)
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _convert(ckpt: str | Path, out: str | Path, tokenizer: str, force: bool = False,
             num_heads: int | None = None, log=print) -> dict[str, Path]:
    """Convert ClipBERT's checkpoint ``ckpt`` into ``out/clipbert-visual`` (model.visual) and
    ``out/clipbert-text`` (model.text, with the tokenizer of ``tokenizer``: a Hub id or a local
    folder; ClipBERT's is bert-base-uncased). Folders already converted from this same file are
    kept unless ``force`` (or ``num_heads`` differs from theirs); folders converted from another
    file are replaced only with ``force``. Returns ``{"visual": folder, "text": folder}``."""
    from safetensors.torch import save_file
    from transformers import BertTokenizerFast

    from siasam_fast.model import (
        CLIPBERT_HEAD,
        CLIPBERT_MARKER,
        TOKENIZER_FILES,
        from_pretrained_checked,
    )
    from siasam_fast.weights import _save, writable_out

    ckpt = Path(ckpt)
    if not ckpt.is_file():  # a mistyped path is said first (not the tokenizer, or OUT's folders)
        load_checkpoint(ckpt)  # raises, naming it (a folder, or no such file)
    out = writable_out(out)
    folders = {"visual": out / VISUAL_FOLDER, "text": out / TEXT_FOLDER}
    source = _source_id(ckpt)
    marker = folders["visual"] / CLIPBERT_MARKER
    if marker.is_file() and folders["text"].is_dir() and not force:
        try:
            previous = json.loads(marker.read_text(encoding="utf-8")).get("source")
        except ValueError:
            previous = None
        # an interrupted replacement (--force) leaves the new BERT beside the old CNN
        text_source = _read_source(folders["text"] / TEXT_SOURCE)
        if previous == source == text_source and _build_problem(folders) is None:
            other_heads = _other_heads(folders["text"], num_heads)
            if other_heads is None:
                log(f"{folders['visual']} and {folders['text']}: already converted from {ckpt} "
                    "(they load); kept")
                return folders
            log(f"{folders['text']}: {other_heads} (--heads): converting {ckpt} again")
        if previous is not None and previous != source:
            raise ValueError(f"{folders['visual']} was converted from {previous['path']} "
                             f"({previous['bytes']} bytes), not from this --clipbert file; "
                             "give another OUT, or --force to replace it")

    # the tokenizer first: a Hub that cannot be reached is said before the checkpoint is read
    tok = from_pretrained_checked(
        BertTokenizerFast, "--text", tokenizer, local_only=False,
        hint=(". --clipbert takes the tokenizer of ClipBERT's vocabulary (bert-base-uncased's) "
              "from --text: a Hub id, or, where the Hub cannot be reached, a local folder "
              f"holding it ({' or '.join(TOKENIZER_FILES)}): ClipBERT's "
              "scripts/download_pretrained.sh fetches one into pretrained/bert-base-uncased"))
    log(f"reading {ckpt} ...")
    sd = load_checkpoint(ckpt)
    resnet, taken_cnn = resnet_from_detectron2(sd)
    bert, taken_text = bert_from_clipbert(sd, num_heads)
    head, taken_head = visual_head(sd, bert.config.hidden_size, resnet.config.hidden_sizes[-1])
    if len(tok) != bert.config.vocab_size:
        raise ValueError(f"--text {tokenizer!r}: its tokenizer has {len(tok)} tokens, ClipBERT's "
                         f"word embeddings {bert.config.vocab_size}; give the vocabulary it was "
                         "trained with (bert-base-uncased for the released checkpoint)")
    taken = set(taken_cnn) | set(taken_text) | set(taken_head)
    left_out = _left_out(sd, taken)
    info = {"made_by": "siasam-fast weights --clipbert", "source": source,
            "visual_head": "clipbert", "cnn_freeze": "detectron2",
            "tensors_converted": len(taken), "tensors_left_out": len(sd) - len(taken)}

    def write_visual(folder: Path) -> None:
        resnet.save_pretrained(folder)
        save_file(head, str(folder / CLIPBERT_HEAD))
        (folder / CLIPBERT_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def write_text(folder: Path) -> None:
        bert.save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / TEXT_SOURCE).write_text(json.dumps({"source": source}, indent=2) + "\n",
                                          encoding="utf-8")

    _save(out, TEXT_FOLDER, write_text)  # the marker's folder last: its presence means complete
    _save(out, VISUAL_FOLDER, write_visual)
    problem = _build_problem(folders)
    if problem:
        raise ValueError(f"converted into {out}, but the package cannot build a model from it: "
                         f"{problem}")
    log(f"converted {len(taken)} tensors: ResNet (depths {resnet.config.depths}) -> "
        f"{folders['visual']}; BERT ({bert.config.num_hidden_layers} layers, hidden "
        f"{bert.config.hidden_size}, {bert.config.num_attention_heads} attention heads "
        f"({'--heads' if num_heads else 'hidden / 64: the weights do not tell; --heads sets it'}), "
        f"vocabulary {bert.config.vocab_size}) -> {folders['text']}")
    log(f"not carried over (pre-training heads, detector parts, unused embeddings): {left_out}")
    return folders


def _other_heads(folder: Path, num_heads: int | None) -> str | None:
    """How the BERT converted into ``folder`` differs from an explicit ``--heads`` (None: it
    does not, or no --heads was given)."""
    try:
        had = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        had = had["num_attention_heads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if num_heads is None or had == num_heads:
        return None
    return f"its BERT has {had} attention heads, not {num_heads}"


def _read_source(path: Path) -> dict | None:
    """The ``source`` recorded in ``path`` (None: no such file, or unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _build_problem(folders: dict[str, Path]) -> str | None:
    """Why no model builds from the two folders with ClipBERT's head loaded (None: it does;
    ``model.max_grid`` at most the rows the position embeddings have)."""
    from safetensors import safe_open

    from siasam_fast.config import ModelConfig
    from siasam_fast.model import CLIPBERT_HEAD, SiaSamReaModel, load_tokenizer

    try:
        with safe_open(str(folders["visual"] / CLIPBERT_HEAD), "pt") as f:
            rows = f.get_slice("row.weight").get_shape()[0]
        cfg = ModelConfig(visual=str(folders["visual"]), text=str(folders["text"]),
                          max_grid=max(1, min(ModelConfig.max_grid, rows)))
        tokenizer = load_tokenizer(cfg)
        SiaSamReaModel(cfg, "open", 1, len(tokenizer), 2)
    except (ValueError, OSError) as err:
        return str(err)
    return None


def config_lines(folders: dict[str, Path]) -> str:
    """The config that starts from the converted folders."""
    from siasam_fast.weights import config_lines as lines

    return (lines(folders) + "\nmodel.visual_head, model.cnn_freeze and model.qa_head (auto) "
            "then follow ClipBERT: its grid encoder and input, its frozen BatchNorms, stem and "
            "first stage, its answer classifier (Linear, ReLU, Linear; it starts fresh). "
            "ClipBERT fine-tuned on frames resized on the longer side and padded with black, "
            "at 448 px on MSRVTT-QA and 768 px on TGIF-QA: data.frame_fit: pad with "
            "data.image_size: 448 (or 768) gives it the same input.")
