"""Batches of several tasks in one training epoch (``task: multi``, the paper's pre-training on
TGIF-QA's open-ended and multiple-choice tasks at once).

Each task keeps its own loader (its annotations, its sampler, its shard of each epoch, any backend);
:class:`MultiTaskLoader` interleaves their batches. An epoch is every task's batches once, in an
order drawn from (seed, epoch) that is the same on every process: each process's loader of a task
has the same number of batches (equal shards), so all processes train the same task at each
micro-batch, as DeepSpeed's collectives need (every process computes the same head's gradient).
Every batch is one task's (``batch["head"]`` names it), so a step's loss is the loss of that
task's setting (eq. 8 with that task's L_gt). A task's share of the steps is its share of the
batches, as MT-DNN samples tasks for multi-task learning.

What the training loop reads of a loader is here too: ``len()`` (micro-batches an epoch),
``sampler.position`` / ``len(sampler)`` (progress in the epoch, counted in ``batch_size``
examples a micro-batch), ``set_epoch``, ``state_dict`` / ``load_state_dict`` (exact resume on the
same number of processes), ``dataset`` (``len()``: the examples of every task).
"""

from __future__ import annotations

import numpy as np

_MIX_STREAM = 0x6D6978  # the order's random stream: apart from the samplers' (seed, epoch) draws


class _Progress:
    """The loop's view of a multi-task epoch: ``position`` counts ``batch_size`` examples for each
    micro-batch done, so ``position // batch_size`` is the micro-batches done and ``position >=
    len(self)`` the epoch's end (a task's short last batch counts as a whole one)."""

    def __init__(self, owner: MultiTaskLoader):
        self.owner = owner

    @property
    def position(self) -> int:
        return self.owner.done * self.owner.batch_size

    def __len__(self) -> int:
        return len(self.owner) * self.owner.batch_size


class _Examples:
    """``len()`` of every task's training examples together."""

    def __init__(self, loaders: dict):
        self.loaders = loaders

    def __len__(self) -> int:
        return sum(len(loader.dataset) for loader in self.loaders.values())


class MultiTaskLoader:
    """The batches of ``loaders`` (NAME -> a task's train loader, all with ``batch_size``),
    interleaved; each batch carries ``head`` = its task's NAME."""

    def __init__(self, loaders: dict, seed: int, batch_size: int):
        if not loaders:
            raise ValueError("MultiTaskLoader: no task loaders")
        self.loaders = dict(loaders)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.epoch = 0
        self.done = 0  # micro-batches of this epoch already given out
        self.sampler = _Progress(self)
        self.dataset = _Examples(self.loaders)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders.values())

    def order(self, epoch: int | None = None) -> list[str]:
        """The task of each micro-batch of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        names = [name for name, loader in self.loaders.items() for _ in range(len(loader))]
        shuffled = np.random.default_rng([self.seed, epoch, _MIX_STREAM]).permutation(len(names))
        return [names[i] for i in shuffled]

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (a restored state for it is kept)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.done = epoch, 0
        for loader in self.loaders.values():
            loader.set_epoch(epoch)

    def __iter__(self):
        order = self.order()
        self._check_positions(order)
        iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        for i in range(self.done, len(order)):
            name = order[i]
            batch = next(iterators[name], None)
            if batch is None:  # the loaders keep every batch (stand-ins): a broken promise
                raise RuntimeError(f"task {name}: its loader ended before its "
                                   f"{len(self.loaders[name])} batches of epoch {self.epoch + 1}")
            batch["head"] = name
            self.done = i + 1
            yield batch
        for iterator in iterators.values():  # each task's loader ends its epoch
            next(iterator, None)

    def _check_positions(self, order: list[str]) -> None:
        """Each task's loader stands where this epoch's first ``done`` micro-batches leave it."""
        for name, loader in self.loaders.items():
            want = order[: self.done].count(name)
            have = -(-loader.sampler.position // self.batch_size)
            if have != want:
                raise ValueError(f"multi-task loader state: task {name} has given {have} batches "
                                 f"of epoch {self.epoch + 1}, the order says {want}: the state "
                                 "does not belong to these tasks and data")

    def state_dict(self) -> dict:
        states = {name: loader.state_dict() for name, loader in self.loaders.items()}
        first = next(iter(states.values()))
        return {"epoch": self.epoch, "done": self.done, "seed": self.seed,
                "world_size": first.get("world_size", 1), "tasks": states}

    def load_state_dict(self, state: dict, align: int = 1) -> None:
        """Continue from ``state`` (saved by a run on the same number of processes, at the end
        of an optimizer step)."""
        tasks = state.get("tasks")
        if not isinstance(tasks, dict):
            raise ValueError("this loader state is a one-task run's, not a task=multi run's")
        if set(tasks) != set(self.loaders):
            raise ValueError(f"loader state has the tasks {', '.join(sorted(tasks))}, this run "
                             f"has {', '.join(sorted(self.loaders))}")
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state has seed={state['seed']}, this run has "
                             f"train.seed={self.seed}")
        for name, loader in self.loaders.items():
            try:
                loader.load_state_dict(tasks[name], 1)
            except ValueError as err:  # e.g. other data: say which task's
                raise ValueError(f"data.tasks.{name}: {err}") from None
        self.epoch, self.done = int(state["epoch"]), int(state["done"])
        self._check_positions(self.order())
