"""The VLM: a Qwen3 causal LM plus one connector per media kind, joined by the splice.

Forward, for a batch from the collator (see vlm_dist/data/pack.py):

    embeds = embed_tokens(input_ids)                               # (R, L, H)
    embeds.flat[slots] = connector(features)                       # k-th image -> k-th block
    hidden = llm.model(inputs_embeds=embeds, position_ids=...,     # packed rows: the samples'
                       **packed_attention_inputs(cu_seqlens))      # boundaries, explicitly
    loss_sum = CE(lm_head(hidden[supervised]), targets[supervised])

The splice is an index_copy at slot positions the loader computed (its backward is
a gather; masked_scatter's backward syncs with the host).

Logits exist only at supervised positions and are computed in checkpointed
chunks, so a 4K-token row never materialises a (tokens x 151,936) tensor; with
`fused_ce` (Liger kernels, ZeRO-0/1/2: see vlm_dist.model.build.resolve_fused_ce) Liger's
fused linear cross-entropy does the same in one call, gradients computed in its forward.
Every forward runs every connector, even with no media in the batch, so all
ranks take part in ZeRO-3's parameter gathers (the LLaVA#699 hang).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_dist.contract.media import MEDIA_KINDS
from vlm_dist.model.attention import packed_attention_inputs
from vlm_dist.model.connector import Connector
from vlm_dist.contract.prompt import IGNORE

CE_CHUNK = 4096  # supervised tokens per lm_head/cross-entropy chunk


class SpliceError(ValueError):
    """Image slots in the text and image features do not match; names the samples."""


def unwrap_llm(llm: nn.Module) -> nn.Module:
    """The underlying *ForCausalLM, through a PEFT wrapper if there is one."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def check_media_slots(input_ids: torch.Tensor, media: dict, pad_ids: dict[str, int],
                      num_tokens: dict[str, int], sample_ids=None) -> None:
    """Raise SpliceError unless each row has exactly N slots per view of each kind.

    `counts` count views (feature rows): a tiled image is 1 + tiles of them, a video one a frame.

    Runs on CPU tensors: `embed(validate=True)` (inference, tests) moves them there. Training
    passes validate=False, so its step needs no host sync: the loader worker finds each
    image's slots, and `index_copy` refuses a total that does not match.
    """
    for name, pad in pad_ids.items():
        item = (media or {}).get(name)
        counts = item["counts"].tolist() if item is not None else [0] * input_ids.shape[0]
        n_items = item["features"].shape[0] if item is not None else 0
        if sum(counts) != n_items:
            raise SpliceError(f"{name}: counts sum to {sum(counts)} but {n_items} feature items given")
        slots = (input_ids == pad).sum(dim=1).tolist()
        if name not in num_tokens:        # a kind this model has no connector for
            if any(slots) or n_items:
                row = next(r for r, n in enumerate(slots) if n) if any(slots) else 0
                who = sample_ids[row] if sample_ids is not None else f"row {row}"
                raise SpliceError(f"sample(s) {who}: {name} input, but this model has no {name} "
                                  f"connector (configure model.{name} to train one)")
            continue
        for row, (have, want) in enumerate(zip(slots, counts)):
            if have != want * num_tokens[name]:
                who = sample_ids[row] if sample_ids is not None else f"row {row}"
                raise SpliceError(
                    f"sample(s) {who}: {have} {name} slots in the text but {want} {name} view(s) x "
                    f"{num_tokens[name]} tokens given; every <{name}> needs exactly one {name} "
                    f"and all its views ({'frames' if name == 'video' else 'the thumbnail and its tiles'})")


