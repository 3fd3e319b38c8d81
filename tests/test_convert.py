"""vlm-convert: each real format (small fixture files written here) -> contract records.

Covers the awkward cases: <image> after the text, text-only mix665k records,
multi-turn, Mantis with 3+ images and role/content keys, a parquet subset with
embedded image bytes, missing images; drops are counted and listed, output is
deterministic, validates, and tokenizes with the right labels.
"""
import hashlib
import io
import json

import pytest
from PIL import Image

from vlm_dist.convert.cli import main
from vlm_dist.contract.prompt import IGNORE, PromptEncoder
from vlm_dist.contract.records import read_records


def png(color, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def put(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run(*argv):
    assert main([str(a) for a in argv]) == 0


def side(out, suffix):
    return out.with_name(out.name.replace(".jsonl", f".{suffix}"))


def dropped(out):
    return [json.loads(line) for line in side(out, "dropped.jsonl").read_text().splitlines()]


def stats(out):
    return json.loads(side(out, "stats.json").read_text())


def supervised_text(tokenizer, sample):
    """Decoded supervised spans, one string per contiguous span."""
    spans, cur = [], []
    for t, l in zip(sample.input_ids, sample.labels):
        if l != IGNORE:
            cur.append(t)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(tokenizer.decode(cur))
    return spans


@pytest.fixture
def pretrain(tmp_path):
    root = tmp_path / "LLaVA-Pretrain"
    put(root / "00453/004539375.jpg", png("red"))
    put(root / "00223/002239345.jpg", png("blue"))
    rows = [
        {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "A red circle on the left."}]},
        {"id": "002239345", "image": "00223/002239345.jpg", "conversations": [
            {"from": "human", "value": "<image>\nGive a brief description of the image."},
            {"from": "gpt", "value": "A blue square at the top right of the image."}]},
        {"id": "001", "image": "00001/gone.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A dog."}]},
        {"id": "002", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Nothing to see."}]},
    ]
    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(rows))
    return root


def test_llava_pretrain_image_before_or_after_text_and_missing_image_listed(pretrain, tmp_path, tokenizer):
    out = tmp_path / "out" / "stage1.jsonl"
    run("llava-pretrain", "--input", pretrain / "blip_laion_cc_sbu_558k.json", "--out", out,
        "--image-root", pretrain)
    recs = list(read_records(out))
    assert [r["id"] for r in recs] == ["004539375", "002239345"]
    assert recs[0]["images"] == ["00453/004539375.jpg"]
    assert recs[0]["conversations"][0] == {
        "role": "user", "content": "Render a clear and concise summary of the photo.\n<image>"}
    assert stats(out)["read"] == 4 and stats(out)["kept"] == 2
    assert stats(out)["dropped_by_reason"] == {"missing image": 1, "no image": 1}
    d = dropped(out)[0]
    assert d["id"] == "001" and d["reason"] == "missing image" and "gone.jpg" in d["detail"]
    assert d["source"] == "blip_laion_cc_sbu_558k.json[2]"

    enc = PromptEncoder(tokenizer, "plain", 4)
    s = enc.encode(recs[0])
    assert supervised_text(tokenizer, s) == ["A red circle on the left.<|endoftext|>"]
    # the image block follows the text, where the <image> was
    text = tokenizer.decode(s.input_ids)
    assert text.index("summary of the photo.") < text.index("<|vision_start|>")


@pytest.fixture
def mix665k(tmp_path):
    root = tmp_path / "playground" / "data"
    put(root / "coco/train2017/000000033471.jpg", png("red"))
    put(root / "gqa/images/2354786.jpg", png("green"))
    put(root / "ocr_vqa/images/empty.jpg", b"")
    rows = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "conversations": [   # ShareGPT text-only record: no image key
            {"from": "human", "value": "How to tell if a customer segment is well segmented?"},
            {"from": "gpt", "value": "Check that it is homogeneous, distinct and actionable."}]},
        {"id": 2354786, "image": "gqa/images/2354786.jpg", "conversations": [   # int id
            {"from": "human", "value": "Is the sky dark?\n<image>"}, {"from": "gpt", "value": "Yes"}]},
        {"id": "i6IyJda_0", "conversations": [   # duplicate id, opens with the model
            {"from": "gpt", "value": "Hello! How can I help?"},
            {"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]},
        {"id": "sharegpt_empty", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
        {"id": "ocr_empty", "image": "ocr_vqa/images/empty.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWho wrote this book?"}, {"from": "gpt", "value": "Me."}]},
        {"id": "stray", "conversations": [
            {"from": "human", "value": "What does <image> mean in HTML?"}, {"from": "gpt", "value": "A tag."}]},
    ]
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(rows))
    return root


