"""The one-shot GPU check (the code is vlm_dist.benchmark.gpu_check): stage 1 per attention backend with
and without fused kernels, stage-3 LoRA and QLoRA, the cache builder, packed-vs-alone; one JSON under
benchmarks/ and a Markdown table for BENCHMARKS.md.

    make gpu-check                                       # wheels from .whl/ (launch/gpu_wheels.sh), ~8 min on one H100
    python launch/gpu_check.py --wheels .whl --out benchmarks
    python launch/gpu_check.py --tiny --out /tmp/check   # the CPU rehearsal
"""
import sys

from vlm_dist.benchmark.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
