"""DataLoader wiring: planned micro-batches -> collated, prefetched, pinned batches.

`build_loader` wraps one list of micro-batches (from LengthGroupedSampler) in a
map-style Dataset whose item i is collate(micro_batches[i]); a DataLoader with
workers, prefetch and pin_memory runs it in order. `BatchStream` is what the
trainer iterates: this rank's batches epoch after epoch, starting at the sampler's
(epoch, step), advancing that position as each batch is handed out, so
`sampler.state_dict()` saved at a checkpoint names the next batch to train on.

    python -m pytest tests/test_pack.py -q
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vlm_dist.data.pack import PackableSample, collate

# key -> (P, D) or (V, P, D) features, one for every kind or one per kind (data.pack.collate)
Lookup = Callable[[str], torch.Tensor] | Mapping[str, Callable[[str], torch.Tensor]]
from vlm_dist.data.sampler import LengthGroupedSampler, MicroBatch


class MicroBatchDataset(Dataset):
    """Item i = the collated batch of micro_batches[i]."""

    def __init__(self, micro_batches: Sequence[MicroBatch], samples: Sequence[PackableSample],
                 features_lookup: Lookup, *, pad_id: int, max_seq_len: int,
                 feature_shape: tuple[int, int] | None, pad_to_multiple: int = 8, image_pad_id: int | None = None,
                 pad_ids: Mapping[str, int] | None = None):
        self.micro_batches, self.samples, self.features_lookup = micro_batches, samples, features_lookup
        self.pad_id, self.max_seq_len = pad_id, max_seq_len
        self.feature_shape, self.pad_to_multiple = feature_shape, pad_to_multiple
        self.image_pad_id, self.pad_ids = image_pad_id, pad_ids

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> dict:
        mb = self.micro_batches[i]
        rows = [[self.samples[j] for j in row] for row in mb.rows]
        batch = collate(rows, self.features_lookup, self.pad_id, self.max_seq_len,
                        feature_shape=self.feature_shape, filler_rows=mb.filler_rows,
                        pad_to_multiple=self.pad_to_multiple, image_pad_id=self.image_pad_id,
                        pad_ids=self.pad_ids)
        if mb.step_supervised is not None:  # from the global plan: python ints, no collective, no sync
            batch["global_num_supervised"] = sum(mb.step_supervised)
            batch["max_num_supervised"] = max(mb.step_supervised)
        return batch


def build_loader(micro_batches: Sequence[MicroBatch], samples: Sequence[PackableSample],
                 features_lookup: Lookup, *, pad_id: int, max_seq_len: int,
                 feature_shape: tuple[int, int] | None, num_workers: int = 2, prefetch_factor: int = 4,
                 pin_memory: bool = True, pad_to_multiple: int = 8, image_pad_id: int | None = None,
                 pad_ids: Mapping[str, int] | None = None) -> DataLoader:
    """An ordered DataLoader over the given micro-batches (one batch dict each).

    image_pad_id (the <|image_pad|> id) or pad_ids ({kind: pad id}, e.g. vlm.pad_ids): the
    workers list each kind's slots, so the model's splice needs no host sync to find them.
    features_lookup: one callable or {kind: callable}, as data.pack.collate takes.

    pin_memory is ignored by torch (with a warning) when no accelerator is present.
    features_lookup runs in the workers: it must survive a fork (the Arrow cache's
    memory maps do).
    """
    dataset = MicroBatchDataset(micro_batches, samples, features_lookup, pad_id=pad_id,
                                max_seq_len=max_seq_len, feature_shape=feature_shape,
                                pad_to_multiple=pad_to_multiple, image_pad_id=image_pad_id, pad_ids=pad_ids)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      persistent_workers=False)


class BatchStream:
    """Endless iterator over this rank's batches, epoch after epoch, from the sampler's position.

        stream = BatchStream(sampler, samples, {"image": cache.views, "video": cache.views}, pad_id=...,
                             max_seq_len=..., feature_shape=(P, D), pad_ids=vlm.pad_ids)
        sampler.load_state_dict(ckpt["sampler"])       # on resume, before iterating
        for batch in stream: ...                       # sampler.state_dict() = next batch to train on

    Each batch is collate's dict plus "epoch" and "step" (its position) and, when the sampler
    knows target counts (from_samples), "global_num_supervised" (the targets of this micro-step
    over all ranks) and "max_num_supervised" (the most any rank has), known without communication.

    Each epoch gets a fresh DataLoader over micro_batches(epoch)[step:]; skipped batches
    are never loaded. The position advances when a batch is handed out, so it counts
    batches the trainer received, not those the workers (or the device copy) fetched ahead.

    With `device` a CUDA device, batches come out already there: batch k+1 is copied (by
    `move(batch, device)`, from the workers' pinned memory) on a side stream while the trainer
    runs step k, so the copy never waits behind the step's kernels nor they behind it. On any
    other device `device` and `move` are ignored and batches stay on the host.
    """

    def __init__(self, sampler: LengthGroupedSampler, samples: Sequence[PackableSample],
                 features_lookup: Lookup, *, pad_id: int, max_seq_len: int,
                 feature_shape: tuple[int, int] | None, num_workers: int = 2, prefetch_factor: int = 4,
                 pin_memory: bool = True, pad_to_multiple: int = 8, max_epochs: int | None = None,
                 image_pad_id: int | None = None, pad_ids: Mapping[str, int] | None = None,
                 device: torch.device | str | None = None,
                 move: Callable[[dict, torch.device], dict] | None = None):
        if len(samples) != sampler.num_samples:
            raise ValueError(f"BatchStream: {len(samples)} samples but the sampler was planned for "
                             f"{sampler.num_samples}")
        self.sampler, self.samples, self.features_lookup = sampler, samples, features_lookup
        self.max_epochs = max_epochs
        self.loader_kwargs = dict(pad_id=pad_id, max_seq_len=max_seq_len, feature_shape=feature_shape,
                                  num_workers=num_workers, prefetch_factor=prefetch_factor,
                                  pin_memory=pin_memory, pad_to_multiple=pad_to_multiple,
                                  image_pad_id=image_pad_id, pad_ids=pad_ids)
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and move is None:
            raise ValueError("BatchStream: a CUDA device needs `move` (e.g. vlm_dist.training.loop.to_device)")
        self.move = move

    def _planned(self) -> Iterator[tuple[dict, tuple[int, int]]]:
        """(batch, the position after it), from the sampler's position when iteration starts."""
        s = self.sampler
        epoch, start = s.epoch, s.step
        while self.max_epochs is None or epoch < self.max_epochs:
            todo = s.micro_batches(epoch)[start:]
            if todo:
                loader = build_loader(todo, self.samples, self.features_lookup, **self.loader_kwargs)
                for i, batch in enumerate(loader):
                    batch["epoch"], batch["step"] = epoch, start + i
                    yield batch, (epoch, start + i + 1)
            epoch, start = epoch + 1, 0
            # reached when the batch after the epoch's last is asked for (on CUDA one batch early:
            # the hand-out of that last batch sets its own position again)
            s.set_position(epoch, 0)

    def __iter__(self) -> Iterator[dict]:
        planned = self._planned()
        if self.device is None or self.device.type != "cuda":
            for batch, position in planned:
                self.sampler.set_position(*position)
                yield batch
            return
        yield from _copied_ahead(planned, self.sampler, self.device, self.move)


def _copied_ahead(planned, sampler: LengthGroupedSampler, device: torch.device, move) -> Iterator[dict]:
    """Batches moved to `device` on a CUDA side stream, one ahead of the consumer.

    At hand-out the consumer's stream waits for that batch's own copy (its event, not the whole
    side stream, so the next batch's copy keeps overlapping), and each device tensor is
    record_stream'ed on the consumer's stream: the caching allocator then does not reuse its
    memory (allocated on the side stream) while the step's kernels may still read it.
    """
    side = torch.cuda.Stream(device)

    def copy(item):
        batch, position = item
        with torch.cuda.stream(side):
            moved = move(batch, device)
            done = torch.cuda.Event()
            done.record(side)
        return moved, position, done

    def hand_out(copied):
        batch, position, done = copied
        consumer = torch.cuda.current_stream(device)
        consumer.wait_event(done)
        for t in _tensors(batch):
            if t.is_cuda:
                t.record_stream(consumer)
        sampler.set_position(*position)
        return batch

    return _one_ahead(planned, copy, hand_out)


def _one_ahead(items, start: Callable, finish: Callable) -> Iterator:
    """finish(start(item k)) is yielded only after start(item k+1) ran, so what start queues for
    k+1 (a device copy) runs while the consumer works on k."""
    ahead = None
    for item in items:
        current, ahead = ahead, start(item)
        if current is not None:
            yield finish(current)
    if ahead is not None:
        yield finish(ahead)


def _tensors(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
