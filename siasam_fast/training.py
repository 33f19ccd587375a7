"""Training with DeepSpeed: ``deepspeed train.py --deepspeed_config configs/ds/... --config ...``.

The same entry point runs as one CPU process without a launcher (``python train.py --config ...``:
gloo, fp32, torch AdamW), under ``torchrun`` / ``deepspeed`` with several processes, and on GPUs
with ZeRO 0-3 in fp16 (dynamic loss scaling, V100) or bf16 (Ampere and newer).

The loop reads top to bottom in :func:`main`: set-up, data, model, optimizer and schedule,
``deepspeed.initialize``, resume, then per step forward -> L = alpha * L_siamese + L_gt (eq. 8)
-> ``engine.backward`` -> ``engine.step``; evaluation after each epoch; checkpoints every
``train.save_every`` steps and at each epoch end.

Checkpoints (``<out_dir>/checkpoints/<tag>/``) hold DeepSpeed's files (model, optimizer, scheduler,
loss scaler) plus ``run_state.json`` (config, step, epoch, sampler position) and one
``rng_rank<r>.json`` per rank: JSON, so resuming never unpickles anything of ours.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():  # must precede `import deepspeed`
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from siasam_fast import ds_config, siamese  # noqa: E402
from siasam_fast.config import Config, config_from_json, load_config, task_message  # noqa: E402
from siasam_fast.data.annotations import load_annotations  # noqa: E402
from siasam_fast.data.vocab import (  # noqa: E402
    apply_answer_vocab,
    build_answer_vocab,
    encode_answer,
    load_ans2label,
    save_ans2label,
)
from siasam_fast.extlock import FUSED_ADAM, watch_build_lock  # noqa: E402
from siasam_fast.losses import alpha_at, total_loss  # noqa: E402
from siasam_fast.model import (  # noqa: E402
    SiaSamReaModel,
    aggregate_clips,
    apex_available,
    apex_problem,
    count_answer,
    load_tokenizer,
    task_scores,
    use_apex_layer_norm,
    use_memory_format,
)
from siasam_fast.paths import (  # noqa: E402
    USAGE_ERRORS,
    FolderLock,
    file_in_the_way,
    fsync_tree,
    json_nulls,
    lock_folder,
    packaged_config,
    write_text_atomic,
)
from siasam_fast.pipeline.dataset import close_loaders, shard_length  # noqa: E402
from siasam_fast.pipeline.loaders import build_video_loader  # noqa: E402
from siasam_fast.pipeline.manifest import load_manifest, require_manifest_file  # noqa: E402
from siasam_fast.pipeline.multitask import MultiTaskLoader  # noqa: E402
from siasam_fast.runs import (  # noqa: E402
    _number,
    best_epoch,
    best_line,
    early_stop_reason,
    kept_best_tag,
    task_metric,
)
from siasam_fast.stopping import CHECK_EVERY, Stopped, StopRequest, stop_raises  # noqa: E402

# Config fields that may change between a checkpoint and the run resuming (or evaluating) it.
RESUMABLE_CHANGES = {
    "train.epochs", "train.max_steps", "train.out_dir", "train.log_every", "train.save_every",
    "train.keep_checkpoints", "train.keep_best", "train.early_stop", "train.sync_timing",
    "train.init_from",
    "data.num_workers",
    "train.cudnn_benchmark", "data.decode_group", "data.dali_trim", "data.dedup",
    "train.overwrite",
    "data.backend", "model.layer_norm",
    "data.manifest", "data.video_dir", "data.train", "data.val", "data.test", "eval.batch_size",
    "eval.num_clips", "eval.aggregation", "eval.split", "eval.count_metric", "siamese.impl",
    "model.memory_format",
    "model.activation_checkpointing",
    "sampling.eval_placement",  # where the evaluation clips go: evaluation only, as eval.num_clips
}


# ------------------------------------------------------------------------------------------------
# Set-up


class DropBuildNote:
    """``stream``, but for DeepSpeed's "DeepSpeed OP built successfully" lines (a print: the text,
    then its newline); everything else is written through at once."""

    NOTE = re.compile(r"DeepSpeed \S+ built successfully")

    def __init__(self, stream):
        self._stream, self._held = stream, ""

    def write(self, text: str) -> int:
        held, self._held = self._held, ""
        if held and text == "\n":  # the note's whole line: dropped
            return len(text)
        if held:
            self._stream.write(held)
        if self.NOTE.fullmatch(text):  # held until the next write says whether its line ends
            self._held = text
            return len(text)
        return self._stream.write(text)

    def flush(self) -> None:
        if self._held:
            self._stream.write(self._held)
            self._held = ""
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
JOIN_NOTE_S = 30.0  # a process still waiting for the others after this long says so


def _port_free(port: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(port)))
        return True
    except (OSError, ValueError, OverflowError):
        return False


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size, device. A lone process gets the env a launcher would have set."""
    if "RANK" not in os.environ:  # python train.py: no launcher
        port = os.environ.get("MASTER_PORT")
        if port is None or not _port_free(port):
            if port is not None:
                print(f"note: MASTER_PORT={port} (from the environment) is in use or not a "
                      "port; this lone process takes a free one", file=sys.stderr)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = str(s.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=port)
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:  # (DeepSpeed would then look for MPI: "No module named 'mpi4py'")
        raise ValueError(
            f"RANK={os.environ['RANK']} is set but {', '.join(missing)} not: a launcher "
            "(torchrun, deepspeed) sets all of " + ", ".join(LAUNCHER_ENV) + " for each "
            "process; set them all, start the processes with a launcher (README: Training, "
            "Slurm), or unset RANK to train in one process")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and local >= torch.cuda.device_count():  # (DeepSpeed binds NCCL to cuda:LOCAL_RANK)
        raise ValueError(
            f"LOCAL_RANK={local}, but this process sees {torch.cuda.device_count()} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): each "
            "process takes the GPU of its LOCAL_RANK among the node's GPUs, so every process "
            "must see all of them, as the deepspeed launcher and torchrun give them; a scheduler "
            "that binds one GPU per task (Slurm's --gpus-per-task, --gpu-bind) gives each only "
            "its own: start one torchrun per node instead (README: Slurm)")
    if not dist.is_initialized():
        # on CPU, DeepSpeed builds (or loads) its shared-memory all-reduce op here, and prints
        # "DeepSpeed ... built successfully" each time (a print, no logging level to quiet it):
        # that one line is dropped, anything else it prints passes
        where = (f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, process "
                 f"{os.environ['RANK']} of WORLD_SIZE={os.environ['WORLD_SIZE']}")
        note = threading.Timer(JOIN_NOTE_S, lambda: print(
            f"note: still starting after {JOIN_NOTE_S:.0f} s at {where}: waiting for the other "
            "processes to join (are all of them started? DeepSpeed waits up to "
            f"DEEPSPEED_TIMEOUT={os.environ.get('DEEPSPEED_TIMEOUT', '10')} minutes)"
            + ("" if cuda else ", or building DeepSpeed's CPU all-reduce op (a first run)"),
            file=sys.stderr, flush=True))
        note.daemon = True
        if int(os.environ["WORLD_SIZE"]) > 1:
            note.start()
        try:
            with building("deepspeed_shm_comm") if not cuda else contextlib.nullcontext(), \
                    contextlib.redirect_stdout(DropBuildNote(sys.stdout)):
                deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        except (dist.DistStoreError, dist.DistNetworkError) as err:
            raise ValueError(
                f"the processes could not meet at {where}: "
                f"{(str(err).strip().splitlines() or [''])[0]}; start "
                "WORLD_SIZE processes (torchrun and deepspeed start them), reachable at "
                "MASTER_ADDR, with MASTER_PORT free there") from err
        finally:
            note.cancel()
        if not cuda:
            release_shm_buffer(dist.get_rank(), dist.get_world_size())
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps this rank's shared-memory buffer (the name
    ``deepspeed/ops/csrc/cpu/comm/shm.cpp`` builds from the uid, MASTER_ADDR, MASTER_PORT and the
    rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int, world: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer once every rank has mapped it.

    On the CPU, when all ranks share a machine (the deepspeed launcher sets LOCAL_SIZE), DeepSpeed
    creates a 66 MB buffer per rank in /dev/shm and never unlinks it: every such run used to leave
    them in RAM until reboot (11 GB after a day of test runs here). Each rank maps every buffer
    during ``init_distributed``, so after a barrier the names can go: the mappings stay valid, and
    the kernel frees the memory when the last process exits, killed or not."""
    if world > 1:
        dist.barrier()
    try:
        shm_buffer_path(rank).unlink()
    except FileNotFoundError:  # no shared-memory all-reduce here (ranks on several machines)
        pass
    except OSError as err:
        print(f"note: could not remove DeepSpeed's shared-memory buffer "
              f"{shm_buffer_path(rank)}: {err}", file=sys.stderr)


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


class TextEncoder:
    """Tokenises each question once per video (question + candidate pairs for multiple choice)."""

    def __init__(self, tokenizer, task: str, max_len: int, mc_text: str = "pair"):
        if mc_text not in ("pair", "joined"):
            raise ValueError(f"data.mc_text={mc_text!r}: valid values are pair, joined")
        self.tokenizer, self.task, self.max_len, self.mc_text = tokenizer, task, max_len, mc_text

    def __call__(self, batch: dict) -> dict:
        questions = batch["question"]
        if self.task == "mc":
            cands = batch["candidates"]
            M = len(cands[0])
            if any(len(c) != M for c in cands):
                raise ValueError(f"every question needs the same number of candidates, got "
                                 f"{sorted({len(c) for c in cands})}")
            firsts = [q for q in questions for _ in range(M)]
            seconds = [c for cs in cands for c in cs]
            if self.mc_text == "joined":  # one sentence: "question candidate"
                texts = [f"{q} {c}" for q, c in zip(firsts, seconds)]
                enc = self.tokenizer(texts, padding=True, truncation=True,
                                     max_length=self.max_len, return_tensors="pt")
            else:
                enc = self.tokenizer(firsts, seconds, padding=True, truncation=True,
                                     max_length=self.max_len, return_tensors="pt")
            V = len(questions)
            return {k: enc[k].view(V, M, -1) for k in ("input_ids", "attention_mask")}
        enc = self.tokenizer(list(questions), padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def tokens(self, question: str, candidates: list[str] | None = None) -> int:
        """How many tokens the text the model reads for ``question`` has before the cut to
        ``max_len``: for multiple choice, the longest question-and-candidate text."""
        if self.task != "mc":
            return len(self.tokenizer(question)["input_ids"])
        if self.mc_text == "joined":
            return max(len(self.tokenizer(f"{question} {c}")["input_ids"]) for c in candidates)
        return max(len(self.tokenizer(question, c)["input_ids"]) for c in candidates)


@dataclass
class Data:
    examples: dict  # split -> list[QAExample] (train OOV answers dropped)
    labels: dict  # split -> {example index: label}
    ans2label: dict
    manifest: dict
    notes: list = field(default_factory=list)  # what loading did (OOV answers, duplicate qids)


def _split_paths(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


# The task each config task takes examples of (QAExample.task), and what to set otherwise.
_TASK_HINT = {"open": "open-ended answers", "mc": "multiple choice (candidates)",
              "count": "counting (integer answers)"}


def load_data(cfg: Config, ans2label: dict | None = None, need_train: bool = True,
              splits: tuple[str, ...] = ("train", "val", "test"),
              manifest: dict | None = None, scoring: bool = False) -> Data:
    """Annotations of the configured splits among ``splits``, the answer vocabulary and the
    manifest (``manifest``: already loaded from data.manifest). ``need_train``: data.train must
    be set (training); evaluation needs it only to build an open-ended vocabulary that is not
    given. ``scoring``: the splits are evaluated, train included: its questions whose answer is
    outside the vocabulary are kept (scored wrong, as in every evaluated split), not dropped as
    training drops them."""
    d = cfg.data
    if not d.manifest:
        raise ValueError("data.manifest is empty: build one with `siasam-fast index VIDEO_DIR "
                         "--out manifest.jsonl` and set data.manifest")
    if d.video_dir and not Path(d.video_dir).is_dir():
        raise ValueError(f"data.video_dir={d.video_dir!r} is not a folder (it re-roots the "
                         "manifest's video paths; leave it empty to use them as indexed)")
    if manifest is None:
        manifest = load_manifest(d.manifest, video_dir=d.video_dir or None)
    sample = list(itertools.islice((r for r in manifest.values() if r.ok), 20))
    if sample and not any(Path(r.path).exists() for r in sample):
        where = "data.video_dir" if d.video_dir else "the manifest"
        raise ValueError(
            f"none of the first {len(sample)} videos is where {where} puts it (e.g. "
            f"{sample[0].path}): if the videos moved, set data.video_dir to their folder (the "
            "manifest stores absolute paths; data.video_dir re-roots them), or index them again")
    examples, notes = {}, []
    for split in splits:
        spec = getattr(d, split)
        if spec:
            missing = [p for p in _split_paths(spec) if not Path(p).exists()]
            if missing:
                raise ValueError(f"data.{split}={spec!r}: {missing[0]} does not exist (set "
                                 f"data.{split} to the {split} annotations, e.g. --set "
                                 f"data.{split}=PATH, or leave it empty)")
            examples[split] = [
                ex for p in _split_paths(spec)
                for ex in load_annotations(d.dataset, p, split=split if Path(p).is_dir() else None,
                                           fmt=d.format, **d.options)]
            if not examples[split]:
                raise ValueError(f"data.{split} ({spec}) holds no questions")
            _check_task(cfg, split, spec, examples[split])
            duplicates = _duplicate_qids(examples[split])
            if duplicates:
                notes.append(f"data.{split}: {len(duplicates)} question id(s) occur more than "
                             f"once ({', '.join(map(repr, duplicates[:3]))}"
                             f"{', ...' if len(duplicates) > 3 else ''}); each occurrence is "
                             "its own question, but --predictions rows cannot tell them apart")
            same = [ex for ex in examples[split] if ex.candidates
                    and len({c.strip().casefold() for c in ex.candidates}) < len(ex.candidates)]
            if same:  # (How2QA has rows whose wrong answer repeats the right one)
                notes.append(f"data.{split}: {len(same)} multiple-choice question(s) list one "
                             f"candidate twice (e.g. qid {same[0].qid}: {same[0].candidates}); "
                             "the model scores both alike, so which of them it picks follows "
                             "their order, not the video")
    if d.ans2label and ans2label is None and not Path(d.ans2label).is_file():
        raise ValueError(f"data.ans2label={d.ans2label!r} does not exist (leave it empty to build "
                         "the vocabulary from train's top data.num_answers answers)")
    if "train" not in examples:
        if need_train:
            raise ValueError("data.train is empty: training needs the train annotations")
        if cfg.task == "open" and ans2label is None and not d.ans2label:
            raise ValueError("data.train is empty: task=open builds its answer vocabulary from "
                             "train's answers; set data.train, or data.ans2label to a saved one")
    labels: dict = {}
    if cfg.task == "open":
        if ans2label is None:
            ans2label = (load_ans2label(d.ans2label) if d.ans2label
                         else build_answer_vocab(examples["train"], top_k=d.num_answers,
                                                 min_count=d.min_answer_count))
        for split, exs in examples.items():
            drop = split == "train" and not scoring  # (no label to train on)
            encoded = apply_answer_vocab(exs, ans2label, oov="drop" if drop else "keep")
            examples[split] = encoded.examples
            labels[split] = encoded.labels
            notes.append(f"data.{split} answers ({len(ans2label)}-answer vocabulary): "
                         f"{encoded.summary()}")
    return Data(examples, labels, ans2label or {}, manifest, notes)


def load_streams(cfg: Config, ans2label: dict | None = None, need_train: bool = True,
                 splits: tuple[str, ...] = ("train", "val", "test"), scoring: bool = False,
                 ) -> tuple[dict[str, Config], dict[str, Data]]:
    """Each task's run config and data (:meth:`Config.streams`): NAME -> ... for task=multi
    (one manifest for all; ``ans2label`` is the open-ended task's), {"": ...} for one task.
    ``scoring``: see :func:`load_data`."""
    streams = cfg.streams()
    if cfg.task != "multi":
        return streams, {"": load_data(cfg, ans2label, need_train, splits, scoring=scoring)}
    datas: dict[str, Data] = {}
    manifest = None
    for name, stream in streams.items():
        try:
            data = load_data(stream, ans2label if stream.task == "open" else None, need_train,
                             splits, manifest, scoring=scoring)
        except ValueError as err:
            raise ValueError(task_message(name, str(err))) from None
        manifest = data.manifest
        data.notes = [f"data.tasks.{name}: {note}" for note in data.notes]
        datas[name] = data
    return streams, datas


def run_vocabulary(streams: dict[str, Config], datas: dict[str, Data]) -> dict:
    """The run's answer vocabulary: its open-ended task's (one at most), else empty."""
    return next((datas[n].ans2label for n, s in streams.items() if s.task == "open"), {})


def _check_task(cfg: Config, split: str, spec: str, examples: list) -> None:
    """Every example of ``split`` fits ``cfg.task``, else a ValueError that says what to set."""
    if cfg.task == "mc":
        wrong = next((ex for ex in examples if not ex.candidates), None)
    else:
        wrong = next((ex for ex in examples if ex.task != cfg.task), None)
    if wrong is not None:
        raise ValueError(
            f"task={cfg.task} needs {_TASK_HINT[cfg.task]}, but the data.{split} annotations "
            f"({spec}, dataset {cfg.data.dataset}) hold {_TASK_HINT[wrong.task]} (question "
            f"{wrong.qid!r}): set task: {wrong.task}, or use a {cfg.task} dataset")


def _duplicate_qids(examples: list) -> list[str]:
    seen, repeated = set(), {}
    for ex in examples:
        if ex.qid in seen:
            repeated[ex.qid] = None
        seen.add(ex.qid)
    return list(repeated)


class LabelLookup:
    """label_fn for the loader: the label of an example's answer (picklable: workers may
    spawn). Keyed by the answer, not the question id, which need not be unique."""

    def __init__(self, ans2label: dict):
        self.ans2label = ans2label

    def __call__(self, example) -> int:
        return encode_answer(example.answer, self.ans2label)


class _TaskLogPrefix(logging.Filter):
    """Names the task in the log lines a loader writes while it is built (task=multi: "train:
    kept 60 of 66 examples" says which task's)."""

    def __init__(self, name: str):
        super().__init__()
        self.prefix = f"data.tasks.{name}: "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


PIPELINE_LOGGERS = ("siasam_fast.pipeline.dataset", "siasam_fast.pipeline.dali",
                    "siasam_fast.pipeline.loaders")


def make_loader(cfg: Config, data: Data, split: str, rank: int, world: int, epoch: int = 0,
                task_name: str = "", scoring: bool = False):
    """The loader of ``split``; ``task_name``: the task=multi task it is for (the log lines
    written while the loader is built name it; those of its batches name their video files).
    ``scoring``: ``split`` is evaluated, train included: evaluation clips (eval.num_clips, placed
    by sampling.eval_placement) in a fixed order, as for val and test, not training's siamese
    sampling."""
    if task_name:
        prefix = _TaskLogPrefix(task_name)
        loggers = [logging.getLogger(name) for name in PIPELINE_LOGGERS]
        for logger in loggers:
            logger.addFilter(prefix)
        try:
            return make_loader(cfg, data, split, rank, world, epoch, scoring=scoring)
        finally:
            for logger in loggers:
                logger.removeFilter(prefix)
    train = split == "train" and not scoring
    label_fn = LabelLookup(data.ans2label) if cfg.task == "open" else None
    sampling = cfg.sampling
    if not train:  # evaluation: eval.num_clips clips per video, placed by sampling.eval_placement
        sampling = type(sampling)(**{**sampling.__dict__, "eval_clips": cfg.eval.num_clips})
    return build_video_loader(
        data.examples[split], data.manifest, sampling,
        split="eval" if split == "train" and not train else split,  # evaluation sampling
        batch_size=cfg.train.batch_size if train else cfg.eval.batch_size,
        image_size=cfg.data.image_size, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        rank=rank, world_size=world, backend=cfg.data.backend, dedup=cfg.data.dedup,
        label_fn=label_fn, epoch=epoch, decode_group=cfg.data.decode_group,
        trim=cfg.data.dali_trim, defer_stop_signals=True, frame_fit=cfg.data.frame_fit,
    )


def make_train_loader(cfg: Config, streams: dict[str, Config], datas: dict[str, Data],
                      rank: int, world: int):
    """The train loader of a run: its task's, or (task=multi) every task's interleaved."""
    if cfg.task != "multi":
        return make_loader(cfg, datas[""], "train", rank, world)
    loaders = {name: make_loader(stream, datas[name], "train", rank, world, task_name=name)
               for name, stream in streams.items()}
    for name, loader in loaders.items():  # a head never trained, yet evaluated: refused
        if len(loader) == 0:
            raise ValueError(f"data.tasks.{name}: the train split has no usable examples (see "
                             "the log for the reasons)")
    return MultiTaskLoader(loaders, seed=cfg.train.seed, batch_size=cfg.train.batch_size)


def epoch_means(sums: dict, n_steps: int) -> dict:
    """An epoch's ``train_*`` columns: the steps' loss terms averaged over its ``n_steps`` steps,
    and (task=multi) each task's ``NAME_loss`` over its ``NAME_batches`` micro-batches."""
    out = {}
    for key, value in sums.items():
        if key.endswith("_batches"):
            continue
        count = sums.get(key.removesuffix("_loss") + "_batches") if key.endswith("_loss") else None
        out[f"train_{key}"] = value / max(1, count if count is not None else n_steps)
    return out


def epoch_videos(loader) -> int:
    """Examples a process trains on in an epoch (every task's, for task=multi)."""
    if isinstance(loader, MultiTaskLoader):
        return sum(len(task_loader.sampler) for task_loader in loader.loaders.values())
    return len(loader.sampler)


def build_model(cfg: Config, num_answers: int, vocab_size: int,
                device: torch.device | None = None) -> SiaSamReaModel:
    """The model of ``cfg.model``; with ``device``, its CNN weights in the layout that
    ``model.memory_format`` resolves to there (the model stays on the CPU until moved; leave
    ``device`` out for a model DeepSpeed wraps: see ``use_memory_format``)."""
    s = cfg.siamese
    siamese_kwargs = dict(omega=s.omega, tau=s.tau, skg=s.skg, learn_w1=s.learn_w1,
                          learn_w2=s.learn_w2, detach_soft_label=s.detach_soft_label, impl=s.impl)
    heads = {name: stream.task for name, stream in cfg.streams().items()} \
        if cfg.task == "multi" else None
    model = SiaSamReaModel(cfg.model, cfg.task, num_answers, vocab_size,
                           num_clips=cfg.sampling.num_clips, siamese_kwargs=siamese_kwargs,
                           heads=heads)
    check_question_len(cfg, model)
    return model if device is None else use_memory_format(model, device)


def check_question_len(cfg: Config, model: SiaSamReaModel) -> None:
    """A ValueError when ``data.max_question_len`` exceeds the text model's token positions (a
    longer question failed mid-run with a traceback)."""
    positions = model.text.config.max_position_embeddings
    if cfg.data.max_question_len > positions:
        raise ValueError(f"data.max_question_len={cfg.data.max_question_len}: model.text="
                         f"{cfg.model.text} has {positions} token positions; use at most "
                         f"{positions}")


def model_visual_note(config: Config) -> str | None:
    """One start-up line when the CNN's head or freezing, or the answer head, is not the default
    (a converted ClipBERT folder sets all three through auto), so that a run says what it trains,
    and whether its frames are prepared as ClipBERT's were."""
    from siasam_fast.model import resolve_cnn_freeze, resolve_qa_head, resolve_visual_head

    cfg, data = config.model, config.data
    head, freeze, qa = resolve_visual_head(cfg), resolve_cnn_freeze(cfg), resolve_qa_head(cfg)
    if head == "proj" and freeze == "none" and qa == "siasam":
        return None
    frozen = {"none": "all of the CNN trains",
              "batchnorm": "the CNN's BatchNorms are frozen",
              "detectron2": "the CNN's BatchNorms, stem and first stage are frozen"}[freeze]
    frames = ""
    if head == "clipbert" and (data.frame_fit, data.image_size) not in (("pad", 448), ("pad", 768)):
        frames = (f"; frames: data.frame_fit={data.frame_fit}, data.image_size={data.image_size} "
                  "(ClipBERT's: pad at 448, or 768 on TGIF-QA)")
    return (f"model: visual head {head}"
            + (" (ClipBERT's grid encoder, detectron2's pixel input)" if head == "clipbert" else "")
            + f"; {frozen}; answer head {qa}"
            + (" (ClipBERT's: Linear, ReLU, Linear)" if qa == "clipbert" else "")
            + f" (model.visual_head={cfg.visual_head}, model.cnn_freeze={cfg.cnn_freeze}, "
            f"model.qa_head={cfg.qa_head})" + frames)


def deepspeed_arch_list(value: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed 0.19's JIT builder can read it, or None if it can as is.

    Its builder sorts the entries by ``int()`` of each dotted part, so the architecture-specific
    entries that recent CUDA images set ("9.0a", "10.0f") stop FusedAdam's build with "invalid
    literal for int() with base 10: '0a'" (seen on an H100 with torch 2.11). FusedAdam uses none
    of their features: keep each entry's number (and its "+PTX"), drop duplicates.
    """
    if not value or not value.strip():
        return None
    out: list[str] = []
    for entry in re.split(r"[;\s]+", value.strip()):
        m = re.fullmatch(r"(\d+\.\d+)[a-zA-Z]*(\+PTX)?", entry)
        fixed = (m.group(1) + (m.group(2) or "")) if m else entry
        if fixed not in out:
            out.append(fixed)
    joined = ";".join(out)
    return None if joined == value.strip() else joined


def use_deepspeed_arch_list() -> None:
    """Rewrite TORCH_CUDA_ARCH_LIST in this process's environment as DeepSpeed's JIT builder can
    read it (:func:`deepspeed_arch_list`), saying so; nothing when it can read it as is."""
    fixed = deepspeed_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if fixed is not None:
        print(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} -> {fixed!r} "
              "for DeepSpeed's FusedAdam build (it cannot parse suffixed entries)")  # fmt: skip
        os.environ["TORCH_CUDA_ARCH_LIST"] = fixed


@contextlib.contextmanager
def building(name: str):
    """The JIT build (or load) of torch extension ``name``: a stop signal raises
    :class:`Stopped` at once, so that torch's build ends through its ``finally`` and removes its
    lock file (killed outright, the build leaves the lock, and every later run on the machine
    waits on it), and the build lock is watched (:func:`watch_build_lock`)."""
    with stop_raises(), watch_build_lock(name):
        yield


def build_fused_adam_op() -> None:
    """Build DeepSpeed's FusedAdam CUDA extension now (JIT: nvcc and ninja, about a minute the
    first time), or load it from torch's extension cache (~/.cache/torch_extensions), with the
    arch list that :func:`build_optimizer` uses, so that its build is found there later. Raises
    what the build raises."""
    use_deepspeed_arch_list()
    from deepspeed.ops.op_builder import FusedAdamBuilder

    with building(FUSED_ADAM):
        FusedAdamBuilder().load()


def adam_kwargs(cfg: Config) -> dict:
    """AdamW's hyperparameters from ``train.*``, as every optimizer here takes them."""
    t = cfg.train
    return {"lr": t.lr, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_eps}


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device):
    """AdamW; no weight decay on biases and norms. DeepSpeed FusedAdam on CUDA, torch AdamW on
    CPU, apex FusedAdam when asked for and installed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    adam = adam_kwargs(cfg)
    choice = cfg.train.optimizer
    if choice == "auto":
        choice = ("torch" if device.type != "cuda" else "apex" if apex_available() else
                  "deepspeed")
    if choice == "apex":
        problem = apex_problem()
        if problem:
            raise ValueError(f"train.optimizer='apex' but {problem} (apex is not on PyPI; see "
                             "its README), use 'deepspeed' or 'torch'")
        from apex.optimizers import FusedAdam as ApexFusedAdam

        return ApexFusedAdam(groups, adam_w_mode=True, **adam), "apex FusedAdam"
    if choice == "deepspeed":
        if device.type != "cuda":
            raise ValueError("train.optimizer='deepspeed' (FusedAdam) needs CUDA; "
                             "use 'torch' on CPU")
        from deepspeed.ops.adam import FusedAdam

        from siasam_fast.envcheck import arch_list_gaps

        use_deepspeed_arch_list()
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        try:
            cc = torch.cuda.get_device_capability(device)
        except (AssertionError, RuntimeError):  # no GPU to ask
            cc = None
        try:
            if cc and arch_list_gaps(arch_list, [cc]):  # it would build, then fail at step one
                raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}, which it is built for, "
                                   f"has no code for this GPU (sm_{cc[0]}{cc[1]}): unset it or "
                                   f"add {cc[0]}.{cc[1]}")
            with building(FUSED_ADAM):  # its JIT build or load
                return FusedAdam(groups, adam_w_mode=True, **adam), "DeepSpeed FusedAdam"
        except Exception as err:  # noqa: BLE001 - its JIT build: no nvcc / ninja, a bad arch list
            why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            if cfg.train.optimizer != "auto":
                raise ValueError(f"train.optimizer='deepspeed': DeepSpeed's FusedAdam could not "
                                 f"be built here ({why}); use train.optimizer=torch "
                                 "(`siasam-fast env` says what the build needs)") from err
            print(f"note: DeepSpeed's FusedAdam could not be built here ({why}); using torch "
                  "AdamW (`siasam-fast env` says what the build needs)", file=sys.stderr)
    return torch.optim.AdamW(groups, **adam), "torch AdamW"


def same_optimizer_everywhere(optimizer, name: str, model: torch.nn.Module, cfg: Config,
                              device: torch.device, rank: int, world: int):
    """``(optimizer, name)`` of :func:`build_optimizer`, the same on every process: where some
    built another one (``train.optimizer=auto`` on several nodes: a node whose FusedAdam cannot
    be built there, no nvcc and no build in its own ~/.cache, falls back alone), every process
    takes torch AdamW, and process 0 says which hosts fell back. Mixed optimizers would step
    each process's replica (ZeRO-0) or partition differently."""
    if not (dist.is_initialized() and world > 1):
        return optimizer, name
    views = [None] * world
    dist.all_gather_object(views, {"name": name, "host": socket.gethostname()})
    if all(v["name"] == views[0]["name"] for v in views):
        return optimizer, name
    built = sorted({f"{v['name']} on {v['host']}" for v in views})
    if rank == 0:
        print(f"note: the processes built different optimizers ({'; '.join(built)}): every "
              "process uses torch AdamW (train.optimizer=torch says so without this note)",
              flush=True)
    torch_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="torch"))
    return build_optimizer(model, torch_cfg, device)


