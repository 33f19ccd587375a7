"""The ClipBERT-like VideoQA model that SiaSamRea trains (DESIGN section 2; SiaSamRea section 3.1).

Reads top to bottom: sizes and builders, the visual encoder (a ResNet trunk over each video's
unique frames, projection, 2x2 pooling, per-clip mean, 2-D position embeddings), the text
embeddings (once per video), the multimodal BERT encoder over [text ; visual] whose [CLS] output is
the clip-text feature f_i, and the three heads (open-ended classifier, multiple-choice scorer, count
regressor). The SiaSamRea reasoning module (theta1, theta2 of eq. 5) lives here too so that its
weights are trained and checkpointed with the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertModel, BertTokenizerFast, ResNetConfig, ResNetModel

from siasam_fast.config import ModelConfig
from siasam_fast.pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from siasam_fast.siamese import SiameseReasoning

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_VOCAB = ASSETS / "tiny_vocab.txt"

# Randomly initialised stand-ins: "tiny" for CPU runs and tests, the base sizes for benchmarks that
# must not download weights. A path loads real weights with from_pretrained (no network access).
VISUAL_PRESETS = {
    # 3 stages, stride 16: a 64 px frame gives a 4x4 grid (2x2 after pooling).
    "tiny": dict(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                 layer_type="basic"),
    "resnet18": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                     layer_type="basic"),
    "resnet50": dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                     layer_type="bottleneck"),
}
TEXT_PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=128),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512),
}


def _is_path(name: str) -> bool:
    return os.sep in name or Path(name).is_dir()


def _pretrained_dir(key: str, name: str, valid: str, needs: tuple[str, ...] = ()) -> str:
    """``name`` when it is a folder (from_pretrained's local files) holding one of ``needs``, else
    a ValueError naming the config key and what is valid."""
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(f"{key}={name!r}: no such folder; valid: {valid}, or a local folder "
                         f"saved with save_pretrained (if it moved: --set {key}=ITS_NEW_PLACE)")
    if needs and not any((folder / f).is_file() for f in needs):
        raise ValueError(f"{key}={name!r}: the folder holds none of {', '.join(needs)}; valid: "
                         f"{valid}, or a local folder saved with save_pretrained")
    return name


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def from_pretrained_checked(cls, key: str, source: str, local_only: bool = True,
                            hint: str = ""):
    """``cls.from_pretrained(source)``; what transformers refuses becomes a ValueError naming
    ``key`` (and ``hint``). A model (not a tokenizer) must also be of ``cls``'s kind and bring
    every one of its weights: transformers would otherwise build it silently, randomly
    initialised where the checkpoint has nothing (a BERT folder given as a ResNet, say)."""
    from transformers.utils import logging as hf_logging

    is_model = hasattr(cls, "config_class")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report: what matters is checked below
    try:
        if not is_model:
            tokenizer = cls.from_pretrained(source, local_files_only=local_only)
        else:
            # a weight of another shape is listed below, named (transformers' own refusal
            # points at its load report, which the verbosity above silences)
            model, info = cls.from_pretrained(source, local_files_only=local_only,
                                              output_loading_info=True,
                                              ignore_mismatched_sizes=True)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, safetensors' own errors...
        raise ValueError(f"{key}={source!r}: transformers could not load it as a "
                         f"{cls.__name__}: {' '.join(str(err).split())[:300]}{hint}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_model:
        # transformers 5 builds an empty tokenizer from a folder without vocab.txt /
        # tokenizer.json (every word would be [UNK])
        if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
            if not local_only and not Path(source).is_dir():  # a Hub id
                raise ValueError(f"{key}={source!r}: no tokenizer vocabulary came from the "
                                 "Hugging Face Hub (not reachable from here, offline mode, or "
                                 f"no such repository){hint}")
            raise ValueError(f"{key}={source!r}: no tokenizer vocabulary there (none of "
                             f"{', '.join(TOKENIZER_FILES)}){hint}")
        return tokenizer
    kind = cls.config_class.model_type
    found = getattr(model.config, "model_type", kind)
    # BatchNorm's batch counters are not weights (a checkpoint converted from elsewhere may
    # leave them out); anything else missing would start random.
    # BERT's pooler was trained for next-sentence prediction only: a masked-LM checkpoint
    # (BertForMaskedLM.save_pretrained) has none, and it starts fresh as in any fine-tuning.
    missing = [k for k in info.get("missing_keys") or []
               if not k.endswith("num_batches_tracked")
               and not (kind == "bert" and k.startswith("pooler."))]
    mismatched = sorted((str(k), tuple(there), tuple(here))
                        for k, there, here in info.get("mismatched_keys") or [])
    if found != kind or missing or mismatched:
        why = (f"its config is a {found!r} model, not {kind!r}" if found != kind else
               f"{len(missing)} of its weights are missing (e.g. {sorted(missing)[0]})"
               if missing else
               f"{len(mismatched)} of its weights have another shape (e.g. {mismatched[0][0]}: "
               f"{mismatched[0][1]} there, {mismatched[0][2]} in its config)")
        raise ValueError(f"{key}={source!r}: not a {cls.__name__} checkpoint: {why}{hint}")
    return model


def _from_pretrained(cls, key: str, folder: str):
    """:func:`from_pretrained_checked` of a local folder."""
    return from_pretrained_checked(cls, key, folder)


def load_tokenizer(cfg: ModelConfig) -> BertTokenizerFast:
    """The shipped tiny word-piece vocabulary, or a local from_pretrained directory."""
    if cfg.tokenizer:
        folder = _pretrained_dir("model.tokenizer", cfg.tokenizer, "empty (the tiny vocabulary)",
                                 TOKENIZER_FILES)
        return _from_pretrained(BertTokenizerFast, "model.tokenizer", folder)
    if _is_path(cfg.text):
        folder = _pretrained_dir("model.text", cfg.text, ", ".join(TEXT_PRESETS), TOKENIZER_FILES)
        return _from_pretrained(BertTokenizerFast, "model.text", folder)
    # transformers 5 ignores vocab_file= silently (every word becomes [UNK]): pass the mapping.
    words = TINY_VOCAB.read_text(encoding="utf-8").splitlines()
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


def resolve_channels_last(memory_format: str, device: torch.device | str) -> bool:
    """``model.memory_format`` on a device: auto is channels_last on CUDA, contiguous elsewhere
    (on CPU the oneDNN convolutions gain little and the tests compare against NCHW)."""
    if memory_format == "auto":
        return torch.device(device).type == "cuda"
    return memory_format == "channels_last"


def use_memory_format(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Stores the CNN trunk's 4-D weights in channels_last where ``model.memory_format`` asks for
    it on ``device``. The frames are converted in the forward either way, and a convolution with
    NHWC input and NCHW weights runs NHWC (the weight is re-laid per call, a small copy); weights
    converted once save that copy. Not for a model that DeepSpeed will wrap: its engine
    broadcasts every weight as bytes (``p.data.view(torch.uint8)``), which needs a unit last
    stride, and ZeRO 1-2 flatten the weights into contiguous buffers anyway."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisualEmbeddings) and visual.channels_last(torch.device(device)):
        visual.trunk.to(memory_format=torch.channels_last)
    return model


# apex's compiled CUDA ops behind FusedAdam (amp_C) and FusedLayerNorm (fused_layer_norm_cuda).
# A Python-only apex build (no --cuda_ext) imports both classes but refuses to construct them.
APEX_EXTENSIONS = ("amp_C", "fused_layer_norm_cuda")


def apex_problem() -> str | None:
    """Why NVIDIA apex's fused CUDA ops cannot be used here, or None when they can (apex is not
    on PyPI: never required)."""
    try:
        from apex.normalization import FusedLayerNorm  # noqa: F401
        from apex.optimizers import FusedAdam  # noqa: F401
    except ImportError:
        return "apex is not installed"
    except Exception as err:  # noqa: BLE001 - an apex built for another torch / CUDA
        text = str(err).strip()
        return f"apex does not import ({text.splitlines()[0] if text else type(err).__name__})"
    missing, broken = [], []
    for name in APEX_EXTENSIONS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
            continue
        try:  # found is not enough: built for another torch, it fails to load (undefined symbol)
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - ImportError, OSError: not usable either way
            text = str(err).strip()
            broken.append(f"{name}: {text.splitlines()[0] if text else type(err).__name__}")
    if missing:
        return (f"apex is installed without its CUDA extensions ({', '.join(missing)} missing: "
                "a Python-only build, whose FusedAdam and FusedLayerNorm refuse to run)")
    if broken:
        return (f"apex's CUDA extensions do not load ({'; '.join(broken)}): built for another "
                "torch / CUDA, rebuild apex")
    return None


def apex_available() -> bool:
    """Whether NVIDIA apex's fused CUDA ops can be used here (see :func:`apex_problem`)."""
    return apex_problem() is None


