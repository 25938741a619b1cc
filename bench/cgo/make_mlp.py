#!/usr/bin/env python3
"""Exports bench/cgo's MLP (64 -> 256 -> 256 -> 10) as TorchScript.
Usage: make_mlp.py OUT.pt"""
import sys

import torch
from torch import nn

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
torch.jit.script(net).save(sys.argv[1])
