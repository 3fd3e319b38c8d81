"""A vlm_dist model for transformers: LLaVA with vlm_dist's connector (custom code).

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)

LLaVA's classes do everything (vision tower, the splice of image tokens into `<|image_pad|>`
slots, the language model, generate() and its KV cache); only the projector is swapped for
vlm_dist's connector, whose parameter names and mathematics are those of
vlm_dist.model.connector.Connector:

    (M, P, Dv) --LayerNorm?--> Perceiver resampler (N latents)? --> Linear, GELU, Linear --> (M, N, H)

Image features are `hidden_states[vision_feature_layer]` of the SigLIP tower (no post-layernorm),
computed with the tower's weights in `config.vision_dtype` (the dtype the training cache was built
in: the tower keeps it whatever dtype the rest is loaded in), then cast to the connector's dtype.
The connector classes below are a deliberate copy of vlm_dist/model/connector.py: this file is copied
into every export and runs where vlm_dist is not installed (only torch and transformers are imported).
tests/test_export_remote.py holds the two equal: logits at every position match vlm-generate's.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.models.llava.modeling_llava import (LlavaForConditionalGeneration, LlavaModel,
                                                      LlavaPreTrainedModel)

from .configuration_vlm_dist import VlmDistConfig


class CrossAttentionBlock(nn.Module):
    """Latents attend to [patches; latents] (Flamingo's resampler), then a feed-forward."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.heads = heads
        self.norm_latents, self.norm_media = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        m, n, d = latents.shape
        q_in = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(media), q_in], dim=1)                 # (M, P+N, D)
        q = self.q(q_in).view(m, n, self.heads, -1).transpose(1, 2)              # (M, h, N, d)
        k, v = self.kv(kv_in).view(m, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)                           # (M, h, N, d)
        latents = latents + self.out(attn.transpose(1, 2).reshape(m, n, d))
        return latents + self.ff(self.norm_ff(latents))


class PerceiverResampler(nn.Module):
    """N learned latent queries attending to the patches."""

    def __init__(self, dim_in: int, dim: int, num_latents: int, depth: int, heads: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))    # loaded from the checkpoint
        self.proj_in = nn.Linear(dim_in, dim) if dim_in != dim else nn.Identity()
        self.layers = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                          # (M, P, Din)
        x = self.proj_in(x)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.norm_out(latents)                                            # (M, N, D)


class VlmDistConnector(nn.Module):
    """LayerNorm? -> resampler? -> MLP projector: takes the place of LLaVA's multi_modal_projector."""

    def __init__(self, vision_dim: int, llm_dim: int, kind: str = "resampler", num_latents: int = 64,
                 depth: int = 2, heads: int = 8, resampler_dim: int | None = None,
                 use_layernorm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim) if use_layernorm else nn.Identity()
        width = vision_dim
        if kind == "resampler":
            width = resampler_dim or vision_dim
            self.resampler = PerceiverResampler(vision_dim, width, num_latents, depth, heads)
        else:
            self.resampler = None
        self.projector = nn.Sequential(nn.Linear(width, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:                   # (M, P, Dv)
        x = self.norm(features.to(self.projector[0].weight.dtype))
        if self.resampler is not None:
            x = self.resampler(x)
        return self.projector(x)                                                 # (M, N, H)


class VlmDistPreTrainedModel(LlavaPreTrainedModel):
    config: VlmDistConfig
    config_class = VlmDistConfig

    @property
    def dtype(self) -> torch.dtype:
        """The language model's dtype (what save_pretrained records, what generate() computes in);
        the vision tower keeps config.vision_dtype."""
        return self.get_input_embeddings().weight.dtype

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PerceiverResampler):   # only for weights a checkpoint lacks
            nn.init.normal_(module.latents, std=module.latents.shape[-1] ** -0.5)


class VlmDistModel(VlmDistPreTrainedModel, LlavaModel):
    """LlavaModel with vlm_dist's connector as its multi_modal_projector."""

    def __init__(self, config: VlmDistConfig):
        VlmDistPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        # the features the connector trained on came from a tower in this dtype; loading keeps it
        self.vision_tower.to(getattr(torch, config.vision_dtype))
        self.multi_modal_projector = VlmDistConnector(**config.connector_config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()


class VlmDistForConditionalGeneration(VlmDistPreTrainedModel, LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration around VlmDistModel: generate() and its cache are LLaVA's."""

    def __init__(self, config: VlmDistConfig):
        VlmDistPreTrainedModel.__init__(self, config)
        self.model = VlmDistModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


__all__ = ["VlmDistModel", "VlmDistForConditionalGeneration", "VlmDistPreTrainedModel"]