def use_apex_layer_norm(model: nn.Module) -> int:
    """Replace every ``nn.LayerNorm`` of ``model`` with apex's FusedLayerNorm, the same shape,
    eps and weights (one CUDA kernel instead of several); returns how many were replaced."""
    from apex.normalization import FusedLayerNorm

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                fused = FusedLayerNorm(child.normalized_shape, eps=child.eps,
                                       elementwise_affine=child.elementwise_affine)
                if child.elementwise_affine:
                    fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused.to(next(child.parameters()).device)
                        if child.elementwise_affine else fused)
                replaced += 1
    return replaced


def build_visual(name: str) -> ResNetModel:
    if name in VISUAL_PRESETS:
        return ResNetModel(ResNetConfig(**VISUAL_PRESETS[name]))
    if _is_path(name):
        folder = _pretrained_dir("model.visual", name, ", ".join(VISUAL_PRESETS), WEIGHT_FILES)
        return _from_pretrained(ResNetModel, "model.visual", folder)
    raise ValueError(f"model.visual={name!r}: use {', '.join(VISUAL_PRESETS)} or a local directory")


def build_text(name: str, vocab_size: int, dropout: float) -> BertModel:
    if name in TEXT_PRESETS:
        config = BertConfig(vocab_size=vocab_size, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout, **TEXT_PRESETS[name])
        return BertModel(config)
    if _is_path(name):
        folder = _pretrained_dir("model.text", name, ", ".join(TEXT_PRESETS), WEIGHT_FILES)
        return _from_pretrained(BertModel, "model.text", folder)
    raise ValueError(f"model.text={name!r}: use {', '.join(TEXT_PRESETS)} or a local directory")


