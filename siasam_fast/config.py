"""The run configuration: one YAML file (configs/*.yaml) plus ``--set section.key=value`` overrides.

Sections: ``data`` (annotations, manifest, decoding backend), ``sampling`` (siamese sampling,
:class:`~siasam_fast.sampling.SamplingConfig`), ``model`` (ClipBERT-like model), ``siamese`` (the
SiaSamRea loss and its ablations), ``train`` and ``eval``. Unknown keys are errors that list the
valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from siasam_fast.sampling import SamplingConfig

TASKS = ("open", "mc", "count")
BACKENDS = ("auto", "pyav", "dali")
GT_CLIPS = ("anchor", "all")
AGGREGATIONS = ("mean", "max", "logsumexp")
OPTIMIZERS = ("auto", "torch", "deepspeed", "apex")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass
class DataConfig:
    dataset: str = "msrvtt_qa"  # annotation reader (siasam_fast.data.annotations registry)
    train: str = ""  # annotation file(s) of each split; a comma separates several files
    val: str = ""
    test: str = ""
    format: str = "auto"  # annotation format: auto | official | clipbert | value
    manifest: str = ""  # video manifest from `siasam-fast index` (paths inside are absolute)
    video_dir: str = ""  # re-roots the manifest's paths when the videos moved since indexing
    ans2label: str = ""  # answer vocabulary file; built from train (top-K) when empty
    num_answers: int = 1000  # K for the open-ended vocabulary built from train
    backend: str = "auto"  # auto (DALI with a GPU and DALI installed, else pyav) | pyav | dali
    image_size: int = 224
    num_workers: int = 2
    dedup: bool = True  # decode each unique frame once, gather per clip
    # DALI: training batches decoded in one pipeline iteration (its video decoder runs one
    # iteration's videos in parallel, one per thread, and waits for the slowest); 1 = each batch
    decode_group: int = 1
    max_question_len: int = 32
    options: dict = field(default_factory=dict)  # extra keyword arguments of the reader

    def __post_init__(self) -> None:
        _choice("data.backend", self.backend, BACKENDS)
        if self.decode_group < 1:
            raise ValueError(f"data.decode_group={self.decode_group}: must be >= 1 (batches per "
                             "DALI iteration)")


@dataclass
class ModelConfig:
    visual: str = "tiny"  # tiny | resnet50 (random init) | a local from_pretrained directory
    text: str = "tiny"  # tiny | bert-base (random init) | a local from_pretrained directory
    tokenizer: str = ""  # a from_pretrained directory; empty: the shipped tiny vocabulary
    grid_pool: int = 2  # pooling of the visual feature grid (ClipBERT: 2x2)
    max_grid: int = 16  # rows/columns covered by the 2-D position embeddings
    dropout: float = 0.1
    projection_head: bool = False  # g() of eq. 1: a learned projection before the affinity
    # Layout of the CNN's frames and weights: channels_last (NHWC) feeds tensor-core convolutions
    # without the NCHW <-> NHWC transposes around each one; auto = channels_last on CUDA only.
    memory_format: str = "auto"  # auto | channels_last | contiguous

    def __post_init__(self) -> None:
        _choice("model.memory_format", self.memory_format, MEMORY_FORMATS)


@dataclass
class SiameseConfig:
    alpha: float = 1.0  # weight of L_siamese (eq. 8); 0 is the baseline
    omega: float = 0.5  # eq. 5
    tau: float = 1.0  # affinity temperature (eq. 1 / tau)
    skg: bool = True  # False: "SKR only", uniform average over the other clips
    learn_w1: bool = True  # False: the "without W1" ablation (fixed uniform)
    learn_w2: bool = True
    detach_soft_label: bool = False  # BAKE-style stop-gradient through Q
    gt_clips: str = "anchor"  # L_gt on the anchor clip only or on every clip
    impl: str = "auto"  # auto | triton | reference

    def __post_init__(self) -> None:
        _choice("siamese.gt_clips", self.gt_clips, GT_CLIPS)
        _choice("siamese.impl", self.impl, ("auto", "triton", "reference"))
        if not 0.0 <= self.omega <= 1.0:
            raise ValueError(f"siamese.omega={self.omega}: must lie in [0, 1]")
        if self.tau <= 0:
            raise ValueError(f"siamese.tau={self.tau}: must be > 0")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8  # videos per process per step
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over the first 10% of steps, then linear decay
    grad_clip: float = 1.0
    optimizer: str = "auto"  # auto: DeepSpeed FusedAdam on CUDA, torch AdamW elsewhere
    seed: int = 42
    save_every: int = 0  # steps between checkpoints (0: only at each epoch end)
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    log_every: int = 10
    max_steps: int = 0  # stop after this many steps (0: run all epochs)
    precision: str = "auto"  # auto: from the DeepSpeed config | fp32 | fp16 | bf16
    sync_timing: bool = False  # synchronise the GPU between phases to split the step time
    # cuDNN times its convolution algorithms once per input shape and keeps the fastest. The frames
    # per step are fixed by the sampling (37 unique a video at N=9, B=8, stride 4), so training
    # tunes once (plus the evaluation's and a last short batch's shapes).
    cudnn_benchmark: bool = True
    init_from: str = ""  # a checkpoint (tag or run directory) whose model weights start a new run

    def __post_init__(self) -> None:
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.precision", self.precision, ("auto", "fp32", "fp16", "bf16"))


@dataclass
class EvalConfig:
    num_clips: int = 1  # 1: the anchor clip only (no inference cost beyond the baseline)
    aggregation: str = "mean"  # multi-clip score aggregation (ClipBERT): mean | max | logsumexp
    batch_size: int = 16
    split: str = "val"

    def __post_init__(self) -> None:
        _choice("eval.aggregation", self.aggregation, AGGREGATIONS)


@dataclass
class Config:
    task: str = "open"
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    siamese: SiameseConfig = field(default_factory=SiameseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        values = dict(values)
        sections = {f.name: f for f in fields(cls)}
        _reject_unknown("config", values, sections)
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            section_type = _SECTIONS.get(name)
            if section_type is None:
                kwargs[name] = value
                continue
            if not isinstance(value, dict):
                raise ValueError(f"config section {name!r} must be a mapping, got {value!r}")
            if section_type is SamplingConfig:
                kwargs[name] = SamplingConfig.from_dict(value)
            else:
                _reject_unknown(name, value, {f.name: f for f in fields(section_type)})
                kwargs[name] = section_type(**value)
        return cls(**kwargs)


_SECTIONS = {
    "data": DataConfig,
    "sampling": SamplingConfig,
    "model": ModelConfig,
    "siamese": SiameseConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r}: valid values are {', '.join(valid)}")


def _reject_unknown(where: str, values: dict, known: dict) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid: {sorted(known)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], the value parsed as YAML: 3, true, [5, 16])."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    values = json.loads(json.dumps(values))  # deep copy
    for text in overrides or []:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (relative paths inside stay relative to the working directory)."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file must hold a mapping of sections")
    return Config.from_dict(apply_overrides(values, overrides or []))


def config_from_json(text: str) -> Config:
    """Inverse of ``json.dumps(config.to_dict())`` (checkpoints store configs this way)."""
    values = json.loads(text)
    fpc = values.get("sampling", {}).get("frames_per_clip")
    if isinstance(fpc, list):
        values["sampling"]["frames_per_clip"] = tuple(fpc)
    return Config.from_dict(values)
