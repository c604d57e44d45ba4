"""Script: train STEP steps, save the last step's gradient.
``torchrun ... -m distalign_testing.grad_probe OUT.pt STEP KEY=VALUE ...``"""

import os
import sys

import torch

from distalign.train.distributed import exit_process
from distalign_testing.runs import capture_gradient

if __name__ == "__main__":
    gradient = capture_gradient(sys.argv[3:], step=int(sys.argv[2]))
    if os.environ.get("RANK", "0") == "0":
        torch.save(gradient, sys.argv[1])
    exit_process(0)
