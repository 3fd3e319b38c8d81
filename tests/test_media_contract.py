"""The contract for tiled images and videos: records, blocks from layouts, truncation, the splice."""
import pytest
import torch

from vlm_dist.contract.prompt import IGNORE, PromptEncoder, SampleError
from vlm_dist.contract.records import RecordError, validate_record
from vlm_dist.contract.tiling import Tiling, TilingSpec, block_length, plan_tiling
from vlm_dist.contract.video import VideoLayout, video_block_ids
from vlm_dist.model.build import build_vlm, load_connectors, load_llm, save_connectors, set_trainable
from vlm_dist.model.vlm import SpliceError

T, TF, P, DV = 4, 3, 16, 32


def ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def mixed_record():
    return {"id": "mix", "images": ["a.png", "b.png"], "videos": ["v.mp4"], "conversations": [
        {"role": "user", "content": "<image> then <video> then <image>\nWhat changes?"},
        {"role": "assistant", "content": "The square moves."}]}


def layouts():
    spec = TilingSpec(tile_size=32, tokens_per_tile=T, grids=((2, 2), (1, 2)))
    wide = plan_tiling(64, 32, spec)           # 1x2 grid: thumbnail + 2 tiles
    small = plan_tiling(20, 20, spec)          # no bigger than a tile: 1x1, one view
    video = VideoLayout((0.25, 0.75, 1.25), 6, 1.5, (32, 32))
    return {"image": [wide, small], "video": [video]}, wide, small, video


@pytest.mark.parametrize("bad,rule", [
    ({"videos": "v.mp4"}, "'videos' must be a list"),
    ({"videos": []}, "1 <video> placeholder"),
    ({"videos": ["v.mp4", "w.mp4"]}, "2 video"),
])
def test_records_keep_the_kth_placeholder_rule_per_kind(bad, rule):
    r = dict(mixed_record(), **bad)
    with pytest.raises(RecordError, match=rule):
        validate_record(r)
    validate_record(mixed_record())
    r = mixed_record()
    r["conversations"][1]["content"] = "see <video>"
    with pytest.raises(RecordError, match="assistant turn contains <video>"):
        validate_record(r)


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_blocks_follow_each_items_layout_in_kind_order(tokenizer, template):
    enc = PromptEncoder(tokenizer, template, {"image": T, "video": TF})
    lay, wide, small, video = layouts()
    s = enc.encode(mixed_record(), layouts=lay)
    start, ipad, vpad, end = ids(tokenizer, "<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")
    assert s.media == {"image": ["a.png", "b.png"], "video": ["v.mp4"]}
    # slots: views x tokens per kind; count_slots counts views
    assert enc.count_slots(s.input_ids) == {"image": wide.num_views + small.num_views, "video": 3}
    assert s.input_ids.count(ipad) == T * (3 + 1) and s.input_ids.count(vpad) == TF * 3
    # blocks in text order: tiled image, video, plain image
    blocks, i = [], 0
    while i < len(s.input_ids):
        if s.input_ids[i] == start:
            j = s.input_ids.index(end, i)
            blocks.append(s.input_ids[i:j + 1])
            i = j
        i += 1
    assert [len(b) for b in blocks] == [block_length(T, 1, 2), len(video_block_ids(tokenizer, video.timestamps, TF)),
                                        block_length(T, 1, 1)]
    assert blocks[1] == video_block_ids(tokenizer, video.timestamps, TF)
    assert "0.8s" in tokenizer.decode(blocks[1]) and blocks[2] == [start] + [ipad] * T + [end]
    # dict layouts (as the cache stores them) give the same ids
    as_dicts = {"image": [wide.to_dict(), None], "video": [video.to_dict()]}
    assert enc.encode(mixed_record(), layouts=as_dicts).input_ids[:len(s.input_ids)] != [] and \
        enc.encode(mixed_record(), layouts=as_dicts).input_ids == \
        enc.encode(mixed_record(), layouts={"image": [wide, None], "video": [video]}).input_ids
    # supervision unchanged by media: only the answer (and its end token)
    sup = [t for t, l in zip(s.input_ids, s.labels) if l != IGNORE]
    assert tokenizer.decode(sup).startswith("The square moves.")


def test_a_video_needs_its_layout(tokenizer):
    enc = PromptEncoder(tokenizer, "plain", {"image": T, "video": TF})
    with pytest.raises(ValueError, match="needs the video's layout"):
        enc.encode(mixed_record(), layouts={"image": [None, None]})


def test_truncation_cuts_before_a_tiled_or_video_block_never_inside(tokenizer):
    enc = PromptEncoder(tokenizer, "plain", {"image": T, "video": TF})
    lay, wide, _, video = layouts()
    r = {"id": "t", "images": ["a.png"], "videos": ["v.mp4"], "conversations": [
        {"role": "user", "content": "Look: <image> and <video> please"},
        {"role": "assistant", "content": "A long answer " * 20}]}
    full = enc.encode(r, layouts={"image": [wide], "video": [video]})
    start, end = ids(tokenizer, "<|vision_start|>", "<|vision_end|>")
    starts = [i for i, t in enumerate(full.input_ids) if t == start]
    ends = [i for i, t in enumerate(full.input_ids) if t == end]
    for cut in range(starts[0] + 1, len(full.input_ids)):
        try:
            s = enc.encode(r, cut, truncate=True, layouts={"image": [wide], "video": [video]})
        except SampleError:
            continue
        n_blocks = s.input_ids.count(start)
        assert s.input_ids.count(end) == n_blocks            # no block is split
        assert list(s.media) == (["image", "video"] if n_blocks == 2 else ["image"] if n_blocks else [])
        if starts[1] < cut <= ends[1]:                          # inside the video block: cut before it
            assert len(s.input_ids) == starts[1]


