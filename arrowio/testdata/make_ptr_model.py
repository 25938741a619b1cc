#!/usr/bin/env python3
"""Exports the TorchScript model arrowio's zero-copy test runs.

Usage: make_ptr_model.py OUT.pt

forward(x) adds 1 to x in place and returns x itself and y = x * 2. The
first output is the input's storage, so its address is the address
libtorch worked on, and the in-place write shows in the caller's buffer;
the second is memory libtorch allocated.
"""
import sys

import torch


class InPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        x.add_(1)
        return x, x * 2


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_ptr_model.py OUT.pt")
    torch.jit.script(InPlace()).save(sys.argv[1])
