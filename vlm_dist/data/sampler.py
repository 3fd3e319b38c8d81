"""Length-grouped, modality-aware, rank-balanced micro-batch planning with O(plan) resume.

One epoch's plan is computed from (seed, epoch, lengths, modalities, world_size,
capacity) alone, identically on every rank:

1. permute the dataset (numpy PCG64 seeded with (seed, epoch));
2. cut the permutation into mega-chunks (~`mega_chunk_steps` steps of data each) and
   sort each chunk by (modality, length descending): neighbours share modality and
   length, while which samples meet changes every epoch;
3. rows: with packing, best-fit-decreasing per (chunk, modality) into rows of
   <= max_seq_len tokens; without packing, one sample per row;
4. cut each modality's rows into steps of world_size x k rows, k = rows_per_micro, or
   less when `max_tokens_per_micro` caps rows x longest row; a modality's leftover rows
   wait for its rows from the next chunk, so only the epoch's last steps mix modalities;
5. the end of the epoch (see `_fix_tail`): a short last step still gives every rank
   at least one row — by smaller micro-batches, by splitting packed rows, by
   re-cutting the last two steps, and only if the whole remainder has fewer samples
   than ranks, by filler rows: duplicates of a real sample that collate trains with
   zero supervision (no loss, no gradient), so every sample is still trained exactly
   once per epoch;
6. whole optimizer steps (see `_whole_optimizer_steps`): with grad_accum > 1 the epoch's
   micro-steps are made a multiple of grad_accum — by splitting the steps holding the
   most samples in two, and only when no step can split, by steps of filler rows — so
   an optimizer step never spans two epochs and `train.epochs=N` ends exactly at the
   end of epoch N (`optimizer_steps(N)`);
7. shuffle the order of steps (so an optimizer step does not see a run of
   same-length, same-modality micro-batches);
8. in each step give rows to ranks longest-first to the least-loaded rank that has
   fewer than ceil(rows / world_size) rows (LPT with a cardinality cap): every rank
   gets a non-empty micro-batch, and tokens are balanced.

So every rank has the same number of micro-batches per epoch, and the union of all
ranks' non-filler rows in an epoch is exactly a permutation of the dataset.

With target counts (`from_samples`), each micro-batch also carries every rank's target
count for its step (`MicroBatch.step_supervised`): the global loss denominator and the
lm_head chunk count that all ranks must agree on are read from the plan, with no collective.

Resume: the state is (epoch, step); `micro_batches(epoch)[step:]` are exactly the
batches an uninterrupted run would have seen next, computed without touching any
skipped sample (planning 558K samples takes 1-2 s on one CPU core, once per epoch).

    python -m pytest tests/test_sampler.py -q
"""
from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from vlm_dist.data.pack import count_targets, pack_rows
from vlm_dist.errors import UserError

TEXT, SINGLE_IMAGE, MULTI_IMAGE, VIDEO = 0, 1, 2, 3
MODALITIES = (TEXT, SINGLE_IMAGE, MULTI_IMAGE, VIDEO)


def modality_of(num_images: int, num_videos: int = 0) -> int:
    """0 = text only, 1 = one image, 2 = several, 3 = any video (long, feature-heavy rows that
    group together whatever images they also have)."""
    if num_videos:
        return VIDEO
    return TEXT if num_images == 0 else SINGLE_IMAGE if num_images == 1 else MULTI_IMAGE


class SamplerStateError(UserError, ValueError):
    """A saved data position that this run would plan differently (other data, seed, world, batch)."""


@dataclass(frozen=True)
class MicroBatch:
    """One rank's micro-batch: dataset indices per row; filler rows hold one duplicate to
    be collated with no supervision.

    step_supervised: the targets of this micro-step on every rank (index = rank), known from
    the global plan when the sampler has target counts; the trainer's loss denominator and
    lm_head chunk count come from it instead of from collectives."""
    rows: tuple[tuple[int, ...], ...]
    filler_rows: tuple[int, ...] = ()
    step_supervised: tuple[int, ...] | None = None

    @property
    def indices(self) -> list[int]:
        """Real (non-filler) samples, row by row."""
        return [i for r, row in enumerate(self.rows) if r not in self.filler_rows for i in row]


@dataclass(frozen=True)
class _Row:
    indices: tuple[int, ...]
    tokens: int
    filler: bool = False


@dataclass
class SamplerState:
    """Where the data stream stands: the next micro-batch is micro_batches(epoch)[step].

    The other fields fingerprint the plan; loading into a sampler that would plan
    differently is an error that names the field.
    """
    epoch: int
    step: int
    seed: int
    world_size: int
    num_samples: int
    data_digest: str   # sha256 of lengths and modalities
    capacity: str      # packing, max_seq_len, rows_per_micro, max_tokens_per_micro, mega_chunk_steps, grad_accum