# A model.visual folder converted from ClipBERT's checkpoint (siasam_fast/clipbert.py) holds, beside
# the ResNet's save_pretrained files, this marker and the weights of ClipBERT's grid encoder,
# position embeddings and LayerNorm in VisualEmbeddings' names.
CLIPBERT_MARKER = "siasam_visual.json"
CLIPBERT_HEAD = "siasam_visual_head.safetensors"
# detectron2's MSRA-style input, which ClipBERT's CNN was trained on: 0..255 less this mean (its
# img_pixel_mean, RGB order; its pixel std is 1).
CAFFE_MEAN_RGB = (123.675, 116.28, 103.53)
CLIPBERT_LAYER_NORM_EPS = 1e-12  # its visual LayerNorm's (BERT's)


def converted_visual(cfg: ModelConfig) -> dict | None:
    """The marker of a ``model.visual`` folder converted from ClipBERT, or None."""
    if not _is_path(cfg.visual):
        return None
    marker = Path(cfg.visual) / CLIPBERT_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"model.visual={cfg.visual!r}: cannot read {marker} ({err}); convert "
                         "ClipBERT's checkpoint again (siasam-fast weights --clipbert)") from None


def resolve_visual_head(cfg: ModelConfig) -> str:
    """``model.visual_head`` with auto resolved: clipbert for a converted ClipBERT folder."""
    converted = converted_visual(cfg) is not None
    head = cfg.visual_head
    if head == "auto":
        return "clipbert" if converted else "proj"
    if converted and head != "clipbert":
        raise ValueError(
            f"model.visual_head={head!r}: model.visual={cfg.visual!r} is ClipBERT's CNN "
            "(converted by `siasam-fast weights --clipbert`), trained on detectron2's input, "
            "which only ClipBERT's head gives it; valid for this folder: clipbert or auto")
    if head == "clipbert" and _is_path(cfg.visual) and not converted:
        raise ValueError(
            f"model.visual_head=clipbert: model.visual={cfg.visual!r} has no {CLIPBERT_MARKER}, "
            "so it is not ClipBERT's CNN converted by `siasam-fast weights --clipbert`, and its "
            "input is not detectron2's; valid for this folder: proj or auto")
    return head


