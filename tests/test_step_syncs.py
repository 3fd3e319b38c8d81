"""No stalls in the training step: count what one optimizer step makes the host wait for.

On a GPU, an op whose result shape or value the host must know (`.item()`, `nonzero`,
`masked_select`, a tensor in an `if`, boolean-mask indexing) blocks the host until the
device has finished everything queued before it; a collective of Python numbers holds
every rank until the slowest arrives. On the CPU the same ops are still dispatched, so a
TorchDispatchMode counts them here, and a regression shows as a changed number.
"""
import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlm_dist import dist
from vlm_dist.contract.prompt import PromptEncoder
from vlm_dist.data.loader import BatchStream
from vlm_dist.data.sampler import LengthGroupedSampler
from vlm_dist.model.build import build_vlm, load_llm, set_trainable
from vlm_dist.training.loop import train_step

aten = torch.ops.aten
N, P, DV = 4, 16, 32

# ops that need a device result on the host before they can return
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten._unique2.default,
            aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
            aten.bincount.default,
            # its own kernel (its masked_select inside is invisible to the mode); on CUDA it syncs
            aten.masked_scatter_backward.default}


def _bool_indexing(func, args) -> bool:
    """x[mask] / x[mask] = y: the kernel runs nonzero on the mask inside (invisible to the mode)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                    aten._index_put_impl_.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


class SyncCounter(TorchDispatchMode):
    """Counts host-syncing ops by (op, where): the innermost frame in vlm_dist or transformers."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or _bool_indexing(func, args):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "/vlm_dist/" in f.filename or "/transformers/" in f.filename]
            where = (f"{frames[-1].filename.split('/site-packages/')[-1].split('/work/main/')[-1]}"
                     f":{frames[-1].name}") if frames else "autograd"
            self.syncs[(str(func.overloadpacket.__name__), where)] += 1
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        return "\n".join(f"{n} x {op} at {where}" for (op, where), n in sorted(self.syncs.items()))


class StepEngine:
    """The slice of DeepSpeed's engine that train_step uses, with no optimizer: the count covers our
    step code (train_step, the model's forward and backward); DeepSpeed's own step is not ours."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


@pytest.fixture
def step_inputs(tiny_models, tokenizer):
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "frozen", dtype=torch.float32)
    vlm = build_vlm(llm, tokenizer, vision_dim=DV, num_patches=P,
                    connector=dict(num_latents=N, depth=1, heads=4), dtype=torch.float32)
    set_trainable(vlm, "frozen")
    enc = PromptEncoder(tokenizer, "plain", N)
    samples = [enc.encode({"id": f"s{i}", "images": [f"img{i}"] * (i % 3), "conversations": [
        {"role": "user", "content": "<image>\n" * (i % 3) + "Describe."},
        {"role": "assistant", "content": "a red square " * (1 + i % 4)}]}) for i in range(16)]
    feats = {f"img{i}": torch.randn(P, DV) for i in range(16)}
    sampler = LengthGroupedSampler.from_samples(samples, world_size=2, rank=0, max_seq_len=128,
                                                rows_per_micro=2, seed=0, grad_accum=2)
    stream = iter(BatchStream(sampler, samples, feats.__getitem__, pad_id=tokenizer.pad_token_id,
                              max_seq_len=128, feature_shape=(P, DV), num_workers=0, pin_memory=False,
                              image_pad_id=vlm.pad_ids["image"]))
    return StepEngine(vlm), [next(stream) for _ in range(2)]


def test_one_optimizer_step_has_no_collective_and_no_host_sync(step_inputs, monkeypatch):
    """One optimizer step (2 packed micro-batches with images) of the real model: train_step, the
    model's forward and backward.

    Collectives of ours: 0. Before issue 14: 1 + one per micro-batch (the global supervised count
    and the lm_head chunk count, now read from the sampler's global plan).
    Host syncs: 0. Before: per micro-batch, transformers' packed-mask creation (gone with the
    explicit sample boundaries, cu_seqlens) and masked_scatter's backward (gone with the splice by
    index_copy at slots the loader lists). What remains is DeepSpeed's, inside engine.step and
    not run here: the overflow check's `.item()`, the gradient-norm read, and with overlap_comm a
    device synchronize per backward; the loop's own reads happen only on log/save steps and the
    preemption check every train.preempt_check_every steps (see /work/notes/bench_syncs.md).
    """
    engine, batches = step_inputs
    assert all(b["media"]["image"]["features"].shape[0] > 0 for b in batches)
    calls = Counter()
    monkeypatch.setattr(dist, "all_reduce_sum", lambda x: calls.update(["all_reduce_sum"]) or x)
    monkeypatch.setattr(dist, "all_reduce_max", lambda x: calls.update(["all_reduce_max"]) or x)
    counter = SyncCounter()
    with counter:
        loss_sum, count = train_step(engine, batches, world=2)
    assert calls == Counter(), f"collectives in the step: {calls}"
    assert count == sum(b["global_num_supervised"] for b in batches) > 0
    assert torch.isfinite(loss_sum)
    assert counter.syncs == Counter(), "host syncs in one optimizer step:\n" + counter.report()

    # the counter sees a sync when there is one: without the loader's slots the splice finds them
    for b in batches:
        del b["media"]["image"]["slots"]
    counter = SyncCounter()
    with counter:
        train_step(engine, batches, world=2)
    assert sum(counter.syncs.values()) == len(batches), counter.report()
    assert all(op == "nonzero" and where.endswith("vlm.py:embed") for op, where in counter.syncs), counter.report()
