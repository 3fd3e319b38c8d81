"""Stage-1 caption filters (length, spam, exact/near duplicates) and synthetic multi-image captions."""
import json

import pytest

from vlm_dist.convert.cli import main
from vlm_dist.convert.hygiene import (DEFAULT_SPAM, CaptionFilters, HygieneError, MultiImageAugment, NearDuplicates,
                                normalize_caption, stage1)
from vlm_dist.contract.prompt import IGNORE, PromptEncoder
from vlm_dist.contract.records import read_records, validate_record, write_records


def cap(rid, caption, image=None):
    return {"id": rid, "images": [image or f"{rid}.jpg"], "conversations": [
        {"role": "user", "content": "<image>\nRender a clear and concise summary of the photo."},
        {"role": "assistant", "content": caption}]}


CAPTIONS = [
    cap("a", "A red circle on the left."),
    cap("b", "a red circle on the left"),                      # exact duplicate after normalisation
    cap("c", "A red circle on the left of the picture."),      # near duplicate of a
    cap("d", "Stock photo of a green triangle, download now"), # spam
    cap("e", "Yes."),                                          # too short
    cap("f", "A blue square at the top right of the image."),
    cap("g", "A yellow star near the bottom with a small purple circle in the center of the image."),
    cap("h", "The quick brown fox jumps over the lazy dog."),
]


def test_filters_count_and_list_every_drop(tokenizer):
    filters = CaptionFilters(min_tokens=3, max_tokens=40, tokenizer=tokenizer, spam_phrases=DEFAULT_SPAM,
                             dedup="near", near_threshold=0.6)
    out, dropped, stats = stage1(CAPTIONS, filters, MultiImageAugment(fraction=0.0))
    assert [r["id"] for r in out] == ["a", "f", "g", "h"]
    assert stats.dropped == {"duplicate caption": 1, "near-duplicate caption": 1, "spam phrase": 1,
                             "caption too short": 1}
    by_id = {d["id"]: d for d in dropped}
    assert by_id["b"]["detail"] == "same caption as 'a'" and by_id["c"]["detail"] == "near 'a'"
    assert "stock photo" in by_id["d"]["detail"].lower()
    assert stats.read == 8 and stats.kept == 4


def test_exact_dedup_keeps_near_duplicates():
    _, dropped, _ = stage1(CAPTIONS[:3], CaptionFilters(dedup="exact"), MultiImageAugment())
    assert [d["id"] for d in dropped] == ["b"]


def test_near_duplicates_are_confirmed_not_guessed():
    nd = NearDuplicates(threshold=0.8)
    assert nd.check_and_add(normalize_caption("a dog runs on the beach at sunset")) is None
    assert nd.check_and_add(normalize_caption("a cat sleeps on a red sofa")) is None
    assert nd.check_and_add(normalize_caption("A dog runs on the beach at sunset!")) == 0
    assert nd.check_and_add(normalize_caption("a dog runs on the beach")) is None   # Jaccard < 0.8


def test_spam_matches_whole_words_only():
    recs = [cap("x", "A clicker on a table."), cap("y", "Click here for the best deals.")]
    out, dropped, _ = stage1(recs, CaptionFilters(spam_phrases=DEFAULT_SPAM), MultiImageAugment())
    assert [r["id"] for r in out] == ["x"] and dropped[0]["id"] == "y"


def test_synthetic_multi_image_records_are_deterministic_and_tokenize(tokenizer):
    recs = [cap(str(i), f"Caption number {i}", image=f"img{i}.jpg") for i in range(20)]
    aug = MultiImageAugment(fraction=0.25, sizes=(2, 3), seed=7)
    out, _, stats = stage1(recs, CaptionFilters(), aug)
    again, _, _ = stage1(recs, CaptionFilters(), aug)
    assert out == again
    synth = out[20:]
    assert len(synth) == 5 == sum(stats.synthetic.values())
    enc = PromptEncoder(tokenizer, "plain", 4)
    for r in synth:
        validate_record(r)
        k = len(r["images"])
        assert k in (2, 3) and len(set(r["images"])) == k
        assert r["conversations"][0]["content"] == "<image>\n" * k + "Describe each image in order."
        members = r["id"].split(":", 1)[1].split("+")
        want = " ".join(f"Image {n}: Caption number {m}." for n, m in enumerate(members, 1))
        assert r["conversations"][1]["content"] == want
        assert r["images"] == [f"img{m}.jpg" for m in members]
        s = enc.encode(r)
        assert s.image_keys == r["images"]
        sup = [t for t, l in zip(s.input_ids, s.labels) if l != IGNORE]
        assert tokenizer.decode(sup) == want + "<|endoftext|>"
    other, _, _ = stage1(recs, CaptionFilters(), MultiImageAugment(fraction=0.25, seed=8))
    assert other[20:] != synth


def test_non_caption_records_are_refused():
    multi_turn = {"id": "m", "images": [], "conversations": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(HygieneError, match="'m' is not a stage-1 caption record"):
        stage1([multi_turn], CaptionFilters(), MultiImageAugment())


def test_cli_prompt_rewrite_and_side_files(tmp_path, tiny_models):
    src = tmp_path / "stage1.jsonl"
    write_records(src, CAPTIONS)
    out = tmp_path / "stage1.clean.jsonl"
    assert main(["stage1", "--input", str(src), "--out", str(out), "--tokenizer", tiny_models["tokenizer"],
                 "--min-tokens", "3", "--spam-filter", "--dedup", "exact",
                 "--prompt", "Describe the image in one sentence.",
                 "--multi-image-fraction", "0.3", "--multi-image-sizes", "2"]) == 0
    recs = list(read_records(out))
    singles = [r for r in recs if len(r["images"]) == 1]
    assert all(r["conversations"][0]["content"] == "<image>\nDescribe the image in one sentence." for r in singles)
    stats = json.loads((tmp_path / "stage1.clean.stats.json").read_text())
    assert stats["kept"] == len(singles) == 5 and stats["synthetic_by_images"] == {"2": 2}
    listed = (tmp_path / "stage1.clean.dropped.jsonl").read_text().splitlines()
    assert len(listed) == stats["dropped"] == 3


def test_non_utf8_input_is_named_and_a_failed_write_leaves_no_partial_file(tmp_path, capsys):
    src = tmp_path / "stage1.jsonl"
    lines = [json.dumps(r).encode() for r in CAPTIONS[:4]]
    lines[2] = lines[2].replace(b"circle", b"c\xefrcle")
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out" / "clean.jsonl"
    assert main(["stage1", "--input", str(src), "--out", str(out)]) == 2
    assert f"{src}:3: not UTF-8" in capsys.readouterr().err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    # write_records streams to <out>.tmp: a bad record midway removes it and leaves no output
    (tmp_path / "w").mkdir()
    with pytest.raises(ValueError, match="'b'"):
        write_records(tmp_path / "w" / "w.jsonl", [CAPTIONS[0], dict(CAPTIONS[1], images=[])])
    assert list((tmp_path / "w").iterdir()) == []