def resolve_cnn_freeze(cfg: ModelConfig) -> str:
    """``model.cnn_freeze`` with auto resolved: detectron2 for a converted ClipBERT folder."""
    if cfg.cnn_freeze != "auto":
        return cfg.cnn_freeze
    return "detectron2" if converted_visual(cfg) is not None else "none"


def resolve_qa_head(cfg: ModelConfig) -> str:
    """``model.qa_head`` with auto resolved: clipbert for a converted ClipBERT folder."""
    if cfg.qa_head != "auto":
        return cfg.qa_head
    return "clipbert" if converted_visual(cfg) is not None else "siasam"


def build_qa_head(how: str, task: str, hidden: int, outputs: int, dropout: float) -> nn.Module:
    """The answer head over a clip's pooled [CLS] (``model.qa_head``, resolved): ``outputs``
    scores (the answers for open, 1 for mc and count)."""
    if how == "clipbert":  # ClipBERT's classifier (ClipBertForSequenceClassification / MC)
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden * 2), nn.ReLU(),
                             nn.Linear(hidden * 2, outputs))
        for layer in (head[1], head[3]):  # BERT's init, as ClipBERT's init_weights gives them
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        return head
    if task == "open":
        return nn.Sequential(nn.Linear(hidden, hidden * 2), nn.GELU(), nn.LayerNorm(hidden * 2),
                             nn.Linear(hidden * 2, outputs))
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, outputs))


class FrozenBatchNorm2d(nn.Module):
    """A BatchNorm2d that always normalises with its running statistics, its scale and shift
    buffers rather than parameters (detectron2's FrozenBN): nothing of it changes in training."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        n, self.eps = bn.num_features, bn.eps
        defaults = {"weight": torch.ones(n), "bias": torch.zeros(n),
                    "running_mean": torch.zeros(n), "running_var": torch.ones(n)}
        for name, default in defaults.items():
            value = getattr(bn, name, None)
            self.register_buffer(name, default if value is None else value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.float() * (self.running_var.float() + self.eps).rsqrt()
        shift = self.bias.float() - self.running_mean.float() * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def freeze_cnn(trunk: ResNetModel, how: str) -> None:
    """``model.cnn_freeze`` on ``trunk`` (resolved: none | batchnorm | detectron2)."""
    if how == "none":
        return
    for name, module in list(trunk.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent, _, attr = name.rpartition(".")
            setattr(trunk.get_submodule(parent) if parent else trunk, attr,
                    FrozenBatchNorm2d(module))
    if how == "detectron2":  # FREEZE_AT=2: the stem and the first stage
        for p in (*trunk.embedder.parameters(), *trunk.encoder.stages[0].parameters()):
            p.requires_grad_(False)


def real_frame_slots(num_unique: torch.Tensor, U: int, device: torch.device) -> torch.Tensor:
    """Flat indices ``v * U + u`` (u < num_unique[v]) of the real frames of a [V, U] padded batch,
    on ``device``. With ``num_unique`` on the CPU (as the loaders give it and ``to_device`` keeps
    it) they are found on the host and copied without waiting for the GPU; boolean-mask indexing
    on the GPU would synchronise the host with the device twice per forward (it must learn how
    many frames are real before it can allocate), which stops the host from queueing the text
    encoder's kernels while the CNN runs."""
    valid = torch.arange(U, device=num_unique.device)[None, :] < num_unique[:, None]  # [V, U]
    slots = valid.flatten().nonzero().squeeze(1)
    if slots.device.type == "cpu" and torch.device(device).type == "cuda":
        slots = slots.pin_memory()  # an asynchronous copy from pinned memory never waits
    return slots.to(device, non_blocking=True)


