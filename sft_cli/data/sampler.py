"""Which packed rows every rank reads at every optimizer step: a pure function of
(seed, epoch, step), so resuming needs only the step number and no sampler state.

Each epoch the rows are shuffled (seeded by epoch) and cut into micro-batches of
`micro_batch_size`; one optimizer step takes `grad_accum * world_size` consecutive
micro-batches, rank r taking every world_size-th. So 1 process x grad_accum 2 and
2 processes x grad_accum 1 see the same rows in the same step. Micro-batches left over
at the end of an epoch (fewer than one step's worth) are skipped, so no rank ever waits
for a batch that does not exist.

    plan = StepPlan(num_rows=100, micro_batch_size=4, grad_accum=2, world_size=1, seed=0)
    plan.steps_per_epoch        # 12
    plan.micro_batches(step=3, rank=0)   # [[row, row, row, row], [..]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sft_cli.data.collate import length_grouped_batches


@dataclass
class StepPlan:
    num_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    lengths: list[int] | None = None  # set for unpacked rows: batches group similar lengths
    _recent: tuple = field(default=(), repr=False)

    @property
    def micro_batches_per_step(self) -> int:
        return self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.micro_batch_size) // self.micro_batches_per_step

    def total_steps(self, epochs: float, max_steps: int) -> int:
        return max_steps if max_steps > 0 else max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        # The two newest epochs, swapped in as one tuple: the training loop and its prefetch thread
        # may ask for adjacent epochs at once, and neither may see the other's half-made update.
        recent = self._recent
        for cached_epoch, batches in recent:
            if cached_epoch == epoch:
                return batches
        if self.lengths is not None:
            seed = int(np.random.SeedSequence([self.seed, 6, epoch]).generate_state(1)[0])
            batches = length_grouped_batches(self.lengths, self.micro_batch_size, seed=seed)
        else:
            order = np.random.default_rng([self.seed, 5, epoch]).permutation(self.num_rows).tolist()
            batches = [order[i:i + self.micro_batch_size] for i in range(0, self.num_rows, self.micro_batch_size)]
        self._recent = ((epoch, batches), *recent[:1])
        return batches

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global 0-based step."""
        return divmod(step, self.steps_per_epoch)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, within = self.position(step)
        batches = self.epoch_batches(epoch)
        first = within * self.micro_batches_per_step
        return [batches[first + j * self.world_size + rank] for j in range(self.grad_accum)]

    def step_rows(self, step: int) -> list[int]:
        """Every row of one optimizer step, over all its micro-batches and all ranks."""
        epoch, within = self.position(step)
        first = within * self.micro_batches_per_step
        return [i for batch in self.epoch_batches(epoch)[first:first + self.micro_batches_per_step] for i in batch]


@dataclass(frozen=True)
class RowCounts:
    """Per packed row, computed once from the Arrow columns: real tokens, trained targets (labels
    after the one-token shift), and the sum of squared example lengths (attention FLOPs). A step's
    totals over all ranks are then a CPU sum over StepPlan.step_rows: no collective, no device sync."""

    tokens: np.ndarray
    targets: np.ndarray
    attention: np.ndarray

    @classmethod
    def of(cls, rows, batch_rows: int = 8192) -> RowCounts:
        """From the Arrow columns, `batch_rows` rows at a time: never a whole split's tokens in one array."""
        import pyarrow.compute as pc

        table = rows.with_format("arrow")[:]  # honours a select()'s index mapping (rows.data would not)
        tokens, targets, attention = [], [], []
        for batch in table.select(["labels", "seq_lens"]).to_batches(max_chunksize=batch_rows):
            labels, lens = batch.column("labels"), batch.column("seq_lens")
            offsets = labels.offsets.to_numpy()
            starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
            trained = np.concatenate([pc.list_flatten(labels).to_numpy(zero_copy_only=False) != -100, [False]])
            running = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
            # A row's first label has no token before it to predict it: never a target.
            targets.append(running[ends] - running[starts] - np.where(ends > starts, trained[starts], 0))
            tokens.append(ends - starts)
            squares = np.concatenate([[0.0], np.cumsum(pc.list_flatten(lens).to_numpy(zero_copy_only=False)
                                                       .astype(np.float64) ** 2)])
            len_offsets = lens.offsets.to_numpy()
            attention.append(squares[len_offsets[1:] - len_offsets[0]] - squares[len_offsets[:-1] - len_offsets[0]])
        join = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
        return cls(tokens=join(tokens, np.int64), targets=join(targets, np.int64), attention=join(attention, np.float64))

    def total(self, ids: list[int]) -> tuple[int, int, float]:
        """(tokens, targets, sum of squared example lengths) of these rows."""
        index = np.asarray(ids, dtype=np.int64)
        return int(self.tokens[index].sum()), int(self.targets[index].sum()), float(self.attention[index].sum())
