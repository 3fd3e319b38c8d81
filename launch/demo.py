"""The embedded demo: the whole system on synthetic data, on this machine, downloading nothing
(the code is vlm_dist.demo; training runs the real `deepspeed launch/train.py`).

    python launch/demo.py [--out demo_out]        # or: make demo
"""
import sys

from vlm_dist.demo.run import main

if __name__ == "__main__":
    sys.exit(main())
