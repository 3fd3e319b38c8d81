"""Mantis-Instruct: JSON files and the published parquet subsets.

Rows are {"id", "images": [...], "conversation": [{"role", "content"}]} (some
files use "conversations" and from/value keys; both are read). In JSON files an
image is a path relative to the JSON file's folder (override with --images-from).
In parquet subsets an image is {"bytes", "path"}: with bytes, the bytes are
written once under <image-root>/sha256/<aa>/<sha256><ext>, named by their
content, so re-running a conversion or sharing images between subsets stores
each image once; without bytes, the path is resolved like a JSON path
(pass --images-from <subset>/train_images after unzipping the subset's images).

    vlm-convert mantis --input Mantis-Instruct/nlvr2/train-00000-of-00001.parquet --out nlvr2.jsonl --image-root mantis_images
    vlm-convert mantis --input mantis/multi_vqa.json --out multi_vqa.jsonl --image-root mantis
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from vlm_dist.convert.formats.common import Drop, RawRecord, image_list, json_rows, turn_fields

PARQUET_BATCH = 64  # rows per read: bounds memory when rows carry image bytes


def rows(path: Path) -> Iterator[tuple[str, object]]:
    path = Path(path)
    if path.suffix != ".parquet":
        yield from json_rows(path)
        return
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
        for row in batch.to_pylist():
            yield f"{path.name}#{i}", row
            i += 1


def parse(row) -> RawRecord:
    if not isinstance(row, dict):
        raise Drop("malformed record", f"row is a {type(row).__name__}, not an object")
    convs = row.get("conversation", row.get("conversations"))
    if not isinstance(convs, list):
        raise Drop("no conversation", "missing 'conversation' list")
    images = row.get("images", row.get("image"))
    return RawRecord(id=None if row.get("id") is None else str(row["id"]),
                     images=image_list(images),
                     turns=[turn_fields(t) for t in convs])
