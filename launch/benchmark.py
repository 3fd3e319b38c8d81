"""Training throughput and MFU on the real architecture, with synthetic features (the code is vlm_dist.benchmark).

    python launch/benchmark.py                                       # stage 1, ZeRO-2, 1 GPU
    python launch/benchmark.py --config launch/configs/stage3_multi.yaml --model.llm_mode=qlora
    deepspeed launch/benchmark.py --deepspeed ds_configs/zero3.json  # many GPUs
    python launch/benchmark.py --mode cache                          # the feature-cache builder
    python launch/benchmark.py --tiny --out bench.json               # CPU pipeline check (automatic without CUDA)

`vlm-benchmark` is the same command; `--help` lists every flag.
"""
import sys

from vlm_dist.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