@contextlib.contextmanager
def batchnorm_stats_frozen(module: nn.Module):
    """Inside: ``module``'s BatchNorms in training mode normalise with the batch's statistics as
    usual but leave their running statistics and batch count as they were. For the recomputation
    of a checkpointed segment in the backward: its forward has updated them once already."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0  # running = (1 - 0) x running + 0 x batch
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def activation_checkpointing_off(model: nn.Module):
    """Inside: ``model`` runs without model.activation_checkpointing (no recomputation in the
    backward), e.g. to count its useful FLOPs (MFU leaves recomputation out; HFU counts it)."""
    switches = [(m, "checkpoint_cnn") for m in model.modules() if isinstance(m, VisualEmbeddings)]
    switches += [(m, "gradient_checkpointing") for m in model.modules()
                 if m is not model and getattr(m, "gradient_checkpointing", False) is True]
    saved = [(m, name, getattr(m, name)) for m, name in switches]
    for m, name, _ in saved:
        setattr(m, name, False)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def checkpointed(segment: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``segment(x)`` keeping only ``x`` for the backward, which runs ``segment`` again (torch's
    non-reentrant checkpoint: the same dropout draws; BatchNorm statistics updated once)."""
    def contexts():  # (the forward's, the recomputation's)
        return contextlib.nullcontext(), batchnorm_stats_frozen(segment)

    return checkpoint(segment, x, use_reentrant=False, context_fn=contexts)


