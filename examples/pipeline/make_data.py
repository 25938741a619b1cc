#!/usr/bin/env python3
"""Writes the demo's data sets, bundled with scikit-learn (nothing is
downloaded), as CSV for Kiln's pipelines (`make run`):

  OUTDIR/iris.csv     sepal_length, sepal_width, petal_length, petal_width
                      (cm) and species (setosa, versicolor, virginica)
  OUTDIR/digits.csv   p0..p63 (8x8 pixel values 0..16) and digit (0..9)

Usage: make_data.py OUTDIR
"""
import csv
import os
import sys

from sklearn.datasets import load_digits, load_iris


def write(path, names, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows(rows)
    os.replace(tmp, path)


def main(out):
    os.makedirs(out, exist_ok=True)
    iris = load_iris()
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width", "species"]
    write(os.path.join(out, "iris.csv"), names,
          [[repr(float(v)) for v in x] + [iris.target_names[y]] for x, y in zip(iris.data, iris.target)])
    dg = load_digits()
    write(os.path.join(out, "digits.csv"), [f"p{i}" for i in range(64)] + ["digit"],
          [[int(v) for v in x] + [int(y)] for x, y in zip(dg.data, dg.target)])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