def make_vlm(tiny_models, tokenizer, video=TF):
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "frozen", dtype=torch.float32)
    vlm = build_vlm(llm, tokenizer, vision_dim=DV, num_patches=P, connector=dict(num_latents=T, depth=1, heads=4),
                    dtype=torch.float32, video_tokens_per_frame=video)
    set_trainable(vlm, "frozen")
    return vlm


def batch(tokenizer, vlm_tokens, feats_img, feats_vid):
    enc = PromptEncoder(tokenizer, "plain", vlm_tokens)
    lay, *_ = layouts()
    s = enc.encode(mixed_record(), layouts=lay)
    i, lab = torch.tensor([s.input_ids]), torch.tensor([s.labels])
    tgt = torch.full_like(lab, IGNORE)
    tgt[:, :-1] = lab[:, 1:]
    media = {"image": {"features": feats_img, "counts": torch.tensor([feats_img.shape[0]])},
             "video": {"features": feats_vid, "counts": torch.tensor([feats_vid.shape[0]])}}
    return dict(input_ids=i, position_ids=torch.arange(i.shape[1])[None], targets=tgt, media=media,
                sample_ids=[["mix"]])


def test_video_connector_starts_from_the_image_connector_and_splices_frames(tiny_models, tokenizer):
    vlm = make_vlm(tiny_models, tokenizer)
    img, vid = vlm.connectors["image"], vlm.connectors["video"]
    assert vlm.num_tokens == {"image": T, "video": TF}
    torch.testing.assert_close(vid.resampler.latents, img.resampler.latents[:TF])
    vs, ims = vid.state_dict(), img.state_dict()
    assert vs.keys() == ims.keys()
    for k in vs:                         # every other weight is the image connector's
        if not k.endswith("latents"):
            torch.testing.assert_close(vs[k], ims[k], rtol=0, atol=0)
    b = batch(tokenizer, vlm.num_tokens, torch.randn(4, P, DV), torch.randn(3, P, DV))
    out = vlm(**b)
    out["loss_sum"].backward()
    assert vid.projector[0].weight.grad.abs().sum() > 0 and img.projector[0].weight.grad.abs().sum() > 0
    # frames are written into the video's slots in order: swapping two frames changes exactly those slots
    e1 = vlm.embed(b["input_ids"], b["media"])
    m2 = {k: dict(v) for k, v in b["media"].items()}
    m2["video"]["features"] = b["media"]["video"]["features"][[1, 0, 2]]
    e2 = vlm.embed(b["input_ids"], m2)
    vslots = (b["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|video_pad|>")).nonzero().squeeze(1)
    changed = (e1[0] != e2[0]).any(-1).nonzero().squeeze(1)
    assert changed.tolist() == vslots[:2 * TF].tolist()


def test_views_must_match_slots_and_a_model_without_video_refuses_it(tiny_models, tokenizer):
    vlm = make_vlm(tiny_models, tokenizer)
    b = batch(tokenizer, vlm.num_tokens, torch.randn(3, P, DV), torch.randn(3, P, DV))  # 4 image views needed
    with pytest.raises(SpliceError, match="16 image slots in the text but 3 image view"):
        vlm(**b)
    no_video = make_vlm(tiny_models, tokenizer, video=None)
    b = batch(tokenizer, {"image": T, "video": TF}, torch.randn(4, P, DV), torch.randn(3, P, DV))
    with pytest.raises(SpliceError, match="no video connector"):
        no_video(**b)


def test_a_stage1_export_without_video_weights_starts_the_video_connector_from_the_image(tiny_models, tokenizer,
                                                                                            tmp_path):
    stage1 = make_vlm(tiny_models, tokenizer, video=None)
    with torch.no_grad():
        for p in stage1.connectors.parameters():
            p.add_(0.5)
    save_connectors(stage1, tmp_path)
    stage2 = make_vlm(tiny_models, tokenizer)
    said = []
    load_connectors(stage2, tmp_path, log=said.append)
    assert said and "no video connector" in said[0]
    torch.testing.assert_close(stage2.connectors["image"].projector[0].weight,
                               stage1.connectors["image"].projector[0].weight)
    torch.testing.assert_close(stage2.connectors["video"].projector[0].weight,
                               stage1.connectors["image"].projector[0].weight)
    # and a full round trip keeps the video connector's own weights
    save_connectors(stage2, tmp_path / "s2")
    again = make_vlm(tiny_models, tokenizer)
    load_connectors(again, tmp_path / "s2")
    torch.testing.assert_close(again.connectors["video"].resampler.latents, stage2.connectors["video"].resampler.latents)
