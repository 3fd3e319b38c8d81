"""Any JSON list / JSONL file shaped like the contract, with a key map for other names.

The key map names, for each contract field, the key the input uses:
`id`, `images` (a path or a list of paths), `videos` (likewise; `<video>` placeholders),
`conversations`, and in each turn `role` and `content`. Defaults accept the common
spellings (images/image, videos/video, conversations/conversation/messages, role/from,
content/value/text). Extra role names map with --role-map.

    vlm-convert jsonl --input mine.jsonl --out records.jsonl --image-root imgs \\
        --key-map conversations=messages,content=text --role-map bot=assistant
"""
from __future__ import annotations

from vlm_dist.convert.formats.common import ConvertError, Drop, RawRecord, image_list, turn_fields

DEFAULT_KEYS = {
    "id": ("id",),
    "images": ("images", "image"),
    "videos": ("videos", "video"),
    "conversations": ("conversations", "conversation", "messages"),
    "role": ("role", "from"),
    "content": ("content", "value", "text"),
}


def parse_key_map(text: str | None) -> dict[str, tuple[str, ...]]:
    """'conversations=messages,content=text' -> DEFAULT_KEYS with those entries replaced."""
    keys = dict(DEFAULT_KEYS)
    for item in filter(None, (text or "").split(",")):
        field, sep, key = item.partition("=")
        field, key = field.strip(), key.strip()
        if not sep or field not in DEFAULT_KEYS or not key:
            raise ConvertError(f"--key-map entry {item!r}: expected FIELD=KEY with FIELD one of "
                               f"{', '.join(DEFAULT_KEYS)}")
        keys[field] = (key,)
    return keys


def make_parser(keys: dict[str, tuple[str, ...]]):
    def first(row: dict, field: str):
        return next((row[k] for k in keys[field] if k in row), None)

    def parse(row) -> RawRecord:
        if not isinstance(row, dict):
            raise Drop("malformed record", f"row is a {type(row).__name__}, not an object")
        convs = first(row, "conversations")
        if not isinstance(convs, list):
            raise Drop("no conversation", f"none of the keys {keys['conversations']} holds a list")
        rid = first(row, "id")
        videos = first(row, "videos")
        videos = [] if videos is None or videos == "" else videos if isinstance(videos, list) else [videos]
        if not all(isinstance(v, str) and v for v in videos):
            raise Drop("malformed video reference", f"video entry {first(row, 'videos')!r} is not a path")
        return RawRecord(id=None if rid is None else str(rid), images=image_list(first(row, "images")),
                         turns=[turn_fields(t, keys["role"], keys["content"]) for t in convs], videos=videos)
    return parse
