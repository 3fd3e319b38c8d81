"""The demo's synthetic dataset: coloured shapes, captions and multi-image questions (the code is
vlm_dist.demo.data).

    python launch/demo_data.py --out /tmp/demo/data [--seed 0] [--scale 1.0]
"""
import sys

from vlm_dist.demo.data import main

if __name__ == "__main__":
    sys.exit(main())