class VisionLanguageModel(nn.Module):
    def __init__(self, llm: nn.Module, connectors: dict[str, Connector], pad_ids: dict[str, int],
                 num_tokens: dict[str, int], fused_ce: bool = False):
        super().__init__()
        self.llm = llm
        self.connectors = nn.ModuleDict(connectors)
        self.pad_ids = dict(pad_ids)          # kind -> pad token id
        self.num_tokens = dict(num_tokens)    # kind -> slots per item
        self.fused_ce = fused_ce              # Liger's fused lm_head + cross-entropy (see the property)

    @property
    def fused_ce(self) -> bool:
        """Liger's LigerFusedLinearCrossEntropyLoss in place of the checkpointed lm_head/CE chunks.

        It takes `lm_head.weight` as a tensor, so a ZeRO-3 gather hook on the lm_head module would
        not fire: set it only where the weight is whole (build.resolve_fused_ce decides, the trainer
        logs why). Setting it True imports liger_kernel (GPU only)."""
        return self.flce is not None

    @fused_ce.setter
    def fused_ce(self, on: bool) -> None:
        if on:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            self.flce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
        else:
            self.flce = None

    # -- splice -------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, media: dict | None, sample_ids=None,
              validate: bool = True) -> torch.Tensor:
        if validate:
            check_media_slots(input_ids.cpu(), _cpu_counts(media), self.pad_ids, self.num_tokens,
                              sample_ids)
        embeds = self.llm.get_input_embeddings()(input_ids)                      # (R, L, H)
        for name, connector in self.connectors.items():
            item = (media or {}).get(name)
            if item is None or item["features"].shape[0] == 0:
                # No items on this rank: still run the connector so its parameters are
                # gathered and receive (zero) gradients like on every other rank.
                dummy = torch.zeros(1, 1, connector.config["vision_dim"], device=embeds.device,
                                    dtype=_param_dtype(connector))
                embeds = embeds + connector(dummy).sum().to(embeds.dtype) * 0
                continue
            tokens = connector(item["features"].to(_param_dtype(connector)))      # (M, N, H)
            slots = item.get("slots")  # (M * N,) flat positions, from the loader
            if slots is None:  # generation, or a caller without them: find them here (syncs)
                slots = (input_ids.reshape(-1) == self.pad_ids[name]).nonzero().squeeze(1)
            flat = embeds.reshape(-1, embeds.shape[-1])                            # (R * L, H)
            embeds = flat.index_copy(0, slots, tokens.reshape(-1, tokens.shape[-1]).to(embeds.dtype)
                                     ).view_as(embeds)
        return embeds

    # -- training -----------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor,
                media: dict | None = None, sample_ids=None, supervised_index: torch.Tensor | None = None,
                validate: bool = True, num_ce_chunks: int | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, **_unused) -> dict:
        """Summed next-token loss over supervised positions, and their count.

        `targets` are already shifted (targets[r, t] is the token after t), IGNORE elsewhere.
        `cu_seqlens`/`max_seqlen` (from the collator): the samples' boundaries in the flattened
        rows; attention stays within each sample. Without them (one sample per row) the backend
        runs plain causal attention.
        `supervised_index` (flat indices of targets != IGNORE) lets the caller skip a sync.
        `num_ce_chunks`: run the lm_head this many times (empty chunks included). Under ZeRO-3
        each call gathers the lm_head on every rank, so the caller passes the same number on
        all ranks (the max over ranks of ceil(supervised / CE_CHUNK)). Unused with fused_ce
        (never under ZeRO-3: no gather to keep in step).
        """
        embeds = self.embed(input_ids, media, sample_ids, validate)
        base = unwrap_llm(self.llm)
        if cu_seqlens is not None:
            attention = packed_attention_inputs(base.config, cu_seqlens, max_seqlen,
                                                tuple(input_ids.shape), embeds.dtype)
        else:
            attention = {"attention_mask": None}
        hidden = base.model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False,
                            **attention).last_hidden_state                        # (R, L, H)
        flat_targets = targets.reshape(-1)
        if supervised_index is None:
            supervised_index = (flat_targets != IGNORE).nonzero().squeeze(1)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, supervised_index)  # (K, H)
        t = flat_targets.index_select(0, supervised_index)                         # (K,)
        lm_head = base.get_output_embeddings()
        if self.flce is not None:
            if hasattr(lm_head.weight, "ds_numel"):   # a ZeRO-3 partition: Liger would see an empty shard
                raise RuntimeError("fused_ce with a ZeRO-3 partitioned lm_head: resolve_fused_ce keeps "
                                   "the chunked path under ZeRO-3")
            if h.shape[0] > 0:   # sum over the supervised positions; Liger skips grad_weight if frozen
                loss_sum = self.flce(lm_head.weight, h, t).float()
            else:   # keep the graph connected so backward reaches every rank's params
                loss_sum = hidden.sum().float() * 0
            return {"loss_sum": loss_sum, "num_supervised": supervised_index.numel()}
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        chunks = num_ce_chunks if num_ce_chunks is not None else ce_chunks(h.shape[0])
        for start in range(0, chunks * CE_CHUNK, CE_CHUNK):
            hc, tc = h[start:start + CE_CHUNK], t[start:start + CE_CHUNK]
            if torch.is_grad_enabled() and hc.requires_grad:
                loss_sum = loss_sum + checkpoint(_chunk_ce, lm_head, hc, tc, use_reentrant=False)
            else:
                loss_sum = loss_sum + _chunk_ce(lm_head, hc, tc)
        if h.shape[0] == 0:  # keep the graph connected so backward reaches every rank's params
            loss_sum = loss_sum + hidden.sum().float() * 0
        return {"loss_sum": loss_sum, "num_supervised": supervised_index.numel()}

    # -- inference ----------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, media: dict | None = None, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id=None, pad_token_id=None, streamer=None, logits_processor=None
                 ) -> torch.Tensor:
        """New token ids (1, T_new) for one prompt (1, T) with its media.

        do_sample draws from torch's global RNG; for seeded sampling that leaves it alone,
        pass vlm_dist.inference.generate.SeededSampling as `logits_processor` (with do_sample=False).
        """
        embeds = self.embed(input_ids, media)
        kwargs = dict(do_sample=do_sample)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            streamer=streamer, logits_processor=logits_processor, **kwargs)


def ce_chunks(num_supervised: int) -> int:
    """lm_head calls needed for this many supervised tokens (at least one)."""
    return max(1, -(-num_supervised // CE_CHUNK))


def _chunk_ce(lm_head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), t, reduction="sum")


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _cpu_counts(media: dict | None) -> dict | None:
    """Media with counts on the CPU; features stay where they are (only their length is read)."""
    if not media:
        return media
    return {k: {"features": v["features"], "counts": v["counts"].cpu()} for k, v in media.items()}


def media_pad_ids(tokenizer) -> dict[str, int]:
    from vlm_dist.contract.media import token_id
    return {name: token_id(tokenizer, kind.pad_token) for name, kind in MEDIA_KINDS.items()}
