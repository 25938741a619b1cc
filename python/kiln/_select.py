"""Model selection from Python: candidates trained and ranked in the Go
core, the winner loaded as a kiln.Model."""
from . import _train
from ._model import Model, load


def select_model(candidates, x, y, *, epochs=20, batch_size=32, validation_split=0.2, optimizer="adam",
                 lr=1e-3, seed=0, budget_seconds=None, concurrency=None, metric=None, verbose=1,
                 record=None, register=None, registry=None):
    """Trains each candidate (a list of layer lists or specs) on the same
    split, ranks them on the validation metric with a cost term, and returns
    (leaderboard, best_model).

    Registry (as for ``Model.fit``): the selection is recorded as a run of
    kind "select" (parameters, each candidate's per-epoch metrics, the
    winner's final metrics) when ``record`` is True or, with None, when
    ``registry`` or ``register`` is given or ``$KILN_REGISTRY`` is set;
    ``leaderboard["run_id"]`` and ``best_model.run_id`` name it.
    ``register="NAME"`` registers the winner (``leaderboard["registered"]``)."""
    from . import _registry

    specs = []
    for c in candidates:
        if isinstance(c, Model):
            c = c.spec
        elif isinstance(c, (list, tuple)):
            c = {"layers": list(c)}
        if not isinstance(c, dict) or "layers" not in c:
            raise ValueError(f"a candidate is a list of layers or a spec with 'layers', got {c!r}")
        specs.append(c)
    if not specs:
        raise ValueError("select_model needs at least one candidate")
    with _train.select(specs, x, y, epochs=epochs, batch_size=batch_size, validation_split=validation_split,
                       optimizer=optimizer, lr=lr, seed=seed, budget_seconds=budget_seconds,
                       concurrency=concurrency, metric=metric, verbose=verbose,
                       record=_registry.record_spec(record, register, registry)) as (out, board):
        best = load(out)
        best._package = out
    best.run_id = board.run_id
    if register:
        board["registered"] = best.register(register, registry=registry)
    return board, best
