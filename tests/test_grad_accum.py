"""Gradient accumulation (train.grad_accum): how an epoch's micro-batches make optimizer steps,
and that a step of several micro-batches through DeepSpeed (ZeRO 0, 2, 3) updates the weights as
one step over all their examples would, also for an epoch's shorter last step."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_env import cpu_env

from siasam_fast.training import (
    accumulation_group,
    epoch_means,
    micro_batch_weight,
    optimizer_steps,
    warmup_linear_decay,
)

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("batches", range(1, 12))
@pytest.mark.parametrize("accum", [1, 2, 3, 4, 16])
def test_micro_batches_make_whole_steps_from_the_epochs_start(batches, accum):
    groups, current = [], []
    for index in range(batches):
        size, last = accumulation_group(index, batches, accum)
        current.append((index, size))
        if last:
            groups.append(current)
            current = []
    assert current == []  # the epoch's last micro-batch ends a step
    assert len(groups) == optimizer_steps(batches, accum)
    assert [i for g in groups for i, _ in g] == list(range(batches))
    for k, g in enumerate(groups):
        assert all(size == len(g) for _, size in g)  # each micro-batch knows its step's size
        assert g[0][0] == k * accum  # steps start at multiples of grad_accum (resume positions)
        assert len(g) == accum or k == len(groups) - 1  # only the last step may be shorter
    with pytest.raises(IndexError, match=f"micro-batch {batches} of an epoch of {batches}"):
        accumulation_group(batches, batches, accum)


@pytest.mark.parametrize("examples", range(1, 30))
@pytest.mark.parametrize("accum", [1, 2, 3, 5])
def test_each_example_weighs_the_same_in_its_step(examples, accum):
    batch_size = 4
    batches = -(-examples // batch_size)  # the last micro-batch partial
    for index in range(batches):
        group, _ = accumulation_group(index, batches, accum)
        start = index - index % accum
        step_examples = min(examples, (start + group) * batch_size) - start * batch_size
        mine = min(batch_size, examples - index * batch_size)
        assert micro_batch_weight(index, batches, accum, examples, batch_size) == \
            pytest.approx(mine / step_examples)
    assert micro_batch_weight(0, 1, 1, 3, 4) == 1.0  # no accumulation: the loss as it is


# One or two processes, DeepSpeed's CPU accelerator. On each, engine A takes 3 micro-batches of 2
# examples, then an epoch's short last step of a micro-batch of 2 and a partial one of 1; engine B
# takes the same examples as single batches of 6 and 3. Same weights after each step (fp32, torch
# AdamW; clipping is set but never reached, since clipping would hide a gradient's wrong scale),
# same lr schedule.
SCRIPT = r"""
import json, os, socket, sys
import torch, deepspeed
from siasam_fast.training import micro_step, micro_batch_weight, accumulation_group
if "RANK" not in os.environ:  # one process without a launcher
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
deepspeed.init_distributed(dist_backend="gloo")
stage, rank = int(sys.argv[1]), int(os.environ["RANK"])
torch.manual_seed(0)
x, y = torch.randn(16, 5), torch.randn(16, 3)
x, y = x[8 * rank:8 * rank + 8], y[8 * rank:8 * rank + 8]  # this rank's examples
init = torch.nn.Linear(5, 3).state_dict()

def engine(micro, accum):
    model = torch.nn.Linear(5, 3)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "train_batch_size": micro * accum * int(os.environ["WORLD_SIZE"]),
              "gradient_clipping": 100.0,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**6}
    eng, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                            config=config)
    return eng, sched

def weights(eng):
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(eng.module.parameters())):
            return [p.detach().clone() for p in eng.module.parameters()]
    return [p.detach().clone() for p in eng.module.parameters()]

def loss_of(eng, rows):
    def forward():
        loss = torch.nn.functional.mse_loss(eng(x[rows]), y[rows])
        return loss, {"loss": loss.detach()}
    return forward

