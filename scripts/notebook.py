#!/usr/bin/env python3
"""Converts a jupytext "percent" script (cells start with `# %%`; markdown
cells with `# %% [markdown]`, their lines commented with `# `) into a
Jupyter notebook (nbformat 4) next to it, without executing it.

    python scripts/notebook.py examples/walkthrough.py   # writes examples/walkthrough.ipynb
"""
import json
import pathlib
import sys


def cells(text: str) -> list:
    """The notebook cells of a percent script, in order."""
    out, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind is not None and body:
            src = body.splitlines(keepends=True)
            cell = {"cell_type": kind, "metadata": {}, "source": src}
            if kind == "code":
                cell.update(execution_count=None, outputs=[])
            out.append(cell)

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind == "markdown":
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif kind == "code":
            lines.append(line)
    flush()
    return out


def notebook(text: str) -> dict:
    return {
        "cells": cells(text),
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 4,
    }


def render(text: str) -> str:
    return json.dumps(notebook(text), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["examples/walkthrough.py"]:
        src = pathlib.Path(arg)
        src.with_suffix(".ipynb").write_text(render(src.read_text()))
