#!/usr/bin/env python3
"""The PyTorch side of bench/compress: the same compressions done with
PyTorch's own tools on the same trained model.

Usage: peer.py DIR

DIR is what bench/compress wrote: meta.json (the model's spec, the split
sizes, the quantized engine, the fine-tuning settings), kiln/fp32.pt (the
trained Kiln model, TorchScript) and data/*.f32 (raw float32 rows of the
train, validation, test and calibration sets, labels as float32).

The Kiln model's weights are loaded into an equivalent eager torch.nn
model (its preprocessing as a module in front), checked to give Kiln's
outputs, then transformed as PyTorch users do it, and each variant saved
as TorchScript to DIR/torch/<variant>.pt:

  fp32          the model as it is (torch.jit.script)
  unstructured  torch.nn.utils.prune.l1_unstructured(amount=0.5) on every
                Linear/Conv weight, then prune.remove
  structured    prune.ln_structured(n=2, dim=0, amount=0.5) on the layers
                Kiln's structured pruning shrinks, fine-tuned with the mask
                (the same epochs, batch size, optimizer, learning rate and
                schedule as Kiln's fine-tuning, best validation epoch kept),
                then prune.remove: zeroed rows, the same dense shapes
  int8-dynamic  torch.ao.quantization.quantize_dynamic({nn.Linear}, qint8)
  int8-static   torch.ao.quantization prepare/convert (QuantStub after the
                preprocessing, Conv+BN(+ReLU), Conv+ReLU and Linear+ReLU fused, the engine's
                default qconfig) calibrated on the same rows as Kiln's
  fp16          weights stored as float16, computed in float32: PyTorch
                1.13 on CPU cannot run a .half() model (its CPU addmm has
                no Half kernel) and its fp16 dynamic
                quantization needs fbgemm, which Debian's build lacks

DIR/torch/meta.json gets each variant's parameter count and sparsity.
Timing and accuracy are measured by bench/compress for both sides alike.
"""
import collections
import copy
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.ao import quantization as tq
from torch.nn.utils import prune


def load(d, name, cols):
    a = np.fromfile(os.path.join(d, "data", name + ".f32"), dtype="<f4")
    return torch.from_numpy(a.reshape(-1, cols) if cols else a)


class Pre(nn.Module):
    """Kiln's fitted preprocessing for all-numeric data: imputation (when
    fitted) and scaling."""

    def __init__(self, shift, scale, fill):
        super().__init__()
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self.impute = fill is not None
        self.register_buffer("fill", fill if fill is not None else torch.zeros_like(shift))

    def forward(self, x):
        if self.impute:
            x = torch.where(torch.isnan(x), self.fill, x)
        return (x - self.shift) / self.scale


class HalfLinear(nn.Module):
    """A Linear layer whose weight is stored as float16."""

    def __init__(self, lin):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().half(), requires_grad=False)
        self.bias = nn.Parameter(lin.bias.detach(), requires_grad=False) if lin.bias is not None else None

    def forward(self, x):
        return F.linear(x, self.weight.float(), self.bias)


class HalfConv2d(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().half(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach(), requires_grad=False) if conv.bias is not None else None
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x):
        return F.conv2d(x, self.weight.float(), self.bias, self.stride, self.padding)


def build(spec, state):
    """An nn.Sequential named like Kiln's layers (l0, l1, ...) with Kiln's
    weights; preprocessing first as `pre`."""
    if any(k.startswith("pre_") and k not in ("pre_shift", "pre_scale", "pre_fill") for k in state):
        sys.exit("peer.py: only all-numeric preprocessing is supported")
    mods = collections.OrderedDict()
    mods["pre"] = Pre(state["pre_shift"], state["pre_scale"], state.get("pre_fill"))
    if spec.get("input_shape"):
        mods["reshape"] = nn.Unflatten(1, tuple(spec["input_shape"]))
    for i, l in enumerate(spec["layers"]):
        name = l.get("name") or f"l{i}"
        t = l["type"].lower().replace("_", "")
        w = state.get(name + "_weight")
        if t == "linear":
            m = nn.Linear(w.shape[1], w.shape[0], bias=name + "_bias" in state)
        elif t == "conv2d":
            m = nn.Conv2d(w.shape[1], w.shape[0], l["kernel"], l.get("stride") or 1, l.get("padding") or 0,
                          bias=name + "_bias" in state)
        elif t in ("batchnorm1d", "batchnorm2d"):
            cls = nn.BatchNorm1d if t == "batchnorm1d" else nn.BatchNorm2d
            m = cls(w.shape[0], eps=l.get("eps") or 1e-5, momentum=l.get("momentum") or 0.1)
        elif t == "maxpool2d":
            m = nn.MaxPool2d(l["kernel"], l.get("stride") or l["kernel"], l.get("padding") or 0)
        elif t == "relu":
            m = nn.ReLU()
        elif t == "dropout":
            m = nn.Dropout(l.get("p", 0))
        elif t == "flatten":
            m = nn.Flatten()
        else:
            sys.exit(f"peer.py: layer type {t} is not supported here")
        sd = {}
        for k, v in state.items():
            if k.startswith(name + "_"):
                sd[k[len(name) + 1:]] = v
        if sd:
            m.load_state_dict(sd)
        mods[name] = m
    return nn.Sequential(mods).eval()