def test_llava_instruct_mix665k_multi_turn_text_only_and_repairs(mix665k, tmp_path, tokenizer):
    out = tmp_path / "mix665k.jsonl"
    run("llava-instruct", "--input", mix665k / "llava_v1_5_mix665k.json", "--out", out, "--image-root", mix665k)
    recs = {r["id"]: r for r in read_records(out)}
    assert list(recs) == ["000000033471", "i6IyJda_0", "2354786", "i6IyJda_0#2"]
    assert recs["i6IyJda_0"]["images"] == []
    assert recs["2354786"]["images"] == ["gqa/images/2354786.jpg"]
    assert [t["role"] for t in recs["i6IyJda_0#2"]["conversations"]] == ["user", "assistant"]
    st = stats(out)
    assert st["dropped_by_reason"] == {"empty image file": 1, "empty turn": 1,
                                       "placeholder/image count mismatch": 1}
    assert st["repaired"] == {"duplicate id renamed": 1, "leading assistant turn removed": 1}
    assert {d["id"] for d in dropped(out)} == {"sharegpt_empty", "ocr_empty", "stray"}

    enc = PromptEncoder(tokenizer, "chatml", 4)
    s = enc.encode(recs["000000033471"])
    assert supervised_text(tokenizer, s) == ["The bus in the image is white and red.<|im_end|>",
                                             "The back of the bus features an advertisement.<|im_end|>"]
    assert len(s.image_keys) == 1
    t = enc.encode(recs["i6IyJda_0"])
    assert t.image_keys == [] and "<|vision_start|>" not in tokenizer.decode(t.input_ids)


def test_mantis_json_three_images_role_content_and_added_placeholders(tmp_path, tokenizer):
    subset = tmp_path / "mantis" / "nlvr2"
    for name, color in [("a.png", "red"), ("b.png", "blue"), ("c.png", "green")]:
        put(subset / "images" / name, png(color))
    rows = [
        {"id": "nlvr2_1", "images": ["images/a.png", "images/b.png", "images/c.png"], "conversation": [
            {"role": "user", "content": "Image 1: <image>\nImage 2: <image>\nImage 3: <image>\nWhich is red?"},
            {"role": "assistant", "content": "The first image."},
            {"role": "user", "content": "And blue?"},
            {"role": "assistant", "content": "The second image."}]},
        {"id": "nlvr2_2", "images": [{"bytes": None, "path": "images/b.png"}, {"bytes": None, "path": "images/a.png"}],
         "conversations": [{"from": "human", "value": "Which image shows the red square?"},
                           {"from": "gpt", "value": "The second image."}]},
        {"id": "nlvr2_3", "images": ["images/a.png", "images/b.png"], "conversation": [
            {"role": "user", "content": "<image> only one placeholder"}, {"role": "assistant", "content": "No."}]},
    ]
    (subset / "train.json").write_text(json.dumps(rows, indent=1))
    out = tmp_path / "nlvr2.jsonl"
    run("mantis", "--input", subset / "train.json", "--out", out, "--image-root", tmp_path / "mantis",
        "--id-prefix", "nlvr2/")
    recs = list(read_records(out))
    assert [r["id"] for r in recs] == ["nlvr2/nlvr2_1", "nlvr2/nlvr2_2"]
    assert recs[0]["images"] == ["nlvr2/images/a.png", "nlvr2/images/b.png", "nlvr2/images/c.png"]
    assert recs[1]["conversations"][0]["content"] == "<image>\n<image>\nWhich image shows the red square?"
    assert stats(out)["repaired"] == {"placeholders added": 1}
    assert dropped(out)[0]["reason"] == "placeholder/image count mismatch"

    s = PromptEncoder(tokenizer, "chatml", 4).encode(recs[0])
    assert s.image_keys == recs[0]["images"]
    assert supervised_text(tokenizer, s) == ["The first image.<|im_end|>", "The second image.<|im_end|>"]


