"""vlm_dist: a multi-image vision-language model (Qwen3 LLM, SigLIP image features, a trainable
connector) trained with DeepSpeed on cached vision features, and the tools around it.

In pipeline order:
    contract/   the sample contract: records, templates and labels, media kinds, image decoding
    convert/    public datasets -> contract records, stage-1 hygiene, the supervision check (vlm-convert)
    cache/      the feature cache: SigLIP features of every unique image, encoded once (vlm-cache)
    data/       records + cache -> samples -> length-grouped micro-batches -> packed rows
    model/      vision tower, connector, the VLM and how it is built; knows nothing of distribution
    training/   the loop (vlm-train), DeepSpeed config, optimizer, checkpoints and exports, metrics, FLOPs
    inference/  loading exports, generation (vlm-generate), evaluation (vlm-eval)
    config/     the run configuration: typed dataclasses, YAML, --section.key=value overrides
    dist.py     ranks, the process group, barriers, deepspeed.initialize: the one place for distribution
    errors.py   UserError and how every command reports it;  fileio.py  atomic publishing and hashing
    testing/    tiny models for tests;  demo/  the embedded demo;  benchmark/  throughput and MFU

Entry points are thin: launch/ (training time) and preprocess/ (the offline job) call into this
package, as do the console scripts in setup.py.
"""
