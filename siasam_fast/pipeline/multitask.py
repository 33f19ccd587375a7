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
examples a micro-batch), ``set_epoch``, ``state_dict`` / ``load_state_dict``, ``dataset``
(``len()``: the examples of every task).

A resume on as many processes as saved with is exact. On another number, each task's loader
continues its own epoch where the old processes together had left it (its shards re-cut, a few of
its examples given again, none skipped), and the batches left are interleaved in a new order
drawn from (seed, epoch, the new number of processes); the epochs after it are as always.
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
        for name, loader in self.loaders.items():  # progress and resume count in batch_size
            size = getattr(loader, "batch_size", self.batch_size)
            if size != self.batch_size:
                raise ValueError(f"task {name}: its loader's batch_size is {size}, the "
                                 f"multi-task loader's {self.batch_size}: give every task's "
                                 "loader the same")
        self.epoch = 0
        self.done = 0  # micro-batches of this epoch already given out
        # an epoch continued on another number of processes: {"epoch", "world_size", "done":
        # {task: its batches given before}}; its order is those, then the rest reshuffled
        self.resumed: dict | None = None
        self.sampler = _Progress(self)
        self.dataset = _Examples(self.loaders)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders.values())

    def order(self, epoch: int | None = None) -> list[str]:
        """The task of each micro-batch of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        resumed = self.resumed if self.resumed and int(self.resumed["epoch"]) == epoch else None
        before = resumed["done"] if resumed else dict.fromkeys(self.loaders, 0)
        names = [name for name, loader in self.loaders.items()
                 for _ in range(len(loader) - before[name])]
        key = [self.seed, epoch, _MIX_STREAM] + ([int(resumed["world_size"])] if resumed else [])
        shuffled = np.random.default_rng(key).permutation(len(names))
        done = [name for name in self.loaders for _ in range(before[name])]
        return done + [names[i] for i in shuffled]

    def micro_batch_sizes(self, epoch: int | None = None) -> list[int]:
        """The examples of each micro-batch of :meth:`order` on this process: each task's k-th
        batch holds ``batch_size``, its last one what is left of its shard (so a step's weights
        count examples, not batches)."""
        seen = dict.fromkeys(self.loaders, 0)
        sizes = []
        for name in self.order(epoch):
            examples = len(self.loaders[name].sampler)
            sizes.append(max(0, min(self.batch_size, examples - seen[name] * self.batch_size)))
            seen[name] += 1
        return sizes

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (a restored state for it is kept)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.done, self.resumed = epoch, 0, None
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
        state = {"epoch": self.epoch, "done": self.done, "seed": self.seed,
                 "world_size": first.get("world_size", 1), "tasks": states}
        if self.resumed and int(self.resumed["epoch"]) == self.epoch:
            state["resumed"] = self.resumed
        return state

    def world_size(self) -> int:
        sampler = next(iter(self.loaders.values())).sampler
        return int(getattr(sampler, "world_size", 1))

    def load_state_dict(self, state: dict, align: int = 1) -> None:
        """Continue from ``state``, saved at the end of an optimizer step (``align``: the
        examples of one step per process, ``batch_size`` x grad_accum). Saved by another number
        of processes: each task continues its epoch (:meth:`_reshard`)."""
        tasks = state.get("tasks")
        if not isinstance(tasks, dict):
            raise ValueError("this loader state is a one-task run's, not a task=multi run's")
        if set(tasks) != set(self.loaders):
            raise ValueError(f"loader state has the tasks {', '.join(sorted(tasks))}, this run "
                             f"has {', '.join(sorted(self.loaders))}")
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state has seed={state['seed']}, this run has "
                             f"train.seed={self.seed}")
        same = int(state.get("world_size", 1)) == self.world_size()
        for name, loader in self.loaders.items():
            try:  # on another number of processes: re-cut at whole batches
                loader.load_state_dict(tasks[name], 1 if same else self.batch_size)
            except ValueError as err:  # e.g. other data: say which task's
                raise ValueError(f"data.tasks.{name}: {err}") from None
        self.epoch = int(state["epoch"])
        if same:
            self.done = int(state["done"])
            resumed = state.get("resumed")
            self.resumed = (dict(resumed) if resumed and int(resumed["epoch"]) == self.epoch
                            else None)
        else:
            self._reshard(max(1, int(align) // self.batch_size))
        self._check_positions(self.order())

    def _reshard(self, accum: int) -> None:
        """After each task's loader has re-cut its epoch for this number of processes: the
        batches each has given count as done (the order's first ones); a few more are given again
        (taken from the task with the most batches done) so that the done batches make whole
        optimizer steps of ``accum`` micro-batches, unless the epoch was complete."""
        done = {name: -(-loader.sampler.position // self.batch_size)
                for name, loader in self.loaders.items()}
        if sum(done.values()) < len(self):
            for _ in range(sum(done.values()) % accum):
                name = max(reversed(list(done)), key=done.get)
                done[name] -= 1
        for name, loader in self.loaders.items():
            position = min(done[name] * self.batch_size, loader.sampler.position)
            if position != loader.sampler.position:
                loader.sampler.rewind(position)
        self.done = sum(done.values())
        self.resumed = {"epoch": self.epoch, "world_size": self.world_size(), "done": done}