a, sched_a = engine(2, 3)
b, sched_b = engine(6, 1)
batches = [[0, 1], [2, 3], [4, 5], [6, 7], [0]]  # an epoch of 9 examples, grad_accum 3
diffs, lrs = [], []
for index, rows in enumerate(batches):
    group, last = accumulation_group(index, len(batches), 3)
    micro_step(a, loss_of(a, rows), micro_batch_weight(index, len(batches), 3, 9, 2), last)
    if last:
        whole = [r for rows_ in batches[index + 1 - group:index + 1] for r in rows_]
        micro_step(b, loss_of(b, whole), 1.0, True)
        diffs.append(max(float((p - q).abs().max()) for p, q in zip(weights(a), weights(b))))
        lrs.append((sched_a.get_last_lr()[0], sched_b.get_last_lr()[0]))
moved = max(float((p - q).abs().max()) for p, q in zip(weights(a), init.values()))
a.destroy(), b.destroy()
torch.distributed.barrier()
torch.distributed.destroy_process_group()
if rank == 0:
    print(json.dumps({"diffs": diffs, "lrs": lrs, "steps": [a.global_steps, b.global_steps],
                      "moved": moved}), flush=True)
# Two ZeRO-3 engines in one process: the interpreter's teardown aborted now and then ("terminate
# called without an active exception", 2 runs in 30 on 2 processes) after the results were out.
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage, processes", [(0, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
def test_accumulated_steps_update_as_one_batch_of_their_examples(stage, processes, tmp_path):
    script = tmp_path / "accumulate.py"
    script.write_text(SCRIPT)
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(free_port())]
    proc = subprocess.run([*launch, str(script), str(stage)], cwd=ROOT, timeout=600,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == [2, 2]  # two optimizer steps each: 3 + 1 micro-batches against 1 + 1
    assert result["moved"] > 1e-2  # the weights did change
    assert len(result["diffs"]) == 2 and max(result["diffs"]) < 1e-6, result
    assert result["lrs"] == [[0.05, 0.05], [0.1 / 3, 0.1 / 3]]  # the schedule moved per step


def test_learning_rate_warms_up_linearly_then_decays_to_zero_at_the_end():
    """train.warmup_ratio: the factor of step s (from 0) rises as (s + 1) / warmup over the first
    round(total x ratio) steps, then falls linearly to zero at ``total_steps`` and stays there.
    Worked by hand."""
    factor = warmup_linear_decay(10, 0.2)  # warmup 2: 0.5, 1, then (10 - s) / 8
    want = [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0, 0.0]
    assert [factor(s) for s in range(13)] == pytest.approx(want)
    factor = warmup_linear_decay(20, 0.13)  # 2.6 steps: rounded to 3, not cut to 2
    assert [factor(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 16 / 17])
    assert warmup_linear_decay(5, 0.0)(0) == 1.0  # no warm-up: the full rate from the start
    factor = warmup_linear_decay(4, 1.0)  # warm-up the whole run: no division by zero after it
    assert [factor(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.0, 0.0])


def test_epoch_means_average_steps_and_each_tasks_micro_batches():
    """The epoch's train_* columns: the loss terms summed per optimizer step over the epoch's
    steps; a task=multi task's NAME_loss, summed per micro-batch, over its own micro-batches;
    the micro-batch counts themselves are no column."""
    sums = {"loss": 6.0, "loss_gt": 4.0, "frameqa_loss": 9.0, "frameqa_batches": 3,
            "count_loss": 2.0, "count_batches": 4}
    assert epoch_means(sums, 2) == pytest.approx(
        {"train_loss": 3.0, "train_loss_gt": 2.0, "train_frameqa_loss": 3.0,
         "train_count_loss": 0.5})
    assert epoch_means({"loss": 0.0}, 0) == {"train_loss": 0.0}  # no step: no division by 0
    assert epoch_means({"action_loss": 0.0, "action_batches": 0}, 3) == {"train_action_loss": 0.0}


def test_fp16_loss_scale_at_its_minimum_is_named_with_what_to_do():
    """DeepSpeed's fp16 loss scaler stops a run whose gradients overflow at every scale with a
    bare Exception ("Current loss scale already at minimum - ... Exiting run."), no cause and no
    way out; the step says fp16 overflowed, the loss, and what to change. Other errors of the
    step pass unchanged. (A stand-in engine: DeepSpeed refuses fp16 on the CPU.)"""
    import torch

    from siasam_fast.training import micro_step

    class Engine:
        def __init__(self, error):
            self.error = error

        def set_gradient_accumulation_boundary(self, last):
            pass

        def backward(self, loss, scale_wrt_gas=True):
            pass

        def step(self):
            raise self.error

    def forward():
        loss = torch.tensor(float("inf"))
        return loss, {"loss": loss}

    deepspeed_says = Exception("Current loss scale already at minimum - cannot decrease scale "
                               "anymore. Exiting run.")
    with pytest.raises(FloatingPointError, match=r"^fp16: the gradients overflowed .*"
                       r"min_loss_scale .*loss is inf: lower train.lr, or train in bf16") as info:
        micro_step(Engine(deepspeed_says), forward, 1.0, True)
    assert info.value.__cause__ is deepspeed_says
    other = RuntimeError("CUDA out of memory")
    with pytest.raises(RuntimeError) as info:
        micro_step(Engine(other), forward, 1.0, True)
    assert info.value is other


def test_a_moved_schedule_end_takes_the_rate_of_the_schedulers_own_step():
    """A resume that changes the schedule's length gives the next step the new schedule's rate
    at once, at the scheduler's own count: in fp16 DeepSpeed does not step the scheduler on a
    step the loss scaler skipped, so it lags the run's steps (here 2 skipped of 6); the rate
    was set at the run's step, and the scheduler's next step() jumped back to its own count."""
    import torch

    from siasam_fast.training import move_schedule_end

    schedule = {"total": 10}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_linear_decay(schedule["total"], 0.0)(s))
    for _ in range(4):  # 6 steps run, 2 of them skipped by the fp16 loss scaler
        opt.step()
        scheduler.step()
    schedule["total"] = 20
    was, now = move_schedule_end(scheduler, 10, 20, 0.0)
    assert (was, now) == (warmup_linear_decay(10, 0.0)(4), warmup_linear_decay(20, 0.0)(4))
    assert scheduler.get_last_lr() == [2.0 * now] == [opt.param_groups[0]["lr"]]
    opt.step()
    scheduler.step()  # the rate goes on from there, one step of the new schedule later
    assert scheduler.get_last_lr() == [pytest.approx(2.0 * warmup_linear_decay(20, 0.0)(5))]


