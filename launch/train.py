#!/usr/bin/env python
"""Entry point for every launcher: deepspeed, torchrun, mpirun, srun, or plain python.

    deepspeed launch/train.py                                   # the embedded default
    deepspeed launch/train.py --config examples/x.yaml --beta 0.2
"""
import sys

from dpo_ds.trainer import main

if __name__ == "__main__":
    sys.exit(main())
