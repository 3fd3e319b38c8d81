"""Encode planned shards: decode in DataLoader workers, SigLIP on the device, write in a thread.

Used by vlm_dist.cache.build (`vlm-cache build`). Images and videos are read,
checked against their key, decoded, cut into views (an image: itself, or with
tiling its thumbnail and tiles; a video: its sampled frames) and resized to 8-bit
pixels in worker processes (normalised on the device: 4x fewer bytes to pin and
copy), as VisionTower.encode_views does online; the
main loop only moves pinned batches to the device (non-blocking) and runs the
forward, then starts the features' copy into pinned host memory without
waiting for it. A writer thread streams them into the shard; the SHA-256 runs
on a hashing thread of the shard's own beside the writes (and beside the next
shard's, so hashing is no single-core cap), and a finished shard's fsync, sidecar
and rename run on a finishing thread (in shard order) while the next shard is
written, so neither the device nor the next shard waits for the disk. Batches
never cross a shard, so a shard's bytes do not depend on which process built it.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlm_dist.cache.plan import IMAGE_KIND, VIDEO_KIND, BuildConfig, Plan
from vlm_dist.cache.writer import (ShardWriter, disk_full_is_an_error, sidecar_path,
                                 write_json_atomic)
from vlm_dist.cache.reader import layout_json, shard_name
from vlm_dist.contract.images import ImageError, load_image, read_under
from vlm_dist.contract.video import VideoError, VideoLayout, load_video
from vlm_dist.model.vision import VisionTower, dtype_name, image_views, resize_uint8


class _DecodeDataset(Dataset):
    """Item i: read, check, decode and preprocess one image or video into its views, in a worker.

    Returns (i, pixels of its V views or None, layout JSON or None, failure reason or None)."""

    def __init__(self, items: list[tuple[int, str, str, str]], tower: VisionTower, cfg: BuildConfig):
        self.items = items                        # (shard, key, reference, kind)
        self.processor, self.naflex = tower.processor, tower.is_naflex
        self.draft_to = tower.draft_to            # as the fingerprint records it (tower.decode's rule)
        self.root, self.max_pixels = cfg.image_root, cfg.max_pixels
        self.max_bytes, self.max_video_bytes = cfg.max_bytes, cfg.max_video_bytes
        self.tiling, self.sampling = cfg.tiling, cfg.video_sampling

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        _, key, ref, kind = self.items[i]
        video = kind == VIDEO_KIND
        try:          # contained, regular, capped
            data = read_under(self.root, ref, self.max_video_bytes if video else self.max_bytes)
        except ImageError as e:
            return i, None, None, e.reason
        if hashlib.sha256(data).hexdigest() != key:
            return i, None, None, "file changed since the build was planned (its SHA-256 differs)"
        try:
            if video:
                clip = load_video(data, self.sampling, name=ref, max_bytes=self.max_video_bytes,
                                  max_pixels=self.max_pixels)
                views, layout = clip.frames, VideoLayout.of(clip).to_dict()
            else:
                img = load_image(data, max_pixels=self.max_pixels, name=ref, draft_to=self.draft_to)
                tiling, views = image_views(img, self.tiling)
                layout = None if tiling is None else {"kind": IMAGE_KIND, **tiling.to_dict()}
            if not self.naflex:      # 8-bit, resized: the tower normalises on the device
                return i, resize_uint8(self.processor, views), layout_json(layout), None
            out = self.processor(images=views, return_tensors="pt")
        except (ImageError, VideoError) as e:
            return i, None, None, e.reason
        except (ValueError, OSError) as e:           # the image processor rejecting an image
            return i, None, None, f"preprocessing failed: {type(e).__name__}: {e}"
        pixels = {k: out[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
        return i, pixels, layout_json(layout), None


def _num_rows(pixels) -> int:
    return len(pixels["pixel_values"] if isinstance(pixels, dict) else pixels)


def _collate(items):
    """Decoded items -> (ok item indices, views per ok item, their layouts, every view's pixels
    concatenated in item order, [(failed item index, reason)])."""
    ok = [(i, px, layout) for i, px, layout, _ in items if px is not None]
    failed = [(i, reason) for i, px, _, reason in items if px is None]
    if not ok:
        return [], [], [], None, failed
    first = ok[0][1]
    if isinstance(first, dict):
        pixels = {k: torch.cat([px[k] for _, px, _ in ok]) for k in first}
    else:
        pixels = torch.cat([px for _, px, _ in ok])
    return ([i for i, _, _ in ok], [_num_rows(px) for _, px, _ in ok], [layout for _, _, layout in ok],
            pixels, failed)


def _encode(tower: VisionTower, pixels, pool: int, chunk: int) -> torch.Tensor:
    """Features (V, P, D) of every view, `chunk` views per forward at most (a batch of tiled
    images or videos holds several views per item)."""
    n = _num_rows(pixels)
    if n <= chunk:
        return tower(pixels, pool=pool)
    parts = []
    for s in range(0, n, chunk):
        part = ({k: v[s:s + chunk] for k, v in pixels.items()} if isinstance(pixels, dict)
                else pixels[s:s + chunk])
        parts.append(tower(part, pool=pool))
    return torch.cat(parts)


def _copy_to_host(feats: torch.Tensor | None):
    """Start moving (B, P, D) features to the host: (tensor, CUDA event or None).

    On CUDA the copy goes into pinned memory without blocking (the writer waits for the
    event before reading it); the caching host allocator reuses pinned blocks once freed.
    """
    if feats is None or feats.device.type != "cuda":
        return feats, None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(feats.device))
    return host, done


def _to_storage(feats: torch.Tensor) -> np.ndarray:
    """(B, P, D) features -> (B, P*D) numpy in the storage dtype (bf16 as raw uint16 bits)."""
    feats = feats.to("cpu")                    # a no-op for what _copy_to_host already moved
    if feats.dtype == torch.bfloat16:
        feats = feats.view(torch.uint16)
    return feats.reshape(feats.shape[0], -1).numpy()


# Finished shards whose fsync/publish may be pending at once before the writer waits: each
# holds only dirty page cache, and publishing stays in shard order (one finishing thread).
MAX_FINISHING = 2


class _WriterThread(threading.Thread):
    """Writes shards while the device encodes the next batch; finishes them on another thread."""

    def __init__(self, out: Path, dtype: str, feature_shape):
        super().__init__(daemon=True)
        self.out, self.dtype, self.feature_shape = out, dtype, feature_shape
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: Exception | None = None
        self.bytes = 0
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-publish")
        self.finishing: deque = deque()        # futures of shards being finished, oldest first

    def run(self):
        writer, failures = None, []
        try:
            while (item := self.queue.get()) is not None:
                j, (keys, views, layouts), (feats, copied), failed, last = item
                with disk_full_is_an_error(self.out / shard_name(j)):
                    if writer is None:
                        writer, failures = ShardWriter(self.out / shard_name(j), self.dtype,
                                                       self.feature_shape, hash_in_background=True), []
                    if keys:
                        if copied is not None:
                            copied.synchronize()          # the device->host copy has landed
                        writer.write(keys, _to_storage(feats), views, layouts)
                    failures.extend(failed)
                    if last:
                        writer.close()
                        self.finishing.append(self.finisher.submit(self._finish, j, writer, failures))
                        writer = None
                        while len(self.finishing) > MAX_FINISHING:
                            self.bytes += self.finishing.popleft().result()
            while self.finishing:
                self.bytes += self.finishing.popleft().result()
        except Exception as e:         # re-raised in the main thread by put()/join_checked()
            self.error = e
            if writer is not None:
                writer.abort()
            for future in self.finishing:      # earlier shards still publish; a later error is theirs
                future.exception()
            while self.queue.get() is not None:         # drain so the producer never blocks
                pass
        finally:
            self.finisher.shutdown()

    def _finish(self, j: int, writer: ShardWriter, failures: list[dict]) -> int:
        """fsync shard j, write its sidecar, rename it into place; return its bytes."""
        with disk_full_is_an_error(self.out / shard_name(j)):
            try:
                info = writer.finish()
                info["failures"] = sorted(failures, key=lambda f: f["key"])
                write_json_atomic(sidecar_path(self.out, j), info)
            except BaseException:
                writer.abort()
                raise
            writer.publish()                    # the commit point of the shard
        return info["bytes"]

    def put(self, item):
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def join_checked(self):
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error

def _rows(keys: list[str], views: list[int], layouts: list[str | None]):
    """Per shard row (one per view): its key, view number and layout (on view 0 only)."""
    row_keys, row_views, row_layouts = [], [], []
    for key, v, layout in zip(keys, views, layouts):
        row_keys += [key] * v
        row_views += range(v)
        row_layouts += [layout] + [None] * (v - 1)
    return row_keys, row_views, row_layouts


def encode_shards(cfg: BuildConfig, tower: VisionTower, plan: Plan, shard_ids: list[int],
                  out: Path, show_progress: bool) -> dict:
    """Encode the given shards; return {"images" (items: images and videos), "views", "encoded",
    "failed", "bytes", "input_wait_seconds", "output_wait_seconds"}.

    input_wait_seconds is how long the device loop waited for decoded batches,
    output_wait_seconds how long it waited to hand features to the writer: both
    near zero mean the encoder, not JPEG decoding nor the disk, sets the pace.
    """
    items, batches = [], []          # batches: (index list, shard, last batch of the shard)
    for j in shard_ids:
        start = len(items)
        items += [(j, k, plan.key_ref[k], plan.key_kind.get(k, IMAGE_KIND)) for k in plan.shard_keys(j)]
        idx = list(range(start, len(items)))
        chunks = [idx[s:s + cfg.batch_size] for s in range(0, len(idx), cfg.batch_size)]
        batches += [(c, j, n == len(chunks) - 1) for n, c in enumerate(chunks)]
    stats = {"images": len(items), "views": 0, "encoded": 0, "failed": 0, "bytes": 0,
             "input_wait_seconds": 0.0, "output_wait_seconds": 0.0}
    if not items:
        return stats
    on_cuda = tower.device.type == "cuda"
    loader = DataLoader(_DecodeDataset(items, tower, cfg),
                        batch_sampler=[b for b, _, _ in batches], num_workers=cfg.workers,
                        collate_fn=_collate, pin_memory=on_cuda,
                        prefetch_factor=4 if cfg.workers > 0 else None)
    writer = _WriterThread(out, dtype_name(tower.dtype), tower.feature_shape(cfg.pool))
    writer.start()
    bar = tqdm(total=len(items), unit="item", desc="encode", disable=not show_progress,
               dynamic_ncols=True)
    batch_iter = iter(loader)
    try:
        for _, j, last in batches:
            t_wait = time.monotonic()
            ok, views, layouts, pixels, failed = next(batch_iter)
            stats["input_wait_seconds"] += time.monotonic() - t_wait    # decode-bound if large
            # (sum of views, P, D) on the device, batch_size views per forward at most
            feats = _encode(tower, pixels, cfg.pool, cfg.batch_size) if ok else None
            t_out = time.monotonic()
            writer.put((j, _rows([items[i][1] for i in ok], views, layouts), _copy_to_host(feats),
                        [{"key": items[i][1], "reason": r} for i, r in failed], last))
            stats["output_wait_seconds"] += time.monotonic() - t_out    # writer-bound if large
            stats["encoded"] += len(ok)
            stats["views"] += sum(views)
            stats["failed"] += len(failed)
            bar.update(len(ok) + len(failed))
            bar.set_postfix(failed=stats["failed"], refresh=False)
    finally:
        bar.close()
        writer.join_checked()
    stats["bytes"] = writer.bytes
    stats["input_wait_seconds"] = round(stats["input_wait_seconds"], 3)
    stats["output_wait_seconds"] = round(stats["output_wait_seconds"], 3)
    return stats
