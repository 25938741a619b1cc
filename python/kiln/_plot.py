"""Plots with matplotlib (imported on first use; in a notebook the Figure
displays itself; headless, matplotlib's Agg backend draws it)."""


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # matplotlib is optional for the rest of kiln
        raise ImportError("kiln.plot_history and kiln.plot_optimization need matplotlib (pip install matplotlib)") from e
    return plt


def plot_history(history, metrics=None):
    """Draws a training history (what ``Model.fit`` returns, or its
    ``history`` dict): one panel per metric, training ('loss') and
    validation ('val_loss') curves together, over epochs 1..n. ``metrics``
    picks the panels (names without 'val_'; default every one recorded).
    Returns the matplotlib Figure."""
    h = getattr(history, "history", history)
    if not isinstance(h, dict) or not h:
        raise ValueError("plot_history needs fit's History (or its history dict) with at least one metric")
    names = []
    for k in h:
        base = k[4:] if k.startswith("val_") else k
        if base not in names and isinstance(h[k], (list, tuple)):
            names.append(base)
    if metrics is not None:
        unknown = [m for m in metrics if m not in names]
        if unknown:
            raise ValueError(f"plot_history: no {unknown} in the history (it has {names})")
        names = list(metrics)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, label in ((name, "training"), ("val_" + name, "validation")):
            ys = h.get(key)
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_optimization(record):
    """Draws an optimization report (what ``Model.prune``/``quantize``
    return, or its ``report``): for each variant (original, pruned,
    int8, ...) its file size (KiB), test metric and median latency at
    batch 1 and 64 (ms), as bar charts side by side. Returns the matplotlib
    Figure."""
    report = record.get("report", record) if isinstance(record, dict) else None
    variants = (report or {}).get("variants")
    if not variants:
        raise ValueError("plot_optimization needs an optimization record with a report of variants")
    plt = _pyplot()
    names = [v["name"] for v in variants]
    panels = [
        ("file size (KiB)", [v["file_bytes"] / 1024 for v in variants]),
        (f"test {variants[0].get('metric', 'metric')}", [v["value"] for v in variants]),
        ("latency b1 (ms)", [v["latency_ms_b1"] for v in variants]),
        ("latency b64 (ms)", [v["latency_ms_b64"] for v in variants]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (title, ys) in zip(axes[0], panels):
        ax.bar(names, ys, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
