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

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vlm_dist.data.pack import PackableSample, collate
from vlm_dist.data.sampler import LengthGroupedSampler, MicroBatch


class MicroBatchDataset(Dataset):
    """Item i = the collated batch of micro_batches[i]."""

    def __init__(self, micro_batches: Sequence[MicroBatch], samples: Sequence[PackableSample],
                 features_lookup: Callable[[str], torch.Tensor], *, pad_id: int, max_seq_len: int,
                 feature_shape: tuple[int, int] | None, pad_to_multiple: int = 8):
        self.micro_batches, self.samples, self.features_lookup = micro_batches, samples, features_lookup
        self.pad_id, self.max_seq_len = pad_id, max_seq_len
        self.feature_shape, self.pad_to_multiple = feature_shape, pad_to_multiple

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> dict:
        mb = self.micro_batches[i]
        rows = [[self.samples[j] for j in row] for row in mb.rows]
        return collate(rows, self.features_lookup, self.pad_id, self.max_seq_len,
                       feature_shape=self.feature_shape, filler_rows=mb.filler_rows,
                       pad_to_multiple=self.pad_to_multiple)


def build_loader(micro_batches: Sequence[MicroBatch], samples: Sequence[PackableSample],
                 features_lookup: Callable[[str], torch.Tensor], *, pad_id: int, max_seq_len: int,
                 feature_shape: tuple[int, int] | None, num_workers: int = 2, prefetch_factor: int = 4,
                 pin_memory: bool = True, pad_to_multiple: int = 8) -> DataLoader:
    """An ordered DataLoader over the given micro-batches (one batch dict each).

    pin_memory is ignored by torch (with a warning) when no accelerator is present.
    features_lookup runs in the workers: it must survive a fork (the Arrow cache's
    memory maps do).
    """
    dataset = MicroBatchDataset(micro_batches, samples, features_lookup, pad_id=pad_id,
                                max_seq_len=max_seq_len, feature_shape=feature_shape,
                                pad_to_multiple=pad_to_multiple)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      persistent_workers=False)


class BatchStream:
    """Endless iterator over this rank's batches, epoch after epoch, from the sampler's position.

        stream = BatchStream(sampler, samples, cache.get, pad_id=..., max_seq_len=..., feature_shape=(P, D))
        sampler.load_state_dict(ckpt["sampler"])       # on resume, before iterating
        for batch in stream: ...                       # sampler.state_dict() = next batch to train on

    Each batch is collate's dict plus "epoch" and "step" (its position) and, when the sampler
    knows target counts (from_samples), "global_num_supervised": the targets of this
    micro-step over all ranks, known without communication.

    Each epoch gets a fresh DataLoader over micro_batches(epoch)[step:]; skipped batches
    are never loaded. The position advances when a batch is handed out, so it counts
    batches the trainer received, not those the workers prefetched.
    """

    def __init__(self, sampler: LengthGroupedSampler, samples: Sequence[PackableSample],
                 features_lookup: Callable[[str], torch.Tensor], *, pad_id: int, max_seq_len: int,
                 feature_shape: tuple[int, int] | None, num_workers: int = 2, prefetch_factor: int = 4,
                 pin_memory: bool = True, pad_to_multiple: int = 8, max_epochs: int | None = None):
        if len(samples) != sampler.num_samples:
            raise ValueError(f"BatchStream: {len(samples)} samples but the sampler was planned for "
                             f"{sampler.num_samples}")
        self.sampler, self.samples, self.features_lookup = sampler, samples, features_lookup
        self.max_epochs = max_epochs
        self.loader_kwargs = dict(pad_id=pad_id, max_seq_len=max_seq_len, feature_shape=feature_shape,
                                  num_workers=num_workers, prefetch_factor=prefetch_factor,
                                  pin_memory=pin_memory, pad_to_multiple=pad_to_multiple)

    def __iter__(self) -> Iterator[dict]:
        s = self.sampler
        while self.max_epochs is None or s.epoch < self.max_epochs:
            epoch, start = s.epoch, s.step
            todo = s.micro_batches(epoch)[start:]
            if todo:
                loader = build_loader(todo, self.samples, self.features_lookup, **self.loader_kwargs)
                for i, batch in enumerate(loader):
                    s.set_position(epoch, start + i + 1)
                    batch["epoch"], batch["step"] = epoch, start + i
                    if s.num_targets is not None:
                        batch["global_num_supervised"] = s.global_num_supervised(epoch, start + i)
                    yield batch
            s.set_position(epoch + 1, 0)
