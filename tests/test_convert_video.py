"""vlm-convert llava-video: LLaVA-Video-178K subset JSON files (written here in the dataset's
layout) -> contract records with `videos` and `<video>`; drops counted and listed; a LLaVA-NeXT
data YAML as a stage mixture.

    python -m pytest tests/test_convert_video.py -q
"""
import json

import pytest

from vlm_dist.contract.prompt import IGNORE, PromptEncoder
from vlm_dist.contract.records import read_records
from vlm_dist.contract.video import VideoLayout
from vlm_dist.convert.cli import main


def put(path, data: bytes = b"\x00\x00\x00\x18ftypmp42"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def side(out, suffix):
    return out.with_name(out.name.replace(".jsonl", f".{suffix}"))


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture
def llava_video(tmp_path):
    """Two subsets of LLaVA-Video-178K: JSON files beside their unpacked video folders."""
    root = tmp_path / "LLaVA-Video-178K"
    academic, nextqa = root / "0_30_s_academic_v0_1", root / "0_30_s_nextqa"
    put(academic / "academic_source/Charades/RW587.mp4")
    put(academic / "academic_source/Charades/EMPTY.mp4", b"")
    put(nextqa / "NextQA/NExTVideo/1006/8968804598.mp4")
    src = "0_30_s_academic_v0_1"
    rows = [
        {"id": "RW587", "conversations": turns("<image>\nWhat is the person doing?", "Opening a door.",
                                               "What happens next?", "They walk out."),
         "data_source": src, "video": "academic_source/Charades/RW587.mp4"},
        {"id": "RW587-cap", "conversations": turns("Describe the video in detail.", "A person opens a door."),
         "data_source": src, "video": "academic_source/Charades/RW587.mp4"},          # no placeholder
        {"id": "gone", "conversations": turns("<image>\nWhat happens?", "Nothing."),
         "data_source": src, "video": "academic_source/Charades/GONE.mp4"},
        {"id": "empty", "conversations": turns("<image>\nWhat happens?", "Nothing."),
         "data_source": src, "video": "academic_source/Charades/EMPTY.mp4"},
        {"id": "twice", "conversations": turns("<image>\n<image>\nCompare.", "Same."),
         "data_source": src, "video": "academic_source/Charades/RW587.mp4"},
        {"id": "answer", "conversations": turns("<image>\nWhat?", "It shows <image>."),
         "data_source": src, "video": "academic_source/Charades/RW587.mp4"},
        {"id": "both", "conversations": turns("<image>\nWhat?", "A door."), "image": "x.jpg",
         "data_source": src, "video": "academic_source/Charades/RW587.mp4"},
    ]
    (academic / "0_30_s_academic_oe_v0_1_qa_processed.json").write_text(json.dumps(rows))
    mc = [{"id": "1006-8968804598", "conversations": turns(
        "<image>\nWhy did the boy stop?\nOptions:\nA. tired.\nB. training.\n"
        "Please provide your answer by stating the letter followed by the full option.", "B. training."),
        "data_source": "0_30_s_nextqa", "video": "NextQA/NExTVideo/1006/8968804598.mp4"},
        {"id": "RW587", "conversations": turns("<video>\nAgain?", "Yes."),           # already <video>; id repeats
         "data_source": "0_30_s_nextqa", "video": "NextQA/NExTVideo/1006/8968804598.mp4"}]
    (nextqa / "0_30_s_nextqa_mc_qa_processed.json").write_text(json.dumps(mc))
    return root


def test_subset_files_become_video_records(llava_video, tmp_path, tokenizer):
    out = tmp_path / "video.jsonl"
    files = [llava_video / "0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed.json",
             llava_video / "0_30_s_nextqa/0_30_s_nextqa_mc_qa_processed.json"]
    assert main(["llava-video", "--input", *map(str, files), "--out", str(out),
                 "--image-root", str(llava_video)]) == 0
    recs = list(read_records(out))
    assert [r["id"] for r in recs] == ["RW587", "RW587-cap", "1006-8968804598", "RW587#2"]
    first = recs[0]
    assert first["videos"] == ["0_30_s_academic_v0_1/academic_source/Charades/RW587.mp4"]
    assert first["images"] == []
    assert [t["content"] for t in first["conversations"]] == [
        "<video>\nWhat is the person doing?", "Opening a door.", "What happens next?", "They walk out."]
    assert recs[1]["conversations"][0]["content"] == "<video>\nDescribe the video in detail."
    assert recs[2]["videos"] == ["0_30_s_nextqa/NextQA/NExTVideo/1006/8968804598.mp4"]
    assert recs[3]["conversations"][0]["content"] == "<video>\nAgain?"

    st = json.loads(side(out, "stats.json").read_text())
    assert (st["read"], st["kept"], st["dropped"]) == (9, 4, 5)
    assert st["dropped_by_reason"] == {"ambiguous placeholder": 1, "empty video file": 1, "missing video": 1,
                                       "placeholder in assistant turn": 1, "placeholder/video count mismatch": 1}
    assert st["repaired"] == {"duplicate id renamed": 1, "placeholders added": 1}
    assert st["kept_by_source"] == {"0_30_s_academic_v0_1": 2, "0_30_s_nextqa": 2}
    listed = [json.loads(line) for line in side(out, "dropped.jsonl").read_text().splitlines()]
    assert {(d["id"], d["reason"]) for d in listed} == {
        ("gone", "missing video"), ("empty", "empty video file"), ("twice", "placeholder/video count mismatch"),
        ("answer", "placeholder in assistant turn"), ("both", "ambiguous placeholder")}
    assert next(d for d in listed if d["id"] == "gone")["source"] == "0_30_s_academic_oe_v0_1_qa_processed.json[2]"

    # the record trains as a video sample: its <video> becomes the frames' block, the answers supervised
    enc = PromptEncoder(tokenizer, "chatml", {"image": 4, "video": 2})
    layout = VideoLayout(timestamps=(0.5, 1.5, 2.5), num_available=90, duration=3.0, size=(64, 48))
    s = enc.encode(first, layouts={"video": [layout]})
    assert s.video_keys == first["videos"]
    pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert s.input_ids.count(pad) == 3 * 2
    supervised = tokenizer.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE])
    assert "Opening a door." in supervised and "They walk out." in supervised
    assert "What is the person doing?" not in supervised