def weights(model):
    """(parameter count, zero fraction of Linear/Conv weights), quantized
    modules included."""
    params, zeros, total = 0, 0, 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        w = w() if callable(w) else w
        b = b() if callable(b) else b
        if w is None or not isinstance(w, torch.Tensor) or isinstance(m, nn.Sequential):
            continue
        params += w.numel() + (b.numel() if isinstance(b, torch.Tensor) else 0)
        if w.dim() >= 2:
            wf = w.dequantize() if w.is_quantized else w.float()
            zeros += int((wf == 0).sum())
            total += w.numel()
    return params, (zeros / total if total else 0.0)


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y.long()).float().mean())


def finetune(model, meta, tx, ty, vx, vy):
    """Kiln's fine-tuning: its epochs, batch size, Adam/AdamW with its
    learning rate, per-step cosine decay, best validation accuracy kept."""
    ft = meta["finetune"]
    torch.manual_seed(ft["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if ft["optimizer"] == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=ft["lr"], weight_decay=ft.get("weight_decay", 0))
    steps_per_epoch = math.ceil(len(ty) / ft["batch_size"])
    total = steps_per_epoch * ft["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 + math.cos(math.pi * min(s, total) / total)) / 2)
    best, best_state = -1.0, None
    for _ in range(ft["epochs"]):
        model.train()
        perm = torch.randperm(len(ty))
        for i in range(0, len(ty), ft["batch_size"]):
            idx = perm[i:i + ft["batch_size"]]
            opt.zero_grad()
            loss = F.cross_entropy(model(tx[idx]), ty[idx].long())
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc = accuracy(model, vx, vy)
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def fuse_groups(model):
    """The module groups PyTorch's static quantization fuses: Conv+BN+ReLU,
    Conv+BN, Conv+ReLU, Linear+ReLU (a quantized BatchNorm2d of its own
    does not even run when scripted in PyTorch 1.13)."""
    names = list(model._modules)
    kinds = [type(model._modules[n]) for n in names]
    groups, i = [], 0
    while i < len(names):
        k = kinds[i:i + 3]
        if k[:1] == [nn.Conv2d] and k[1:2] == [nn.BatchNorm2d]:
            n = 3 if k[2:3] == [nn.ReLU] else 2
            groups.append(names[i:i + n])
            i += n
        elif k[:1] in ([nn.Conv2d], [nn.Linear]) and k[1:2] == [nn.ReLU]:
            groups.append(names[i:i + 2])
            i += 2
        else:
            i += 1
    return groups


def main(d):
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    torch.set_num_threads(meta["threads"])
    torch.backends.quantized.engine = meta["engine"]
    nf = meta["features"]
    tx, ty = load(d, "train_x", nf), load(d, "train_y", 0)
    vx, vy = load(d, "val_x", nf), load(d, "val_y", 0)
    sx = load(d, "test_x", nf)
    cx = load(d, "calib_x", nf)

    kiln = torch.jit.load(os.path.join(d, "kiln", "fp32.pt")).eval()
    state = {k: v.detach().clone() for k, v in list(kiln.named_parameters()) + list(kiln.named_buffers())}
    base = build(meta["spec"], state)
    with torch.no_grad():
        diff = float((base(sx) - kiln(sx)).abs().max())
    if diff > 1e-4:
        sys.exit(f"peer.py: the rebuilt model differs from Kiln's by {diff}")

    out = os.path.join(d, "torch")
    os.makedirs(out, exist_ok=True)
    info = {}

    def save(name, model, scripted=None):
        model.eval()
        s = scripted if scripted is not None else torch.jit.script(model)
        s.save(os.path.join(out, name + ".pt"))
        p, sp = weights(model)
        info[name] = {"params": p, "sparsity": sp}

    save("fp32", base)

    m = copy.deepcopy(base)
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(mod, "weight", amount=0.5)
            prune.remove(mod, "weight")
    save("unstructured", m)

    m = copy.deepcopy(base)
    pruned = [getattr(m, n) for n in meta["structured_layers"]]
    for mod in pruned:
        prune.ln_structured(mod, "weight", amount=0.5, n=2, dim=0)
    m = finetune(m, meta, tx, ty, vx, vy)
    for mod in pruned:
        prune.remove(mod, "weight")
    save("structured", m)

    q = tq.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
    save("int8-dynamic", q)

    s = copy.deepcopy(base)
    mods = collections.OrderedDict()
    for k, v in s._modules.items():
        mods[k] = v
        if k == "pre":
            mods["quant"] = tq.QuantStub()
    mods["dequant"] = tq.DeQuantStub()
    s = nn.Sequential(mods).eval()
    groups = fuse_groups(s)
    if groups:
        s = tq.fuse_modules(s, groups)
    s.qconfig = tq.get_default_qconfig(meta["engine"])
    s.pre.qconfig = None
    tq.prepare(s, inplace=True)
    with torch.no_grad():
        s(cx)
    tq.convert(s, inplace=True)
    save("int8-static", s)

    h = copy.deepcopy(base)
    for k, v in list(h._modules.items()):
        if isinstance(v, nn.Linear):
            h._modules[k] = HalfLinear(v)
        elif isinstance(v, nn.Conv2d):
            h._modules[k] = HalfConv2d(v)
    save("fp16", h)

    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"torch": torch.__version__, "engine": meta["engine"], "variants": info,
                   "rebuild_max_abs_diff": diff}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