def write_mantis_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([
        ("id", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("conversation", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("source", pa.string()),
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)


def test_mantis_parquet_embedded_bytes_written_once_by_content(tmp_path):
    red, blue, green = png("red"), png("blue"), png("green")
    put(tmp_path / "subset" / "train_images" / "on_disk.png", png("yellow"))
    conv = lambda n: [{"role": "user", "content": "<image>" * n + "\nDescribe each image in order."},
                      {"role": "assistant", "content": "Image 1: a small purple circle."}]
    rows = [
        {"id": "s0", "images": [{"bytes": red, "path": "x0.png"}, {"bytes": blue, "path": "x1.png"},
                                {"bytes": green, "path": "x2.jpeg"}], "conversation": conv(3), "source": "t"},
        {"id": "s1", "images": [{"bytes": blue, "path": "other-name.png"}], "conversation": conv(1), "source": "t"},
        {"id": "s2", "images": [{"bytes": None, "path": "on_disk.png"}], "conversation": conv(1), "source": "t"},
        {"id": "s3", "images": [{"bytes": None, "path": "not_there.png"}], "conversation": conv(1), "source": "t"},
    ]
    pq_path = tmp_path / "subset" / "train-00000-of-00001.parquet"
    write_mantis_parquet(pq_path, rows)
    root = tmp_path / "images"
    (root / "subset").mkdir(parents=True)
    # path-only images are resolved in the unzipped image folder, then expressed relative to the root
    import shutil
    shutil.copytree(tmp_path / "subset" / "train_images", root / "subset" / "train_images")
    out = tmp_path / "subset.jsonl"
    run("mantis", "--input", pq_path, "--out", out, "--image-root", root,
        "--images-from", root / "subset" / "train_images")
    recs = list(read_records(out))
    sha = lambda b: hashlib.sha256(b).hexdigest()
    assert recs[0]["images"] == [f"sha256/{sha(red)[:2]}/{sha(red)}.png", f"sha256/{sha(blue)[:2]}/{sha(blue)}.png",
                                 f"sha256/{sha(green)[:2]}/{sha(green)}.jpeg"]
    assert recs[1]["images"] == [recs[0]["images"][1]]     # same bytes, same file
    assert recs[2]["images"] == ["subset/train_images/on_disk.png"]
    for rel in recs[0]["images"]:
        data = (root / rel).read_bytes()
        assert sha(data) in rel
    st = stats(out)
    assert (st["images_written"], st["images_reused"]) == (3, 1)
    assert st["dropped_by_reason"] == {"missing image": 1}
    assert dropped(out)[0]["source"] == "train-00000-of-00001.parquet#3"

    # a second run writes nothing new and produces the same bytes
    first = out.read_bytes()
    run("mantis", "--input", pq_path, "--out", out, "--image-root", root,
        "--images-from", root / "subset" / "train_images")
    assert out.read_bytes() == first
    assert stats(out)["images_written"] == 0


def test_jsonl_key_map_and_role_map(tmp_path):
    put(tmp_path / "imgs" / "p.png", png("red"))
    rows = [{"uid": "a", "pics": ["p.png"], "messages": [
        {"speaker": "system", "text": "Be brief."},
        {"speaker": "person", "text": "<image>\nWhat colour?"}, {"speaker": "bot", "text": "Red."}]},
        {"uid": "b", "pics": [], "messages": [{"speaker": "alien", "text": "?"}, {"speaker": "bot", "text": "!"}]}]
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    out = tmp_path / "mine.records.jsonl"
    run("jsonl", "--input", src, "--out", out, "--image-root", tmp_path / "imgs",
        "--key-map", "id=uid,images=pics,conversations=messages,role=speaker,content=text",
        "--role-map", "person=user,bot=assistant")
    [r] = list(read_records(out))
    assert r == {"id": "a", "images": ["p.png"], "conversations": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "Red."}]}
    assert stats(out)["dropped_by_reason"] == {"invalid JSON": 1, "unknown role": 1}
    assert dropped(out)[1]["source"] == "mine.jsonl:3"


def test_output_is_deterministic(mix665k, tmp_path):
    outs = []
    for name in ("one.jsonl", "two.jsonl"):
        out = tmp_path / name
        run("llava-instruct", "--input", mix665k / "llava_v1_5_mix665k.json", "--out", out, "--image-root", mix665k)
        outs.append((out.read_bytes(), side(out, "dropped.jsonl").read_bytes()))
    assert outs[0] == outs[1]


def test_bad_flags_are_loud(tmp_path, capsys):
    assert main(["llava-instruct", "--input", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "nope.json" in capsys.readouterr().err
    put(tmp_path / "elsewhere" / "x.png", png("red"))
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"id": "x", "image": "../elsewhere/x.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red square."}]}]))
    (tmp_path / "root").mkdir()
    assert main(["llava-instruct", "--input", str(src), "--out", str(tmp_path / "o.jsonl"),
                 "--image-root", str(tmp_path / "root")]) == 2
    assert "outside --image-root" in capsys.readouterr().err