def test_output_is_deterministic_and_video_folder_can_be_shared(llava_video, tmp_path):
    src = llava_video / "0_30_s_nextqa/0_30_s_nextqa_mc_qa_processed.json"
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        assert main(["llava-video", "--input", str(src), "--out", str(out), "--image-root", str(llava_video)]) == 0
    assert a.read_bytes() == b.read_bytes()
    # LLaVA-NeXT's single --video_folder: relative paths from one shared folder instead
    shared = tmp_path / "shared.jsonl"
    assert main(["llava-video", "--input", str(src), "--out", str(shared), "--image-root", str(llava_video),
                 "--images-from", str(llava_video / "0_30_s_nextqa")]) == 0
    assert [r["videos"] for r in read_records(shared)] == [r["videos"] for r in read_records(a)]


def test_a_video_outside_the_image_root_is_an_error_naming_it(llava_video, tmp_path, capsys):
    src = llava_video / "0_30_s_nextqa/0_30_s_nextqa_mc_qa_processed.json"
    out = tmp_path / "x.jsonl"
    assert main(["llava-video", "--input", str(src), "--out", str(out),
                 "--image-root", str(llava_video / "0_30_s_academic_v0_1")]) == 2
    err = capsys.readouterr().err
    assert "video 'NextQA/NExTVideo/1006/8968804598.mp4'" in err and "--image-root" in err
    assert not out.exists()


def test_llava_next_data_yaml_is_a_stage_mixture(llava_video, tmp_path):
    academic = "0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed.json"
    nextqa = "0_30_s_nextqa/0_30_s_nextqa_mc_qa_processed.json"
    mix = llava_video / "exp.yaml"
    mix.write_text("datasets:\n"
                   f"  - json_path: {academic}\n    sampling_strategy: first:2\n"
                   f"  - json_path: {llava_video / nextqa}\n    sampling_strategy: end:1\n"
                   f"  - json_path: {academic}\n    sampling_strategy: random:50%\n")
    outs = []
    for name, seed in (("m1", 0), ("m2", 0)):
        out = tmp_path / f"{name}.jsonl"
        assert main(["llava-video", "--input", str(mix), "--out", str(out), "--image-root", str(llava_video),
                     "--seed", str(seed)]) == 0
        outs.append(out)
    st = json.loads(side(outs[0], "stats.json").read_text())
    assert st["read"] == 2 + 1 + 4                       # 50% of 7 rows, rounded up as LLaVA-NeXT does
    recs = list(read_records(outs[0]))
    assert [r["id"] for r in recs[:3]] == ["RW587", "RW587-cap", "RW587#2"]      # first:2, then nextqa's end:1
    assert recs[2]["videos"] == ["0_30_s_nextqa/NextQA/NExTVideo/1006/8968804598.mp4"]
    assert outs[0].read_bytes() == outs[1].read_bytes()                          # same seed, same records

    bad = llava_video / "bad.yaml"
    bad.write_text(f"datasets:\n  - json_path: {academic}\n    sampling_strategy: some:3\n")
    assert main(["llava-video", "--input", str(bad), "--out", str(tmp_path / "bad.jsonl"),
                 "--image-root", str(llava_video)]) == 2
    missing = llava_video / "missing.yaml"
    missing.write_text("datasets:\n  - json_path: nowhere.json\n")
    assert main(["llava-video", "--input", str(missing), "--out", str(tmp_path / "bad.jsonl"),
                 "--image-root", str(llava_video)]) == 2
    assert not (tmp_path / "bad.jsonl").exists()