def test_fp16_overflow_at_the_minimum_scale_stops_zero0_too():
    """Under ZeRO-0, DeepSpeed's fp16 optimizers (FP16_Optimizer with FusedAdam,
    FP16_UnfusedOptimizer with torch AdamW) keep the loss scale at min_loss_scale and skip every
    step, without the exception of ZeRO 1-3's scaler: a run whose gradients overflow at every
    scale would skip all its steps. The step stops it as under ZeRO 1-3 (README, "Which ZeRO stage
    and precision"); an overflow above the minimum, or a step without overflow, goes on. (A
    stand-in engine with DeepSpeed's own LossScaleConfig: DeepSpeed refuses fp16 on the CPU.)"""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import (
        INITIAL_LOSS_SCALE,
        MIN_LOSS_SCALE,
        SCALE_WINDOW,
        LossScaleConfig,
    )

    from siasam_fast.training import micro_step

    class Optimizer:  # what engine.step() reads and changes of FP16_Optimizer
        def __init__(self, scale):
            self.loss_scale_config = LossScaleConfig(
                torch.float16, True, 0,
                {INITIAL_LOSS_SCALE: scale, SCALE_WINDOW: 1000, MIN_LOSS_SCALE: 1})
            self.overflow = False

        def step(self, overflow):
            config = self.loss_scale_config
            self.overflow = overflow
            if overflow:
                config.cur_scale = max(config.cur_scale / 2, config.min_loss_scale)

    class Engine:
        def __init__(self, scale, overflow):
            self.optimizer, self.overflow = Optimizer(scale), overflow

        def set_gradient_accumulation_boundary(self, last):
            self.last = last

        def backward(self, loss, scale_wrt_gas=True):
            pass

        def step(self):
            if self.last:
                self.optimizer.step(self.overflow)

    def forward():
        loss = torch.tensor(3.5)
        return loss, {"loss": loss}

    with pytest.raises(FloatingPointError, match=r"^fp16: the gradients overflowed at every loss "
                       r"scale .*min_loss_scale .*loss is 3.5: lower train.lr, or train in bf16"):
        micro_step(Engine(1.0, overflow=True), forward, 1.0, True)
    for scale, overflow, last in ((2.0, True, True), (1.0, False, True), (1.0, True, False)):
        engine = Engine(scale, overflow)
        engine.optimizer.overflow = True  # a skipped step before: read only at a step's end
        micro_step(engine, forward, 1.0, last)


