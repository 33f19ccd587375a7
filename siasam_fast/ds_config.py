"""DeepSpeed configurations: ZeRO stage 0-3 x fp16 / bf16 / fp32 (the files under configs/ds/).

Plain DeepSpeed ignores the value "auto" (that is a HF Trainer feature), so every value is real.
The run config owns the batch size, the gradient accumulation and the clipping norm:
:func:`finalize` writes them into the DeepSpeed dict at start-up, so one DeepSpeed file serves
every model size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from siasam_fast.paths import shipped_config

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp16", "bf16", "fp32")

# fp16 on V100: dynamic loss scaling. loss_scale 0 = dynamic; start at 2**16; halve on overflow
# (the step is skipped), double after 1000 clean steps; hysteresis 2 tolerates one overflow first.
FP16_DYNAMIC = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def make_ds_config(stage: int, precision: str, micro_batch: int = 8,
                   grad_clip: float = 1.0) -> dict:
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage {stage!r}: valid stages are 0, 1, 2, 3")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: valid values are {', '.join(PRECISIONS)}")
    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True,
                    reduce_bucket_size=50_000_000, allgather_bucket_size=50_000_000)
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=50_000_000,
                    stage3_param_persistence_threshold=100_000)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "fp16": dict(FP16_DYNAMIC) if precision == "fp16" else {"enabled": False},
        "bf16": {"enabled": precision == "bf16"},
        # torch AdamW and apex FusedAdam are as safe under ZeRO as DeepSpeed's own Adam.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def config_file_name(stage: int, precision: str) -> str:
    return f"zero{stage}_{precision}.json"


def has_bf16() -> bool:
    """Whether this machine's GPU computes in bf16 (Ampere, sm_80, and later). Not
    ``torch.cuda.is_bf16_supported()``: by default it counts emulation, and says True on a V100,
    where bf16 runs emulated and slowly."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def default_precision() -> str:
    """bf16 where the GPU has it (Ampere+), fp16 on V100, fp32 on CPU (no fp16 there)."""
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if has_bf16() else "fp16"


def load_ds_config(path: str | None, precision: str = "auto", stage: int = 2) -> dict:
    """The DeepSpeed dict from a file, or the default for this machine."""
    if path:
        p = shipped_config(path)
        if not p.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path!r} does not exist (see configs/ds/)")
        try:
            config = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {err}") from None
        if not isinstance(config, dict):
            raise ValueError(f"DeepSpeed config {path!r} must hold a JSON object of settings, got "
                             f"a {type(config).__name__}")
        for key in ("optimizer", "scheduler"):
            if key in config:
                raise ValueError(
                    f"DeepSpeed config {path!r} has an {key!r} block, which siasam-fast does not "
                    "use (it builds the optimizer from train.optimizer / train.lr / "
                    "train.weight_decay and the warm-up schedule from train.warmup_ratio): "
                    f"remove the block")
    else:
        config = make_ds_config(stage, default_precision() if precision == "auto" else precision)
    config = _bf16_key(config, path)
    if precision != "auto" and precision != precision_of(config):  # (else keep the file's block)
        config["fp16"] = dict(FP16_DYNAMIC) if precision == "fp16" else {"enabled": False}
        config["bf16"] = {"enabled": precision == "bf16"}
    return config


def _bf16_key(config: dict, source: str | None) -> dict:
    """DeepSpeed's older spelling "bfloat16" as "bf16" (both enable bf16 in DeepSpeed 0.19)."""
    if "bfloat16" not in config:
        return config
    config = dict(config)
    old = config.pop("bfloat16")
    if "bf16" in config and config["bf16"] != old:
        raise ValueError(f"DeepSpeed config {source or ''!r} has both 'bf16' and 'bfloat16', "
                         "which disagree: keep 'bf16'")
    config["bf16"] = old
    return config


def precision_of(config: dict) -> str:
    config = _bf16_key(config, None)
    if config.get("fp16", {}).get("enabled"):
        return "fp16"
    if config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"


