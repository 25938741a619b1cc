"""Kiln's layers beyond feed-forward (core/nn layers_seq.go) compute what
their torch.nn namesakes compute: `kiln train` builds and trains a network
with the layer, Python's torch.jit.load reads the saved model.pt, the
layer's weights are copied by name into torch.nn.TransformerEncoderLayer /
MultiheadAttention / LSTM / GRU, and the outputs agree to 1e-5."""
import json
import subprocess

import numpy as np
import pytest
import torch
import yaml

T, D = 5, 8  # sequence length, features per step


def train_kiln(kiln_bin, tmp_path, layers, input_shape=(T, D), rows=48):
    """Trains layers + flatten + linear(1) on random data with `kiln train`
    (unscaled features) and returns (torch.jit module in eval mode, its
    parameters by name, the features as a float32 [rows, *input_shape])."""
    rng = np.random.default_rng(0)
    n = int(np.prod(input_shape))
    x = rng.normal(size=(rows, n)).astype(np.float32)
    y = rng.normal(size=rows).astype(np.float32)
    cols = [f"f{i}" for i in range(n)]
    with open(tmp_path / "data.csv", "w") as f:
        f.write(",".join(cols + ["t"]) + "\n")
        for r, t in zip(x, y):
            f.write(",".join(repr(float(v)) for v in r) + f",{float(t)!r}\n")
    job = {"model": {"input_shape": list(input_shape), "layers": layers + [{"type": "flatten"}, {"type": "linear", "out": 1, "name": "head"}]},
           "data": {"target": "t", "scale": "none"}, "split": {"val": 0.2, "test": 0},
           "train": {"epochs": 1, "batch_size": 16, "optimizer": {"type": "adam", "lr": 0.01}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    run = subprocess.run([str(kiln_bin), "train", "--spec", str(tmp_path / "job.yaml"), "--data", str(tmp_path / "data.csv"),
                          "--out", str(tmp_path / "pkg"), "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    m = torch.jit.load(str(tmp_path / "pkg" / "model.pt")).eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    return m, params, torch.from_numpy(x.reshape(rows, *input_shape))


def load_into(module, params, prefix, rename=lambda k: k):
    """Copies Kiln's tensors <prefix>_<name> into module's parameters
    <name> ('.' written '_' by Kiln: rename maps torch's names to Kiln's)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            key = prefix + "_" + rename(name)
            assert key in params, f"Kiln has no tensor {key} for torch's {name}; it has {sorted(params)}"
            assert params[key].shape == p.shape, (key, params[key].shape, p.shape)
            p.copy_(params[key])


def head(params, h):
    return torch.nn.functional.linear(h.flatten(1), params["head_weight"], params["head_bias"])


def check(m, x, want):
    with torch.no_grad():
        got = m(x.reshape(len(x), -1))
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"max |kiln - torch| = {err}"


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_layer_matches_torch(kiln_bin, tmp_path, norm_first, activation):
    layer = {"type": "transformer_encoder_layer", "name": "enc", "d_model": D, "nhead": 2, "dim_feedforward": 16,
             "dropout": 0.1, "activation": activation, "norm_first": norm_first}
    m, params, x = train_kiln(kiln_bin, tmp_path, [layer])
    ref = torch.nn.TransformerEncoderLayer(D, 2, 16, dropout=0.1, activation=activation, batch_first=True,
                                           norm_first=norm_first).eval()
    load_into(ref, params, "enc", lambda k: k.replace(".", "_"))
    check(m, x, head(params, ref(x)))


def test_multihead_attention_matches_torch(kiln_bin, tmp_path):
    m, params, x = train_kiln(kiln_bin, tmp_path, [{"type": "multihead_attention", "name": "att", "embed_dim": D, "num_heads": 4}])
    ref = torch.nn.MultiheadAttention(D, 4, batch_first=True).eval()
    load_into(ref, params, "att", lambda k: k.replace(".", "_"))
    check(m, x, head(params, ref(x, x, x, need_weights=False)[0]))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_sequence_matches_torch(kiln_bin, tmp_path, kind):
    layer = {"type": kind, "name": "rnn", "hidden_size": 6, "num_layers": 2, "bidirectional": True}
    m, params, x = train_kiln(kiln_bin, tmp_path, [layer])
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    ref = cls(D, 6, num_layers=2, bidirectional=True, batch_first=True).eval()
    load_into(ref, params, "rnn")
    check(m, x, head(params, ref(x)[0]))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_last_state_matches_torch(kiln_bin, tmp_path, kind):
    layer = {"type": kind, "name": "rnn", "hidden_size": 4, "bidirectional": True, "output": "last"}
    m, params, x = train_kiln(kiln_bin, tmp_path, [layer])
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    ref = cls(D, 4, bidirectional=True, batch_first=True).eval()
    load_into(ref, params, "rnn")
    out = ref(x)[1]
    h = out[0] if kind == "lstm" else out  # h_n: [directions, batch, hidden]
    check(m, x, head(params, torch.cat([h[-2], h[-1]], 1)))


def test_residual_positional_and_pooling_match_torch(kiln_bin, tmp_path):
    layers = [{"type": "positional_embedding", "name": "pos"},
              {"type": "positional_embedding", "name": "sin", "encoding": "sinusoidal"},
              {"type": "residual", "name": "res", "layers": [{"type": "linear", "name": "fc", "out": 3}, {"type": "relu"}]},
              {"type": "global_avg_pool", "dim": 0}]
    m, params, x = train_kiln(kiln_bin, tmp_path, layers)
    state = dict(m.named_buffers())
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    i = torch.arange(D)
    angle = pos / torch.pow(10000.0, (i - i % 2).double() / D)
    pe = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle)).float()
    assert torch.allclose(state["sin_pe"], pe, atol=1e-6)
    h = x + params["pos_weight"] + pe
    body = torch.relu(torch.nn.functional.linear(h, params["res_fc_weight"], params["res_fc_bias"]))
    h = body + torch.nn.functional.linear(h, params["res_proj_weight"], params["res_proj_bias"])
    check(m, x, head(params, h.mean(1)))
