"""What kind of table a caller passed: pyarrow and pandas inputs are
recognised by type name, so that neither library has to be installed."""


def is_arrow(x) -> bool:
    """Whether x is a pyarrow Table or RecordBatch."""
    return type(x).__module__.startswith("pyarrow") and type(x).__name__ in ("Table", "RecordBatch")


def is_pandas(x) -> bool:
    """Whether x is a pandas DataFrame."""
    return type(x).__module__.startswith("pandas") and type(x).__name__ == "DataFrame"


def pandas_to_arrow(df):
    """The pandas DataFrame df as a pyarrow Table (without its index)."""
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False)
