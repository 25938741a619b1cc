"""Keras-familiar training: Keras's losses fused with the output
activation, binary classifiers from 0/1 labels, History, summary, metrics,
callbacks as objects, plots."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

import kiln
from kiln import layers
from kiln.callbacks import EarlyStopping, ModelCheckpoint
from kiln.layers import Dense


@pytest.fixture(scope="module")
def cancer():
    x, y = load_breast_cancer(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.2, random_state=0, stratify=y)


@pytest.mark.parametrize("loss", ["bce_with_logits", "binary_crossentropy"])
@pytest.mark.parametrize("kind", ["int64", "bool"])
def test_binary_labels_make_a_classifier(cancer, loss, kind):
    xtr, xte, ytr, yte = cancer
    ytr, yte = ytr.astype(kind), yte.astype(kind)
    last = [layers.Sigmoid()] if loss == "binary_crossentropy" else []
    m = kiln.Sequential([layers.Linear(16), layers.ReLU(), layers.Linear(1), *last])
    h = m.fit(xtr, ytr, epochs=15, loss=loss, seed=1, verbose=0)
    want = [False, True] if kind == "bool" else [0, 1]
    assert m.classes_ == want
    assert m.manifest["task"] == "classification"
    assert "val_accuracy" in h.history
    r = m.evaluate(xte, yte)
    assert set(r) == {"loss", "accuracy"} and r["accuracy"] >= 0.93


def test_double_sigmoid_is_an_error(cancer):
    xtr, _, ytr, _ = cancer
    m = kiln.Sequential([layers.Linear(8), layers.ReLU(), layers.Linear(1), layers.Sigmoid()])
    with pytest.raises(kiln.InvalidArgumentError, match="applied twice"):
        m.fit(xtr, ytr, epochs=1, loss="bce_with_logits", verbose=0)
    plain = kiln.Sequential([layers.Linear(8), layers.ReLU(), layers.Linear(1)])
    with pytest.raises(kiln.InvalidArgumentError, match="takes the output of a sigmoid"):
        plain.fit(xtr, ytr, epochs=1, loss="binary_crossentropy", verbose=0)
    with pytest.raises(ValueError, match="binary classifier but y has 3 classes"):
        m.fit(xtr, np.arange(len(ytr)) % 3, epochs=1, loss="binary_crossentropy", verbose=0)


def test_softmax_losses_predict_probabilities():
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x.astype(np.float32), y, test_size=0.2, random_state=0, stratify=y)
    for loss, target in (("sparse_categorical_crossentropy", ytr), ("categorical_crossentropy", np.eye(10)[ytr])):
        m = kiln.Sequential([Dense(32, activation="relu"), Dense(10, activation="softmax")])
        m.compile(optimizer="adam", loss=loss, metrics=["accuracy"], learning_rate=0.01)
        h = m.fit(xtr, target, epochs=5, batch_size=32, verbose=0, seed=1)
        assert set(h.history) == {"loss", "val_loss", "val_accuracy"}
        p = m.predict(xte)
        np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)
        loss_v, acc = m.evaluate(xte, yte if loss.startswith("sparse") else np.eye(10)[yte])
        assert acc >= 0.9 and 0 < loss_v < 0.5


def test_history_summary_metrics(cancer, capsys):
    xtr, _, ytr, _ = cancer
    m = kiln.Sequential([Dense(10, activation="relu", input_shape=(30,)), Dense(1, activation="sigmoid")])
    m.summary()
    text = capsys.readouterr().out
    assert "(None, 10)" in text and "(None, 1)" in text and "Total params: 321" in text
    assert "310" in text and "11" in text
    h = m.fit(xtr, ytr, epochs=3, loss="binary_crossentropy", metrics=["accuracy", "f1"], verbose=0)
    assert isinstance(h, kiln.callbacks.History)
    assert sorted(h.history) == ["loss", "val_accuracy", "val_f1", "val_loss"]
    assert h.epoch == [0, 1, 2] and h.params["epochs"] == 3 and h.params["steps"] > 0
    assert h["loss"] == h.history["loss"] and h.report["result"]["best_epoch"] >= 1
    with pytest.raises(ValueError, match="unknown metric"):
        m.fit(xtr, ytr, epochs=1, loss="binary_crossentropy", metrics=["auc"], verbose=0)
    with pytest.raises(ValueError, match="not yet been built"):
        kiln.Sequential([Dense(4)]).summary()


def test_callbacks_as_objects(cancer, tmp_path):
    xtr, _, ytr, _ = cancer
    seen = []

    class Log(kiln.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, sorted(logs)))

    m = kiln.Sequential([Dense(16, activation="relu"), Dense(1, activation="sigmoid")])
    m.compile(loss="binary_crossentropy", metrics=["accuracy"], learning_rate=0.05)
    h = m.fit(xtr, ytr, epochs=200, verbose=0, callbacks=[
        EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True),
        ModelCheckpoint(tmp_path / "best", monitor="val_accuracy", save_best_only=True), Log()])
    assert len(h.epoch) < 200 and h.report["result"]["stop_reason"] == "early_stopping"
    assert seen[0] == (0, ["loss", "val_accuracy", "val_loss"]) and len(seen) == len(h.epoch)
    best = kiln.load(tmp_path / "best")
    assert best.classes_ == [0, 1] and best.manifest["task"] == "classification"
    with pytest.raises(ValueError, match="monitor"):
        EarlyStopping(monitor="accuracy")


def test_plots(cancer):
    xtr, xte, ytr, yte = cancer
    m = kiln.Sequential([Dense(8, activation="relu"), Dense(1, activation="sigmoid")])
    h = m.fit(xtr, ytr, epochs=3, loss="binary_crossentropy", verbose=0)
    fig = kiln.plot_history(h)
    assert isinstance(fig, matplotlib.figure.Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "loss" and sorted(titles) == ["accuracy", "f1", "loss", "precision", "recall"]
    assert [l.get_label() for l in fig.axes[0].get_lines()] == ["training", "validation"]
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == h.history["loss"]
    rec = m.quantize("fp16", xtr, ytr)
    fig = kiln.plot_optimization(rec)
    assert len(fig.axes) == 4 and len(fig.axes[0].patches) == len(rec["report"]["variants"])
    with pytest.raises(ValueError):
        kiln.plot_history({})