class VisualEmbeddings(nn.Module):
    """Unique frames -> grid tokens per clip: ResNet, projection, pooling, mean over B and 2-D
    position embeddings. ``model.visual_head``: proj = a 1x1 projection and average pooling;
    clipbert = ClipBERT's grid encoder (3x3 projection without bias, max pooling, ReLU) over
    detectron2's input (ImageNet-normalised frames mapped back to 0..255 less its pixel mean)."""

    def __init__(self, trunk: ResNetModel, hidden: int, cfg: ModelConfig):
        super().__init__()
        self.trunk = trunk
        self.head = resolve_visual_head(cfg)
        freeze_cnn(trunk, resolve_cnn_freeze(cfg))
        channels = trunk.config.hidden_sizes[-1]
        if self.head == "clipbert":
            self.proj = nn.Conv2d(channels, hidden, kernel_size=3, padding=1, bias=False)
            self.norm = nn.LayerNorm(hidden, eps=CLIPBERT_LAYER_NORM_EPS)
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            self.register_buffer("pixel_scale", (255 * std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_shift", (255 * mean - torch.tensor(CAFFE_MEAN_RGB))
                                 .view(1, 3, 1, 1), persistent=False)  # fmt: skip
        else:
            self.proj = nn.Conv2d(channels, hidden, kernel_size=1)
            self.norm = nn.LayerNorm(hidden)
        self.pool = cfg.grid_pool
        self.row = nn.Embedding(cfg.max_grid, hidden)
        self.col = nn.Embedding(cfg.max_grid, hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.max_grid = cfg.max_grid
        self.memory_format = cfg.memory_format
        self.checkpoint_cnn = cfg.activation_checkpointing in ("cnn", "all")
        if converted_visual(cfg) is not None:
            self.load_converted_head(Path(cfg.visual) / CLIPBERT_HEAD)

    def load_converted_head(self, path: Path) -> None:
        """The grid encoder, position embeddings and LayerNorm of a converted ClipBERT folder."""
        from safetensors.torch import load_file

        if not path.is_file():
            raise ValueError(f"model.visual: {path} is missing; convert ClipBERT's checkpoint "
                             "again with `siasam-fast weights --clipbert`")
        saved = load_file(str(path))
        for key in ("row.weight", "col.weight"):  # ClipBERT has 100 rows / columns
            if key in saved and saved[key].shape[0] < self.max_grid:
                raise ValueError(f"model.max_grid={self.max_grid}: {path} has position "
                                 f"embeddings for {saved[key].shape[0]} rows / columns only; "
                                 f"valid: at most {saved[key].shape[0]}")
            if key in saved:
                saved[key] = saved[key][: self.max_grid]
        own = self.state_dict()
        wanted = ("proj.weight", "row.weight", "col.weight", "norm.weight", "norm.bias")
        problems = [f"{k}: missing" for k in wanted if k not in saved]
        problems += [f"{k}: {tuple(saved[k].shape)} there, {tuple(own[k].shape)} here"
                     for k in wanted if k in saved and saved[k].shape != own[k].shape]
        if problems:
            raise ValueError(f"model.visual: {path} does not fit this model (its text side sets "
                             "the hidden size: use the BERT converted with it as model.text): "
                             + "; ".join(problems))  # fmt: skip
        self.load_state_dict({k: saved[k].to(own[k].dtype) for k in wanted}, strict=False)

    def channels_last(self, device: torch.device) -> bool:
        """Whether frames go through the CNN in channels_last (NHWC) layout on ``device``."""
        return resolve_channels_last(self.memory_format, device)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[F, C, H, W] -> [F, hidden, h, w]: each unique frame goes through the CNN once."""
        if self.channels_last(frames.device):
            # Every convolution, BatchNorm, ReLU and residual add keeps the layout, so the whole
            # trunk runs NHWC (cuDNN's tensor-core kernels need no transposes around each conv).
            frames = frames.contiguous(memory_format=torch.channels_last)
        if self.head == "clipbert":  # back to 0..255, less detectron2's pixel mean
            frames = frames * self.pixel_scale.to(frames.dtype) + self.pixel_shift.to(frames.dtype)
        if self.checkpoint_cnn and self.training and torch.is_grad_enabled():
            # model.activation_checkpointing: the stem and each stage keep only their input for
            # the backward (ResNetModel's forward, less its unused pooler)
            x = checkpointed(self.trunk.embedder, frames)
            for stage in self.trunk.encoder.stages:
                x = checkpointed(stage, x)
        else:
            x = self.trunk(pixel_values=frames).last_hidden_state
        x = self.proj(x)
        if self.head == "clipbert":  # ClipBERT's grid encoder: max pooling (floor), then ReLU
            if self.pool > 1:
                x = F.max_pool2d(x, self.pool)
            return F.relu(x)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool, ceil_mode=True)
        return x

    def forward(self, frames, num_unique, clip_index, frame_mask) -> torch.Tensor:
        """frames [V, U, C, H, W] -> tokens [V, N, h*w, hidden] (one grid per clip)."""
        V, U = frames.shape[:2]
        slots = real_frame_slots(num_unique, U, frames.device)  # [F]: padding never encoded
        feats = self.encode_frames(frames.flatten(0, 1).index_select(0, slots))
        grid = feats.new_zeros(V * U, *feats.shape[1:]).index_copy(0, slots, feats)
        grid = grid.view(V, U, *feats.shape[1:])  # [V, U, hidden, h, w], zeros at padding
        # Gather every clip's B frames through the index map, mean over the valid ones.
        per_clip = grid[torch.arange(V, device=frames.device)[:, None, None], clip_index]
        weights = frame_mask.to(per_clip.dtype)[..., None, None, None]
        per_clip = (per_clip * weights).sum(2) / weights.sum(2).clamp_min(1)  # [V, N, hid, h, w]
        V, N, hidden, h, w = per_clip.shape
        if h > self.max_grid or w > self.max_grid:
            raise ValueError(
                f"visual grid {h}x{w} exceeds model.max_grid={self.max_grid}: raise max_grid, "
                "grid_pool, or lower data.image_size"
            )
        tokens = per_clip.flatten(3).transpose(2, 3)  # [V, N, h*w, hidden]
        cells = torch.arange(h * w, device=frames.device)  # row-major, as flatten(3) orders them
        rows, cols = cells // w, cells % w
        tokens = tokens + self.row(rows) + self.col(cols)
        return self.drop(self.norm(tokens))


class SiaSamReaModel(nn.Module):
    """ClipBERT-like model: f_i = [CLS]( BERT([question ; clip i]) ); heads per task."""

    def __init__(self, cfg: ModelConfig, task: str, num_answers: int, vocab_size: int,
                 num_clips: int, siamese_kwargs: dict | None = None,
                 heads: dict[str, str] | None = None):
        """``task`` open / mc / count: one head (``head``); multi: one head per task of ``heads``
        (NAME -> open / mc / count; ``heads.NAME``), the rest shared, and each batch names the
        head it trains or asks (``batch["head"]``)."""
        super().__init__()
        self.head_tasks = dict(heads or {}) if task == "multi" else {}
        if task == "multi" and not self.head_tasks:
            raise ValueError("task=multi: give the heads, NAME -> open / mc / count")
        if num_answers < 1 and (task == "open" or "open" in self.head_tasks.values()):
            raise ValueError(f"num_answers={num_answers}: an open-ended head needs >= 1 answer")
        self.task = task
        self.text = build_text(cfg.text, vocab_size, cfg.dropout)
        if cfg.activation_checkpointing == "all":  # BERT's layers recomputed in the backward
            enable = getattr(self.text, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers 5.x
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # 4.x
                self.text.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        hidden = self.text.config.hidden_size
        self.visual = VisualEmbeddings(build_visual(cfg.visual), hidden, cfg)
        # g() of eq. 1: identity by default, a learned projection when asked for.
        self.projection_head = nn.Linear(hidden, hidden) if cfg.projection_head else nn.Identity()
        # one score per answer for open; per (question + candidate) for mc; one number for count
        how = resolve_qa_head(cfg)
        if self.head_tasks:
            self.heads = nn.ModuleDict({
                name: build_qa_head(how, kind, hidden, num_answers if kind == "open" else 1,
                                    cfg.dropout) for name, kind in self.head_tasks.items()})
        else:
            self.head = build_qa_head(how, task, hidden, num_answers if task == "open" else 1,
                                      cfg.dropout)
        self.reasoning = SiameseReasoning(num_clips, **(siamese_kwargs or {}))

    def task_of(self, batch: dict) -> str:
        """The task a batch is (open / mc / count): task=multi, its head's (``batch["head"]``)."""
        if not self.head_tasks:
            return self.task
        name = batch.get("head")
        if name not in self.head_tasks:
            raise ValueError(f"batch['head']={name!r}: this model's heads are "
                             f"{', '.join(self.head_tasks)}")
        return self.head_tasks[name]

    def text_embeddings(self, input_ids, attention_mask) -> torch.Tensor:
        """Question tokens embedded once per video (reused by its N clips)."""
        types = torch.zeros_like(input_ids)
        return self.text.embeddings(input_ids=input_ids, token_type_ids=types)

    def forward(self, batch: dict) -> dict:
        """Returns ``features`` [V, N, D] (clip-text features after g) and, per task, ``logits``
        [V, N, K] (open), ``scores`` [V, N, M] (mc) or ``prediction`` [V, N] (count)."""
        frames = batch["frames"]
        visual = self.visual(frames, batch["num_unique"], batch["clip_index"], batch["frame_mask"])
        V, N, G, H = visual.shape
        ids, mask = batch["input_ids"], batch["attention_mask"]
        M = ids.shape[1] if ids.dim() == 3 else 1  # candidates per question (mc)
        ids, mask = ids.reshape(V * M, -1), mask.reshape(V * M, -1)
        text = self.text_embeddings(ids, mask)  # [V*M, L, H]
        L = text.shape[1]
        # Every (candidate, clip) pair: [text ; visual tokens of the clip].
        text = text.view(V, M, 1, L, H).expand(V, M, N, L, H)
        vis = visual.view(V, 1, N, G, H).expand(V, M, N, G, H)
        hidden = torch.cat([text, vis], dim=3).reshape(V * M * N, L + G, H)
        clip_mask = batch["clip_mask"].view(V, 1, N, 1).expand(V, M, N, G)
        keys = torch.cat([mask.view(V, M, 1, L).expand(V, M, N, L).bool(), clip_mask], dim=3)
        keys = keys.reshape(V * M * N, 1, 1, L + G)
        additive = torch.zeros(keys.shape, dtype=hidden.dtype, device=hidden.device)
        additive = additive.masked_fill(~keys, torch.finfo(hidden.dtype).min)
        out = self.text.encoder(hidden, attention_mask=additive).last_hidden_state
        cls = out[:, 0]
        if self.text.pooler is not None:
            cls = self.text.pooler(out)
        cls = cls.view(V, M, N, H)
        result = {"features": self.projection_head(cls.mean(1))}  # mc: mean over candidates
        task = self.task_of(batch)
        head = (self.heads[batch["head"]] if self.head_tasks else self.head)(cls)
        if task == "open":
            result["logits"] = head[:, 0]  # [V, N, K]
        elif task == "mc":
            result["scores"] = head[..., 0].transpose(1, 2)  # [V, N, M]
        else:
            result["prediction"] = head[:, 0, :, 0]  # [V, N]
        return result


def task_scores(outputs: dict, task: str) -> torch.Tensor:
    """The per-clip prediction tensor the siamese loss and evaluation read."""
    return outputs[{"open": "logits", "mc": "scores", "count": "prediction"}[task]]


# TGIF-QA's repetition counts lie in 1..10; the Count numbers published for it (HCRN's
# evaluation, which the later works follow) round the regression output to the nearest integer
# and clip it to that range before the squared error.
COUNT_RANGE = (1, 10)


def count_answer(prediction: torch.Tensor, how: str = "tgif") -> torch.Tensor:
    """The count a regression output answers (``eval.count_metric``): tgif = floor(x + 0.5)
    clipped to 1..10 (HCRN's ``(logits + 0.5).long().clamp(min=1, max=10)``); raw = x."""
    if how == "raw":
        return prediction
    if how != "tgif":
        raise ValueError(f"eval.count_metric={how!r}: valid values are tgif, raw")
    return (prediction + 0.5).floor().clamp(*COUNT_RANGE)


def aggregate_clips(scores: torch.Tensor, clip_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Combine per-clip scores [V, E, ...] over valid clips (ClipBERT's multi-clip inference)."""
    mask = clip_mask.view(*clip_mask.shape, *([1] * (scores.dim() - 2)))
    if how == "mean":
        w = mask.to(scores.dtype)
        return (scores * w).sum(1) / w.sum(1).clamp_min(1)
    filled = scores.masked_fill(~mask, float("-inf"))
    if how == "max":
        return filled.max(1).values
    if how == "logsumexp":
        return filled.logsumexp(1)
    raise ValueError(f"aggregation={how!r}: valid values are mean, max, logsumexp")
