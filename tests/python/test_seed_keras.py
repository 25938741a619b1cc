"""examples/seed_keras.py (the founding document's Keras example with only
the imports changed) runs, and reaches the test accuracy of the same
network trained the same way in Python torch on the same data."""
import os
import runpy

import numpy as np
import torch

from conftest import ROOT


def _torch_accuracy(x_train, y_train, x_test, y_test, seed):
    """Dense(10, relu) -> Dense(1, sigmoid), BCELoss, Adam(1e-3), 10 epochs of
    batches of 32 on the first 80% of the training rows (Keras's
    validation_split=0.2 holds out the last 20%)."""
    torch.manual_seed(seed)
    n = int(len(x_train) * 0.8)
    xt = torch.tensor(x_train[:n], dtype=torch.float32)
    yt = torch.tensor(y_train[:n], dtype=torch.float32).reshape(-1, 1)
    net = torch.nn.Sequential(torch.nn.Linear(xt.shape[1], 10), torch.nn.ReLU(), torch.nn.Linear(10, 1),
                              torch.nn.Sigmoid())
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCELoss()
    for _ in range(10):
        perm = torch.randperm(n)
        for i in range(0, n, 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss_fn(net(xt[idx]), yt[idx]).backward()
            opt.step()
    with torch.no_grad():
        p = net(torch.tensor(x_test, dtype=torch.float32)).numpy().reshape(-1)
    return float(((p > 0.5) == (y_test == 1)).mean())


def test_seed_keras_example_matches_torch(capsys):
    g = runpy.run_path(os.path.join(ROOT, "examples", "seed_keras.py"))
    out = capsys.readouterr().out
    assert "Total params: 321" in out  # 30*10+10 + 10*1+1, as Keras's summary says
    model, history = g["model"], g["history"]
    assert model.classes_ == [0, 1]
    assert len(history.history["loss"]) == 10 and history.epoch == list(range(10))
    assert set(history.history) == {"loss", "val_loss", "val_accuracy"}
    pred = g["predictions"]
    assert pred.shape == (len(g["X_test"]), 1) and pred.dtype == np.float32
    assert ((pred >= 0) & (pred <= 1)).all(), "predict returns the sigmoid's probabilities"
    kiln_acc = g["accuracy"]
    assert abs(kiln_acc - float(((pred.reshape(-1) > 0.5) == (g["y_test"] == 1)).mean())) < 1e-9
    torch_acc = np.mean([_torch_accuracy(g["X_train"], g["y_train"], g["X_test"], g["y_test"], s) for s in range(5)])
    print(f"test accuracy: kiln {kiln_acc:.4f}, torch (mean of 5 seeds) {torch_acc:.4f}")
    assert kiln_acc >= torch_acc - 0.02