class LengthGroupedSampler:
    """Plans each rank's micro-batches for an epoch. See the module docstring."""

    def __init__(self, lengths: Sequence[int], modalities: Sequence[int], *, world_size: int, rank: int,
                 max_seq_len: int, rows_per_micro: int, packing: bool = True,
                 max_tokens_per_micro: int | None = None, seed: int = 0, mega_chunk_steps: int = 64,
                 num_targets: Sequence[int] | None = None, grad_accum: int = 1):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.modalities = np.asarray(modalities, dtype=np.int64)
        n = len(self.lengths)
        if n == 0:
            raise ValueError("LengthGroupedSampler: the dataset is empty (no encoded samples)")
        if len(self.modalities) != n:
            raise ValueError(f"LengthGroupedSampler: {n} lengths but {len(self.modalities)} modalities")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"LengthGroupedSampler: rank {rank} is not in a world of size {world_size}")
        if rows_per_micro < 1:
            raise ValueError(f"rows_per_micro must be >= 1, got {rows_per_micro}")
        if max_tokens_per_micro is not None and max_tokens_per_micro < max_seq_len:
            raise ValueError(f"max_tokens_per_micro={max_tokens_per_micro} is smaller than "
                             f"max_seq_len={max_seq_len}: a full row could never be scheduled")
        if mega_chunk_steps < 1:
            raise ValueError(f"mega_chunk_steps must be >= 1, got {mega_chunk_steps}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        bad = np.nonzero((self.lengths < 1) | (self.lengths > max_seq_len))[0]
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"sample {i} has {int(self.lengths[i])} tokens; every sample needs 1.."
                             f"{max_seq_len} (max_seq_len) tokens ({len(bad)} samples out of range)")
        bad = np.nonzero(~np.isin(self.modalities, MODALITIES))[0]
        if len(bad):
            raise ValueError(f"sample {int(bad[0])} has modality {int(self.modalities[bad[0]])}; "
                             "expected 0 (text), 1 (one image), 2 (several) or 3 (video)")
        self._len: list[int] = self.lengths.tolist()  # python ints: fast per-row sums
        self.world_size, self.rank = world_size, rank
        self.max_seq_len, self.rows_per_micro = max_seq_len, rows_per_micro
        self.packing, self.max_tokens_per_micro = packing, max_tokens_per_micro
        self.seed, self.mega_chunk_steps, self.grad_accum = seed, mega_chunk_steps, grad_accum
        digest = hashlib.sha256(self.lengths.tobytes() + b"|" + self.modalities.tobytes()).hexdigest()
        self._state = SamplerState(
            epoch=0, step=0, seed=seed, world_size=world_size, num_samples=n, data_digest=digest,
            capacity=f"packing={packing} max_seq_len={max_seq_len} rows_per_micro={rows_per_micro} "
                     f"max_tokens_per_micro={max_tokens_per_micro} mega_chunk_steps={mega_chunk_steps} "
                     f"grad_accum={grad_accum}")
        self._cache: tuple[int, list[list[MicroBatch]]] | None = None
        if num_targets is not None and len(num_targets) != n:
            raise ValueError(f"LengthGroupedSampler: {n} lengths but {len(num_targets)} num_targets")
        self.num_targets = None if num_targets is None else [int(x) for x in num_targets]

    @classmethod
    def from_samples(cls, samples: Sequence, **kwargs) -> "LengthGroupedSampler":
        """Lengths, modalities and target counts from encoded samples (input_ids, labels, image_keys
        and, where they have it, video_keys)."""
        return cls([len(s.input_ids) for s in samples],
                   [modality_of(len(s.image_keys), len(getattr(s, "video_keys", ()))) for s in samples],
                   num_targets=[count_targets(s.labels) for s in samples], **kwargs)

    # ---- planning -------------------------------------------------------------------

    def plan(self, epoch: int) -> list[list[MicroBatch]]:
        """The whole epoch: plan[step][rank]. Same on every rank; cached for the last epoch."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        steps = self._whole_optimizer_steps(self._fix_tail(self._steps(rng)))
        steps = [steps[i] for i in rng.permutation(len(steps))]
        plan = [self._assign(step) for step in steps]
        if self.num_targets is not None:
            plan = [self._with_supervision(step) for step in plan]
        self._cache = (epoch, plan)
        return plan

    def micro_batches(self, epoch: int) -> list[MicroBatch]:
        """This rank's micro-batches for the epoch, in order."""
        return [step[self.rank] for step in self.plan(epoch)]

    def steps_per_epoch(self, epoch: int) -> int:
        """Micro-steps of the epoch (a multiple of grad_accum)."""
        return len(self.plan(epoch))

    def optimizer_steps(self, epochs: int) -> int:
        """Optimizer steps in epochs 0..epochs-1, each planned on its own (packed epochs differ in
        length): after that many steps the stream stands at (epoch=epochs, step=0)."""
        return sum(self.steps_per_epoch(e) for e in range(epochs)) // self.grad_accum

    def _with_supervision(self, step: list[MicroBatch]) -> list[MicroBatch]:
        """The step's micro-batches, each carrying every rank's target count (one shared tuple)."""
        counts = tuple(sum(self.num_targets[i] for i in mb.indices) for mb in step)
        return [replace(mb, step_supervised=counts) for mb in step]

    def _chunk_size(self) -> int:
        """Samples per mega-chunk: about mega_chunk_steps steps' worth."""
        per_micro = self.rows_per_micro
        if self.packing:
            per_micro *= max(1, self.max_seq_len // max(1, int(self.lengths.mean())))
        return max(self.world_size, self.mega_chunk_steps * self.world_size * per_micro)

    def _steps(self, rng: np.random.Generator) -> list[list[_Row]]:
        """Rows, chunk by chunk, cut into steps of one modality; leftover rows of a modality
        wait for the next chunk's, so only the epoch's last few steps can mix modalities."""
        perm = rng.permutation(len(self.lengths))
        size = self._chunk_size()
        steps: list[list[_Row]] = []
        waiting: dict[int, list[_Row]] = {m: [] for m in MODALITIES}
        for a in range(0, len(perm), size):
            chunk = perm[a:a + size]
            # primary key modality, then longest first, ties in permutation order
            chunk = chunk[np.lexsort((np.arange(len(chunk)), -self.lengths[chunk], self.modalities[chunk]))]
            mods = self.modalities[chunk]
            for m, rows in waiting.items():
                group = chunk[mods == m].tolist()
                if self.packing:
                    rows.extend(self._row(r) for r in pack_rows(self._len, group, self.max_seq_len))
                else:
                    rows.extend(_Row((i,), self._len[i]) for i in group)
                full, waiting[m] = self._cut_steps(rows)
                steps.extend(full)
        full, rest = self._cut_steps([r for rows in waiting.values() for r in rows])
        return steps + full + ([rest] if rest else [])

    def _row(self, indices, filler: bool = False) -> _Row:
        indices = tuple(indices)
        return _Row(indices, sum(self._len[i] for i in indices), filler)

    def _rows_per_rank(self, rows: Sequence[_Row]) -> int:
        """k: rows a rank may take in a step made of `rows` (0 when a row is over budget)."""
        k = self.rows_per_micro
        if self.max_tokens_per_micro is not None and rows:
            k = min(k, self.max_tokens_per_micro // max(r.tokens for r in rows))
        return k

    def _cut_steps(self, rows: list[_Row]) -> tuple[list[list[_Row]], list[_Row]]:
        """Full steps of world_size x k rows from the front of `rows`, and the rows left over."""
        steps, i, ws = [], 0, self.world_size
        while True:
            k = self.rows_per_micro
            while True:  # shrink k until the step's longest row fits the token budget
                k2 = self._rows_per_rank(rows[i:i + ws * k])
                assert k2 >= 1, "max_tokens_per_micro >= max_seq_len is checked at init"
                if k2 >= k:
                    break
                k = k2
            if i + ws * k > len(rows):
                return steps, rows[i:]
            steps.append(rows[i:i + ws * k])
            i += ws * k

    def _split(self, rows: list[_Row], need: int) -> list[_Row]:
        """Split packed rows (largest first) until there are `need` rows or none can split."""
        rows = list(rows)
        while len(rows) < need:
            multi = [j for j, r in enumerate(rows) if len(r.indices) > 1]
            if not multi:
                break
            j = max(multi, key=lambda j: (rows[j].tokens, -j))
            halves: list[list[int]] = [[], []]
            load = [0, 0]
            for i in sorted(rows[j].indices, key=lambda i: -self._len[i]):
                h = 0 if load[0] <= load[1] else 1
                halves[h].append(i)
                load[h] += self._len[i]
            rows[j:j + 1] = [self._row(halves[0]), self._row(halves[1])]
        return rows

    def _fix_tail(self, steps: list[list[_Row]]) -> list[list[_Row]]:
        """Make the last step give every rank at least one row (see the module docstring)."""
        ws = self.world_size
        last = steps[-1]
        if len(last) >= ws:
            return steps  # smaller micro-batches, all non-empty
        last = self._split(last, ws)
        if len(last) >= ws:
            return steps[:-1] + [last]
        if len(steps) >= 2:
            merged = self._split(steps[-2] + last, 2 * ws)
            if 2 * ws <= len(merged) <= 2 * ws * self._rows_per_rank(merged):
                half = math.ceil(len(merged) / 2)
                return steps[:-2] + [merged[:half], merged[half:]]
        # fewer samples left than ranks: duplicate the shortest one, trained with no supervision
        shortest = min((i for r in last for i in r.indices), key=lambda i: (self._len[i], i))
        return steps[:-1] + [last + [self._row([shortest], filler=True)] * (ws - len(last))]

    def _whole_optimizer_steps(self, steps: list[list[_Row]]) -> list[list[_Row]]:
        """Make the number of micro-steps a multiple of grad_accum (see the module docstring): split
        the step holding the most samples into two of >= world_size rows each; when no step holds
        2 x world_size samples, add steps of filler rows (the epoch's shortest sample, unsupervised)."""
        ws = self.world_size
        while len(steps) % self.grad_accum:
            j = max(range(len(steps)), key=lambda j: (sum(len(r.indices) for r in steps[j]), -j))
            rows = self._split(steps[j], 2 * ws)
            if len(rows) < 2 * ws:
                break
            half = len(rows) // 2
            steps[j:j + 1] = [rows[:half], rows[half:]]
        if len(steps) % self.grad_accum:
            shortest = min(range(len(self._len)), key=lambda i: (self._len[i], i))
            filler = [self._row([shortest], filler=True)] * ws
            steps = steps + [filler] * (-len(steps) % self.grad_accum)
        return steps

    def _assign(self, rows: list[_Row]) -> list[MicroBatch]:
        """LPT with a cap of ceil(rows / ranks) rows per rank: balanced tokens, none empty."""
        ws = self.world_size
        cap = math.ceil(len(rows) / ws)
        per_rank: list[list[_Row]] = [[] for _ in range(ws)]
        heap = [(0, r) for r in range(ws)]  # (tokens so far, rank) of ranks with room left
        for j in sorted(range(len(rows)), key=lambda j: (-rows[j].tokens, j)):
            load, r = heapq.heappop(heap)
            per_rank[r].append(rows[j])
            if len(per_rank[r]) < cap:
                heapq.heappush(heap, (load + rows[j].tokens, r))
        assert all(per_rank), "every rank gets a row: the tail fix guarantees >= world_size rows"
        return [MicroBatch(tuple(r.indices for r in mine), tuple(i for i, r in enumerate(mine) if r.filler))
                for mine in per_rank]

    # ---- position and resume ----------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self._state.num_samples

    @property
    def epoch(self) -> int:
        return self._state.epoch

    @property
    def step(self) -> int:
        return self._state.step

    def set_position(self, epoch: int, step: int) -> None:
        if epoch < 0 or step < 0:
            raise ValueError(f"sampler position must be non-negative, got epoch={epoch} step={step}")
        self._state.epoch, self._state.step = epoch, step

    def state_dict(self) -> dict:
        return asdict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, step); refuse a state planned for other data, seed, world or capacity."""
        mine = asdict(self._state)
        if set(state) != set(mine):
            raise ValueError(f"sampler state has keys {sorted(state)}, expected {sorted(mine)}")
        for key in ("seed", "world_size", "num_samples", "data_digest", "capacity"):
            if state[key] != mine[key]:
                raise SamplerStateError(
                    f"cannot resume the data order: the checkpoint's sampler {key} is {state[key]!r} but "
                    f"this run's is {mine[key]!r}; resume with the same data, seed, world size and "
                    "batch settings (or start a fresh run)")
        self.set_position(int(state["epoch"]), int(state["step"]))

    def stats(self, epoch: int) -> dict:
        """Plan quality for logs: steps, rows, fillers, padding efficiency, cross-rank balance."""
        plan = self.plan(epoch)
        real = np.array([[int(self.lengths[mb.indices].sum()) for mb in step] for step in plan])
        padded = sum(len(mb.rows) * max(int(self.lengths[list(row)].sum()) for row in mb.rows)
                     for step in plan for mb in step)
        mixed = sum(len({int(self.modalities[i]) for mb in step for i in mb.indices}) > 1 for step in plan)
        return {
            "steps": len(plan),
            "rows": sum(len(mb.rows) for step in plan for mb in step),
            "filler_rows": sum(len(mb.filler_rows) for step in plan for mb in step),
            "pad_efficiency": float(real.sum() / padded),      # real tokens / rows x longest row
            "rank_balance": float((real.mean(axis=1) / real.max(axis=1)).mean()),  # 1 = perfect
            "mixed_modality_steps": int(mixed),
        }