def finalize(config: dict, micro_batch: int, grad_clip: float, world_size: int,
             grad_accum: int = 1) -> dict:
    """Write the run's batch size, gradient accumulation and clipping into the DeepSpeed dict;
    check it for this device."""
    config = json.loads(json.dumps(config))
    for key, value in list(config.items()):
        if value == "auto" or (isinstance(value, dict) and "auto" in value.values()):
            raise ValueError(f"DeepSpeed config key {key!r} uses 'auto', which plain DeepSpeed "
                             "ignores: write a real value (see configs/ds/)")
    config = _bf16_key(config, None)
    accum = config.get("gradient_accumulation_steps", 1)
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ValueError(f"DeepSpeed config: gradient_accumulation_steps={accum!r}: must be a "
                         "whole number >= 1")
    if accum not in (1, grad_accum):  # the run config owns it, as it owns the batch size
        raise ValueError(
            f"DeepSpeed config: gradient_accumulation_steps={accum}, but train.grad_accum="
            f"{grad_accum}: the run config sets the accumulation; use --set train.grad_accum="
            f"{accum} (and leave the file's value at 1 or make it agree)")
    wanted = config.get("train_batch_size")
    effective = micro_batch * world_size * grad_accum
    if wanted is not None and wanted != effective:
        raise ValueError(
            f"DeepSpeed config: train_batch_size={wanted!r}, but train.batch_size={micro_batch} "
            f"per process x {world_size} process(es) x train.grad_accum={grad_accum} is "
            f"{effective}: the run config sets the batch; remove train_batch_size from the file "
            "or make it agree")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):  # DeepSpeed's older true / false: the trainer reads a mapping
        raise ValueError(f"DeepSpeed config: zero_optimization={zero!r}: must be a mapping such "
                         'as {"stage": 2} (see configs/ds/)')
    stage = zero.get("stage", 0)
    if stage not in STAGES:
        raise ValueError(f"DeepSpeed config: zero_optimization.stage={stage!r}: valid stages are "
                         f"{', '.join(map(str, STAGES))}")
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = grad_accum
    # DeepSpeed's throughput timer is on by default and synchronises the device when each forward
    # starts and each step ends (from the third step): two device-wide syncs per step that keep
    # the host from queueing ahead, for a rate that is printed only every steps_per_print steps.
    # The trainer times its own steps; a file that sets "timers" keeps its setting.
    config.setdefault("timers", {"throughput": {"enabled": False}})
    config["train_batch_size"] = effective
    config["gradient_clipping"] = grad_clip
    precision = precision_of(config)
    if precision == "fp16" and stage == 0:
        # DeepSpeed 0.19's engine.backward() scales the loss for its ZeRO optimizers only: under
        # ZeRO-0 its FP16_Optimizer / FP16_UnfusedOptimizer never see the loss scaled, yet their
        # step() divides the gradients by the loss scale, so every update is loss-scale times
        # (65536 at the start) too small (deepspeedai/DeepSpeed pull request #8393)
        raise ValueError("fp16 with ZeRO stage 0: DeepSpeed's ZeRO-0 fp16 optimizer divides the "
                         "gradients by the loss scale without the loss ever being scaled, so "
                         "every update is the loss scale (65536) times too small: use "
                         "configs/ds/zero2_fp16.json (or zero1_fp16.json), or ZeRO-0 in bf16 / "
                         "fp32")
    if not torch.cuda.is_available() and precision == "fp16":
        raise ValueError("fp16 needs a CUDA GPU (DeepSpeed refuses it on CPU): use a bf16 or fp32 "
                         "config, e.g. configs/ds/zero2_fp32.json")
    if torch.cuda.is_available() and precision == "bf16" and not has_bf16():
        raise ValueError(f"{torch.cuda.get_device_name()} has no bf16 (e.g. V100): use "
                         "configs/ds/zero2_fp16.json (fp16 with dynamic loss scaling) with "
                         "train.precision auto or fp16 (train.precision=bf16 overrides the file)")
    return config


def write_all(directory: str | Path) -> list[Path]:
    """Regenerate configs/ds/*.json (a test checks the files match this module)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in STAGES:
        for precision in PRECISIONS:
            if (stage, precision) == (0, "fp16"):  # refused (finalize): not shipped
                continue
            path = directory / config_file_name(stage, precision)
            path.write_text(json.dumps(make_ds_config(stage, precision), indent=2) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(Path(__file__).resolve().parent.parent / "configs" / "ds"):
        print(p)