def write_clip(path, frames=20, fps=10, side=32):
    """A real (decodable) mpeg4 clip: frame i is grey level 10 * i."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = side, side, "yuv420p"
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((side, side, 3), 10 * i, np.uint8),
                                                         format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_converted_videos_cache_and_check_with_their_frames(tmp_path, tiny_models, tokenizer):
    """llava-video -> vlm-cache build (frames sampled into the cache) -> vlm-convert check laying each
    video out with its cached frames: Tf slots per sampled frame, as training lays it out."""
    from vlm_dist.cache.cli import main as cache_main
    from vlm_dist.cache.reader import read_layouts
    from vlm_dist.contract.video import video_block_ids

    root = tmp_path / "LLaVA-Video-178K" / "0_30_s_academic_v0_1"
    write_clip(root / "academic_source/Charades/RW587.mp4")            # 2 s at 10 fps
    (root / "oe.json").write_text(json.dumps([
        {"id": "RW587", "conversations": turns("<image>\nWhat is the person doing?", "Opening a door."),
         "data_source": "0_30_s_academic_v0_1", "video": "academic_source/Charades/RW587.mp4"}]))
    out = tmp_path / "video.jsonl"
    assert main(["llava-video", "--input", str(root / "oe.json"), "--out", str(out),
                 "--image-root", str(root.parent)]) == 0
    cache = tmp_path / "cache"
    assert cache_main(["build", "--records", str(out), "--image-root", str(root.parent), "--vision-model",
                       tiny_models["vision"], "--out", str(cache), "--frames", "4", "--device", "cpu",
                       "--workers", "0"]) == 0
    check = ["check", "--records", str(out), "--tokenizer", tiny_models["tokenizer"], "--template", "chatml",
             "--image-tokens", "4", "--video-tokens", "2", "--max-seq-len", "256", "--workers", "1"]
    assert main(check) == 0
    alone = json.loads(side(out, "supervision.json").read_text())
    assert main(check + ["--feature-cache", str(cache)]) == 0
    laid_out = json.loads(side(out, "supervision.json").read_text())
    # 4 frames (2 s at most 2 per second) of 2 slots each, against one placeholder frame without the cache
    assert laid_out["media_tokens"]["max_per_sample"] == 4 * 2 and alone["media_tokens"]["max_per_sample"] == 2
    assert (laid_out["ok"], laid_out["videos"]) == (1, 1)
    # the block is the cached frames' own: their timestamps as text, 2 slots each
    (layout,) = read_layouts(cache).values()
    assert len(layout["timestamps"]) == 4
    assert laid_out["length"]["max"] - alone["length"]["max"] == \
        len(video_block_ids(tokenizer, layout["timestamps"], 2)) - len(video_block_ids(tokenizer, [0.0], 2))


def test_jsonl_carries_images_and_videos_per_kind(tmp_path):
    """The contract-shaped format keeps a record mixing images and videos, each kind in its own order."""
    root = tmp_path / "media"
    for name in ("a.jpg", "b.jpg", "clip1.mp4", "clip2.mp4"):
        put(root / name, b"\xff\xd8\xff" if name.endswith(".jpg") else b"\x00\x00\x00\x18ftypmp42")
    rows = [{"id": "mix", "images": ["a.jpg", "b.jpg"], "video": ["clip1.mp4", "clip2.mp4"], "messages": [
        {"role": "user", "content": "<video> then <image>, <video> and <image>: what changed?"},
        {"role": "assistant", "content": "The light."}]},
            {"id": "gone", "videos": "nope.mp4", "messages": [
                {"role": "user", "content": "<video>\nWhat?"}, {"role": "assistant", "content": "X."}]}]
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["jsonl", "--input", str(src), "--out", str(out), "--image-root", str(root)]) == 0
    (rec,) = read_records(out)
    assert (rec["images"], rec["videos"]) == (["a.jpg", "b.jpg"], ["clip1.mp4", "clip2.mp4"])
    assert rec["conversations"][0]["content"] == "<video> then <image>, <video> and <image>: what changed?"
    assert json.loads(side(out, "stats.json").read_text())["dropped_by_reason"] == {"missing video": 1}
