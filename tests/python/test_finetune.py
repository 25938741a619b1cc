"""Fine-tuning a user's own TorchScript model in Kiln's Go core: a small
ResNet (BasicBlocks, batch norm) scripted in Python torch fine-tunes on
scikit-learn's digits upsampled to 16x16, with frozen layers and a
per-group learning rate, through kiln.load(...).fit and `kiln train
--init`; frozen parameters stay bit-identical and torch.jit.load of the
result gives Kiln's outputs."""
import json
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import kiln


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
    """ResNet-18's layout (conv1, bn1, layer1..layer4 of two BasicBlocks,
    global average pooling, fc), narrowed for 16x16 one-channel images."""

    def __init__(self, classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        w = [width, width, 2 * width, 4 * width, 4 * width]
        self.layer1 = nn.Sequential(BasicBlock(w[0], w[1], 1), BasicBlock(w[1], w[1], 1))
        self.layer2 = nn.Sequential(BasicBlock(w[1], w[2], 2), BasicBlock(w[2], w[2], 1))
        self.layer3 = nn.Sequential(BasicBlock(w[2], w[3], 2), BasicBlock(w[3], w[3], 1))
        self.layer4 = nn.Sequential(BasicBlock(w[3], w[4], 1), BasicBlock(w[4], w[4], 1))
        self.fc = nn.Linear(w[4], classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(torch.mean(x, [2, 3]), 1))


def digits(n=480):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images[:n].astype(np.float32) / 16.0
    x = np.kron(x, np.ones((2, 2), dtype=np.float32))[:, None]  # [n, 1, 16, 16]
    return np.ascontiguousarray(x), d.target[:n]


@pytest.fixture()
def scripted(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet.pt"
    torch.jit.script(ResNet()).save(str(path))
    return path


def state(path):
    m = torch.jit.load(str(path))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


FROZEN = ("conv1.", "bn1.", "layer1.")


def test_fit_fine_tunes_a_scripted_resnet(scripted, tmp_path):
    x, y = digits()
    before = state(scripted)
    model = kiln.load(scripted)
    history = model.fit(x, y, epochs=3, batch_size=32, lr=2e-3, validation_split=0.2, verbose=0,
                        freeze=list(FROZEN), param_groups=[{"prefix": "fc.", "lr": 1e-2}])
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    assert model.classes_ == list(range(10))
    out = tmp_path / "finetuned.pt"
    model.export_torchscript(out)
    after = state(out)
    assert before.keys() == after.keys()
    params = dict(torch.jit.load(str(scripted)).named_parameters()).keys()
    for k in params:
        if k.startswith(FROZEN):
            assert torch.equal(before[k], after[k]), f"frozen {k} changed"
        else:
            assert not torch.equal(before[k], after[k]), f"trainable {k} did not change"
    # Without freeze_bn the frozen layers' batch norm still tracks statistics (train mode).
    assert not torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    # torch.jit.load of the result computes what Kiln computes.
    ref = torch.jit.load(str(out)).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(x[:64])).numpy()
    got = model.predict(x[:64])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert model.evaluate(x, y)["accuracy"] > 0.2  # 10 classes: above chance


def test_freeze_bn_keeps_frozen_statistics(scripted, tmp_path):
    x, y = digits(160)
    before = state(scripted)
    model = kiln.load(scripted)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, freeze=["conv1.", "bn1.", "layer1.", "layer2."], freeze_bn=True)
    model.export_torchscript(tmp_path / "out.pt")
    after = state(tmp_path / "out.pt")
    for k in before:
        if k.startswith(("bn1.", "layer1.", "layer2.")):
            assert torch.equal(before[k], after[k]), f"frozen {k} changed under freeze_bn"
    assert not torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])


def test_fine_tune_errors(scripted):
    x, y = digits(64)
    model = kiln.load(scripted)
    with pytest.raises(kiln.InvalidArgumentError, match="freeze prefix \"nope.\" matches no parameter"):
        model.fit(x, y, epochs=1, verbose=0, freeze=["nope."])
    with pytest.raises(kiln.InvalidArgumentError, match="every parameter is frozen"):
        model.fit(x, y, epochs=1, verbose=0, freeze=["conv1", "bn1", "layer", "fc"])
    with pytest.raises(kiln.InvalidArgumentError, match="forward on samples of shape"):
        model.fit(x.reshape(64, 16, 16), y, epochs=1, verbose=0)


def test_cli_init_fine_tunes(kiln_bin, scripted, tmp_path):
    x, y = digits(160)
    cols = [f"p{i}" for i in range(256)]
    with open(tmp_path / "digits.csv", "w") as f:
        f.write(",".join(cols + ["digit"]) + "\n")
        for r, t in zip(x.reshape(len(x), -1), y):
            f.write(",".join(f"{v:g}" for v in r) + f",{t}\n")
    before = state(scripted)
    out = tmp_path / "pkg"
    run = subprocess.run([str(kiln_bin), "train", "--init", str(scripted), "--input-shape", "1,16,16",
                          "--data", str(tmp_path / "digits.csv"), "--target", "digit", "--epochs", "2",
                          "--freeze", "conv1.", "--freeze", "layer1.", "--lr-group", "fc.=0.01", "--out", str(out), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [-1, 1, 16, 16]
    assert manifest["lineage"]["hyperparameters"]["freeze"] == ["conv1.", "layer1."]
    after = state(out / "model.pt")
    assert torch.equal(before["layer1.1.conv2.weight"], after["layer1.1.conv2.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    m = kiln.load(out)
    with torch.no_grad():
        want = torch.jit.load(str(out / "model.pt")).eval()(torch.from_numpy(x[:8])).numpy()
    np.testing.assert_allclose(m.predict(x[:8]), want, atol=1e-5)
    bad = subprocess.run([str(kiln_bin), "train", "--init", str(scripted), "--input-shape", "1,16,16",
                          "--data", str(tmp_path / "digits.csv"), "--target", "digit", "--lr-group", "fc.", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--lr-group \"fc.\": want PREFIX=LR" in bad.stderr
