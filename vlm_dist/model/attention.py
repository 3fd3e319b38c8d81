"""Packed attention: sample boundaries reach the kernel explicitly, never guessed.

The collator (vlm_dist/data/pack.py) emits `cu_seqlens`: int32 offsets of every
sample (and every row's padding tail) in the flattened (R * L) token stream, and
`max_seqlen`, a Python int. `packed_attention_inputs` turns them into what the
chosen backend needs and hands it to the decoder as a prepared mask mapping, so
transformers builds no mask of its own and never reads position ids for packing
(its detection fires only at batch size 1 for flash_attention_2, and costs a
host sync per forward everywhere):

    varlen             CUDA: torch.nn.attention.varlen.varlen_attn on the flat stream;
                       no mask, no host sync, K/V heads shared (GQA). Registered with
                       transformers as "vlm_varlen". Elsewhere: a per-sample sdpa loop,
                       the CPU reference that checks the plumbing (syncs; tests only).
    flash_attention_2/3  transformers' flash path with the same boundaries as its
                       cu_seq_lens_* / max_length_* kwargs (needs the flash-attn package).
    flex_attention     a BlockMask from the sample ids (same sample and causal).
    sdpa, eager        a dense (R, 1, L, L) mask from the sample ids: every pair is
                       computed and K/V are repeated per query head; the CPU fallback.

"auto" resolves to varlen on CUDA and sdpa elsewhere (`resolve`).
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

VARLEN = "vlm_varlen"  # the name transformers knows our varlen function by
FLASH = ("flash_attention_2", "flash_attention_3")

log = logging.getLogger(__name__)


def resolve(attn_implementation: str, device_type: str) -> str:
    """The backend a run uses: "auto" -> varlen on CUDA where torch has its varlen kernel, else sdpa
    (the per-sample reference loop syncs in every layer: never chosen for you); explicit choices pass through."""
    if attn_implementation == "auto":
        chosen = "varlen" if device_type == "cuda" and _torch_varlen()[0] is not None else "sdpa"
        log.info("model.attn_implementation=auto -> %s on %s", chosen, device_type)
        return chosen
    return attn_implementation


def hf_name(attn_implementation: str) -> str:
    """The name passed to transformers' from_pretrained(attn_implementation=...)."""
    if attn_implementation == "varlen":
        register()
        return VARLEN
    return attn_implementation


def register() -> None:
    """Register varlen_attention_forward with transformers (idempotent). No mask function is
    registered for it: transformers then builds no mask for this name (masking_utils
    `_preprocess_mask_arguments` exits early for names without one)."""
    from transformers import AttentionInterface
    AttentionInterface.register(VARLEN, varlen_attention_forward)


# -- the kernel -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """torch's varlen_attn with its keyword for causality, which changed between releases
    (is_causal=True in 2.10, window_size=(-1, 0) from 2.11); None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}, False
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def varlen_reference(q, k, v, cu_seqlens: torch.Tensor, scale: float | None) -> torch.Tensor:
    """CPU REFERENCE for the varlen kernel (tests only): causal sdpa per sample on (T, H, D)
    inputs. Reads the boundaries on the host, so it syncs; the real kernel does not."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))              # (H, n, D)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=True).transpose(0, 1)
    return out


@functools.lru_cache(maxsize=None)
def _warn_reference(device_type: str) -> None:
    log.warning("model.attn_implementation=varlen on %s: torch's varlen kernel is CUDA-only, running the "
                "per-sample sdpa CPU reference (correct, slow, syncs); use sdpa on the CPU", device_type)


def varlen(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None) -> torch.Tensor:
    """Causal attention within each [cu_seqlens[i], cu_seqlens[i+1]) of (T, H, D) inputs."""
    kernel, causal, has_gqa = _torch_varlen()
    if q.device.type != "cuda" or kernel is None:
        _warn_reference(q.device.type)
        return varlen_reference(q, k, v, cu_seqlens, scale)
    if not has_gqa and k.shape[1] != q.shape[1]:  # older kernels want as many K/V heads as queries
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    gqa = {"enable_gqa": True} if has_gqa else {}
    return kernel(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, **causal, **gqa)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, max_length_q=None,
                             **kwargs):
    """transformers attention function: query (B, Hq, L, D), key/value (B, Hkv, L, D) ->
    (B, L, Hq, D). With boundaries (training) attention stays within each sample; without
    them (generation: one prompt, then the cache) it is plain causal sdpa."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("model.attn_implementation=varlen has no attention dropout; "
                         "set the LLM config's attention_dropout to 0")
    b, hq, length, d = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * length, x.shape[1], d) for x in (query, key, value))
    out = varlen(q, k, v, cu_seq_lens_q, max_length_q, scaling)                 # (B*L, Hq, D)
    return out.view(b, length, hq, d), None


# -- what the decoder receives -----------------------------------------------------

def segment_ids(cu_seqlens: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(R, L) index of the sample (or padding tail) each token belongs to, on the device."""
    tokens = torch.arange(shape[0] * shape[1], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True).view(shape)


def dense_mask(seg: torch.Tensor) -> torch.Tensor:
    """(R, 1, L, L) bool: query t sees key s when both are in one sample and s <= t."""
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    return (seg[:, None, :, None] == seg[:, None, None, :]) & causal


def block_mask(seg: torch.Tensor):
    """flex attention BlockMask of the same rule. Rows should come at a fixed width (the
    loader's pad_to_multiple = max_seq_len) so compiled flex kernels are reused."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

    rows, length = seg.shape
    return create_block_mask(same_sample_causal, rows, None, length, length, device=seg.device)


def packed_attention_inputs(config, cu_seqlens: torch.Tensor, max_seqlen: int,
                            shape: tuple[int, int], dtype: torch.dtype) -> dict:
    """Keyword arguments for the decoder (Qwen3Model.forward) of a packed (R, L) batch:
    `attention_mask` as a prepared {layer type: mask} mapping (transformers then builds
    none) and, for the varlen/flash backends, the boundaries it forwards to every
    attention call (transformers' names: cu_seq_lens_q/k, max_length_q/k)."""
    impl = config._attn_implementation
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"packed attention supports full-attention layers only; this LLM has "
                         f"{sorted(layer_types)} (sliding-window Qwen3 configs are not supported)")
    kwargs = {}
    if impl == VARLEN or impl in FLASH:
        if not isinstance(max_seqlen, int):
            raise ValueError(f"{impl} needs max_seqlen as a Python int (collate's batch['max_seqlen']), "
                             f"got {type(max_seqlen).__name__}")
        mask = None
        kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                      max_length_q=max_seqlen, max_length_k=max_seqlen)
    elif impl == "flex_attention":
        mask = block_mask(segment_ids(cu_seqlens, shape))
    elif impl in ("sdpa", "eager"):
        mask = dense_mask(segment_ids(cu_seqlens, shape))
        if impl == "eager":  # eager adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min)
    else:
        raise ValueError(f"model.attn_implementation={impl!r} cannot run packed batches; choose "
                         "varlen (CUDA), flex_attention, sdpa or eager")
    return dict(attention_mask={"full_attention": mask}, **kwargs)