def test_converted_records_pass_the_supervision_check(mix665k, tmp_path, tiny_models):
    out = tmp_path / "mix665k.jsonl"
    run("llava-instruct", "--input", mix665k / "llava_v1_5_mix665k.json", "--out", out, "--image-root", mix665k)
    run("check", "--records", out, "--tokenizer", tiny_models["tokenizer"], "--template", "chatml",
        "--image-tokens", 4, "--max-seq-len", 256, "--workers", 1)
    summary = json.loads(side(out, "supervision.json").read_text())
    assert summary["ok"] == 4 and summary["images"] == 2 and summary["text_only_records"] == 2


def _chat(rid, text):
    return {"id": rid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Yes."}]}


@pytest.mark.parametrize("fmt,name", [("jsonl", "mine.jsonl"), ("llava-instruct", "list.json")])
def test_non_utf8_bytes_name_the_file_and_line_and_leave_no_partial_output(tmp_path, capsys, fmt, name):
    src = tmp_path / name
    if fmt == "jsonl":   # one record a line: the bad byte is in record 3
        lines = [json.dumps(_chat(str(i), "Hello.")).encode() for i in range(4)]
    else:                # a JSON list, one record a line after the opening bracket: record 2 on line 3
        lines = [b"["] + [json.dumps(_chat(str(i), "Hello.")).encode() + b"," for i in range(3)] + [b"{}]"]
    lines[2] = lines[2].replace(b"Hello", b"H\xe9llo")   # Latin-1 e-acute, not UTF-8
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out" / "records.jsonl"
    assert main([fmt, "--input", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3: not UTF-8" in err and "byte 0xe9" in err and "Traceback" not in err
    assert not out.exists() and list(out.parent.iterdir()) == []   # no records.jsonl.tmp left behind


def test_utf8_bom_at_the_start_is_read_not_dropped(tmp_path):
    rows = [_chat("a", "Hello."), _chat("b", "Ça va?")]
    for fmt, name, body in [("jsonl", "bom.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n"),
                            ("llava-instruct", "bom.json", json.dumps(rows))]:
        src = tmp_path / name
        src.write_bytes(b"\xef\xbb\xbf" + body.encode())
        out = tmp_path / f"{fmt}.out.jsonl"
        run(fmt, "--input", src, "--out", out)
        assert [r["id"] for r in read_records(out)] == ["a", "b"] and stats(out)["dropped"] == 0


def test_symlinks_out_of_the_image_root_are_dropped_links_inside_are_kept(tmp_path):
    root = tmp_path / "imgs"
    put(root / "p.png", png("red"))
    put(tmp_path / "secret.png", png("blue"))
    (root / "sub").mkdir()
    (root / "sub" / "in.png").symlink_to(root / "p.png")
    (root / "out.png").symlink_to(tmp_path / "secret.png")          # textually inside the root
    (root / "outdir").symlink_to(tmp_path)
    turns = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."}]
    rows = [{"id": i, "images": [ref], "conversations": turns}
            for i, ref in (("in", "sub/in.png"), ("out", "out.png"), ("dir", "outdir/secret.png"))]
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mine.records.jsonl"
    run("jsonl", "--input", src, "--out", out, "--image-root", root)
    assert [(r["id"], r["images"]) for r in read_records(out)] == [("in", ["sub/in.png"])]
    assert stats(out)["dropped_by_reason"] == {"image outside image root": 2}
    assert all("outside the image root" in d["detail"] for d in dropped(out))