def fused_layer_norm(cfg: Config, device: torch.device) -> bool:
    """Whether ``model.layer_norm`` puts apex's FusedLayerNorm in the model on ``device``."""
    choice = cfg.model.layer_norm
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda":
        raise ValueError("model.layer_norm='apex' needs CUDA (apex's kernels); use torch or auto")
    problem = apex_problem()
    if problem:
        if choice == "apex":
            raise ValueError(f"model.layer_norm='apex' but {problem} (apex is not on PyPI; see "
                             "its README); use torch or auto")
        return False
    return True


def warmup_linear_decay(total_steps: int, warmup_ratio: float):
    """Linear warm-up over the first ``warmup_ratio`` of the steps, then linear decay to zero.
    The warm-up takes one step at least (its last step and the decay's first both run at the full
    rate), so with ``warmup_ratio`` 0 the first two steps run at the full rate."""
    warmup = max(1, int(round(total_steps * warmup_ratio)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def optimizer_steps(batches: int, grad_accum: int) -> int:
    """Optimizer steps in ``batches`` micro-batches (an epoch's last step may take fewer)."""
    return -(-batches // grad_accum)


def accumulation_group(index: int, batches: int, grad_accum: int) -> tuple[int, bool]:
    """Micro-batch ``index`` (from 0) of an epoch of ``batches``: how many micro-batches its
    optimizer step takes, and whether it is that step's last. Steps take ``grad_accum``
    micro-batches from the epoch's start; the epoch's last step takes what is left."""
    if not 0 <= index < batches:
        raise IndexError(f"micro-batch {index} of an epoch of {batches}")
    start = index - index % grad_accum
    size = min(grad_accum, batches - start)
    return size, index == start + size - 1


def micro_batch_weight(index: int, batches: int, grad_accum: int, examples: int,
                       batch_size: int, sizes: list[int] | None = None) -> float:
    """The share of micro-batch ``index`` in its optimizer step: its examples over the step's
    (``examples`` on this process in the epoch, in micro-batches of ``batch_size``, the last one
    partial; or ``sizes``, each micro-batch's examples in the epoch's order, where short ones
    occur mid-epoch: a task=multi epoch interleaves each task's last, short batch). A step then
    weighs each of its examples equally, as one batch of them would, also an epoch's last step
    with a partial micro-batch. 1 without accumulation."""
    start = index - index % grad_accum
    group = range(start, min(start + grad_accum, batches))
    counts = ([sizes[i] for i in group] if sizes is not None else
              [min(batch_size, examples - i * batch_size) for i in group])
    return counts[index - start] / sum(counts)


def move_schedule_end(scheduler, old_total: int, new_total: int,
                      warmup_ratio: float) -> tuple[float, float]:
    """Give ``scheduler`` (a LambdaLR of :func:`warmup_linear_decay` whose length now reads
    ``new_total``) the rate of the new schedule from the next step on, not one step later (a
    LambdaLR changes its rate at its next ``step()``). Returns the factor of the next step's rate
    under the old and the new schedule. At the scheduler's own count, not the run's steps:
    DeepSpeed does not step the scheduler on a step the fp16 loss scaler skipped, so in fp16 it
    is that many steps behind the run."""
    at = scheduler.last_epoch
    was = warmup_linear_decay(old_total, warmup_ratio)(at)
    now = warmup_linear_decay(new_total, warmup_ratio)(at)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * now
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return was, now


def micro_step(engine, forward, weight: float, last: bool, sync=lambda: None):
    """One micro-batch of an optimizer step: forward, backward of loss x ``weight`` (its share
    of the step, :func:`micro_batch_weight`), and ``engine.step()``, which updates the weights
    (and moves the lr schedule on) on the step's ``last`` micro-batch only. DeepSpeed's own
    micro-step counter would let an epoch's leftover micro-batches run into the next epoch's
    first step (and into a checkpoint); the boundary is set here instead. Returns ``forward()``'s
    loss terms and the times before forward, backward, the optimizer and after it. Out of GPU
    memory, it says which settings need less (torch's error, with its sizes, comes first)."""
    try:
        return _micro_step(engine, forward, weight, last, sync)
    except torch.cuda.OutOfMemoryError as err:
        raise torch.cuda.OutOfMemoryError(OOM_ADVICE) from err


# What a training step out of GPU memory can change (the README's memory arithmetic: "V100
# memory"; the activations of the CNN are most of it)
OOM_ADVICE = (
    "out of GPU memory in a training step: lower train.batch_size (train.grad_accum keeps the "
    "batch of a step), set model.activation_checkpointing=cnn (or all), use a ZeRO stage that "
    "shards more (configs/ds/zero2_* or zero3_*), or a smaller data.image_size; README: 'V100 "
    "memory' and 'Activation checkpointing'")


def _micro_step(engine, forward, weight: float, last: bool, sync):
    engine.set_gradient_accumulation_boundary(last)
    t_fwd = time.perf_counter()
    loss, parts = forward()
    sync()
    t_bwd = time.perf_counter()
    engine.backward(loss * weight, scale_wrt_gas=False)
    sync()
    t_opt = time.perf_counter()
    # ZeRO-0's fp16 optimizers keep the scale at min_loss_scale and skip the step, where ZeRO
    # 1-3's scaler raises: an overflow at a step's end at the minimum stops the run the same way
    scaling = getattr(getattr(engine, "optimizer", None), "loss_scale_config", None)
    at_minimum = (last and getattr(scaling, "dynamic_loss_scale", False)
                  and scaling.cur_scale <= (scaling.min_loss_scale or 0))
    try:
        engine.step()
        if at_minimum and getattr(engine.optimizer, "overflow", False):
            raise Exception(f"ZeRO-0's fp16 optimizer: {FP16_SCALE_AT_MINIMUM} "
                            f"({scaling.cur_scale:g}), and this step overflowed too")
    except Exception as err:
        if FP16_SCALE_AT_MINIMUM not in str(err):
            raise
        raise FloatingPointError(
            f"fp16: the gradients overflowed at every loss scale down to the DeepSpeed config's "
            f"min_loss_scale (DeepSpeed: {err}); this micro-batch's loss is "
            f"{float(parts['loss'])}: lower train.lr, or train in bf16 where the GPU has it "
            "(A100, H100: configs/ds/zero2_bf16.json) or in fp32") from err
    sync()
    return parts, (t_fwd, t_bwd, t_opt, time.perf_counter())


# DeepSpeed's fp16 loss scaler raises a bare Exception with this text when the gradients still
# overflow at its min_loss_scale (deepspeed/runtime/fp16/loss_scaler.py)
FP16_SCALE_AT_MINIMUM = "loss scale already at minimum"


def match_buffer_dtypes(module: torch.nn.Module) -> None:
    """DeepSpeed's bf16 mode casts parameters but not buffers; BatchNorm then refuses bf16 input
    with fp32 running statistics (CPU). Give every floating buffer its module's parameter dtype."""
    for mod in module.modules():
        params = list(mod.parameters(recurse=False))
        if not params:
            continue
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != params[0].dtype:
                setattr(mod, name, buf.to(params[0].dtype))


HOST_KEYS = ("num_unique",)  # read on the host by the model (model.real_frame_slots)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The batch's tensors on ``device`` (frames and clips in ``dtype``), but ``HOST_KEYS``,
    which stay where the loader made them (the CPU) so that the model reads them without a
    device-to-host copy."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and k not in HOST_KEYS:
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and k in ("frames", "clips"):
                v = v.to(dtype)
        out[k] = v
    return out


def share_batchnorm_statistics(module: torch.nn.Module) -> None:
    """Give every process process 0's BatchNorm running statistics and batch counts (a
    collective: every process calls it). DeepSpeed makes the processes' parameters equal at its
    start and keeps them so, never their buffers: each process's BatchNorms track its own
    batches. Done before each evaluation and checkpoint, so that the metrics (gathered from every
    process) are those of the model saved, process 0's, and the processes go on as a resumed run
    does (every process loads process 0's)."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return
    for mod in module.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
            for buf in (mod.running_mean, mod.running_var, mod.num_batches_tracked):
                if buf is not None:
                    dist.broadcast(buf, src=0)


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, loader, cfg: Config, text: TextEncoder, device, dtype, desc="eval",
             predictions: Path | list | None = None, head: str | None = None) -> dict:
    """Top-1 accuracy (open / mc) overall and per question type, or MSE (count: of the answer
    ``eval.count_metric`` takes, tgif = rounded and clipped to 1..10, with ``mse_raw`` the
    regression output's).

    Every rank evaluates its shard; results are gathered and de-duplicated by example (shards are
    padded to equal length by wrapping, which ZeRO-3's collective forward needs). ``predictions``:
    a JSONL file of one row per example (qid, prediction, value) written by rank 0.

    Questions without an answer (multiple choice with hidden test labels: no ``answer_idx``) are
    predicted but not scored: their rows' value is null, they are left out of ``num_examples``
    and the metrics, and ``num_unlabeled`` counts them (present only when there are some).

    ``head``: the task of a task=multi model that answers (``cfg`` is that task's config); its
    name is in each prediction row (``task``), and a list as ``predictions`` collects the rows
    (rank 0) instead of writing them."""
    was_training = model.training
    model.eval()
    share_batchnorm_statistics(model)
    rows: dict[int, tuple] = {}
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for batch in tqdm(loader, desc=desc, disable=not rank0, leave=False):
        batch.update(text(batch))
        if head is not None:
            batch["head"] = head
        batch = to_device(batch, device, dtype)
        outputs = model(batch)
        scores = aggregate_clips(task_scores(outputs, cfg.task).float(), batch["clip_mask"],
                                 cfg.eval.aggregation)
        raw = [None] * len(scores)  # count: the regression output, before count_answer
        if cfg.task == "count":
            pred = count_answer(scores, cfg.eval.count_metric)
            target = batch["count"].float()
            values = ((pred - target) ** 2).tolist()
            labeled = target.isfinite().tolist()  # NaN: no count given
            raw = scores.tolist()
        else:
            pred = scores.argmax(-1)
            target = batch["label"] if cfg.task == "open" else batch["answer_index"]
            # NaN scores (a diverged model) are no answer: argmax would give the first one, the
            # most frequent answer of an open-ended vocabulary, and the split's majority rate
            finite = scores.isfinite().all(-1)
            values = torch.where(finite, (pred == target).float(), float("nan")).tolist()
            # open: label -1 is an answer outside the vocabulary (wrong); mc: -1 is no answer
            labeled = (target >= 0).tolist() if cfg.task == "mc" else [True] * len(values)
        pred_values = pred.tolist()
        if cfg.task != "count":
            pred_values = [p if ok else None for p, ok in zip(pred_values, finite.tolist())]
        if cfg.task == "count" and cfg.eval.count_metric == "tgif":  # an integer answer (none
            pred_values = [int(x) if math.isfinite(x) else None for x in pred_values]  # for NaN)
        for idx, qid, qtype, p, value, known, out, t in zip(
                batch["example_index"].tolist(), batch["qid"], batch["question_type"],
                pred_values, values, labeled, raw, target.tolist()):
            rows[idx] = (qtype, value if known else None, qid, p,
                         None if out is None else (out, (out - t) ** 2 if known else None))
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        rows = {k: v for part in gathered for k, v in part.items()}
    model.train(was_training)
    metric = task_metric(cfg.task)
    scored = [r for r in rows.values() if r[1] is not None]
    result = {"num_examples": len(scored)}
    nonfinite = sum(1 for r in rows.values() if r[3] is None and cfg.task != "count")
    if nonfinite:  # NaN scores: the metrics are NaN (not the majority answer's rate)
        result["num_nonfinite"] = nonfinite
        if rank0:
            print(f"warning: {desc}: the model gave {nonfinite} question(s) non-finite scores "
                  "(NaN or inf: it has diverged); they count as NaN, so the metrics are NaN",
                  file=sys.stderr)
    if len(scored) < len(rows):
        result["num_unlabeled"] = len(rows) - len(scored)
    result[metric] = _mean(r[1] for r in scored)
    if cfg.task == "count" and cfg.eval.count_metric != "raw":  # the unrounded output's too
        result["mse_raw"] = _mean(r[4][1] for r in scored)
    types = sorted({r[0] for r in scored})
    for qtype in types if types != [""] else []:  # no breakdown when no question has a type
        result[f"{metric}/{qtype or 'untyped'}"] = _mean(r[1] for r in scored if r[0] == qtype)
    if predictions is not None and rank0:
        lines = [{**({"task": head} if head is not None else {}), "qid": qid,
                  "question_type": qtype, "prediction": p,
                  **({} if raw is None else {"output": raw[0]}), metric: value}
                 for qtype, value, qid, p, raw in (rows[idx] for idx in sorted(rows))]
        if isinstance(predictions, list):
            predictions.extend(lines)
        else:  # atomic: a stop while writing keeps an earlier file
            write_text_atomic(predictions, "".join(json.dumps(line) + "\n" for line in lines))
    # Examples whose video failed at decode time are not scored (their stand-in is the next
    # example, scored as itself): num_failed counts them, so that metrics over fewer questions
    # are not taken for the split's (the dataset's examples: those whose video is ok in the
    # manifest).
    dataset = getattr(loader, "dataset", None)
    failed = set(getattr(dataset, "indices", ())) - rows.keys()
    if failed:
        result["num_failed"] = len(failed)
        if rank0:
            print(f"note: {desc}: {len(failed)} question(s) not scored, their video failed at "
                  f"decode time (the warnings name the files; `siasam-fast index` again); the "
                  f"metrics cover the other {result['num_examples']}", file=sys.stderr)
    # Questions left out when the loader was built (video missing from the manifest or corrupt in
    # it, a segment outside the video, the sampler's short-video policy): published numbers are
    # over every question of a split, so they are counted, and accuracy_all counts every one
    # that has an answer, the ones not scored as wrong.
    dropped = list(getattr(dataset, "dropped", ()))
    if dropped:
        result["num_dropped"] = len(dropped)
        if rank0:
            reasons = ", ".join(f"{n} {kind}" for kind, n in
                                getattr(dataset, "drop_reasons", Counter()).most_common())
            print(f"note: {desc}: {len(dropped)} question(s) of the split not scored, left out "
                  f"when the loader was built ({reasons}); the metrics cover the other "
                  f"{result['num_examples']}" + ("; accuracy_all counts them as wrong"
                                                 if metric == "accuracy" else ""),
                  file=sys.stderr)
    if metric == "accuracy" and (failed or dropped):
        examples = getattr(dataset, "examples", [])
        unscored = [examples[i] for i in (*failed, *(i for i, _, _ in dropped))
                    if i < len(examples)]
        answered = sum(1 for ex in unscored if cfg.task == "open" or ex.answer_index is not None)
        result["accuracy_all"] = (sum(r[1] for r in scored) / (len(scored) + answered)
                                  if scored or answered else float("nan"))
    return result


def evaluate_tasks(model, loaders: dict, streams: dict[str, Config], texts: dict, device,
                   dtype, desc: str = "eval", predictions: Path | None = None) -> dict:
    """:func:`evaluate` of each task's loader (NAME -> loader; {"": ...} for a one-task run,
    whose metrics come back as they are). task=multi: each task's metrics prefixed ``NAME_``,
    ``accuracy`` the mean of its open-ended and multiple-choice tasks' accuracies (the run's
    metric: best epoch, early stop; a task that scored no question is left out of it, and
    said) and ``num_examples`` the sum; ``predictions`` gets every task's rows, each naming its
    task."""
    if list(loaders) == [""]:
        return evaluate(model, loaders[""], streams[""], texts[""], device, dtype, desc=desc,
                        predictions=predictions)
    result: dict = {"accuracy": float("nan"), "num_examples": 0}
    accuracies, unscored, rows = [], [], ([] if predictions is not None else None)
    for name, loader in loaders.items():
        metrics = evaluate(model, loader, streams[name], texts[name], device, dtype,
                           desc=f"{desc} {name}", predictions=rows, head=name)
        result["num_examples"] += metrics["num_examples"]
        if "accuracy" in metrics:
            if metrics["num_examples"]:
                accuracies.append(metrics["accuracy"])
            else:  # nothing to score (hidden labels, every video failed): NaN, not a measure
                unscored.append(name)
        result.update({f"{name}_{key}": value for key, value in metrics.items()})
    if accuracies:
        result["accuracy"] = _mean(accuracies)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if unscored and rank0:
        print(f"note: {desc}: task(s) {', '.join(unscored)} scored no question (no answers "
              "given, or every video failed); the mean accuracy covers "
              + (', '.join(n for n in loaders if n not in unscored and
                           f"{n}_accuracy" in result) or "no task: it is NaN"), file=sys.stderr)
    absent = [n for n, stream in streams.items() if n not in loaders and stream.task != "count"]
    if absent and accuracies and rank0:  # (a test split only some tasks have, say)
        print(f"note: {desc}: task(s) {', '.join(absent)} have no data here; the mean accuracy "
              "covers " + ", ".join(n for n in loaders if n not in unscored
                                    and f"{n}_accuracy" in result)
              + " only, so it is not comparable with one over every task", file=sys.stderr)
    if predictions is not None and rank0:  # atomic: a stop while writing keeps an earlier file
        write_text_atomic(predictions, "".join(json.dumps(row) + "\n" for row in rows))
    return result


def tasks_line(metrics: dict, streams: dict[str, Config]) -> str:
    """``accuracy 0.5123 (frameqa 0.4000, action 0.6246; count mse 3.91)``: a task=multi
    evaluation in one line."""
    parts, counts = [], []
    for name, stream in streams.items():
        metric = task_metric(stream.task)
        value = metrics.get(f"{name}_{metric}")
        if value is None:
            continue
        if metric == "mse":
            counts.append(f"{name} mse {value:.4f}")
        else:
            parts.append(f"{name} {value:.4f}")
    inside = ", ".join(parts) + ("; " if parts and counts else "") + ", ".join(counts)
    return f"accuracy {metrics.get('accuracy', float('nan')):.4f} ({inside})"


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------------
# Checkpoints


def saved_config(state: dict) -> dict:
    """A checkpoint's config with today's defaults for the fields it predates (a field added
    since must not make an older run's checkpoint incompatible)."""
    return config_from_json(json.dumps(state["config"])).to_dict()


# Config fields naming a folder: the same folder written another way (relative or absolute, as
# `siasam-fast weights` prints it) is no change; nor is another folder where the checkpoint's is
# gone (the weights folders moved, or the run was copied to another machine): the checkpoint holds
# every weight, the folder gives only the architecture and the tokenizer (a note says so).
FOLDER_FIELDS = {"model.visual", "model.text", "model.tokenizer"}


def _same_folder(a, b) -> bool:
    return (isinstance(a, str) and isinstance(b, str) and bool(a) and bool(b)
            and Path(a).is_dir() and Path(b).is_dir() and _same_dir(Path(a), Path(b)))


def _stands_in(a, b) -> bool:
    """``b`` stands in for the checkpoint's folder ``a``, which is gone."""
    return (isinstance(a, str) and isinstance(b, str) and bool(a) and bool(b)
            and not Path(a).exists() and Path(b).is_dir())


def _replaced_folder(name: str, a, b) -> bool:
    """``b`` stands in for the checkpoint's folder ``a``, which is gone; says so once (rank 0)."""
    if not _stands_in(a, b):
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {name}: the checkpoint's folder {a!r} is not here; {b!r} stands in for it "
              "(the checkpoint's weights are loaded over it: it must be a copy of the same "
              "model and tokenizer)", file=sys.stderr)
    return True


# Model fields whose auto picks a value from model.visual: auto and what it picks there are the
# same model (a run saved before model.qa_head has siasam, today's default config auto).
AUTO_FIELDS = ("model.qa_head", "model.visual_head", "model.cnn_freeze")


def _resolved(name: str, section: dict, value, stand_in: dict | None = None):
    """``value`` of the model field ``name`` with auto resolved in its own ``section``; the
    checkpoint's (``stand_in``: this run's section) where its model.visual folder is gone, in the
    folder that stands in for it (the checkpoint's auto picked there what it picks in the copy)."""
    if value != "auto" or name not in AUTO_FIELDS:
        return value
    if stand_in is not None and _stands_in(section.get("visual"), stand_in.get("visual")):
        section = {**section, "visual": stand_in["visual"]}
    from siasam_fast.config import ModelConfig
    from siasam_fast.model import resolve_cnn_freeze, resolve_qa_head, resolve_visual_head

    resolve = {"model.qa_head": resolve_qa_head, "model.visual_head": resolve_visual_head,
               "model.cnn_freeze": resolve_cnn_freeze}[name]
    try:
        return resolve(ModelConfig(**section))
    except (TypeError, ValueError):  # not a valid model section: compared as written
        return value


def config_mismatches(saved: dict, current: dict, prefix: str = "",
                      known: dict | None = None) -> list[str]:
    """Fields that differ and are not allowed to (RESUMABLE_CHANGES may). ``known``: field name
    -> (what the checkpoint's auto resolved to, what this run's does), either None where not
    known (KNOWN_AUTO: recorded in the run state, resolved by the run): auto and the value it
    resolved to are no change."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if name == "data.tasks" and set(a) == set(b) and list(a) != list(b):
                # the order of the model's heads, so of the optimizer state DeepSpeed loads by
                # position, and of the batches
                out.append(f"data.tasks: checkpoint lists the tasks {', '.join(a)}, this run "
                           f"{', '.join(b)} (the order of the model's heads and of the optimizer "
                           "state): list them in the checkpoint's order")
            out += config_mismatches(a, b, name + ".", known)
            continue
        if known is not None and name in known:
            ka, kb = known[name]
            ra = ka if a == "auto" and ka is not None else a
            rb = kb if b == "auto" and kb is not None else b
        else:
            ra, rb = _resolved(name, saved, a, current), _resolved(name, current, b)
        if a != b and ra != rb and not _resumable(name) and not (
                name in FOLDER_FIELDS and (_same_folder(a, b) or _replaced_folder(name, a, b))):
            auto = "".join(f" ({side} auto is {r!r} there; --set {name}={ra} for the "
                           "checkpoint's)" for side, v, r in
                           (("the checkpoint's", a, ra), ("this run's", b, rb)) if v != r)
            if known is not None and name in known and a == "auto" and ra == "auto":
                auto += (" (the checkpoint does not record what its auto chose: set this run's "
                         "to auto)")
            out.append(f"{name}: checkpoint has {a!r}, this run has {b!r}{auto}")
    return out


# Fields whose auto the run resolves (precision: from the DeepSpeed config and the machine;
# optimizer: by what builds here; data.format: by sniffing data.train): run_state.json records
# what it resolved to ("resolved", since 2026-11-28; "precision" before), and a resume compares
# that (config_mismatches' known). data.tasks.NAME.format too, for task=multi.
KNOWN_AUTO = ("train.precision", "train.optimizer", "data.format")
# build_optimizer's names -> train.optimizer's values
OPTIMIZER_CHOICES = {"torch AdamW": "torch", "DeepSpeed FusedAdam": "deepspeed",
                     "apex FusedAdam": "apex"}


def train_formats(config: dict) -> dict[str, str]:
    """What data.format (task=multi: each data.tasks.NAME.format) reads data.train as, auto
    resolved by sniffing the train file(s): field name -> format, for each whose files are here
    and agree (auto reads each file by its own look)."""
    from siasam_fast.data.annotations import _DATASETS, _resolve

    data = config.get("data") or {}
    if config.get("task") == "multi":
        sections = {f"data.tasks.{name}.format": {**data, **spec}
                    for name, spec in (data.get("tasks") or {}).items() if isinstance(spec, dict)}
    else:
        sections = {"data.format": data}
    out = {}
    for name, section in sections.items():
        fmt, spec = section.get("format", "auto"), _DATASETS.get(section.get("dataset"))
        if fmt != "auto" or spec is None:
            out[name] = fmt
            continue
        found = set()
        for path in _split_paths(str(section.get("train") or "")):
            try:
                found.add(_resolve(section["dataset"], spec, path,
                                   "train" if Path(path).is_dir() else None, "auto")[0])
            except (OSError, ValueError):
                found.add(None)
        if len(found) == 1 and None not in found:
            out[name] = found.pop()
    return out


def run_resolutions(cfg: Config, precision: str, optimizer_name: str) -> dict:
    """What this run's auto fields (KNOWN_AUTO) resolved to, as run_state.json records it."""
    return {"train.precision": precision,
            "train.optimizer": OPTIMIZER_CHOICES.get(optimizer_name, optimizer_name),
            **train_formats(cfg.to_dict())}


def saved_resolutions(state: dict) -> dict:
    """What a checkpoint's auto fields resolved to: recorded in its run state (new runs), its
    precision (recorded since 2026-11-26), its data.format sniffed from its own train file(s)
    where they are still here (older runs); a field missing is not known."""
    out = {**train_formats(saved_config(state)), **state.get("resolved", {})}
    if "precision" in state:
        out.setdefault("train.precision", state["precision"])
    return out


def _resumable(name: str) -> bool:
    """A field that may change on a resume: RESUMABLE_CHANGES, and where a task=multi run's
    tasks find their data (data.tasks.NAME.train, val, test)."""
    return name in RESUMABLE_CHANGES or re.fullmatch(r"data\.tasks\.\w+\.(train|val|test)",
                                                     name) is not None


def _vocab_hash(ans2label: dict) -> str:
    return hashlib.sha256(json.dumps(ans2label, sort_keys=True).encode()).hexdigest()[:16]


def resolve_checkpoint(path: str | Path) -> Path:
    """A tag directory, or a run / checkpoints directory (then its latest tag: the one ``latest``
    names or, when that one is incomplete, the newest complete one)."""
    path = Path(path)
    for base in (path, path / "checkpoints"):
        if (base / "latest").is_file():
            tag_dir = base / (base / "latest").read_text().strip()
            complete = complete_tags(base)
            if tag_dir in complete or not complete:
                return tag_dir
            print(f"note: {base / 'latest'} names {tag_dir.name}, which is incomplete (a save cut "
                  f"short); using {complete[-1].name}, the newest complete checkpoint",
                  file=sys.stderr)
            return complete[-1]
    if (path / "run_state.json").is_file():
        return path
    for base in (path, path / "checkpoints"):  # complete tags but no `latest`: a kill between
        complete = complete_tags(base)  # the first save's run_state.json and its `latest`
        if complete:
            print(f"note: {base} has no 'latest' file; using {complete[-1].name}, the newest "
                  "complete checkpoint", file=sys.stderr)
            return complete[-1]
    raise FileNotFoundError(f"no checkpoint at {str(path)!r}: expected a tag directory with "
                            "run_state.json, or a directory holding a 'latest' file")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": None}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    if torch.cuda.is_available():
        # The generator of this process's own GPU, the only one it draws from: restored into the
        # GPU the resuming process has, whichever GPUs each process sees (torchrun: all of the
        # node's; a scheduler binding one per process: only its own).
        state["cuda_own"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if not torch.cuda.is_available():
        return
    if "cuda_own" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda_own"], dtype=torch.uint8))
    elif "cuda" in state:  # saved before 2026-11-28: every GPU the process saw, by index
        # the GPUs this process sees (a resume on a machine with fewer than saved has no others)
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8)
                                      for s in state["cuda"][:torch.cuda.device_count()]])


def save_checkpoint(engine, out_dir: Path, tag: str, run_state: dict, keep: int, rank: int,
                    loader_state: dict | None = None, protect: str | None = None) -> Path:
    """Save tag ``tag``; ``checkpoints/latest`` names it only once every file of it is written (a
    save cut short leaves ``latest`` on the previous, complete tag). ``loader_state``: this
    process's train loader state (its own videos left out by DALI), beside its RNG state. The
    last ``keep`` complete tags are kept, and ``protect`` (the best epoch's tag) too."""
    ckpt_dir = out_dir / "checkpoints"
    share_batchnorm_statistics(engine.module)  # (process 0's are saved)
    final_dir = ckpt_dir / tag
    # A tag saved again (the epoch's last step: a save_every save, then the epoch-end one) is
    # written beside the first and swapped in whole: saved in place, its files were rewritten
    # while `latest` named it (a kill then left a complete-looking tag with a cut model file,
    # with keep_checkpoints=1 the only one)
    again = [(final_dir / "run_state.json").is_file()]  # (a complete save of it)
    if dist.is_initialized():
        dist.broadcast_object_list(again, src=0)
    tag_dir = ckpt_dir / (f".{tag}{RESAVE}" if again[0] else tag)
    if again[0] and rank == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)  # (a re-save cut short before)
    if dist.is_initialized():
        dist.barrier()
    # collective: every rank calls it
    engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, save_latest=False)
    if engine.zero_optimization_stage() == 3:
        _save_gathered_weights(engine, tag_dir / "model_weights.pt", rank)
    _write_json(tag_dir / f"rng_rank{rank}.json", _rng_state())
    if loader_state is not None:
        _write_json(tag_dir / f"loader_rank{rank}.json", loader_state)
    # on the disk, not only in this machine's cache (a power loss, a node lost): each process
    # syncs the files it wrote (on a network file system only the writer's sync counts)
    fsync_tree(tag_dir)
    if dist.is_initialized():
        dist.barrier()  # every rank's files are written
    if rank == 0:
        # last: run_state.json makes the tag complete (complete_tags), so only once every
        # process's files are there
        write_text_atomic(tag_dir / "run_state.json", json.dumps(run_state), durable=True)
        if tag_dir != final_dir:  # the first save aside, the new one in its place: while they
            # are swapped, the newest complete tag is one of the two (resolve_checkpoint)
            old = ckpt_dir / f".{tag}{REPLACED}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
            os.replace(tag_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        write_text_atomic(ckpt_dir / "latest", tag, durable=True)  # (and the renames above)
        prune_checkpoints(ckpt_dir, keep, tag, protect)
    if dist.is_initialized():
        dist.barrier()
    return final_dir


RESAVE, REPLACED = ".resave", ".replaced"  # a tag saved again, and its first save (hidden names)
# torch.save's RuntimeError when the file could not be written (a full disk: "[enforce fail at
# inline_container.cc] . unexpected pos", or "PytorchStreamWriter failed writing file")
WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos|file write failed")


def prune_checkpoints(ckpt_dir: Path, keep: int, tag: str, protect: str | None = None) -> None:
    """Remove all but the newest ``keep`` complete tags (``tag``, just saved, and ``protect``
    stay whatever their age), saves cut short, and universal checkpoints a stop left behind."""
    complete = [p for p in complete_tags(ckpt_dir) if not p.name.startswith(".")]
    cut_short = [p for p in ckpt_dir.iterdir() if p.is_dir() and p not in complete and (
        re.fullmatch(r"step\d+", p.name)  # saves interrupted before
        # a re-save's copies a kill left (a tag is now saved and named by latest)
        or re.fullmatch(rf"\.step\d+({re.escape(RESAVE)}|{re.escape(REPLACED)})", p.name))]
    # universal checkpoints a stop left behind (loading one is over once a run saves)
    cut_short += sorted(ckpt_dir.glob(f".step*.{UNIVERSAL}"))
    for old in [*cut_short, *(complete[:-keep] if keep > 0 else [])]:
        if old.name not in (tag, protect):
            shutil.rmtree(old, ignore_errors=True)


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """The tags of ``ckpt_dir`` with a readable run_state.json, oldest step first."""
    tags = []
    for path in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        try:
            tags.append((int(json.loads((path / "run_state.json").read_text())["step"]), path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return [path for _, path in sorted(tags)]


def _write_json(path: Path, value) -> None:
    _write_text(path, json.dumps(value))


def write_summary(path: Path, summary: dict) -> None:
    """summary.json as strict JSON: a metric with nothing to score (NaN) is null, as in
    ``siasam-fast eval --json``."""
    _write_json(path, json_nulls(summary))


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)  # an interrupted save never leaves half a file


RUN_STATE_KEYS = ("step", "epoch", "sampler", "config", "vocab")


def read_run_state(tag_dir: Path) -> dict:
    """A checkpoint's run_state.json, or a ValueError naming the file and what is wrong."""
    path = tag_dir / "run_state.json"
    if not path.is_file():
        raise ValueError(f"checkpoint {tag_dir} has no run_state.json: not a checkpoint this "
                         "package wrote, or a damaged one ('latest' may name a deleted tag)")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged (not valid JSON: {err})") from None
    missing = [k for k in RUN_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return state


# Fields that only say how a new run builds its answer vocabulary: a resume takes the run
# folder's ans2label.json, and load_run_state (given the vocabulary) checks its hash.
VOCAB_FIELD = re.compile(r"data\.(tasks\.\w+\.)?(ans2label|num_answers|min_answer_count)")


def load_run_state(tag_dir: Path, cfg: Config | None, world: int | None = None,
                   resolved: dict | None = None, vocab: dict | None = None) -> dict:
    """``tag_dir``'s run state, checked against ``cfg``. With ``world`` (this run's number of
    processes) other than the checkpoint's, ``train.grad_accum`` may change too: it is how a run
    on fewer (or more) processes keeps its batch. ``resolved``: what this run's auto fields
    resolved to (:func:`run_resolutions`), compared with the checkpoint's. ``vocab``: this run's
    answer vocabulary, which must be the checkpoint's (then the fields that only build one,
    VOCAB_FIELD, may differ)."""
    state = read_run_state(tag_dir)
    if vocab is not None and state["vocab"] != _vocab_hash(vocab):
        raise ValueError(f"checkpoint {tag_dir} was trained with another answer vocabulary")
    if cfg is not None:
        known = None
        if resolved is not None:
            before = saved_resolutions(state)
            known = {name: (before.get(name), value) for name, value in resolved.items()}
        problems = config_mismatches(saved_config(state), cfg.to_dict(), known=known)
        if vocab is not None:
            problems = [p for p in problems if not VOCAB_FIELD.fullmatch(p.split(":")[0])]
        if world is not None and world != checkpoint_world_size(tag_dir, state):
            problems = [p for p in problems if not p.startswith("train.grad_accum:")]
        problems = [p + (" (it may change only with the number of processes)"
                         if p.startswith("train.grad_accum:") else "") for p in problems]
        if problems:
            raise ValueError(f"checkpoint {tag_dir} comes from an incompatible config:\n  "
                             + "\n  ".join(problems))
    return state


def train_set(loader) -> dict:
    """What the train loader's positions are (task=multi: each task's, by name; else ""): the
    number of usable examples and a hash of their ids (qid, video, question) in order. Recorded
    in run_state.json (since 2026-11-28): a resume must continue over the same examples, wherever
    data.train now finds them."""
    loaders = loader.loaders if isinstance(loader, MultiTaskLoader) else {"": loader}
    out = {}
    for name, task_loader in loaders.items():
        dataset = task_loader.dataset
        ids = [[ex.qid, ex.video_id, ex.question]
               for ex in (dataset.examples[i] for i in dataset.indices)]
        out[name] = {"num_examples": len(ids), "hash": hashlib.sha256(
            json.dumps(ids).encode()).hexdigest()[:16]}
    return out


def check_train_set(tag_dir: Path, state: dict, cfg: Config, now: dict) -> None:
    """Refuse, naming data.train (data.tasks.NAME.train) and both files and counts, a resume
    whose train examples (:func:`train_set`) are not the checkpoint's. Run states from before
    train_set was recorded: not checked here (the train sampler's example count is, at load)."""
    saved_data = saved_config(state).get("data", {})
    for name, was in (state.get("train_set") or {}).items():
        this = now.get(name)
        if this is None or this == was:
            continue
        field = f"data.tasks.{name}.train" if name else "data.train"
        old = ((saved_data.get("tasks") or {}).get(name) or {}).get(
            "train", saved_data.get("train")) if name else saved_data.get("train")
        new = (cfg.data.tasks.get(name) or {}).get("train", cfg.data.train) if name else \
            cfg.data.train
        same = ("other questions" if this["num_examples"] == was["num_examples"] else
                f"{this['num_examples']}")
        why = (" (the same file: the videos data.manifest / data.video_dir give keep other "
               "examples)" if old == new else "")
        raise ValueError(
            f"checkpoint {tag_dir} was trained on {was['num_examples']} usable examples of "
            f"{field}={old!r}, this run has {same} in {field}={new!r}{why}: a resume continues "
            f"its epoch over the same examples in the same order, so {field} may move only to "
            "a copy of the same data; give the checkpoint's, or start a new run from its weights "
            "with train.init_from")


# How an evaluation during training is measured (each may change on a resume)
EVAL_SETTINGS = ("eval.num_clips", "eval.aggregation", "eval.count_metric",
                 "sampling.eval_placement")


def eval_settings_note(saved: dict, cfg: Config, split: str | None) -> str | None:
    """The note a resume prints where it evaluates ``split`` otherwise than the checkpoint's run
    did (EVAL_SETTINGS; eval.count_metric only with a count task): the earlier epochs' metrics,
    which the best epoch and train.early_stop compare with the coming ones, were measured
    otherwise. None where nothing changed or nothing is evaluated."""
    if not split:
        return None
    now = cfg.to_dict()
    counts = any(stream.task == "count" for stream in cfg.streams().values())
    changed = []
    for name in EVAL_SETTINGS:
        if name == "eval.count_metric" and not counts:
            continue
        section, key = name.split(".")
        was, this = saved.get(section, {}).get(key), now[section][key]
        if was != this:
            changed.append(f"{name} {was} -> {this}")
    if not changed:
        return None
    return (f"note: {', '.join(changed)}: the earlier epochs' {split} metrics "
            "(metrics_epochs.csv) were measured with the checkpoint's settings; the best epoch "
            "and train.early_stop compare them with this run's as they are")


def checkpoint_world_size(tag_dir: Path, state: dict) -> int:
    """How many processes saved ``tag_dir`` (run_state.json says since 2026-11-27; before, its
    per-process RNG files do)."""
    if "world_size" in state:
        return int(state["world_size"])
    return max(1, len(list(tag_dir.glob("rng_rank*.json"))))


def zero_partitions(tag_dir: Path) -> int:
    """The number of ZeRO optimizer partitions in ``tag_dir`` (one per process that saved it;
    0 without ZeRO, whose optimizer state is whole in the model file)."""
    return len(list(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


UNIVERSAL = "universal"  # the tag of a universal checkpoint's folder


def zero_stage_of(tag_dir: Path, state: dict) -> int | None:
    """The ZeRO stage that saved ``tag_dir`` (run_state.json says since 2026-11-27; before, its
    files tell stage 3 and stage 0 apart from stages 1-2: None for those)."""
    if "zero_stage" in state:
        return int(state["zero_stage"])
    if list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        return 3
    return None if zero_partitions(tag_dir) else 0


def check_zero_stage(tag_dir: Path, state: dict, stage: int) -> None:
    """DeepSpeed moves optimizer state between ZeRO stages 1 and 2, not between those, stage 0
    (no partitions) and stage 3 (parameters partitioned too): refuse such a resume by name."""
    saved = zero_stage_of(tag_dir, state)
    family = {0: "0", 1: "1-2", 2: "1-2", 3: "3"}
    if family.get(saved if saved is not None else 1) != family.get(stage):
        was = f"ZeRO stage {saved}" if saved is not None else "ZeRO stage 1 or 2"
        raise ValueError(
            f"checkpoint {tag_dir} was saved with {was}, this run's DeepSpeed config has stage "
            f"{stage}: DeepSpeed loads optimizer state across stages 1 and 2 only; resume with a "
            "config of the checkpoint's stage, or start a new run from its weights with "
            "train.init_from")


def universal_checkpoint(tag_dir: Path, ckpt_dir: Path, rank: int, world: int) -> Path:
    """``tag_dir`` as a DeepSpeed universal checkpoint, for a run on another number of processes
    than saved it (ZeRO partitions its optimizer state by process, and DeepSpeed loads such a
    checkpoint only on as many). Process 0 converts it with DeepSpeed's ``ds_to_universal`` into
    the hidden folder ``.<tag>.universal`` of ``ckpt_dir`` (this run's checkpoints folder, on a
    file system every process reads), the others wait, and every process raises the same error
    if it fails. Returns that folder: ``engine.load_checkpoint``'s ``load_dir``, with tag
    ``universal``; remove it once every process has loaded (:func:`remove_universal`)."""
    load_dir = ckpt_dir / f".{tag_dir.name}.universal"
    error = None
    if rank == 0:
        shutil.rmtree(load_dir, ignore_errors=True)  # a conversion cut short
        load_dir.mkdir(parents=True)
        workers = str(max(1, min(4, (os.cpu_count() or 1) // 2)))
        # (ds_to_universal also writes a 'latest_universal' file beside its output folder)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(tag_dir), "--output_folder", str(load_dir / UNIVERSAL),
               "--inject_missing_state", "--num_extract_workers", workers,
               "--num_merge_workers", workers]
        print(f"converting {tag_dir} ({zero_partitions(tag_dir)} ZeRO partition(s)) to a "
              f"universal checkpoint for {world} process(es) in {load_dir}", flush=True)
        start = time.perf_counter()
        try:
            proc = run_to_end(cmd)
        except OSError as err:
            error = f"could not run DeepSpeed's ds_to_universal: {err}"
        except BaseException:  # stopped (Ctrl-C, SIGTERM): nothing half-made is kept
            shutil.rmtree(load_dir, ignore_errors=True)
            print("stopped while converting the checkpoint (the conversion was ended too, and "
                  "nothing of it kept): the next --resume converts it again", file=sys.stderr)
            raise
        else:
            if proc.returncode != 0:
                lines = proc.stdout.strip().splitlines() or ["(no output)"]
                error = (f"DeepSpeed's ds_to_universal failed (exit status {proc.returncode}) "
                         f"converting {tag_dir}: {lines[-1]}\n(its full output: "
                         f"python {' '.join(cmd[1:4])} {tag_dir} --output_folder /tmp/universal "
                         "--inject_missing_state)")
            else:
                print(f"universal checkpoint written in {time.perf_counter() - start:.1f} s",
                      flush=True)
        if error is not None:
            shutil.rmtree(load_dir, ignore_errors=True)
    if dist.is_initialized() and world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(f"{error}\nResume on the {zero_partitions(tag_dir)} process(es) that "
                         "saved it, or start a new run from its weights with train.init_from")
    return load_dir


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` (its output and errors captured together). A SIGTERM meanwhile (a scheduler
    stopping the job while it starts) ends it too, and this process with status 143, where the
    default action would leave the command running on its own."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        output, _ = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def restore_buffers(module: torch.nn.Module, tag_dir: Path) -> None:
    """Copy the module's buffers (BatchNorm's running statistics and counts) from ``tag_dir``:
    DeepSpeed 0.19's universal checkpoint load restores parameters and optimizer state, not
    buffers (they stay as initialised)."""
    saved = load_model_weights(tag_dir)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved:
                buf.copy_(saved[name])


def unshare_optimizer_steps(optimizer) -> int:
    """Give every parameter's optimizer state its own ``step`` tensor. DeepSpeed 0.19's ZeRO-3
    universal load assigns one tensor to every sub-group's ``step``, and torch's Adam(W) adds 1
    to it in place per sub-group: the step count would grow by the number of sub-groups per
    step (and keep doing so in every checkpoint saved from then on, torch.save keeps the alias).
    Returns the number of aliases undone."""
    while hasattr(optimizer, "optimizer"):  # DeepSpeed's ZeRO wrapper -> the torch optimizer
        optimizer = optimizer.optimizer
    seen, undone = set(), 0
    for state in getattr(optimizer, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
                undone += 1
            seen.add(id(step))
    return undone


def remove_universal(load_dir: Path, rank: int, world: int) -> None:
    """Remove a universal checkpoint once every process has loaded it (the run's own checkpoints
    from here on are saved for its number of processes)."""
    if dist.is_initialized() and world > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(load_dir, ignore_errors=True)


def resharded_loader_state(tag_dir: Path, state: dict, saved_world: int) -> dict:
    """The train loader state for a run on another number of processes than ``tag_dir``'s: the
    sampler's position is the same in every saved process (the loader's ``load_state_dict``
    maps it onto the new shards), and the videos any process left out are left out by all."""
    saved = [json.loads(path.read_text()) for path in
             (tag_dir / f"loader_rank{r}.json" for r in range(saved_world)) if path.is_file()]

    def merged(loader: dict, of) -> dict:  # ``of``: a rank's file -> that loader's state
        bad = {}
        for each in saved:
            bad.update((of(each) or {}).get("bad_videos", {}))
        return {**loader, "bad_videos": bad} if bad else dict(loader)

    loader = state["sampler"]
    if "tasks" in loader:  # task=multi: each task's loader
        tasks = {name: merged(task, lambda each, name=name: each.get("tasks", {}).get(name))
                 for name, task in loader["tasks"].items()}
        return {**loader, "tasks": tasks}
    return merged(loader, lambda each: each)


def resharding_note(tag_dir: Path, state: dict, saved_world: int, world: int, cfg: Config,
                    position: int | dict) -> str:
    """What a resume on another number of processes changes (printed by process 0);
    ``position``: where the train loader now starts in each new shard (task=multi: each task's
    loader, by task name)."""
    saved_train = state["config"].get("train", {})
    old_batch = (int(saved_train.get("batch_size", cfg.train.batch_size)) * saved_world
                 * int(saved_train.get("grad_accum", 1)))
    batch = cfg.train.batch_size * world * cfg.train.grad_accum
    sampler = state["sampler"]
    epoch = int(sampler["epoch"]) + 1
    note = (f"note: checkpoint {tag_dir.name} was saved by {saved_world} process(es), this run "
            f"has {world}: ")

    def progress(saved: dict, now: int) -> tuple[int, int, int, bool]:
        """(examples done, examples, given again, complete) of a sampler's epoch."""
        n, drop_last = int(saved["num_examples"]), bool(saved.get("drop_last", False))
        done = min(int(saved["position"]) * saved_world, n)
        complete = int(saved["position"]) >= shard_length(n, saved_world, drop_last)
        return done, n, max(0, done - world * now), complete

    if "tasks" in sampler:  # task=multi: ``position`` is {task: where its loader now starts}
        each = {name: progress(task, position[name]) for name, task in sampler["tasks"].items()}
        parts = [f"{name} after its first {done} of {n} examples"
                 + (f" ({again} given again)" if again else "")
                 for name, (done, n, again, _) in each.items()]
        complete = all(p[3] for p in each.values())
        where = f"epoch {epoch} continues, each task where it was ({'; '.join(parts)}), its " \
                "batches left in a new order"
    else:
        done, n, again, complete = progress(sampler, position)
        where = (f"epoch {epoch} continues after its first {done} of {n} examples"
                 + (f" ({again} of them given again)" if again else ""))
    note += f"epoch {epoch + 1} starts (epoch {epoch} was complete)" if complete else where
    if zero_partitions(tag_dir):
        note += "; ZeRO's optimizer state is re-partitioned (DeepSpeed universal checkpoint)"
    if batch != old_batch:
        per_accum = cfg.train.batch_size * world
        keep = (f"--set train.grad_accum={old_batch // per_accum} keeps it"
                if old_batch % per_accum == 0 else
                f"no train.grad_accum keeps it on {world} process(es) (train.batch_size cannot "
                "change on a resume)")
        note += (f". The batch per step changes from {old_batch} to {batch} examples "
                 f"(train.batch_size x processes x train.grad_accum): {keep}")
    return note


def saved_steps_per_epoch(state: dict) -> int:
    """Optimizer steps per epoch of the run that saved ``state`` (its sampler state and config)."""
    if "steps_per_epoch" in state:
        return int(state["steps_per_epoch"])
    sampler, train_cfg = state["sampler"], state["config"].get("train", {})
    shard = shard_length(int(sampler["num_examples"]), int(sampler["world_size"]),
                         bool(sampler.get("drop_last", False)))
    batches = -(-shard // int(train_cfg.get("batch_size", 1)))
    return optimizer_steps(batches, int(train_cfg.get("grad_accum", 1)))


# ------------------------------------------------------------------------------------------------
# Logging


RUN_FILES = ("metrics_steps.csv", "metrics_epochs.csv", "summary.json", "predictions_test.jsonl")
RUN_FOLDERS = ("checkpoints", "tensorboard")


def previous_run(out_dir: Path) -> list[str]:
    """What another run left in ``out_dir`` (checkpoint tags, metrics, summary); [] if nothing."""
    found = []
    ckpt = out_dir / "checkpoints"
    if ckpt.is_dir():
        tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and not p.name.startswith("."))
        if tags:
            found.append("checkpoints " + ", ".join(tags))
    return found + [name for name in RUN_FILES if (out_dir / name).is_file()]


def set_aside_previous_run(out_dir: Path) -> Path:
    """Move what :func:`previous_run` finds (and the run's TensorBoard logs, config and answer
    vocabulary) into ``out_dir/replaced-<UTC time>/``; returns that folder. Nothing else in
    ``out_dir`` is touched."""
    aside = out_dir / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir()
    for name in (*RUN_FOLDERS, *RUN_FILES, "config.json", "ans2label.json"):
        if (out_dir / name).exists():
            (out_dir / name).rename(aside / name)
    return aside


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def check_siamese_impl(impl: str, device: torch.device) -> None:
    """siamese.impl (and the SIASAM_IMPL variable) checked before the run starts, not at its
    first step."""
    if siamese.requested_impl(impl) == "triton" and device.type != "cuda" \
            and not siamese.interpreting():
        raise ValueError(f"siamese.impl={impl} ({siamese.IMPL_ENV}="
                         f"{os.environ.get(siamese.IMPL_ENV, '')!r}) asks for the Triton kernels, "
                         "which need a CUDA GPU (or TRITON_INTERPRET=1 for the Triton interpreter "
                         "on CPU); use siamese.impl=reference")


class MetricsLog:
    """Appends rows to a CSV (and TensorBoard when installed); rank 0 only. ``keep_rows``: a
    resumed log's earlier rows stay in ``rows`` (the epochs' history; not the steps': a run
    resumed after 100k steps would hold some 90 MB of them, unused, to its end)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None,
                 keep_rows: bool = True):
        self.path, self.enabled = path, enabled
        self.writer = None
        self.rows: list[dict] = []  # the rows kept from before a resume, as numbers
        if not enabled:
            return
        if resume_step is not None and path.is_file():  # drop rows past the resumed step
            with path.open() as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
            if keep_rows:
                self.rows = [{k: _number(v) for k, v in r.items()} for r in rows]
            self.columns = list(rows[0].keys()) if rows else None
            with path.open("w", newline="") as fh:
                if rows:
                    w = csv.DictWriter(fh, fieldnames=self.columns)
                    w.writeheader()
                    w.writerows(rows)
        elif path.is_file():
            path.unlink()
        self.columns = None
        if path.is_file():
            with path.open() as fh:
                self.columns = next(csv.reader(fh), None)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file() or self.columns is None
        if new:
            self.columns = list(row.keys())
        added = [k for k in row if k not in self.columns]
        if added:  # a column first seen now (num_failed, say): the file is written again with it
            with self.path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            self.columns += added
            buffer = io.StringIO()
            w = csv.DictWriter(buffer, fieldnames=self.columns)
            w.writeheader()
            w.writerows(rows)
            w.writerow(row)
            write_text_atomic(self.path, buffer.getvalue())
        else:
            with self.path.open("a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(f"{self.path.stem}/{k}", v, row["step"])
            # written out now, as the CSV row is: the writer is never closed, and its thread
            # flushes only every 2 minutes (a process ending soon after lost the last ones)
            self.writer.flush()


# ------------------------------------------------------------------------------------------------
# The loop


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Train SiaSamRea with DeepSpeed.")
    parser.add_argument("--config", default=None, help="run config (YAML), e.g. configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="auto|if-any|PATH",
                        help="continue a run: 'auto' = the latest checkpoint of train.out_dir; "
                        "'if-any' = that if there is one, else a new run (for jobs that are "
                        "requeued); or a checkpoint folder")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser = deepspeed.add_config_arguments(parser)
    for action in parser._actions:  # DeepSpeed's own help for the flags a run of this uses
        if action.dest == "deepspeed_config":
            action.help = ("DeepSpeed config (JSON: ZeRO stage, precision), e.g. "
                           "configs/ds/zero2_bf16.json; default: ZeRO stage 2 in the machine's "
                           "precision (fp32 on a CPU, bf16 on an A100 / H100, fp16 on a V100)")
        elif action.dest in ("deepscale", "deepscale_config", "deepspeed"):
            action.help = argparse.SUPPRESS  # deprecated (deepscale), or unused: always DeepSpeed
    return parser.parse_args(argv)


_TRAINING: list[bool] = []  # non-empty once the run's first step is near (for main's message)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Train; a bad config, path or checkpoint ends with one clear line (exit status 2)."""
    _TRAINING.clear()
    try:
        with stop_raises():  # the start-up: a scheduler's SIGTERM ends it with one line (the
            return train(argv, prog)  # run's own stop handling takes over at the first step)
    except USAGE_ERRORS as err:
        # one write of the whole line: several processes' lines (an error every process raises)
        # then never run into each other in the launcher's output (print writes the text and the
        # newline apart)
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        return 2
    except Stopped as stopped:  # a stop signal in the start-up (an extension's build ends
        # through its own cleanup, its lock released), or in the moments after the training
        how = ("interrupted: stopped" if stopped.name == "SIGINT" else
               f"stopped by {stopped.name}")
        print(f"{how} " + (
            "after the training: train.out_dir keeps its last checkpoint (--resume auto "
            "continues from it)" if _TRAINING else
            "during the start-up, before the first step: nothing was trained; run the same "
            "command again to start"), file=sys.stderr)
        return stopped.exit_status
    except KeyboardInterrupt:
        # Ctrl-C during the start-up (before the run's stop handling is in place: nothing has
        # been written to train.out_dir yet) or a second one, which stops at once: one line, not a
        # traceback
        print("interrupted: stopped at once; train.out_dir keeps its last complete checkpoint, "
              "if any (--resume auto continues from it)", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:  # a failing run's traceback keeps its loaders, and their workers, alive
        close_loaders()
        end_process_group()


def end_process_group() -> None:
    """Shut the process group down before the interpreter's exit: left to the exit, gloo's
    threads sometimes abort it (SIGABRT, "terminate called without an active exception"; seen
    with `siasam-fast eval` and with a start refused on two processes), and the launcher then
    reports a failure, or another one than the error the run printed."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (a broken group: the exit ends it anyway)
            pass


def lock_run_folder(out_dir: Path, rank: int, world: int) -> FolderLock | None:
    """Process 0 takes the run folder's lock for the whole training (see :func:`lock_folder`),
    the others take none; if it is held by another training, every process raises the same
    error. None on the processes other than 0."""
    lock = error = None
    if rank == 0:
        try:
            lock = lock_folder(out_dir, "train.out_dir")
        except ValueError as err:
            error = str(err)
    if dist.is_initialized() and world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(error)
    return lock


def start_view(resume: str | None, out_dir: Path) -> dict:
    """What this process finds at the start: the checkpoint ``--resume`` continues (``resume``,
    None for a new run), or the error saying there is none (``error``), and what a previous run
    left in ``out_dir`` (``held``, [] when resuming it), with this process's host."""
    view = {"out_dir": str(out_dir), "resume": None, "held": [], "error": None,
            "host": socket.gethostname()}
    try:
        if resume == "if-any":  # a job that may have run before (requeued): continue it if so
            try:
                view["resume"] = str(resolve_checkpoint(out_dir))
            except FileNotFoundError:
                pass
        elif resume:
            view["resume"] = str(resolve_checkpoint(out_dir if resume == "auto" else resume))
    except FileNotFoundError as err:
        view["error"] = str(err)
        cut = sorted(p.name for p in (out_dir / "checkpoints").glob("step*")
                     if resume == "auto" and p.is_dir() and re.fullmatch(r"step\d+", p.name))
        # a first save cut short (a SIGKILL after a stop signal, a second Ctrl-C)
        if cut and not complete_tags(out_dir / "checkpoints"):
            view["error"] += (f"; {out_dir / 'checkpoints'} holds only a save cut short "
                              f"({', '.join(cut)}, without run_state.json): the run never saved "
                              "a complete checkpoint, so start it again with --resume if-any "
                              "(or --set train.overwrite=true)")
        aside = sorted(out_dir.glob("replaced-*/checkpoints/latest"))  # train.overwrite's
        if aside:  # a replacing run that never saved: the replaced one is still there
            view["error"] += (f"; the run that train.overwrite set aside is in "
                              f"{aside[-1].parent.parent}: --resume {aside[-1].parent.parent} "
                              "continues it (with --set train.overwrite=true while "
                              "train.out_dir holds the failed run's files)")
        return view
    tag_dir = Path(view["resume"]) if view["resume"] else None
    if not (tag_dir is not None and _same_dir(tag_dir.parent.parent, out_dir)):
        view["held"] = previous_run(out_dir)
    return view


def check_same_start(view: dict, world: int) -> None:
    """Every process must resume the same checkpoint (or none) and find the same previous run.
    On several nodes they differ where ``train.out_dir`` is not one folder every node shares (a
    node-local disk): then every process stops with one error naming two that differ, where the
    ones that found nothing would stop alone and leave the others waiting in the first
    collective. The processes agreeing, the error they share (no checkpoint) is raised."""
    if dist.is_initialized() and world > 1:
        views = [None] * world
        dist.all_gather_object(views, view)
        keys = ("resume", "held", "error")
        first = views[0]
        other = next((r for r, v in enumerate(views) if any(v[k] != first[k] for k in keys)),
                     None)
        if other is not None:
            def finds(v: dict) -> str:
                if v["error"]:
                    return f"finds no checkpoint ({v['error']})"
                if v["resume"]:
                    return f"resumes {v['resume']}"
                return ("finds " + "; ".join(v["held"]) if v["held"] else
                        "finds no previous run") + " (a new run)"

            raise ValueError(
                f"the processes find different things in train.out_dir={first['out_dir']}: "
                f"process 0 (on {first['host']}) {finds(first)}, process {other} (on "
                f"{views[other]['host']}) {finds(views[other])}: on several nodes, "
                "train.out_dir must be a folder on a file system every node shares (not a "
                "node-local disk such as /tmp)")
    if view["error"]:
        raise FileNotFoundError(view["error"])


def check_start_args(args: argparse.Namespace, cfg: Config) -> None:
    """Refuse, naming what is valid, a training without a run config (every setting at its
    default: no data) and a ``--resume`` value that is neither a keyword nor an existing path."""
    if not args.config and not cfg.data.manifest:
        shipped = sorted(p.name for p in packaged_config("synthetic.yaml").parent.glob("*.yaml"))
        raise ValueError("no --config given (without one every setting is its default, with no "
                         "data): name a run config, e.g. --config configs/synthetic.yaml (after "
                         "`siasam-fast synth --out data/synthetic`); configs/ holds "
                         + ", ".join(shipped))
    if args.resume and args.resume not in ("auto", "if-any") and not Path(args.resume).exists():
        raise FileNotFoundError(f"--resume {args.resume!r}: no such checkpoint folder; give "
                                "'auto' (the latest checkpoint of train.out_dir), 'if-any' (that "
                                "if there is one, else a new run) or a checkpoint folder (a run's, "
                                "its checkpoints/ or one tag)")


def check_ds_config_early(args: argparse.Namespace, cfg: Config) -> None:
    """The DeepSpeed file (there, JSON, its settings against the run config's) and its
    precision on this device, checked before the process group starts (on a CPU that start
    builds or waits for DeepSpeed's all-reduce op: 30 s and more before a one-line error). Every
    process reads the same file and raises the same error. The file's train_batch_size waits
    for the run's check, once the number of processes is known (an inherited WORLD_SIZE may not
    be this run's)."""
    ds = ds_config.load_ds_config(getattr(args, "deepspeed_config", None), cfg.train.precision)
    ds.pop("train_batch_size", None)
    ds_config.finalize(ds, cfg.train.batch_size, cfg.train.grad_clip, 1, cfg.train.grad_accum)


def train(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    cfg = load_config(args.config, args.set)
    check_start_args(args, cfg)
    for stream in cfg.streams().values():  # now, not after the start-up's slow part (below)
        if stream.data.manifest:
            require_manifest_file(stream.data.manifest)
    check_ds_config_early(args, cfg)
    rank, world, device = init_distributed()
    out_dir = Path(cfg.train.out_dir)
    # Nothing is written into out_dir (but its lock file, removed at the end) until the config,
    # data, model and checkpoint have been checked (a failed start leaves a previous run's files
    # as they were), and another run's checkpoints and metrics are never replaced by mistake.
    blocker = file_in_the_way(out_dir)
    if blocker is not None:
        raise ValueError(f"train.out_dir={str(out_dir)!r}: {str(blocker)!r} is a file, not a "
                         "folder")
    # One training at a time in out_dir: a second one (even with --resume auto) stops here,
    # before it reads a checkpoint or changes anything there.
    lock = lock_run_folder(out_dir, rank, world)
    try:
        return run_training(args, cfg, rank, world, device, out_dir)
    finally:
        if lock is not None:
            lock.release()


def run_training(args: argparse.Namespace, cfg: Config, rank: int, world: int,
                 device: torch.device, out_dir: Path) -> int:
    rank0 = rank == 0
    view = start_view(args.resume, out_dir)
    check_same_start(view, world)  # (on several nodes: the same checkpoint on every one)
    tag_dir = Path(view["resume"]) if view["resume"] else None
    resuming_here = tag_dir is not None and _same_dir(tag_dir.parent.parent, out_dir)
    at_epoch_end = False  # the checkpoint resumed was saved at its epoch's last step
    held = view["held"]
    # if-any and no checkpoint: what is there is an earlier try that never saved one (its
    # metrics only, or a first save cut short: a tag without run_state.json), which cannot be
    # resumed: it is replaced, as with train.overwrite.
    unresumable = args.resume == "if-any" and not complete_tags(out_dir / "checkpoints")
    if held and not (cfg.train.overwrite or unresumable):
        raise ValueError(f"train.out_dir={out_dir} holds another run ({'; '.join(held)}): "
                         "continue it with --resume auto, choose another train.out_dir, or "
                         "replace it with --set train.overwrite=true")
    aside = sorted(out_dir.glob("replaced-*/checkpoints/latest"))
    if rank0 and tag_dir is None and aside and not cfg.train.overwrite:
        print(f"note: {aside[-1].parent.parent} holds a run that train.overwrite set aside and "
              "whose replacement never saved: it stays until you delete it (--resume it to "
              "continue it instead)")
    check_siamese_impl(cfg.siamese.impl, device)
    seed_everything(cfg.train.seed, rank)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and device.type == "cuda"

    # DeepSpeed config: precision and ZeRO from the file; batch size and clipping from ours.
    ds = ds_config.load_ds_config(getattr(args, "deepspeed_config", None), cfg.train.precision)
    ds = ds_config.finalize(ds, cfg.train.batch_size, cfg.train.grad_clip, world,
                            cfg.train.grad_accum)
    precision = ds_config.precision_of(ds)
    zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]

    init_dir = saved_vocab = None
    if tag_dir is None and cfg.train.init_from:
        try:
            init_dir = resolve_checkpoint(cfg.train.init_from)
        except FileNotFoundError as err:
            raise ValueError(f"train.init_from: {err}") from None
    # A resume keeps the answer vocabulary it was trained with. A run started from another's
    # weights (init_from) builds its own, from its own train answers as any new run does (the
    # same one on the same data): init_model_from carries the classifier's rows over by answer.
    if tag_dir is not None and (tag_dir.parent.parent / "ans2label.json").is_file():
        saved_vocab = load_ans2label(tag_dir.parent.parent / "ans2label.json")
    streams, datas = load_streams(cfg, ans2label=saved_vocab)
    vocab = run_vocabulary(streams, datas)
    if rank0:
        for note in (note for data in datas.values() for note in data.notes):
            print(f"note: {note}")
    tokenizer = load_tokenizer(cfg.model)
    texts = {name: TextEncoder(tokenizer, stream.task, cfg.data.max_question_len,
                               cfg.data.mc_text) for name, stream in streams.items()}
    stream_task = {name: stream.task for name, stream in streams.items()}
    train_loader = make_train_loader(cfg, streams, datas, rank, world)
    train_identity = train_set(train_loader)  # (recorded in run_state.json)
    eval_split = (cfg.eval.split if any(cfg.eval.split in data.examples
                                        for data in datas.values()) else None)
    where = ("every data.tasks.NAME." if cfg.task == "multi" else "data.") + cfg.eval.split
    if eval_split is None and cfg.train.early_stop:
        raise ValueError(f"train.early_stop={cfg.train.early_stop} needs an evaluation after each "
                         f"epoch, but {where} is empty: give that split, or set "
                         "train.early_stop=0")
    if rank0 and eval_split is None and cfg.eval.split != "none":
        print(f"note: no evaluation during training: {where} is empty "
              "(eval.split: none says so without this note)")
    # task=multi: the run's metric is the mean accuracy of the open-ended and multiple-choice
    # tasks evaluated; a split only count tasks have gives none (no best epoch, no early stop)
    scored = [name for name, data in datas.items()
              if eval_split in data.examples and streams[name].task != "count"]
    if cfg.task == "multi" and eval_split and not scored:
        what = (f"only count tasks have {eval_split} annotations, and the run's metric is the "
                "mean accuracy of its open-ended and multiple-choice tasks")
        if cfg.train.early_stop:
            raise ValueError(f"train.early_stop={cfg.train.early_stop}: {what}: give one of "
                             f"them a {eval_split} split (data.tasks.NAME.{eval_split}), or set "
                             "train.early_stop=0")
        if rank0:
            print(f"note: {what}: no best epoch is chosen")
    eval_loaders = {name: make_loader(streams[name], data, eval_split, rank, world,
                                      task_name=name)
                    for name, data in datas.items() if eval_split in data.examples}
    if rank0 and cfg.task == "multi" and eval_split and len(eval_loaders) < len(datas):
        print(f"note: data.tasks {', '.join(n for n in datas if n not in eval_loaders)}: no "
              f"{eval_split} annotations, not evaluated during training")

    batches_per_epoch = len(train_loader)  # micro-batches of train.batch_size on each process
    if batches_per_epoch == 0:
        raise ValueError("the train split has no usable examples (see the log for the reasons)")
    accum = cfg.train.grad_accum
    steps_per_epoch = optimizer_steps(batches_per_epoch, accum)
    if rank0 and accum > batches_per_epoch:
        print(f"note: train.grad_accum={accum} is more than an epoch's {batches_per_epoch} "
              f"micro-batches: each step takes one epoch ({epoch_videos(train_loader)} videos "
              "per process), not the batch train.grad_accum x train.batch_size asks for")
    total_steps = steps_per_epoch * cfg.train.epochs  # not max_steps: a stop a resume continues
    # Weights stay NCHW under DeepSpeed (model.use_memory_format); frames still go NHWC.
    model = build_model(cfg, len(vocab), len(tokenizer))
    if init_dir is not None:
        note = init_model_from(model, init_dir, cfg, vocab)
        if rank0:
            print(note)
    if fused_layer_norm(cfg, device):
        replaced = use_apex_layer_norm(model)
        if rank0:
            print(f"apex FusedLayerNorm in place of {replaced} torch LayerNorm(s) "
                  "(model.layer_norm=torch keeps torch's)")
    optimizer, optimizer_name = same_optimizer_everywhere(
        *build_optimizer(model, cfg, device), model, cfg, device, rank, world)
    resolved = run_resolutions(cfg, precision, optimizer_name)  # (recorded in run_state.json)
    # The schedule's length: a resume that changes the steps per epoch sets it to the steps done
    # plus the steps left (saved as schedule_steps, for the resumes after it).
    schedule = {"total": total_steps}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear_decay(schedule["total"], cfg.train.warmup_ratio)(s))
    state = saved_world = None
    if tag_dir is not None:  # checked before DeepSpeed starts, and before any file is written
        state = load_run_state(tag_dir, cfg, world, resolved, vocab)
        check_train_set(tag_dir, state, cfg, train_identity)
        if state.get("precision", precision) != precision:
            raise ValueError(
                f"checkpoint {tag_dir} was trained in {state['precision']}, this run is "
                f"{precision}: resume with a DeepSpeed config of the same precision (its "
                "optimizer state cannot be loaded across precisions), or start a new run from "
                "its weights with train.init_from")
        check_zero_stage(tag_dir, state, zero_stage)
        saved_world = checkpoint_world_size(tag_dir, state)
        universal = saved_world != world and zero_partitions(tag_dir) > 0  # ZeRO partitions
        load_dir, load_tag = tag_dir.parent, tag_dir.name
        if universal:  # re-partitioned for this number of processes
            load_dir = universal_checkpoint(tag_dir, out_dir / "checkpoints", rank, world)
            load_tag = UNIVERSAL
            ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    match_buffer_dtypes(engine.module)

    step, start_epoch = 0, 0
    resumed_sums: dict = {}
    if tag_dir is not None:
        engine.load_checkpoint(str(load_dir), tag=load_tag)
        unshare_optimizer_steps(engine.optimizer)  # (also heals a checkpoint saved aliased)
        if universal:
            restore_buffers(engine.module, tag_dir)
            remove_universal(load_dir, rank, world)
        step, start_epoch = state["step"], state["epoch"]
        if rank0:
            print(f"resumed from {tag_dir} ({step} steps done)")
            note = eval_settings_note(saved_config(state), cfg, eval_split)
            if note:
                print(note)
        saved_cfg = state["config"].get("train", {})
        old_epochs = saved_cfg.get("epochs", cfg.train.epochs)
        old_steps = saved_steps_per_epoch(state)
        align = cfg.train.batch_size * accum  # examples of one optimizer step, per process
        if saved_world != world:
            loader_state = resharded_loader_state(tag_dir, state, saved_world)
        else:
            loader_file = tag_dir / f"loader_rank{rank}.json"  # this process's own (older: none)
            loader_state = (json.loads(loader_file.read_text()) if loader_file.is_file()
                            else state["sampler"])
        train_loader.load_state_dict(loader_state, align)  # resumes at one of its steps' start
        if rank0 and saved_world != world:
            where = (train_loader.sampler.position if cfg.task != "multi" else
                     {name: loader.sampler.position
                      for name, loader in train_loader.loaders.items()})
            print(resharding_note(tag_dir, state, saved_world, world, cfg, where))
        saved_total = int(state.get("schedule_steps", old_steps * old_epochs))
        # the saved end, moved by the epochs added or removed
        moved = saved_total + (cfg.train.epochs - old_epochs) * steps_per_epoch
        if old_steps == steps_per_epoch and saved_world == world:
            schedule["total"] = moved
        else:  # the steps done, then the rest of the run at this run's steps per epoch (on
            # another number of processes also with the same steps per epoch: a task=multi
            # epoch's re-cut can give a step again)
            position = train_loader.sampler.position
            left = (0 if position >= len(train_loader.sampler) else
                    steps_per_epoch - optimizer_steps(position // cfg.train.batch_size, accum))
            schedule["total"] = (step + left
                                 + max(0, cfg.train.epochs - int(state["epoch"]) - 1)
                                 * steps_per_epoch)
        if schedule["total"] != saved_total:
            was, now = move_schedule_end(scheduler, saved_total, schedule["total"],
                                         cfg.train.warmup_ratio)
            if rank0:
                why = ([f"train.epochs changed from {old_epochs} to {cfg.train.epochs}"]
                       if old_epochs != cfg.train.epochs else [])
                if old_steps != steps_per_epoch:
                    why.append(f"an epoch takes {steps_per_epoch} steps (was {old_steps})")
                elif schedule["total"] != moved:
                    again = schedule["total"] - moved
                    why.append(f"epoch {int(state['epoch']) + 1} continued on {world} "
                               f"process(es) takes {abs(again)} step(s) "
                               f"{'more' if again > 0 else 'fewer'} than on {saved_world}")
                print(f"note: {' and '.join(why)}: the learning rate now decays to zero at step "
                      f"{schedule['total']} (was {saved_total}), the run's end; the rate of "
                      f"step {step + 1} is {now * cfg.train.lr:.3g} (was "
                      f"{was * cfg.train.lr:.3g})")
        rng_file = tag_dir / f"rng_rank{rank}.json"
        if rng_file.is_file():
            _set_rng_state(json.loads(rng_file.read_text()))
        else:  # a process the checkpoint had not: not the streams of a new run's start
            seed_everything(cfg.train.seed + 7919 * step, rank)
        if train_loader.sampler.position >= len(train_loader.sampler):  # saved at an epoch end
            start_epoch += 1
            at_epoch_end = True
        else:  # mid-epoch: the epoch's running loss sums continue
            resumed_sums = state.get("epoch_sums", {})
    replaced = None  # the previous run, moved aside until this one has saved a checkpoint
    if rank0:  # the start has been checked: now the run's folder is written
        if held:
            replaced = set_aside_previous_run(out_dir)
            why = ("train.overwrite" if cfg.train.overwrite else
                   "--resume if-any, no checkpoint to continue")
            print(f"{why}: moved the previous run in {out_dir} ({'; '.join(held)}) to "
                  f"{replaced}; it is deleted once this run has saved its first checkpoint")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if vocab:
            save_ans2label(vocab, out_dir / "ans2label.json")
    if dist.is_initialized():
        dist.barrier()
    steps_log = MetricsLog(out_dir / "metrics_steps.csv", rank0, step if tag_dir else None,
                           keep_rows=False)
    epochs_log = MetricsLog(out_dir / "metrics_epochs.csv", rank0, step if tag_dir else None)
    if rank0:
        print(f"siasam-fast: {world} process(es) on {device}, {precision}, ZeRO stage "
              f"{engine.zero_optimization_stage()}, {optimizer_name}; {len(train_loader.dataset)} "
              f"train examples, {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs"
              + (f" (each step {accum} micro-batches of {cfg.train.batch_size} per process)"
                 if accum > 1 else "") + "; "
              f"siamese alpha={cfg.siamese.alpha} N={cfg.sampling.num_clips} -> {out_dir}")
        visual_note = model_visual_note(cfg)
        if visual_note:
            print(visual_note)

    def checkpoint(epoch: int) -> None:
        nonlocal replaced
        try:
            save_checkpoint(engine, out_dir, f"step{step}", run_state(epoch),
                            cfg.train.keep_checkpoints, rank, train_loader.state_dict(),
                            protect=kept_best_tag(history, cfg, eval_split,
                                                  out_dir / "checkpoints"))
        except (OSError, RuntimeError) as err:  # a full disk, a permission: one line, and
            # what is still there (torch.save reports a failed write as a RuntimeError)
            if isinstance(err, RuntimeError) and not WRITE_FAILED.search(str(err)):
                raise
            latest = out_dir / "checkpoints" / "latest"
            kept = latest.read_text().strip() if latest.is_file() else None
            raise ValueError(
                f"saving checkpoint step{step} in {out_dir / 'checkpoints'} failed: {err}; "
                + (f"the last complete one, {kept}, is intact (--resume auto continues from "
                   "it once the cause is fixed)" if kept else "no earlier checkpoint exists")
            ) from None
        if replaced is not None:  # this run can be resumed now: the old one goes
            shutil.rmtree(replaced, ignore_errors=True)
            replaced = None

    def run_state(epoch: int) -> dict:
        return {"step": step, "epoch": epoch, "sampler": train_loader.state_dict(),
                "epoch_sums": {**sums, "_steps": n_steps}, "eval_due": eval_due,
                "config": cfg.to_dict(), "vocab": _vocab_hash(vocab),
                "precision": precision, "world_size": world, "steps_per_epoch": steps_per_epoch,
                "schedule_steps": schedule["total"],
                "zero_stage": zero_stage, "resolved": resolved, "train_set": train_identity}

    def sync():  # torch's stream only: DALI's prefetch on its own streams is not this phase's
        if cfg.train.sync_timing and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def end_of_epoch(epoch: int, sums: dict, n_steps: int) -> None:
        """The epoch's evaluation and its row of metrics_epochs.csv."""
        metrics = evaluate_tasks(engine, eval_loaders, streams, texts, device, dtype,
                                 desc=f"eval {eval_split}") if eval_loaders else {}
        row = {"step": step, "epoch": epoch + 1,
               **epoch_means(sums, n_steps),
               **{f"{eval_split}_{k}": v for k, v in metrics.items()},
               "elapsed_s": time.perf_counter() - t_run}
        epochs_log.write(row)
        history.append(row)
        if rank0 and metrics:
            loss_text = f"{row.get('train_loss', float('nan')):.4f}"
            result = (tasks_line(metrics, streams) if cfg.task == "multi" else
                      f"{metric_name} {metrics[metric_name]:.4f}")
            print(f"epoch {epoch + 1}: train loss {loss_text}, {eval_split} {result}")

    def evaluate_or_stop(epoch: int, sums: dict, n_steps: int) -> str | None:
        """:func:`end_of_epoch` after the epoch's checkpoint; with one process a stop signal ends
        the evaluation at once (its name is returned), since the checkpoint is saved. Several
        processes finish it together (a signal on one would leave the others in its
        collectives) and agree on the stop after it."""
        if world > 1:
            end_of_epoch(epoch, sums, n_steps)
            return None
        if stop_request.signal is not None:  # (during the save)
            return stop_request.signal
        try:
            with stop_raises():
                end_of_epoch(epoch, sums, n_steps)
        except Stopped as stopped:
            stop_request.signal = stopped.name
            print(f"\n{stopped.name}: the evaluation of epoch {epoch + 1} is left to the "
                  "resumed run (the epoch's checkpoint is saved)", file=sys.stderr, flush=True)
            return stopped.name
        return None

    history: list[dict] = list(epochs_log.rows)  # a resumed run's summary covers the whole run
    metric_name = task_metric(cfg.task)
    stop = False
    stopped_by = None  # the stop signal this run stopped for
    eval_due = False  # a stop at an epoch's end leaves its evaluation to the resumed run
    first_step = step
    stand_ins = 0  # examples whose video failed at decode time, replaced (pipeline.dataset)
    step_seconds = 0.0  # time inside training steps (data wait included, evaluation excluded)
    t_run = time.perf_counter()
    # SIGTERM / SIGINT / SIGUSR1 (a scheduler's stop or pre-emption, Ctrl-C): finish the step,
    # save a checkpoint, exit 128 + the signal's number. Processes agree over a gloo group.
    # The processes agree on a stop every CHECK_EVERY micro-batches or so (at step ends).
    stop_request = StopRequest(world, dist.new_group(backend="gloo") if world > 1 else None,
                               check_every=max(1, CHECK_EVERY // accum), announce=rank0)
    # A checkpoint saved at an epoch's last step (train.save_every) before that epoch's
    # evaluation, which then never ended (the process killed outright, out of memory, a node
    # lost): this run's metrics_epochs.csv has no row for the epoch, so it is evaluated first,
    # as a stop signal's eval_due would have it. Rank 0 holds the history and decides.
    unevaluated = [bool(resuming_here and at_epoch_end and not state.get("eval_due") and rank0
                        and not any(r.get("epoch") == int(state["epoch"]) + 1
                                    for r in history))]
    if world > 1 and resuming_here and at_epoch_end:
        dist.broadcast_object_list(unevaluated, src=0)
    if unevaluated[0]:
        if rank0:
            print(f"note: {tag_dir.name} ends epoch {int(state['epoch']) + 1}, whose evaluation "
                  f"has no row in {out_dir / 'metrics_epochs.csv'} (the run ended during it): "
                  "evaluating it first")
        state = {**state, "eval_due": True}
    _TRAINING.append(True)
    with stop_request:
        if tag_dir is not None and state.get("eval_due"):  # stopped right at that epoch's end
            due_sums = dict(state.get("epoch_sums", {}))
            end_of_epoch(state["epoch"], due_sums, int(due_sums.pop("_steps", 0)))
            if rank0 and resuming_here:  # done: resuming this checkpoint again must not redo it
                try:  # (another run's checkpoint is left as it is)
                    _write_json(tag_dir / "run_state.json", {**state, "eval_due": False})
                except OSError as err:
                    print(f"note: could not mark {tag_dir} as evaluated ({err})",
                          file=sys.stderr)
        if rank0 and tag_dir is not None and start_epoch >= cfg.train.epochs:
            print(f"note: {tag_dir.name} ends the run's {cfg.train.epochs} epoch(s): nothing is "
                  "left to train (raise train.epochs to train on); the test evaluation and "
                  "summary.json are done again")
        for epoch in range(start_epoch, cfg.train.epochs):
            if cfg.train.max_steps and step >= cfg.train.max_steps:  # a resume already there
                stop = True
                break
            # rank 0 holds the whole history (a resumed run's earlier epochs are in its CSV)
            reason = [early_stop_reason(history, eval_split, metric_name, cfg.train.early_stop)
                      if rank0 else None]
            if world > 1 and cfg.train.early_stop:
                dist.broadcast_object_list(reason, src=0)
            if reason[0]:
                if rank0:
                    print(f"{reason[0]}; epochs {epoch + 1}-{cfg.train.epochs} are not run")
                break
            train_loader.set_epoch(epoch)  # keeps a restored mid-epoch position of this epoch
            engine.train()
            done = train_loader.sampler.position // cfg.train.batch_size  # this epoch's batches
            bar = tqdm(total=steps_per_epoch, initial=optimizer_steps(done, accum),
                       desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not rank0,
                       dynamic_ncols=True)
            sums = {k: v for k, v in resumed_sums.items() if k != "_steps"}
            n_steps = int(resumed_sums.get("_steps", 0))
            resumed_sums = {}
            # task=multi: each micro-batch's examples (a task's short last batch comes mid-epoch)
            sizes = (train_loader.micro_batch_sizes() if accum > 1
                     and hasattr(train_loader, "micro_batch_sizes") else None)
            t_data = time.perf_counter()
            for index, batch in enumerate(train_loader, start=done):
                # Micro-batch `index` of the epoch: its optimizer step's size and whether it ends it
                _, last = accumulation_group(index, batches_per_epoch, accum)
                weight = micro_batch_weight(index, batches_per_epoch, accum,
                                            len(train_loader.sampler), cfg.train.batch_size,
                                            sizes)
                if index == done or index % accum == 0:  # the first micro-batch of a step
                    t_step = t_data  # the step's wall clock starts with its first batch's wait
                    step_parts: dict = {}
                    times = dict.fromkeys(("data_s", "forward_s", "backward_s", "optimizer_s"), 0.0)
                    videos, step_tasks = 0, {}
                    lr = scheduler.get_last_lr()[0]  # the rate this step uses (step() moves it)
                    alpha = alpha_at(cfg.siamese, step, schedule["total"])
                stand_ins += int(batch["stand_in"].sum())  # a CPU tensor: no device sync
                videos += len(batch["example_index"])
                name = batch.get("head", "")  # task=multi: the task of this micro-batch
                step_tasks[name] = None
                batch.update(texts[name](batch))
                batch = to_device(batch, device, dtype)
                sync()

                def forward(batch=batch, alpha=alpha, task=stream_task[name]):
                    outputs = engine(batch)
                    return total_loss(outputs, batch, task, cfg.siamese,
                                      engine.module.reasoning, alpha=alpha)

                parts, (t_fwd, t_bwd, t_opt, t_end) = micro_step(engine, forward, weight, last,
                                                                 sync)
                for key, start, end in (("data_s", t_data, t_fwd), ("forward_s", t_fwd, t_bwd),
                                        ("backward_s", t_bwd, t_opt),
                                        ("optimizer_s", t_opt, t_end)):
                    times[key] += end - start
                for k, v in parts.items():  # the step's loss terms: the mean over its examples
                    step_parts[k] = step_parts.get(k, 0.0) + float(v) * weight
                if name:  # task=multi: each task's loss over its micro-batches of the epoch
                    sums[f"{name}_loss"] = sums.get(f"{name}_loss", 0.0) + float(parts["loss"])
                    sums[f"{name}_batches"] = sums.get(f"{name}_batches", 0) + 1
                if not math.isfinite(float(parts["loss"])) and precision != "fp16":
                    raise FloatingPointError(
                        f"loss is {float(parts['loss'])} at step {step + 1}: lower train.lr or "
                        "check the data (fp16 overflow steps are skipped by the loss scaler "
                        "instead)")
                if not last:  # the step goes on with the next micro-batch
                    t_data = time.perf_counter()
                    continue
                step += 1
                n_steps += 1
                # Wall time, up to the reads of the loss terms above: without train.sync_timing
                # the phases' clocks stop when their Python returns, and the device's work left
                # queued is waited for in those reads (or in a later micro-batch's phases)
                step_time = time.perf_counter() - t_step
                step_seconds += step_time
                row = {"step": step, "epoch": epoch + 1,
                       **({"task": "+".join(step_tasks)} if cfg.task == "multi" else {}),
                       **step_parts, "lr": lr,
                       **({"alpha": alpha} if cfg.siamese.alpha_warmup else {}),
                       "loss_scale": float(getattr(optimizer, "cur_scale",
                                                   getattr(optimizer, "loss_scale", 1.0)) or 1.0),
                       "skipped_steps": int(engine.skipped_steps), **times,
                       "step_s": step_time, "videos_per_s": videos * world / step_time}
                for k in step_parts:
                    sums[k] = sums.get(k, 0.0) + row[k]
                steps_log.write(row)
                bar.update(1)
                if step % max(1, cfg.train.log_every) == 0:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                if cfg.train.save_every and step % cfg.train.save_every == 0:
                    checkpoint(epoch)
                if cfg.train.max_steps and step >= cfg.train.max_steps:
                    stop = True
                    break
                epoch_end = train_loader.sampler.position >= len(train_loader.sampler)
                if stop_request.should_stop(step, epoch_end):
                    stop, stopped_by = True, stop_request.signal
                    break
                t_data = time.perf_counter()
            bar.close()
            epoch_done = not stop or train_loader.sampler.position >= len(train_loader.sampler)
            # Stopped by a signal at the epoch's end: its evaluation is left to the resumed run
            # (the checkpoint says so), not done inside the scheduler's grace period.
            eval_due = epoch_done and stopped_by is not None
            saved = cfg.train.save_every and step % cfg.train.save_every == 0
            # An epoch's end is saved before its evaluation: a kill during the evaluation (a
            # scheduler's SIGKILL after its grace, out of memory) loses no training; the resumed
            # run finds no metrics row for that epoch and evaluates it first (`unevaluated`)
            if eval_due or ((stop or epoch_done) and not saved):
                checkpoint(epoch)
            if epoch_done and not eval_due:
                stopped = evaluate_or_stop(epoch, sums, n_steps)
                if stopped:  # a signal during the evaluation (one process): it is left to
                    stop, stopped_by, eval_due = True, stopped, True  # the resumed run
                elif rank0:  # (the best epoch, known now, is kept from the next prune on)
                    prune_checkpoints(out_dir / "checkpoints", cfg.train.keep_checkpoints,
                                      f"step{step}", kept_best_tag(history, cfg, eval_split,
                                                                   out_dir / "checkpoints"))
                if not stop and epoch + 1 < cfg.train.epochs and stop_request.should_stop(
                        step, epoch_end=True):  # (a signal during the evaluation: not a step)
                    stop, stopped_by = True, stop_request.signal
            if stop:
                break

        # A signal after the last check (in the last epoch's evaluation, say): the training is
        # over and saved; the test evaluation and the summary are left to --resume auto.
        if stopped_by is None and stop_request.should_stop(step, epoch_end=True):
            stopped_by = stop_request.signal
    if stopped_by is not None:
        if rank0:
            at_end = train_loader.sampler.position >= len(train_loader.sampler)
            more = epoch + 1 < cfg.train.epochs
            left = ("the rest of the run" if not at_end else
                    f"epoch {epoch + 1}'s evaluation" + (" and the rest of the run" if more
                                                          else "") if eval_due else
                    "the rest of the run" if more else "the test evaluation and summary.json")
            print(f"stopped by {stopped_by} after step {step}: checkpoint saved in "
                  f"{out_dir / 'checkpoints'}; --resume auto continues with {left}")
        return stop_request.exit_status
    # The training is over and saved: a stop signal from here to the summary ends the run at once
    # and leaves the test evaluation and summary.json to --resume auto.
    try:
        with stop_raises():
            steps_run = step - first_step
            if dist.is_initialized() and world > 1:
                counts = [0] * world
                dist.all_gather_object(counts, stand_ins)
                stand_ins = sum(counts)
            if rank0 and stand_ins:
                print(f"note: {stand_ins} training example(s) got a stand-in because their video "
                      "failed at decode time (the warnings name the files; `siasam-fast index` "
                      "again)")
            # stopped short of the planned steps by train.max_steps (a stop signal returned
            # above; early stopping sets no stop)
            at_max_steps = stop and step < total_steps
            if rank0 and at_max_steps:
                print(f"stopped at train.max_steps={cfg.train.max_steps} ({step} of "
                      f"{total_steps} steps planned): checkpoint saved in "
                      f"{out_dir / 'checkpoints'}; --resume auto with a larger (or no) "
                      "train.max_steps continues the run")
            summary = {"steps": step, "epochs_completed": len(history), "precision": precision,
                       "ended": "max_steps" if at_max_steps else "complete",
                       "planned_steps": total_steps,
                       "steps_per_s": steps_run / max(1e-9, step_seconds),  # training steps only
                       "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                                          if device.type == "cuda" else None),
                       "zero_stage": engine.zero_optimization_stage(), "world_size": world,
                       "optimizer": optimizer_name, "train_seconds": time.perf_counter() - t_run,
                       "stand_in_examples": stand_ins, "history": history}
            previous = out_dir / "summary.json"
            if steps_run == 0 and rank0 and previous.is_file():  # a finished run started again:
                try:  # its training's speed stays what it was, not this start's nothing
                    old = json.loads(previous.read_text())
                    summary.update({k: old[k] for k in SPEED_KEYS if k in old})
                except (OSError, ValueError):
                    pass
            test_loaders = {name: make_loader(streams[name], data, "test", rank, world,
                                              task_name=name)
                            for name, data in datas.items() if "test" in data.examples
                            and not stop}  # (a run train.max_steps stopped is not tested)
            if test_loaders:
                summary["test"] = evaluate_tasks(engine, test_loaders, streams, texts, device,
                                                 dtype, desc="test",
                                                 predictions=out_dir / "predictions_test.jsonl")
    except Stopped as stopped:
        if rank0:
            print(f"\nstopped by {stopped.name} after the training (step {step}, saved in "
                  f"{out_dir / 'checkpoints'}), before the test evaluation finished: --resume "
                  "auto does the test evaluation and summary.json")
        return stopped.exit_status
    if eval_split and history:
        summary[eval_split] = {k[len(eval_split) + 1:]: v for k, v in history[-1].items()
                               if k.startswith(eval_split + "_")}
        best = best_epoch(history, eval_split, metric_name, out_dir / "checkpoints")
        if best:
            summary["best"] = best
    if rank0:
        write_summary(out_dir / "summary.json", summary)
        final = summary.get("test") or summary.get(eval_split or "", {})
        print(f"done: {step} steps in {summary['train_seconds']:.1f} s; final metrics {final}")
        if "best" in summary:
            print(best_line(summary["best"]))
    if dist.is_initialized():
        dist.barrier()
    return 0


# What summary.json says of the training's speed (kept when a finished run is started again)
SPEED_KEYS = ("steps_per_s", "peak_memory_gb", "train_seconds", "stand_in_examples")


def checkpoint_config(checkpoint: str, config_path: str | None = None,
                      overrides: list[str] | None = None) -> tuple[Path, dict, Config]:
    """A checkpoint's tag folder, run state and config (its own, or ``config_path``, with
    ``overrides``); a config whose model or task does not fit the weights is refused."""
    tag_dir = resolve_checkpoint(checkpoint)
    state = read_run_state(tag_dir)
    saved = config_from_json(json.dumps(state["config"]))
    cfg = load_config(config_path, overrides) if config_path else \
        Config.from_dict(_apply(saved.to_dict(), overrides))
    problems = config_mismatches(saved.to_dict(), cfg.to_dict())
    seen = [p for p in problems if p.startswith(SEEN_FIELDS)]
    problems = [p for p in problems if not p.startswith(("train.", "data.", *LOSS_FIELDS))]
    if problems:
        raise ValueError(f"checkpoint {tag_dir} does not fit this config:\n  "
                         + "\n  ".join(problems))
    if seen and int(os.environ.get("RANK", "0")) == 0:
        print("note: the input is prepared otherwise than in training (allowed, but the model "
              "did not learn on it): " + "; ".join(seen), file=sys.stderr)
    return tag_dir, state, cfg


# How a frame or a question reaches the model: an evaluation may change these, with a note
SEEN_FIELDS = ("data.frame_fit:", "data.image_size:", "data.mc_text:")
# Settings of training only: the loss (losses.py; SiameseReasoning keeps omega, tau, skg and
# detach_soft_label for L_siamese alone, never called in evaluation) and dropout (off in eval
# mode; no parameters). An evaluation may change them. learn_w1 / learn_w2 stay: they make
# theta1 / theta2 parameters or buffers.
LOSS_FIELDS = tuple(f"{name}:" for name in (
    "siamese.alpha", "siamese.omega", "siamese.tau", "siamese.skg", "siamese.detach_soft_label",
    "siamese.gt_clips", "siamese.gt_pool", "siamese.mc_loss", "siamese.alpha_warmup",
    "model.dropout"))


def answer_question(checkpoint: str, video: str, question: str,
                    candidates: list[str] | None = None, top: int = 5,
                    overrides: list[str] | None = None, start: float | None = None,
                    end: float | None = None, task: str | None = None) -> dict:
    """``siasam-fast ask``: one question about one video file, answered by a checkpoint as its
    evaluation would (eval.num_clips clips placed by sampling.eval_placement, scores aggregated
    by eval.aggregation). Returns ``{"task", "answers": [(answer, probability), ...]}`` (open:
    the ``top`` most likely answers of the vocabulary; mc: every candidate) or ``{"task",
    "count"}``. ``start`` / ``end`` (seconds): only that segment of the video, as a How2QA
    question's ``ts`` limits its evaluation. ``task``: which task of a task=multi checkpoint
    answers (its data.tasks NAME)."""
    from siasam_fast.data.examples import QAExample
    from siasam_fast.pipeline.dataset import segment_frames
    from siasam_fast.pipeline.manifest import probe_video

    # One video: PyAV in this process (DALI would start a pipeline and its readers for it).
    tag_dir, state, cfg = checkpoint_config(
        checkpoint, None, [*(overrides or []), "data.backend=pyav", "data.num_workers=0",
                           "eval.batch_size=1"])
    if not question.strip():
        raise ValueError("--question is empty")
    run_cfg, head = cfg, None
    if cfg.task == "multi":
        names = ", ".join(cfg.data.tasks)
        if task is None:
            raise ValueError(f"this checkpoint was trained on several tasks (task=multi: "
                             f"{names}): choose the one that answers with --task NAME")
        if task not in cfg.data.tasks:
            raise ValueError(f"--task {task!r}: this checkpoint's tasks are {names}")
        cfg, head = cfg.stream(task), task
    elif task is not None:
        raise ValueError(f"--task {task!r}: this checkpoint was trained on one task "
                         f"({cfg.task}); --task chooses among a task=multi checkpoint's")
    if cfg.task == "mc" and not candidates:
        raise ValueError("this checkpoint answers multiple-choice questions (task=mc): give the "
                         "answers to choose from with --candidates 'first|second|...'")
    if cfg.task != "mc" and candidates:
        raise ValueError(f"--candidates: this checkpoint's task is {cfg.task!r}, which takes none")
    twice = sorted({c for c in candidates or [] if [x.strip() for x in candidates].count(c.strip())
                    > 1})
    if twice:
        raise ValueError(f"--candidates: {twice[0]!r} is given more than once; give each answer "
                         "once")
    ans2label = {}
    open_cfg = next((s for s in run_cfg.streams().values() if s.task == "open"), None)
    given = any(o.split("=", 1)[0].strip().endswith(".ans2label") for o in overrides or [])
    if open_cfg is not None and given and open_cfg.data.ans2label and not Path(
            open_cfg.data.ans2label).is_file():  # (the value as the config reads it)
        raise ValueError(f"data.ans2label={open_cfg.data.ans2label!r}: no such file")
    if open_cfg is not None:  # the model has an open-ended head: its answers
        vocab_file = tag_dir.parent.parent / "ans2label.json"
        if not vocab_file.is_file() and open_cfg.data.ans2label:  # the config's (or --set) file
            vocab_file = Path(open_cfg.data.ans2label)
        if not vocab_file.is_file():
            raise ValueError(f"checkpoint {tag_dir}: its run folder has no ans2label.json (the "
                             "answer vocabulary the run was trained with): give it with --set "
                             "data.ans2label=FILE")
        ans2label = load_ans2label(vocab_file)
        if state["vocab"] != _vocab_hash(ans2label):
            raise ValueError(f"{vocab_file} is not the answer vocabulary {tag_dir} was trained "
                             "with")
    path = Path(video)
    if path.is_dir():
        raise ValueError(f"--video {video!r} is a folder: give one video file")
    if not path.is_file():
        raise ValueError(f"--video {video!r}: no such file")
    record = probe_video(path.resolve(), path.resolve().parent)
    if not record.ok:
        raise ValueError(f"--video {video!r}: cannot be decoded: {record.reason}")
    example = QAExample(qid="ask", video_id=record.video_id, question=question, task=cfg.task,
                        answer="0" if cfg.task == "count" else "", candidates=candidates,
                        answer_index=0 if cfg.task == "mc" else None, start=start, end=end)
    segment = segment_frames(example, record)
    if isinstance(segment, str):
        raise ValueError(f"--start / --end: {segment}")
    data = Data(examples={"test": [example]}, labels={"test": {0: 0}}, ans2label=ans2label,
                manifest={record.video_id: record})
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(run_cfg, len(ans2label), len(tokenizer), device)
    check_question_len(cfg, model)  # (the questions are encoded with this command's settings)
    model.load_state_dict(load_model_weights(tag_dir))
    model.to(device).eval()
    text = TextEncoder(tokenizer, cfg.task, cfg.data.max_question_len, cfg.data.mc_text)
    tokens = text.tokens(question, candidates)
    if tokens > cfg.data.max_question_len:  # (truncated by the encoder, as in training)
        what = ("the question with its longest candidate" if cfg.task == "mc" else
                "the question")
        print(f"note: {what} is {tokens} tokens; the model reads {cfg.data.max_question_len} "
              "of them (data.max_question_len), as training did", file=sys.stderr)
    loader = make_loader(cfg, data, "test", 0, 1)
    try:
        batch = next(iter(loader))
    finally:
        close_loaders()
    batch.update(text(batch))
    if head is not None:
        batch["head"] = head
    batch = to_device(batch, device, torch.float32)
    with torch.no_grad():
        outputs = model(batch)
    scores = aggregate_clips(task_scores(outputs, cfg.task).float(), batch["clip_mask"],
                             cfg.eval.aggregation)[0]
    if cfg.task == "count":  # the answer as evaluation takes it (eval.count_metric), and the output
        answer = count_answer(scores, cfg.eval.count_metric)
        count = float(answer)
        if cfg.eval.count_metric == "tgif":  # an integer (none when the output is not a number)
            count = int(count) if math.isfinite(count) else None
        return {"task": "count", "count": count, "output": float(scores)}
    probs = scores.softmax(-1)
    if cfg.task == "mc":
        return {"task": "mc", "answers": [(c, float(p)) for c, p in zip(candidates, probs)]}
    label2ans = {label: answer for answer, label in ans2label.items()}
    best = probs.topk(min(top, len(probs)))
    return {"task": "open", "answers": [(label2ans[int(i)], float(p))
                                        for p, i in zip(best.values, best.indices)]}


def evaluate_checkpoint(checkpoint: str, config_path: str | None = None,
                        overrides: list[str] | None = None, split: str | None = None,
                        predictions: str | Path | None = None) -> dict:
    """``siasam-fast eval``: load a checkpoint's weights and evaluate one split. ``predictions``:
    a JSONL file of one row per question (qid, question type, prediction, its score)."""
    tag_dir, state, cfg = checkpoint_config(checkpoint, config_path, overrides)
    split = split or cfg.eval.split
    if split not in ("train", "val", "test"):
        hint = (" (the run's eval.split is 'none': choose one with --split)"
                if split == "none" else "")
        raise ValueError(f"split={split!r}: valid splits are train, val, test{hint}")
    if split != "train":  # (not an eval.split value: a task=multi config checks its tasks')
        cfg.eval.split = split
    run_dir = tag_dir.parent.parent
    vocab_file = run_dir / "ans2label.json"
    ans2label = load_ans2label(vocab_file) if vocab_file.is_file() else None
    # Only the split evaluated is read, and train's annotations only when the answer vocabulary
    # must be built from them (a run saves it: its data may have moved since).
    needs_train = ans2label is None and any(
        stream.task == "open" and not stream.data.ans2label for stream in cfg.streams().values())
    streams, datas = load_streams(
        cfg, ans2label=ans2label, need_train=False,
        splits=tuple(dict.fromkeys((split, "train") if needs_train else (split,))), scoring=True)
    if not any(split in data.examples for data in datas.values()):
        where = ("data.tasks.NAME." if cfg.task == "multi" else "data.") + split
        raise ValueError(f"split {split!r} has no annotations in this config ({where} is empty)")
    vocab = run_vocabulary(streams, datas)
    if state["vocab"] != _vocab_hash(vocab):
        raise ValueError(f"checkpoint {tag_dir} was trained with another answer vocabulary")
    rank, world, device = init_distributed()
    for note in (n for data in datas.values() for n in data.notes) if rank == 0 else ():
        if re.sub(r"^data\.tasks\.\w+: ", "", note).startswith(f"data.{split}"):
            print(f"note: {note}", file=sys.stderr)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, len(vocab), len(tokenizer), device)
    model.load_state_dict(load_model_weights(tag_dir))
    model.to(device)
    loaders = {name: make_loader(streams[name], data, split, rank, world, task_name=name,
                                 scoring=True)
               for name, data in datas.items() if split in data.examples}
    texts = {name: TextEncoder(tokenizer, streams[name].task, cfg.data.max_question_len,
                               cfg.data.mc_text) for name in loaders}
    if rank == 0:  # what the table below is of
        questions = sum(len(data.examples[split]) for data in datas.values()
                        if split in data.examples)
        print(f"evaluating {tag_dir} on {split} ({questions} questions; eval.num_clips="
              f"{cfg.eval.num_clips}, sampling.eval_placement={cfg.sampling.eval_placement}, "
              f"eval.aggregation={cfg.eval.aggregation})", flush=True)
    return evaluate_tasks(model, loaders, streams, texts, device, torch.float32,
                          desc=f"eval {split}",
                          predictions=Path(predictions) if predictions else None)


def init_model_from(model: torch.nn.Module, tag_dir: Path, cfg: Config, ans2label: dict) -> str:
    """``train.init_from``: start a new run from a checkpoint's model weights (no optimizer,
    schedule or data position): SiaSamRea fine-tuned from a trained baseline, or the paper's
    recipe, a model pre-trained on one dataset (TGIF-QA) fine-tuned on another. The model
    (``model.*``) must match. What depends on the task and the answers:

    - another task (open / mc / count): the head starts fresh, everything else is loaded;
    - task=multi (one head per task, ``heads.NAME``), into or out of it: a head starts from the
      checkpoint's head of the same name and task, else from the checkpoint's only head of its
      task (a one-task run fine-tuned from a multi-task pre-training takes the head of its task);
      with none, or several and none of its name, it starts fresh;
    - open-ended with another answer vocabulary (``ans2label``, this run's): the classifier's
      hidden layers are loaded, and its output row (weight and bias) of every answer that the
      checkpoint's vocabulary also holds is carried over; the other answers' rows start fresh;
    - weights whose shape differs (theta1 / theta2 when the number of clips changes) keep their
      initialisation.

    Returns a one-line report."""
    state = json.loads((tag_dir / "run_state.json").read_text())
    saved = saved_config(state)
    model_problems = [p for p in config_mismatches(saved, cfg.to_dict()) if p.startswith("model.")]
    # Another task's head starts fresh, whichever it is; so does every head when the heads are
    # built otherwise (model.qa_head), which only a change of task allows.
    other_heads = next((p for p in model_problems if p.startswith("model.qa_head:")), None)
    problems = [p for p in model_problems
                if not (p.startswith("model.qa_head:") and saved["task"] != cfg.task)]
    if problems:
        raise ValueError(f"train.init_from={str(tag_dir)!r} has another model:\n  "
                         + "\n  ".join(problems))  # fmt: skip
    weights = load_model_weights(tag_dir)
    own = model.state_dict()
    own_heads, saved_heads = _head_prefixes(cfg.to_dict()), _head_prefixes(saved)
    body = {k: v for k, v in weights.items() if not k.startswith(tuple(saved_heads))}
    fresh_head, notes = [], []
    for prefix, task in own_heads.items():
        source = _head_source(prefix, task, saved_heads)
        name = prefix[len("heads."):-1] if prefix.startswith("heads.") else ""
        label = f"head {name}" if name else "head"
        if source is None or other_heads:
            fresh_head += [k for k in own if k.startswith(prefix)]
            same = [p[len("heads."):-1] for p, t in saved_heads.items() if t == task]
            why = (f"the checkpoint's {source[:-1]} is another answer head: {other_heads}"
                   if source is not None else
                   f"the checkpoint's task is {saved['task']!r}" if saved["task"] != "multi" else
                   f"the checkpoint has no {task} head" if not same else
                   f"the checkpoint has {len(same)} {task} heads, {', '.join(same)}")
            notes.append(f"{label} initialised afresh ({why})")
            continue
        body.update({prefix + k[len(source):]: v for k, v in weights.items()
                     if k.startswith(source)})
        if source != prefix:
            notes.append(f"{label} from the checkpoint's {source[:-1]}")
        if task == "open" and state["vocab"] != _vocab_hash(ans2label):
            fresh, note = _carry_answer_rows(model, prefix, body, own, tag_dir, state, ans2label)
            fresh_head += fresh
            notes.append(note)
    weights = body
    answers_note = "".join(f"; {note}" for note in notes)
    kept = sorted(k for k, v in weights.items() if k in own and own[k].shape != v.shape
                  and k not in fresh_head)  # fmt: skip
    loaded = {k: v for k, v in weights.items()
              if k in own and own[k].shape == v.shape and k not in fresh_head}
    missing = sorted(set(own) - set(loaded) - set(kept) - set(fresh_head))
    model.load_state_dict(loaded, strict=False)
    note = f"init_from {tag_dir}: {len(loaded)} of {len(own)} tensors loaded{answers_note}"
    if kept:
        note += f"; shape differs, initialised afresh: {', '.join(kept)}"
    if missing:
        note += f"; not in the checkpoint: {', '.join(missing)}"
    return note


def _head_prefixes(config: dict) -> dict[str, str]:
    """The state-dict prefix of each answer head of a model with this config -> its task."""
    if config.get("task") == "multi":
        return {f"heads.{name}.": spec.get("task")
                for name, spec in config.get("data", {}).get("tasks", {}).items()}
    return {"head.": config.get("task")}


def _head_source(prefix: str, task: str, saved: dict[str, str]) -> str | None:
    """The checkpoint's head that starts this model's head ``prefix`` (of ``task``): the one of
    the same name and task, else the checkpoint's only head of that task (a one-task checkpoint's
    head, or a multi-task one's only head of the task). None: it starts fresh."""
    if saved.get(prefix) == task:
        return prefix
    same_task = [p for p, t in saved.items() if t == task]
    return same_task[0] if len(same_task) == 1 else None


def _carry_answer_rows(model, prefix: str, weights: dict, own: dict, tag_dir: Path, state: dict,
                       ans2label: dict) -> tuple[list[str], str]:
    """An open-ended head loaded from a checkpoint with another answer vocabulary: its output
    rows of the answers both vocabularies hold are carried over (into ``model``), the others
    start fresh. Returns the keys left to their initialisation and a note."""
    module = model.get_submodule(prefix[:-1])
    last = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    out_w, out_b = f"{prefix}{last}.weight", f"{prefix}{last}.bias"  # a row per answer
    vocab_file = tag_dir.parent.parent / "ans2label.json"
    old = load_ans2label(vocab_file) if vocab_file.is_file() else {}
    if old and _vocab_hash(old) != state["vocab"]:  # rewritten since: its rows are not these
        old = {}
    pairs = [(label, old[answer]) for answer, label in ans2label.items() if answer in old]
    if pairs and out_w in weights and out_b in weights:
        new_rows, old_rows = (torch.tensor(x) for x in zip(*pairs))
        w, b = own[out_w].clone(), own[out_b].clone()
        w[new_rows] = weights[out_w][old_rows].to(w.dtype)
        b[new_rows] = weights[out_b][old_rows].to(b.dtype)
        model.load_state_dict({out_w: w, out_b: b}, strict=False)
    rows = weights[out_w].shape[0] if out_w in weights else "?"
    note = (f"answers: {len(pairs)} of this run's {len(ans2label)} carried over from the "
            f"checkpoint's {rows}-answer classifier"
            + (", the others start fresh" if len(pairs) < len(ans2label) else ""))
    if not old:
        note += (f" ({vocab_file} is missing or is not the vocabulary it was trained with: its "
                 "answers are unknown)")
    return [out_w, out_b], note


def _apply(values: dict, overrides):
    from siasam_fast.config import apply_overrides, expand_home

    return expand_home(apply_overrides(values, overrides or []))


def load_model_weights(tag_dir: Path) -> dict:
    """Model weights of a checkpoint of any ZeRO stage, loaded with ``weights_only=True``.

    ZeRO-3 partitions the parameters, so its saves also write the gathered ``model_weights.pt``;
    for stages 0-2 DeepSpeed's ``mp_rank_00_model_states.pt`` holds the whole module."""
    gathered = tag_dir / "model_weights.pt"
    try:
        if gathered.is_file():
            weights = torch.load(gathered, map_location="cpu", weights_only=True)
        else:
            states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                                weights_only=True)
            weights = states["module"]
    except FileNotFoundError:
        if tag_dir.is_dir():
            raise
        raise ValueError(f"checkpoint {tag_dir} was removed while this command ran (a training in "
                         "that run folder keeps only its last train.keep_checkpoints): run it "
                         "again, or name a kept tag") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def _save_gathered_weights(engine, path: Path, rank: int) -> None:
    """ZeRO-3: gather the partitioned parameters once and let rank 0 write them."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
