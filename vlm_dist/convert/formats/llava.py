"""LLaVA formats: LLaVA-Pretrain (blip_laion_cc_sbu_558k.json) and LLaVA-Instruct / mix665k.

Both are a JSON list of {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}.
`image` is a path relative to the image folder (LLaVA-Pretrain: "00453/004539375.jpg";
mix665k: "coco/train2017/000000033471.jpg", "gqa/images/...", "ocr_vqa/images/...",
"textvqa/train_images/...", "vg/VG_100K/..."; LLaVA-Instruct-150K: a bare COCO file
name). mix665k's ShareGPT records have no `image` key: they stay text-only. The
`<image>` marker may come before or after the text; its position is kept.

    vlm-convert llava-pretrain --input blip_laion_cc_sbu_558k.json --out stage1.jsonl --image-root LLaVA-Pretrain/images
    vlm-convert llava-instruct --input llava_v1_5_mix665k.json --out mix665k.jsonl --image-root playground/data
"""
from __future__ import annotations

from vlm_dist.convert.formats.common import Drop, RawRecord, image_list, turn_fields


def parse(row) -> RawRecord:
    if not isinstance(row, dict):
        raise Drop("malformed record", f"row is a {type(row).__name__}, not an object")
    convs = row.get("conversations")
    if not isinstance(convs, list):
        raise Drop("no conversation", "missing 'conversations' list")
    return RawRecord(id=None if row.get("id") is None else str(row["id"]),
                     images=image_list(row.get("image", row.get("images"))),
                     turns=[turn_fields(t) for t in convs])