def test_a_step_out_of_gpu_memory_says_what_needs_less(monkeypatch):
    """A CUDA out-of-memory error in a step (a V100 with 16 GB is at the limit with the
    ClipBERT-base-like config) keeps torch's error, with its sizes, as the cause, and says which
    settings need less memory. (A stand-in engine raises it in the backward.)"""
    import torch

    from siasam_fast.training import micro_step

    class Engine:
        def set_gradient_accumulation_boundary(self, last):
            pass

        def backward(self, loss, scale_wrt_gas=True):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def forward():
        loss = torch.tensor(1.0)
        return loss, {"loss": loss}

    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"^out of GPU memory in a training step: "
                       r"lower train.batch_size .*activation_checkpointing=cnn") as info:
        micro_step(Engine(), forward, 1.0, True)
    assert "Tried to allocate 2.00 GiB" in str(info.value.__cause__)


# DeepSpeed refuses fp16 on the CPU; its check is patched away here, and one SGD step (lr 1, no
# clipping) through micro_step is compared with fp32 in the fp32 master weights.
FP16_ZERO0 = r"""
import json, os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))
import torch, deepspeed
from deepspeed.accelerator import get_accelerator
get_accelerator().is_fp16_supported = lambda: True
deepspeed.init_distributed(dist_backend="gloo")
from siasam_fast.ds_config import make_ds_config
from siasam_fast.training import micro_step
torch.manual_seed(0)
x, y = torch.randn(8, 5), torch.randn(8, 3)
init = torch.nn.Linear(5, 3).state_dict()

def update(stage, precision):
    model = torch.nn.Linear(5, 3)
    model.load_state_dict(init)
    config = {**make_ds_config(stage, precision, micro_batch=8, grad_clip=0.0),
              "train_batch_size": 8}
    eng, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=1.0), config=config)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    def forward():
        loss = torch.nn.functional.mse_loss(eng(x.to(dtype)).float(), y)
        return loss, {"loss": loss.detach()}
    micro_step(eng, forward, 1.0, True)
    if hasattr(opt, "fp32_groups"):  # ZeRO-0's fp16 optimizer
        master = [p.float() for group in opt.fp32_groups for p in group]
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO 1-2
        flat = opt.single_partition_of_fp32_groups[0].float()
        master = flat.split([p.numel() for p in init.values()])
    else:
        master = list(eng.module.parameters())
    return float(torch.cat([(m.detach().flatten() - w.to(dtype).float().flatten())
                            for m, w in zip(master, init.values())]).norm())

ref = update(0, "fp32")
print(json.dumps({"zero0": update(0, "fp16") / ref, "zero1": update(1, "fp16") / ref}))
os._exit(0)
"""


@pytest.mark.slow
def test_deepspeeds_zero0_fp16_updates_are_the_loss_scale_too_small():
    """Why ds_config.finalize refuses fp16 with ZeRO stage 0: DeepSpeed 0.19's engine.backward()
    scales the loss for its ZeRO optimizers only, and its ZeRO-0 fp16 optimizer divides the
    gradients by the loss scale (65536) all the same. Should a DeepSpeed release scale it there
    too (deepspeedai/DeepSpeed pull request #8393), this fails: lift the refusal then."""
    proc = subprocess.run([sys.executable, "-c", FP16_ZERO0], cwd=ROOT, timeout=600,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ratios = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ratios["zero1"] == pytest.approx(1.0, rel=1e-3)  # fp16 under ZeRO-1: as fp32
    assert ratios["zero0"] == pytest.approx(1 / 65536, rel=0.01), ratios
