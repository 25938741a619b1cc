#!/usr/bin/env python3
"""Kiln quickstart: train on a data set bundled with scikit-learn, evaluate,
save, deploy into a model repository, serve it from this process, and query
it with the stock tritonclient (gRPC) and kiln.Client.

    python examples/quickstart.py [WORKDIR]
"""
import sys
import tempfile

import numpy as np
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import kiln
from kiln import layers


def main(workdir: str) -> float:
    data = load_breast_cancer()
    labels = np.array(data.target_names)[data.target]
    x_train, x_test, y_train, y_test = train_test_split(
        data.data.astype(np.float32), labels, test_size=0.2, random_state=0, stratify=data.target)

    # 1. Train in Kiln's Go core (preprocessing is fitted and folded in).
    model = kiln.Sequential([layers.Linear(32), layers.ReLU(), layers.Dropout(0.1), layers.Linear()])
    model.fit(x_train, y_train, epochs=40, batch_size=32, validation_split=0.15, seed=1, verbose=1)
    acc = model.evaluate(x_test, y_test)["accuracy"]
    print(f"test accuracy {acc:.3f}; classes {model.classes_}")

    # 2. Save the package and load it back.
    model.save(f"{workdir}/breast_cancer_pkg")
    again = kiln.load(f"{workdir}/breast_cancer_pkg")
    assert again.evaluate(x_test, y_test)["accuracy"] == acc

    # 3. Deploy into a repository and serve it from this process.
    version = model.deploy(f"{workdir}/repository", "breast_cancer")
    with kiln.serve(f"{workdir}/repository", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0, flight_port=-1) as server:
        print(f"serving version {version}: {server}")

        # 4a. Query with the stock tritonclient...
        client = grpcclient.InferenceServerClient(server.grpc)
        inp = grpcclient.InferInput("x", list(x_test[:5].shape), "FP32")
        inp.set_data_from_numpy(x_test[:5])
        out = client.infer("breast_cancer", [inp], outputs=[grpcclient.InferRequestedOutput("y", class_count=1)])
        print("tritonclient top-1:", [s.decode() for s in out.as_numpy("y").reshape(-1)])

        # 4b. ...or with kiln.Client: the same logits as model.predict (in
        # requests of up to max_batch_size = 64 rows).
        with kiln.Client(server.grpc) as kc:
            logits = np.concatenate([kc.infer("breast_cancer", {"x": x_test[i:i + 64]})["y"]
                                     for i in range(0, len(x_test), 64)])
        np.testing.assert_allclose(logits, model.predict(x_test), atol=1e-5)
        served_acc = float((np.array(model.classes_)[logits.argmax(1)] == y_test).mean())
        print(f"served accuracy {served_acc:.3f}")
    return served_acc


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kiln-quickstart-"))
