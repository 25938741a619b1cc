# %% [markdown]
# # Kiln walkthrough
#
# A tour of the `kiln` Python package: train a network in Kiln's Go core,
# evaluate it, predict on numpy, pandas and pyarrow data, pick an
# architecture with `select_model`, prune and quantize it, save and load the
# package, and serve it from this process to a gRPC client.
#
# This file is the source of `walkthrough.ipynb` (jupytext "percent"
# format: `# %%` starts a code cell, `# %% [markdown]` a text cell);
# regenerate the notebook with `python scripts/notebook.py examples/walkthrough.py`.
# CI runs every cell of the notebook (tests/python/test_walkthrough.py).

# %%
import tempfile

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split

import kiln
from kiln import layers as L

print(f"kiln {kiln.__version__} on libtorch {kiln.torch_version()}")
workdir = tempfile.mkdtemp(prefix="kiln-walkthrough-")

# %% [markdown]
# ## Data
# The iris flowers: 4 measurements, 3 species (string labels are fine).

# %%
iris = load_iris(as_frame=True)
features = iris.frame[iris.feature_names].astype(np.float32)
species = np.array(iris.target_names)[iris.target]
x_train, x_test, y_train, y_test = train_test_split(
    features.to_numpy(), species, test_size=0.25, random_state=0, stratify=species)
x_train.shape, x_test.shape

# %% [markdown]
# ## A network, trained in the Go core
# `fit` releases the GIL while Go trains, shows a progress bar (notebook-aware
# tqdm) and returns the history; Ctrl-C (interrupting the kernel) cancels it.
# Standardisation is fitted on the training split and folded into the model.

# %%
model = kiln.Sequential([L.Linear(16), L.ReLU(), L.Linear()])
history = model.fit(x_train, y_train, epochs=60, batch_size=16, validation_split=0.2, lr=0.01, seed=1)
print(f"final loss {history['loss'][-1]:.3f}, validation accuracy {history['val_accuracy'][-1]:.3f}")
model

# %%
metrics = model.evaluate(x_test, y_test)
print(metrics, model.classes_)
assert metrics["accuracy"] >= 0.8

# %% [markdown]
# ## Predict on numpy, pandas and pyarrow
# numpy arrays go to libtorch by address (no copy); a DataFrame or an Arrow
# table feeds its numeric columns as the features.

# %%
logits = model.predict(x_test[:5])
print(logits.shape, logits.dtype)
print("numpy  :", np.array(model.classes_)[logits.argmax(1)])

frame = pd.DataFrame(x_test[:5], columns=iris.feature_names)
from_pandas = model.predict(frame)
table = pa.Table.from_pandas(frame)
from_arrow = model.predict(table)
np.testing.assert_allclose(from_pandas, logits, atol=1e-6)
np.testing.assert_allclose(from_arrow, logits, atol=1e-6)
print("pandas and pyarrow agree with numpy")

# %% [markdown]
# ## Model selection
# Several candidate architectures trained on the same split, ranked on the
# validation metric (with a cost term); the winner comes back trained.

# %%
board, best = kiln.select_model(
    [[L.Linear(8), L.ReLU(), L.Linear()], [L.Linear(32), L.ReLU(), L.Linear(16), L.ReLU(), L.Linear()]],
    x_train, y_train, epochs=30, lr=0.01, seed=1, concurrency=1, verbose=0)
for e in board["entries"]:
    print(e["rank"], e["params"], "parameters, score", round(e["score"], 3))
best.evaluate(x_test, y_test)

# %% [markdown]
# ## Prune and quantize
# Each returns the record with a size / accuracy / latency report; the model
# is replaced in place by the optimized package. x and y are the data `fit`
# saw (its splits are re-created to measure accuracy).

# %%
def show(record):
    print(f"{'variant':>12} {'bytes':>8} {'params':>7} {'sparsity':>8} {'metric':>8} {'ms b1':>7} {'ms b64':>7}")
    for v in record["report"]["variants"]:
        print(f"{v['name']:>12} {v['file_bytes']:8d} {v['params']:7d} {v['sparsity']:8.2f} {v['value']:8.3f} "
              f"{v['latency_ms_b1']:7.3f} {v['latency_ms_b64']:7.3f}")


record = model.prune(0.5, x_train, y_train, structured=True, finetune_epochs=20)
show(record)

# %%
record = model.quantize("int8", x_train, y_train)
show(record)
print("test accuracy after pruning and int8:", model.evaluate(x_test, y_test)["accuracy"])

# %% [markdown]
# ## Save, load, export

# %%
model.save(f"{workdir}/iris")
again = kiln.load(f"{workdir}/iris")
np.testing.assert_array_equal(again.predict(x_test), model.predict(x_test))
model.export_torchscript(f"{workdir}/iris.pt")  # plain TorchScript for torch.jit.load
again

# %% [markdown]
# ## Serve and query
# `kiln.serve` runs Kiln's KServe v2 server inside this process; `kiln.Client`
# speaks its gRPC protocol (so does tritonclient).

# %%
version = model.deploy(f"{workdir}/repository", "iris")
with kiln.serve(f"{workdir}/repository", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0, flight_port=-1) as server:
    with kiln.Client(server.grpc) as client:
        served = client.infer("iris", {"x": x_test[:5]})["y"]
np.testing.assert_allclose(served, model.predict(x_test[:5]), atol=1e-5)
print(f"version {version} served:", np.array(model.classes_)[served.argmax(1)])
