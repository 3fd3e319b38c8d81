"""FLOPs accounting: a hand computation, DESIGN.md's 8B numbers, and torch's own FLOP counter.

    python -m pytest tests/test_flops.py -q
"""
import pytest
import torch
from transformers import Qwen3Config, SiglipVisionConfig

from vlm_dist.training import flops as F


def tiny_llm_config():
    return Qwen3Config(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4, vocab_size=20, tie_word_embeddings=False)


def tiny_vision_config():
    return SiglipVisionConfig(hidden_size=6, image_size=16, patch_size=8, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=12)   # 2 x 2 = 4 patches


TINY_CONNECTOR = dict(vision_dim=6, llm_dim=8, kind="resampler", num_latents=2, depth=1, heads=2,
                      resampler_dim=None, use_layernorm=True)
SAMPLES = [F.SampleShape(length=5, supervised=2, image_views=1), F.SampleShape(length=3, supervised=1, image_views=0)]


def test_hand_computation_on_a_tiny_config():
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate 8x12, up 8x12, down 12x8 = 480 -> N = 960
    n_body, n_head, tokens, supervised = 2 * 480, 8 * 20, 5 + 3, 2 + 1
    assert F.body_params(tiny_llm_config()) == n_body and F.lm_head_params(tiny_llm_config()) == n_head
    # causal attention per layer: 2 x 2 x (heads x head_dim = 8) x L(L+1)/2, summed over samples (not rows)
    attn_forward = 2 * (2 * 2 * 8 * (5 * 6 // 2 + 3 * 4 // 2))
    # connector, per image: width 6, 2 latents, 4 patches; everything trains (x6), attention x3
    conn_linear = (6 * 2 * 6 * 6             # q
                   + 6 * (4 + 2) * 6 * 12    # kv over [patches; latents]
                   + 6 * 2 * 6 * 6           # out
                   + 6 * 2 * 2 * 6 * 24      # ff 6 -> 24 -> 6
                   + 6 * 2 * 6 * 8           # projector fc1
                   + 6 * 2 * 8 * 8)          # projector fc2
    conn_attention = 3 * 2 * 2 * 2 * (4 + 2) * 6

    f = F.step_flops(tiny_llm_config(), tiny_vision_config(), TINY_CONNECTOR, SAMPLES, "frozen")
    assert (f.tokens, f.supervised, f.samples, f.image_views, f.video_frames) == (tokens, supervised, 2, 1, 0)
    assert f.body == 4 * n_body * tokens
    assert f.lm_head == 4 * n_head * supervised
    assert f.attention == 3 * attn_forward
    assert (f.connector, f.connector_attention) == (conn_linear, conn_attention)
    assert f.lora == 0
    assert f.total == 4 * n_body * tokens + 4 * n_head * supervised + 3 * attn_forward + conn_linear + conn_attention
    assert f.recompute == 2 * n_head * supervised                 # the checkpointed cross-entropy chunks

    full = F.step_flops(tiny_llm_config(), tiny_vision_config(), TINY_CONNECTOR, SAMPLES, "full")
    assert (full.body, full.lm_head) == (6 * n_body * tokens, 6 * n_head * supervised)

    r = 2   # LoRA on q and v only: r x (in + out) per layer
    lora = F.step_flops(tiny_llm_config(), tiny_vision_config(), TINY_CONNECTOR, SAMPLES, "qlora",
                        F.LoraShape(r, ("q_proj", "v_proj")))
    assert lora.body == 4 * n_body * tokens
    assert lora.lora == 6 * 2 * (r * (8 + 8) + r * (8 + 4)) * tokens

    gc = F.step_flops(tiny_llm_config(), tiny_vision_config(), TINY_CONNECTOR, SAMPLES, "frozen",
                      gradient_checkpointing=True)
    assert gc.total == f.total                                     # recomputation is not model FLOPs
    assert gc.recompute == 2 * n_head * supervised + 2 * n_body * tokens + attn_forward


def test_packed_samples_do_not_attend_to_each_other():
    llm, vis = tiny_llm_config(), tiny_vision_config()
    a, b = F.SampleShape(100, 10, 1), F.SampleShape(50, 5, 1)
    both = F.step_flops(llm, vis, TINY_CONNECTOR, [a, b]).attention
    assert both == (F.step_flops(llm, vis, TINY_CONNECTOR, [a]).attention
                    + F.step_flops(llm, vis, TINY_CONNECTOR, [b]).attention)
    assert both < F.step_flops(llm, vis, TINY_CONNECTOR, [F.SampleShape(150, 15, 2)]).attention


def test_qwen3_8b_numbers_match_design_md():
    llm, vision = F.load_configs()       # launch/model_configs/: the real Qwen3-8B-Base and so400m configs
    assert F.num_patches(vision) == 729
    assert F.body_params(llm) == pytest.approx(6.95e9, rel=0.01)
    assert F.lm_head_params(llm) == pytest.approx(0.62e9, rel=0.01)
    assert 4 * F.body_params(llm) == pytest.approx(27.8e9, rel=0.01)
    # stage 1 (launch/configs/stage1_align.yaml's connector): ~110 tokens/sample, one image, caption supervised
    connector = dict(vision_dim=1152, llm_dim=4096, kind="resampler", num_latents=64, depth=3, heads=16,
                     resampler_dim=None, use_layernorm=True)
    f = F.step_flops(llm, vision, connector, [F.SampleShape(110, 32, 1)] * 100, "frozen")
    assert f.per_token() == pytest.approx(29e9, rel=0.01)
    # "Stage 1 at 100% of ~800 TFLOP/s is ~27.6K tokens/s"
    assert 800e12 / f.per_token() == pytest.approx(27.6e3, rel=0.01)


def test_mfu_and_spec_peaks():
    assert F.mfu(4e14, 2.0, 800e12) == 0.25
    with pytest.raises(ValueError):
        F.mfu(1.0, 0.0, 1e12)
    assert F.spec_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert F.spec_peak("NVIDIA H100 PCIe") == 756e12
    assert F.spec_peak("NVIDIA H200") == 989e12
    assert F.spec_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert F.spec_peak("Some Future GPU") is None


def test_bad_sample_shape_is_named():
    with pytest.raises(ValueError, match="supervised"):
        F.step_flops(tiny_llm_config(), tiny_vision_config(), TINY_CONNECTOR, [F.SampleShape(3, 4, 0)])
    with pytest.raises(ValueError, match="llm_mode"):
        F.step_flops(tiny_llm_config(), tiny_vision_config(), TINY_CONNECTOR, SAMPLES, "lorra")


# -- against torch.utils.flop_counter on the real VLM ----------------------------------------------

@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_counts_match_torch_flop_counter(tiny_models, tokenizer, mode):
    """Every matmul with a weight (LLM, LoRA, lm_head, connector), forward + backward, as torch counts it.

    Attention is left out of the comparison: torch counts a masked SDPA over the whole
    packed row (or not at all on the CPU), where the model FLOPs count per-sample causal pairs.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from vlm_dist.data.pack import collate
    from vlm_dist.contract.media import IMAGE, block_ids
    from vlm_dist.config import LoraConfig
    from vlm_dist.model.build import build_vlm, load_llm, set_trainable
    from vlm_dist.contract.prompt import EncodedSample

    torch.manual_seed(0)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    llm = load_llm(tiny_models["llm"], mode, torch.float32, "sdpa", lora=lora)
    vcfg = AutoConfig.from_pretrained(tiny_models["vision"]).vision_config
    patches = F.num_patches(vcfg)
    vlm = build_vlm(llm, tokenizer, vcfg.hidden_size, patches, dict(num_latents=4, depth=2, heads=2),
                    torch.float32)
    set_trainable(vlm, mode)
    block = block_ids(tokenizer, IMAGE, 4)

    def sample(i, images, prompt, answer):
        ids = block.block() * images + list(range(10, 10 + prompt + answer))
        return EncodedSample(f"s{i}", ids, [-100] * (len(ids) - answer) + ids[-answer:],
                             {"image": [f"k{i}-{j}" for j in range(images)]})

    rows = [[sample(0, 1, 5, 4), sample(1, 2, 3, 6)], [sample(2, 0, 7, 3)]]
    feats = {k: torch.randn(patches, vcfg.hidden_size) for row in rows for s in row for k in s.image_keys}
    batch = collate(rows, feats.__getitem__, pad_id=0, max_seq_len=64, feature_shape=(patches, vcfg.hidden_size))
    with FlopCounterMode(display=False) as counter:
        out = vlm(batch["input_ids"], batch["position_ids"], batch["targets"], batch["media"])
        out["loss_sum"].backward()
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))

    shapes = [F.SampleShape(len(s), sum(x != -100 for x in s.labels[1:]), len(s.image_keys))
              for row in rows for s in row]
    f = F.step_flops(llm.config, vcfg, vlm.connectors["image"].config, shapes, mode,
                     F.LoraShape(lora.r, tuple(lora.target_modules)))
    # the padding tail of each row runs through the linears too: waste, so not in model FLOPs
    padding = batch["input_ids"].numel() - f.tokens
    assert padding > 0
    per_token_linears = (f.body + f.lora) // f.tokens
    assert counted == f.body + f.lora + f.lm_head + f.recompute + f.connector + per_token_linears * padding


# -- views: tiled images and video frames (issue 18) ------------------------------------------------

def test_a_tiled_image_costs_the_connector_once_per_view():
    """A 2x2 grid is 5 views (thumbnail + 4 tiles): 5x an untiled image's connector work; the LLM
    side only sees the longer block's tokens."""
    from vlm_dist.contract.tiling import TilingSpec, plan_tiling

    spec = TilingSpec(tile_size=16, tokens_per_tile=2, token_budget=64, grids=((2, 2),))
    tiling = plan_tiling(32, 32, spec)
    assert (tiling.rows, tiling.cols, tiling.num_views) == (2, 2, 5)
    block = tiling.block_length(2)                   # start + 5 x 2 pads + 3 "\n" + end
    assert block == 2 + 2 * 5 + 3
    llm, vis = tiny_llm_config(), tiny_vision_config()
    untiled = F.step_flops(llm, vis, TINY_CONNECTOR, [F.SampleShape(4 + 6, 2, image_views=1)])
    tiled = F.step_flops(llm, vis, TINY_CONNECTOR, [F.SampleShape(block + 6, 2, image_views=tiling.num_views)])
    assert tiled.image_views == 5
    assert tiled.connector == 5 * untiled.connector
    assert tiled.connector_attention == 5 * untiled.connector_attention
    assert tiled.body == untiled.body * (block + 6) / (4 + 6)       # per token, views do not matter


def test_video_frames_run_the_video_connector():
    """Frames cost the VIDEO connector's work (its own latent count), not the image connector's."""
    llm, vis = tiny_llm_config(), tiny_vision_config()
    video_conn = dict(TINY_CONNECTOR, num_latents=1)
    # one latent, 4 patches, width 6, everything trains: the same terms as the hand computation above
    per_frame = (6 * 1 * 6 * 6 + 6 * (4 + 1) * 6 * 12 + 6 * 1 * 6 * 6 + 6 * 1 * 2 * 6 * 24
                 + 6 * 1 * 6 * 8 + 6 * 1 * 8 * 8)
    per_frame_attention = 3 * 2 * 2 * 1 * (4 + 1) * 6
    image_only = F.step_flops(llm, vis, TINY_CONNECTOR, [F.SampleShape(20, 3, image_views=1)])
    mixed = F.step_flops(llm, vis, TINY_CONNECTOR, [F.SampleShape(20, 3, image_views=1, video_frames=4)],
                         video_connector_config=video_conn)
    assert (mixed.image_views, mixed.video_frames) == (1, 4)
    assert mixed.connector == image_only.connector + 4 * per_frame
    assert mixed.connector_attention == image_only.connector_attention + 4 * per_frame_attention
    assert (mixed.body, mixed.attention, mixed.lm_head) == (image_only.body, image_only.attention,
                                                            image_only.lm_head)
    with pytest.raises(ValueError, match="video_connector_config"):
        F.step_flops(llm, vis, TINY_CONNECTOR, [F.SampleShape(20, 3, video_frames=2)])
    with pytest.raises(ValueError, match="video_frames"):
        F.step_flops(llm, vis, TINY_CONNECTOR, [F.SampleShape(20, 3, video_frames=-1)])


def test_cache_build_flops_scale_with_views():
    vis = tiny_vision_config()
    one = F.vision_flops_per_image(vis)
    assert F.cache_build_flops(vis, 1) == one
    assert F.cache_build_flops(vis, 5 + 8) == 13 * one     # a 2x2-tiled image and an 8-frame video
    with pytest.raises(ValueError, match="views"):
        F.cache_build_flops(vis, -1)


def test_tiled_and_video_counts_match_torch_flop_counter(tiny_models, tokenizer):
    """The real VLM on one row holding a 2x2-tiled image (5 views), an untiled image and a 3-frame
    video: every matmul with a weight, forward + backward, equals step_flops' count."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from vlm_dist.contract.prompt import IGNORE
    from vlm_dist.contract.tiling import tile_block_ids
    from vlm_dist.contract.video import video_block_ids
    from vlm_dist.model.build import build_vlm, load_llm, set_trainable

    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "frozen", torch.float32, "sdpa")
    vcfg = AutoConfig.from_pretrained(tiny_models["vision"]).vision_config
    patches = F.num_patches(vcfg)
    vlm = build_vlm(llm, tokenizer, vcfg.hidden_size, patches, dict(num_latents=4, depth=1, heads=2),
                    torch.float32, video_tokens_per_frame=2)
    set_trainable(vlm, "frozen")
    ids = (tile_block_ids(tokenizer, 2, 2, 4) + tile_block_ids(tokenizer, 1, 1, 4)
           + video_block_ids(tokenizer, [0.0, 0.5, 1.0], 2) + list(range(10, 22)))
    answer = 5
    targets = torch.full((1, len(ids)), IGNORE)
    targets[0, len(ids) - answer - 1:-1] = torch.tensor(ids[-answer:])
    media = {"image": {"features": torch.randn(5 + 1, patches, vcfg.hidden_size), "counts": torch.tensor([6])},
             "video": {"features": torch.randn(3, patches, vcfg.hidden_size), "counts": torch.tensor([3])}}
    input_ids = torch.tensor([ids])
    with FlopCounterMode(display=False) as counter:
        out = vlm(input_ids, torch.arange(len(ids))[None], targets, media)
        out["loss_sum"].backward()
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))

    f = F.step_flops(llm.config, vcfg, vlm.connectors["image"].config,
                     [F.SampleShape(len(ids), answer, image_views=6, video_frames=3)], "frozen",
                     video_connector_config=vlm.connectors["video"].config)
    assert (f.image_views, f.video_frames) == (6, 3)
    assert counted == f.body + f.lm_head + f.recompute + f.connector
