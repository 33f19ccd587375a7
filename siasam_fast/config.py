"""The run configuration: one YAML file (configs/*.yaml) plus ``--set section.key=value`` overrides.

Sections: ``data`` (annotations, manifest, decoding backend), ``sampling`` (siamese sampling,
:class:`~siasam_fast.sampling.SamplingConfig`), ``model`` (ClipBERT-like model), ``siamese`` (the
SiaSamRea loss and its ablations), ``train`` and ``eval``. Unknown keys are errors that list the
valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from siasam_fast.paths import shipped_config
from siasam_fast.sampling import SamplingConfig

TASKS = ("open", "mc", "count", "multi")
# One task of a task=multi run (data.tasks.NAME): its task and the data fields it sets for itself
STREAM_TASKS = ("open", "mc", "count")
STREAM_KEYS = ("task", "dataset", "format", "train", "val", "test", "ans2label", "num_answers",
               "min_answer_count", "options")
BACKENDS = ("auto", "pyav", "dali")
GT_CLIPS = ("anchor", "all", "pooled")
MC_LOSSES = ("hinge", "ce")
MC_TEXTS = ("pair", "joined")
AGGREGATIONS = ("mean", "max", "logsumexp")
COUNT_METRICS = ("tgif", "raw")
OPTIMIZERS = ("auto", "torch", "deepspeed", "apex")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
LAYER_NORMS = ("auto", "torch", "apex")
ACTIVATION_CHECKPOINTING = ("none", "cnn", "all")
VISUAL_HEADS = ("auto", "proj", "clipbert")
CNN_FREEZES = ("auto", "none", "batchnorm", "detectron2")
QA_HEADS = ("auto", "siasam", "clipbert")
EVAL_SPLITS = ("val", "test", "none")
FRAME_FITS = ("crop", "pad")  # siasam_fast.pipeline.transforms.FRAME_FITS


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
    min_answer_count: int = 1  # ... of answers seen at least this often in train (Just Ask: 2)
    backend: str = "auto"  # auto (DALI with a GPU and DALI installed, else pyav) | pyav | dali
    image_size: int = 224
    # How a frame becomes image_size x image_size: crop = shorter side to image_size, centre
    # square crop; pad = longer side to image_size, black at the right and bottom (ClipBERT's:
    # the whole frame is seen). Both backends; fixed per run (a resume must keep it)
    frame_fit: str = "crop"  # crop | pad
    num_workers: int = 2
    dedup: bool = True  # decode each unique frame once, gather per clip
    # DALI: training batches decoded in one pipeline iteration (its video decoder runs one
    # iteration's videos in parallel, one per thread, and waits for the slowest); 1 = each batch
    decode_group: int = 1
    # DALI gets only the stretch of each file that its frames need (packets copied by PyAV in the
    # reader processes; nothing decoded on the CPU): DALI 2.4's decoder does not seek, it decodes
    # a whole file from its first frame. On the GPU the loader checks once that NVDEC decodes a
    # trimmed clip exactly, else it hands over whole files and says why
    dali_trim: bool = True
    max_question_len: int = 32
    # Multiple choice: how a question and a candidate make one text. pair = [CLS] question [SEP]
    # candidate [SEP] (BERT's sentence pair, the longer of the two trimmed to max_question_len);
    # joined = [CLS] question candidate [SEP], one sentence, as ClipBERT fine-tunes TGIF-QA
    # action / transition (its collator joins them with a space; cut at the end). Either way every
    # text token is embedded with token type 0 (segment A), as ClipBERT embeds its text: the
    # candidate of a pair gets no segment-B embedding.
    mc_text: str = "pair"  # pair | joined
    options: dict = field(default_factory=dict)  # extra keyword arguments of the reader
    # task: multi trains one model on several tasks at once (the paper's pre-training on TGIF-QA's
    # open-ended and multiple-choice tasks): NAME -> {task: open | mc | count, and any of dataset,
    # format, train, val, test, ans2label, num_answers, min_answer_count, options}, each NAME's
    # own annotations; the other data fields (manifest, image size, ...) are shared. Empty for
    # the other tasks.
    tasks: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the readers' registry (a light import); checked here, up front and under the config's
        # key names, not only when the annotations are read (after DeepSpeed's start-up)
        from siasam_fast.data.annotations import _DATASETS

        _choice("data.dataset", self.dataset, tuple(_DATASETS))
        formats = ("auto", *_DATASETS[self.dataset].readers)
        if self.format not in formats:
            raise ValueError(f"data.format={self.format!r}: valid values for data.dataset="
                             f"{self.dataset} are {', '.join(formats)}")
        _choice("data.backend", self.backend, BACKENDS)
        _choice("data.frame_fit", self.frame_fit, FRAME_FITS)
        _at_least("data.decode_group", self.decode_group, 1, "batches per DALI iteration")
        _at_least("data.num_answers", self.num_answers, 1)
        _at_least("data.min_answer_count", self.min_answer_count, 1, "times in train")
        _at_least("data.image_size", self.image_size, 8, "pixels")
        _at_least("data.num_workers", self.num_workers, 0)
        _choice("data.mc_text", self.mc_text, MC_TEXTS)
        _at_least("data.max_question_len", self.max_question_len, 3,
                  "tokens: [CLS], at least one word, [SEP]")


@dataclass
class ModelConfig:
    visual: str = "tiny"  # tiny | resnet18 | resnet50 (random init) | a local from_pretrained dir
    text: str = "tiny"  # tiny | bert-base (random init) | a local from_pretrained directory
    tokenizer: str = ""  # a from_pretrained directory; empty: the shipped tiny vocabulary
    grid_pool: int = 2  # pooling of the visual feature grid (ClipBERT: 2x2)
    max_grid: int = 16  # rows/columns covered by the 2-D position embeddings
    dropout: float = 0.1
    projection_head: bool = False  # g() of eq. 1: a learned projection before the affinity
    # Layout of the CNN's frames and weights: channels_last (NHWC) feeds tensor-core convolutions
    # without the NCHW <-> NHWC transposes around each one; auto = channels_last on CUDA only.
    memory_format: str = "auto"  # auto | channels_last | contiguous
    # LayerNorms (BERT's): apex's FusedLayerNorm, or torch's; auto = apex on CUDA when installed
    layer_norm: str = "auto"  # auto | torch | apex
    # Recompute activations in the backward instead of keeping them (memory for time): cnn = the
    # ResNet trunk's stem and stages (most of the activation memory), all = also BERT's layers.
    activation_checkpointing: str = "none"  # none | cnn | all
    # From the CNN's feature map to grid tokens: proj = 1x1 convolution and average pooling over
    # ImageNet-normalised frames; clipbert = ClipBERT's grid encoder (3x3 convolution, max
    # pooling, ReLU) over its detectron2 trunk's input (0..255 less the pixel mean, its BGR order
    # folded into the first convolution). auto: clipbert when model.visual is a folder converted by
    # `siasam-fast weights --clipbert`, proj otherwise.
    visual_head: str = "auto"  # auto | proj | clipbert
    # What of the CNN stays fixed: batchnorm = every BatchNorm normalises with its running
    # statistics and keeps its scale and shift (detectron2's FrozenBN); detectron2 = that, and the
    # stem and first stage are not trained either (detectron2's FREEZE_AT=2, as ClipBERT trains).
    # auto: detectron2 for a converted ClipBERT folder, none otherwise.
    cnn_freeze: str = "auto"  # auto | none | batchnorm | detectron2
    # The answer head over each clip's pooled [CLS]: siasam = Linear, GELU, LayerNorm, Linear
    # (2 x hidden wide; mc and count: Linear, GELU, Linear, hidden wide); clipbert = ClipBERT's
    # classifier for every task: dropout, Linear (2 x hidden), ReLU, Linear, initialised as BERT's
    # (normal, std 0.02). auto: clipbert for a converted ClipBERT folder, siasam otherwise.
    qa_head: str = "auto"  # auto | siasam | clipbert

    def __post_init__(self) -> None:
        for key, value, presets in (("visual", self.visual, "tiny, resnet18, resnet50"),
                                    ("text", self.text, "tiny, bert-base")):
            if not value.strip():
                raise ValueError(f"model.{key} is empty: valid: {presets}, or a local folder "
                                 "saved with save_pretrained")
        _choice("model.qa_head", self.qa_head, QA_HEADS)
        _choice("model.visual_head", self.visual_head, VISUAL_HEADS)
        _choice("model.cnn_freeze", self.cnn_freeze, CNN_FREEZES)
        _choice("model.memory_format", self.memory_format, MEMORY_FORMATS)
        _choice("model.layer_norm", self.layer_norm, LAYER_NORMS)
        _choice("model.activation_checkpointing", self.activation_checkpointing,
                ACTIVATION_CHECKPOINTING)
        _at_least("model.grid_pool", self.grid_pool, 1, "1 = no pooling")
        _at_least("model.max_grid", self.max_grid, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout}: must lie in [0, 1)")


@dataclass
class SiameseConfig:
    alpha: float = 1.0  # weight of L_siamese (eq. 8); 0 is the baseline
    omega: float = 0.5  # eq. 5
    tau: float = 1.0  # affinity temperature (eq. 1 / tau)
    skg: bool = True  # False: "SKR only", uniform average over the other clips
    learn_w1: bool = True  # False: the "without W1" ablation (fixed uniform)
    learn_w2: bool = True
    detach_soft_label: bool = False  # BAKE-style stop-gradient through Q
    # L_gt on the anchor clip only, on every clip, or (pooled) once per video on the clips'
    # scores pooled by gt_pool, as ClipBERT trains with several clips (logsumexp on MSRVTT-QA)
    gt_clips: str = "anchor"  # anchor | all | pooled
    gt_pool: str = "logsumexp"  # mean | max | logsumexp (count: mean | max)
    # L_gt for multiple choice: hinge = the paper's summed pairwise hinge (sec. 3.4); ce =
    # cross-entropy over the candidates' scores, as ClipBERT fine-tunes TGIF-QA action /
    # transition (the loss of a ClipBERT baseline to compare with)
    mc_loss: str = "hinge"  # hinge | ce
    # Ramp alpha linearly from 0 over this fraction of the training steps (0: alpha from the
    # start, as the paper). For models trained from scratch, whose early guesses L_siamese would
    # lock in (docs/experiments.md section 4).
    alpha_warmup: float = 0.0
    impl: str = "auto"  # auto | triton | reference

    def __post_init__(self) -> None:
        _choice("siamese.gt_clips", self.gt_clips, GT_CLIPS)
        _choice("siamese.gt_pool", self.gt_pool, AGGREGATIONS)
        _choice("siamese.mc_loss", self.mc_loss, MC_LOSSES)
        _choice("siamese.impl", self.impl, ("auto", "triton", "reference"))
        if not 0.0 <= self.omega <= 1.0:
            raise ValueError(f"siamese.omega={self.omega}: must lie in [0, 1]")
        if self.tau <= 0:
            raise ValueError(f"siamese.tau={self.tau}: must be > 0")
        if self.alpha < 0:
            raise ValueError(f"siamese.alpha={self.alpha}: must be >= 0 (0 is the baseline)")
        if not 0.0 <= self.alpha_warmup <= 1.0:
            raise ValueError(f"siamese.alpha_warmup={self.alpha_warmup}: must lie in [0, 1] (the "
                             "fraction of the steps over which alpha ramps up from 0)")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8  # videos per process per micro-batch
    # micro-batches whose gradients add up to one optimizer step: the effective batch is
    # batch_size x grad_accum x processes. Steps (schedule, max_steps, save_every, the steps CSV)
    # count optimizer steps; an epoch's last step may take fewer micro-batches (a step's gradient
    # is the mean over its examples).
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over the first 10% of steps, then linear decay
    grad_clip: float = 1.0
    # AdamW's (torch's defaults; ClipBERT fine-tuned with 0.9, 0.98 and 1e-6, which the dataset
    # configs use)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # auto: on CUDA apex FusedAdam when apex is installed, else DeepSpeed FusedAdam (torch AdamW
    # when that cannot be built); torch AdamW elsewhere
    optimizer: str = "auto"
    seed: int = 42
    save_every: int = 0  # steps between checkpoints (0: only at each epoch end)
    keep_checkpoints: int = 2
    # also keep the checkpoint of the epoch whose evaluation (eval.split) was best, besides the
    # last keep_checkpoints (the paper reports each run's best epoch; summary.json's "best")
    keep_best: bool = True
    out_dir: str = "runs/default"
    log_every: int = 10
    max_steps: int = 0  # stop after this many steps (0: run all epochs); the lr schedule still
    # spans all epochs, so that `--resume` continues the run exactly
    # Stop once this many epochs in a row gave no better eval.split metric than the best before
    # them (0: run every epoch). The paper stops "when its validation performance stabilizes".
    # The test evaluation and summary.json follow as after the last epoch.
    early_stop: int = 0
    # auto: from the DeepSpeed config | fp32 | fp16 | bf16. Another precision than the file's
    # replaces its fp16 / bf16 blocks (fp16: dynamic loss scaling, configs/ds/'s values); the
    # file's own precision keeps its blocks (its loss-scale settings).
    precision: str = "auto"
    sync_timing: bool = False  # synchronise the GPU between phases to split the step time
    # cuDNN times its convolution algorithms once per input shape and keeps the fastest. The frames
    # per step are fixed by the sampling (37 unique a video at N=9, B=8, stride 4), so training
    # tunes once (plus the evaluation's and a last short batch's shapes).
    cudnn_benchmark: bool = True
    init_from: str = ""  # a checkpoint (tag or run directory) whose model weights start a new run
    # A run refuses an out_dir that holds another run's checkpoints or metrics (nothing of it is
    # lost by mistake); true replaces that run (its checkpoints, metrics and summary are moved to
    # replaced-<UTC time>/ there and deleted once the new run has saved its first checkpoint).
    # --resume continues it instead.
    overwrite: bool = False

    def __post_init__(self) -> None:
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.precision", self.precision, ("auto", "fp32", "fp16", "bf16"))
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.seed", self.seed, 0)
        _at_least("train.batch_size", self.batch_size, 1, "videos per process per micro-batch")
        _at_least("train.grad_accum", self.grad_accum, 1,
                  "micro-batches per optimizer step; 1 = none")
        _at_least("train.lr", self.lr, 0, "0 keeps the weights as they are")
        _at_least("train.weight_decay", self.weight_decay, 0)
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio}: must lie in [0, 1] (the "
                             "fraction of the steps spent warming up)")
        _at_least("train.grad_clip", self.grad_clip, 0, "0 = no clipping")
        for name, beta in (("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"train.{name}={beta}: must lie in [0, 1)")
        if not self.adam_eps > 0:
            raise ValueError(f"train.adam_eps={self.adam_eps}: must be > 0 (e.g. 1e-8)")
        _at_least("train.save_every", self.save_every, 0, "0 = at each epoch end only")
        _at_least("train.keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("train.log_every", self.log_every, 1)
        _at_least("train.max_steps", self.max_steps, 0, "0 = all epochs")
        _at_least("train.early_stop", self.early_stop, 0,
                  "epochs without a better evaluation; 0 = run every epoch")
        if not self.out_dir.strip():
            raise ValueError("train.out_dir is empty: name the run's folder, e.g. runs/my_run")


@dataclass
class EvalConfig:
    num_clips: int = 1  # 1: the anchor clip only (no inference cost beyond the baseline)
    aggregation: str = "mean"  # multi-clip score aggregation (ClipBERT): mean | max | logsumexp
    batch_size: int = 16
    split: str = "val"  # the split evaluated after each epoch: val | test | none
    # task=count: the answer a prediction gives, and so the MSE. tgif = the regression output
    # rounded to the nearest integer and clipped to 1..10, as the TGIF-QA Count numbers are
    # scored (HCRN's evaluation: (logits + 0.5).long().clamp(1, 10)); raw = the output itself,
    # which is then the only MSE reported (with tgif, mse_raw gives the output's beside it).
    count_metric: str = "tgif"  # tgif | raw

    def __post_init__(self) -> None:
        _choice("eval.aggregation", self.aggregation, AGGREGATIONS)
        _choice("eval.count_metric", self.count_metric, COUNT_METRICS)
        _choice("eval.split", self.split, EVAL_SPLITS)
        _at_least("eval.num_clips", self.num_clips, 1)
        _at_least("eval.batch_size", self.batch_size, 1)


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
        if self.task == "multi":
            self._check_run()  # the run's own settings first: not blamed on one of its tasks
            self._check_multi()
            return
        if self.data.tasks:
            raise ValueError(f"data.tasks lists the tasks of a task=multi run; this run's task is "
                             f"{self.task}: leave data.tasks out, or set task: multi")
        if (self.task == "count" and self.siamese.gt_clips == "pooled"
                and self.siamese.gt_pool == "logsumexp"):
            raise ValueError("siamese.gt_pool=logsumexp: task=count predicts a number per clip, "
                             "not class scores; valid for count: mean, max")
        if self.task == "count" and self.eval.aggregation == "logsumexp":
            raise ValueError("eval.aggregation=logsumexp: task=count predicts a number per clip, "
                             "not class scores (logsumexp would add log(clips) to each count); "
                             "valid for count: mean, max")
        self._check_run()

    def _check_run(self) -> None:
        """The checks of settings that are the run's whatever its task."""
        if self.train.early_stop and self.eval.split == "none":
            raise ValueError(f"train.early_stop={self.train.early_stop} needs an evaluation after "
                             "each epoch: set eval.split to val or test (or early_stop to 0)")
        if self.sampling.eval_clips != 1:
            raise ValueError(f"sampling.eval_clips={self.sampling.eval_clips}: a run's clips per "
                             "video at evaluation are set by eval.num_clips; leave "
                             "sampling.eval_clips out")

    def _check_multi(self) -> None:
        d = self.data
        if not d.tasks:
            raise ValueError("task=multi trains on several tasks at once: list them under "
                             "data.tasks, e.g. {frameqa: {task: open, dataset: tgif_frameqa, "
                             "train: ...}, action: {task: mc, dataset: tgif_action, train: ...}}")
        given = [f"data.{split}" for split in ("train", "val", "test") if getattr(d, split)]
        if given:
            raise ValueError(f"task=multi: {', '.join(given)} must be empty; each task's "
                             "annotations go under data.tasks.NAME (train, val, test)")
        streams = {name: self.stream(name) for name in d.tasks}  # each checked as a run of its own
        opens = [name for name, c in streams.items() if c.task == "open"]
        if len(opens) > 1:
            raise ValueError(f"task=multi: data.tasks {', '.join(opens)} are all open-ended; a "
                             "run has one answer vocabulary, so one open-ended task at most")
        if all(c.task == "count" for c in streams.values()):
            raise ValueError("task=multi: every task of data.tasks is count; a run selects its "
                             "best epoch by the mean accuracy of its open-ended and "
                             "multiple-choice tasks, so give at least one (or use task: count)")

    def stream(self, name: str) -> Config:
        """Task ``name`` of a task=multi run (``data.tasks.NAME``) as a run of its own: its task,
        its data fields over the run's, everything else the run's."""
        spec = self.data.tasks.get(name)
        if (not isinstance(name, str) or not name.replace("_", "").isalnum()
                or not name.isascii()):
            raise ValueError(f"data.tasks: the name {name!r} must be letters, digits and _ (it "
                             "names the task's metrics and prediction files)")
        import torch.nn  # (only here: a task=multi config's names)

        if hasattr(torch.nn.ModuleDict(), name):  # the model's heads: a ModuleDict by task name
            raise ValueError(f"data.tasks: the name {name!r} is taken by the model's heads (a "
                             "torch ModuleDict, whose attribute it is): choose another, e.g. "
                             f"{name}_task")
        if not isinstance(spec, dict):
            raise ValueError(f"data.tasks.{name} must be a mapping (task, dataset, train, ...), "
                             f"got {spec!r}")
        _reject_unknown(f"data.tasks.{name}", spec, dict.fromkeys(STREAM_KEYS))
        if spec.get("task") not in STREAM_TASKS:
            raise ValueError(f"data.tasks.{name}.task={spec.get('task')!r}: valid values are "
                             f"{', '.join(STREAM_TASKS)}")
        values = self.to_dict()
        values["task"] = spec["task"]
        values["data"] = {**values["data"], "tasks": {},
                          **{k: v for k, v in spec.items() if k != "task"}}
        try:
            return Config.from_dict(values)
        except ValueError as err:
            raise ValueError(task_message(name, str(err))) from None

    def streams(self) -> dict[str, Config]:
        """NAME -> each task's run config (task=multi), or {"": this config} for one task."""
        if self.task != "multi":
            return {"": self}
        return {name: self.stream(name) for name in self.data.tasks}

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
                _reject_unknown(name, value, {f.name: f for f in fields(SamplingConfig)})
                typed = {f.name: f for f in fields(SamplingConfig)
                         if f.type in ("int", "float", "bool", "str", "float | None")}
                value = {k: (v if k not in typed or (v is None and "None" in typed[k].type)
                             else _typed(f"sampling.{k}", v, typed[k])) for k, v in value.items()}
                try:
                    kwargs[name] = SamplingConfig.from_dict(value)
                except ValueError as err:  # its messages name the bare field: add the section
                    text = str(err)
                    field_name = text.split("=", 1)[0]
                    known = {f.name for f in fields(SamplingConfig)}
                    raise ValueError(f"sampling.{text}" if field_name in known else text) from None
            else:
                known = {f.name: f for f in fields(section_type)}
                _reject_unknown(name, value, known)
                kwargs[name] = section_type(**{
                    key: _typed(f"{name}.{key}", v, known[key]) for key, v in value.items()})
        if "task" in kwargs:
            kwargs["task"] = _typed("task", kwargs["task"], sections["task"])
        return cls(**kwargs)


