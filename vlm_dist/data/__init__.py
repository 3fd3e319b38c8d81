"""The data pipeline between encoded samples and the model.

sampler.py plans each rank's micro-batches (length-grouped, modality-aware,
rank-balanced, resumable); pack.py packs samples into rows and collates rows into
the batch dict the model consumes; loader.py runs collate in DataLoader workers.
"""
from vlm_dist.data.loader import BatchStream, MicroBatchDataset, build_loader
from vlm_dist.data.pack import IGNORE, collate, count_targets, pack_rows
from vlm_dist.data.sampler import LengthGroupedSampler, MicroBatch, modality_of

__all__ = ["BatchStream", "MicroBatchDataset", "build_loader", "IGNORE", "collate", "count_targets", "pack_rows",
           "LengthGroupedSampler", "MicroBatch", "modality_of"]
