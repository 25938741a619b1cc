"""The ResNet-like model bench/train fine-tunes (peer.py writes it as
TorchScript for Kiln's side): ResNet-18's layout (conv1, bn1, layer1..4
of two BasicBlocks, global average pooling, fc) narrowed for 16x16
one-channel images, on scikit-learn's digits upsampled 2x."""
import numpy as np
import torch
from torch import nn

# Fine-tuning setup, the same on both sides: these prefixes are frozen,
# fc trains at HEAD_LR, the rest at the base rate 1e-3 (AdamW).
FROZEN = ("conv1.", "bn1.", "layer1.")
HEAD_LR = 1e-2


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


class ResNet(nn.Module):
    def __init__(self, classes=10, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        w = [width, width, 2 * width, 4 * width, 8 * width]
        self.layer1 = nn.Sequential(BasicBlock(w[0], w[1], 1), BasicBlock(w[1], w[1], 1))
        self.layer2 = nn.Sequential(BasicBlock(w[1], w[2], 2), BasicBlock(w[2], w[2], 1))
        self.layer3 = nn.Sequential(BasicBlock(w[2], w[3], 2), BasicBlock(w[3], w[3], 1))
        self.layer4 = nn.Sequential(BasicBlock(w[3], w[4], 2), BasicBlock(w[4], w[4], 1))
        self.fc = nn.Linear(w[4], classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(torch.mean(x, [2, 3]), 1))


def digits16(d):
    """scikit-learn's digits (a load_digits() result) as float32
    [n, 1, 16, 16] images in [0, 1] (each pixel repeated 2x2) and int64
    labels."""
    x = d.images.astype(np.float32) / 16.0
    x = np.kron(x, np.ones((2, 2), dtype=np.float32))[:, None]
    return np.ascontiguousarray(x), d.target.astype(np.int64)