_SECTIONS = {
    "data": DataConfig,
    "sampling": SamplingConfig,
    "model": ModelConfig,
    "siamese": SiameseConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# Float keys that may be infinite (tau = inf: the paper's uniform anchor draw)
_INFINITE_OK = ("sampling.preroll_temperature",)


def _typed(name: str, value: Any, f: dataclasses.Field) -> Any:
    """``value`` as the field's type (int, float, bool, str or dict), or a ValueError naming the
    key, the value and the type wanted. Numbers may come as strings: YAML reads ``1e-4`` (no dot)
    as one."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    kind = kind.removesuffix(" | None")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # --set key=1: YAML reads a number
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{name}={value!r}: expected true or false")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:  # 1e5: YAML reads it as a string, and as a float it is a whole number
                number = float(value.strip())
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise ValueError(f"{name}={value!r}: expected a whole number")
    if kind == "float":
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is not None and name in _INFINITE_OK and number == math.inf:
            return number
        if number is None or not math.isfinite(number):
            raise ValueError(f"{name}={value!r}: expected a finite number, e.g. 1e-4 or 0.5")
        return number
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name}={value!r}: expected a string")
    if kind == "dict" and not isinstance(value, dict):
        raise ValueError(f"{name}={value!r}: expected a mapping")
    return value


def task_message(name: str, text: str) -> str:
    """A message about task ``name`` of a task=multi run, its fields named where they are set:
    data.train -> data.tasks.NAME.train (and the other STREAM_KEYS); otherwise prefixed."""
    keys = "|".join(k for k in STREAM_KEYS if k != "task")
    text, count = re.subn(rf"\bdata\.({keys})\b", rf"data.tasks.{name}.\1", text)
    return text if count else f"data.tasks.{name}: {text}"


def _at_least(name: str, value: float, low: float, note: str = "") -> None:
    if value < low:
        raise ValueError(f"{name}={value}: must be >= {low}" + (f" ({note})" if note else ""))


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r}: valid values are {', '.join(valid)}")


def _reject_unknown(where: str, values: dict, known: dict) -> None:
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        guesses = [(u, close[0]) for u in unknown
                   for close in [difflib.get_close_matches(str(u), list(known), n=1)] if close]
        hint = "; did you mean " + ", ".join(
            f"{guess!r}" if len(unknown) == 1 else f"{guess!r} for {u!r}" for u, guess in guesses
        ) + "?" if guesses else ""
        raise ValueError(f"unknown key(s) {unknown} in {where}{hint}"
                         f"{' ' if guesses else '; '}valid: {sorted(known)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], the value parsed as YAML: 3, true, [5, 16])."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a plain string (e.g. a path with ': '); the field's type check follows
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    values = json.loads(json.dumps(values))  # deep copy
    for text in overrides or []:
        path, value = parse_override(text)
        raw = text.split("=", 1)[1].strip()
        if raw == "~" and _string_key(path):
            value = raw  # the home folder (expand_home), not YAML's null
        if value is not None and _string_key(path) and not raw.startswith(("'", '"')):
            # as written: YAML reads 010 as 8, 1.10 as 1.1, and cuts "runs/q #2.json" at " #"
            value = raw
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return values


def _string_key(path: list[str]) -> bool:
    """Whether an override's key (task, section.key or data.tasks.NAME.key) is a string field."""
    if path == ["task"]:
        return True
    if len(path) == 4 and path[:2] == ["data", "tasks"]:
        path = ["data", path[3]]
    if len(path) != 2 or path[0] not in _SECTIONS:
        return False
    return {f.name: f.type for f in fields(_SECTIONS[path[0]])}.get(path[1]) == "str"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (relative paths inside stay relative to the working directory)."""
    values: dict = {}
    if path:
        path = shipped_config(path)
        if path.is_dir():
            raise ValueError(f"config file {str(path)!r} is a folder; name a YAML file, e.g. "
                             "configs/synthetic.yaml")
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: " + " ".join(str(err).split())) from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file must hold a mapping of sections")
        for name, section in values.items():
            if name in _SECTIONS and not isinstance(section, dict):
                raise ValueError(f"{path}: section {name!r} must be a mapping of keys, got "
                                 f"{section!r}")
        _strings_as_written(values, yaml.compose(path.read_text(), Loader=_UniqueKeyLoader))
    return Config.from_dict(expand_home(apply_overrides(values, overrides or [])))


MERGE_TAG = "tag:yaml.org,2002:merge"
NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
YAML11_NUMBER = re.compile(r"[-+]?(0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def _strings_as_written(values: dict, node, path: tuple[str, ...] = ()) -> None:
    """String fields (``train.out_dir: 010``) keep the text written, as --set does: YAML 1.1
    reads an unquoted 010 as 8, 1.10 as 1.1 and 1:30 as 90. So do numbers only YAML 1.1 reads
    so (``train.epochs: 010`` is 10, and 1:30 is not a number)."""
    if not isinstance(node, yaml.MappingNode) or not isinstance(values, dict):
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
            continue
        key = (*path, key_node.value)
        if isinstance(value_node, yaml.MappingNode):
            _strings_as_written(values.get(key_node.value), value_node, key)
        elif (isinstance(value_node, yaml.ScalarNode) and value_node.style is None
              and value_node.tag in NUMBER_TAGS
              and (_string_key(list(key)) or YAML11_NUMBER.fullmatch(value_node.value))):
            values[key_node.value] = value_node.value


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: YAML keeps the last, so a
    section or key repeated further down the file replaced the first silently."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue  # a merge (<<: *anchor) is overridden by design; other keys: YAML's
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}): "
                    "YAML would keep only the last; give each key once", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# Keys that name files or folders: a leading ~ is the home folder, as in a shell (the shell does
# not expand it in --set train.out_dir=~/runs, nor does YAML)
PATH_KEYS = {
    "data": ("train", "val", "test", "manifest", "video_dir", "ans2label"),
    "model": ("visual", "text", "tokenizer"),
    "train": ("out_dir", "init_from"),
}
LIST_KEYS = ("train", "val", "test")  # a comma separates several files


def expand_home(values: dict) -> dict:
    """``values`` (a config's dict) with a leading ~ of each path key (PATH_KEYS) expanded."""
    def expand(key: str, value):
        if not isinstance(value, str) or "~" not in value:
            return value
        parts = value.split(",") if key in LIST_KEYS else [value]
        return ",".join(os.path.expanduser(p.strip()) if p.strip().startswith("~") else p
                        for p in parts)

    for section, keys in PATH_KEYS.items():
        node = values.get(section)
        if isinstance(node, dict):
            for key in keys:
                if key in node:
                    node[key] = expand(key, node[key])
    data = values.get("data")
    tasks = data.get("tasks") if isinstance(data, dict) else None
    for spec in tasks.values() if isinstance(tasks, dict) else ():
        if isinstance(spec, dict):
            for key in ("train", "val", "test", "ans2label"):
                if key in spec:
                    spec[key] = expand(key, spec[key])
    return values


def config_from_json(text: str) -> Config:
    """Inverse of ``json.dumps(config.to_dict())`` (checkpoints store configs this way)."""
    values = json.loads(text)
    # Fields whose default is not what a checkpoint that predates them trained with
    model = values.get("model")
    if isinstance(model, dict):
        model.setdefault("qa_head", "siasam")  # before model.qa_head: always siasam's
    fpc = values.get("sampling", {}).get("frames_per_clip")
    if isinstance(fpc, list):
        values["sampling"]["frames_per_clip"] = tuple(fpc)
    return Config.from_dict(values)
