#!/usr/bin/env python3
"""A pyarrow.flight (Arrow C++) client for bench/flight: DoPut of the same
record batches bench/flight's Go client sends (16 random float32 columns,
BATCH_MB MiB per batch), the way the issue's users upload data sets.

Usage: pyclient.py --addr HOST:PORT --batches N --batch-mb MB --runs R
Prints the best wall time of R uploads, then the user and system CPU
seconds this process spent in all R uploads, on one line of stdout.
"""
import argparse
import resource
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--batches", type=int, required=True)
    ap.add_argument("--batch-mb", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = args.batch_mb * (1 << 20) // (16 * 4)
    rng = np.random.default_rng(1)
    batch = pa.record_batch({f"c{j}": rng.random(rows, dtype=np.float32) for j in range(16)})
    client = fl.FlightClient("grpc://" + args.addr)
    desc = fl.FlightDescriptor.for_path("datasets", "bench")
    best = None
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.runs):
        start = time.perf_counter()
        writer, reader = client.do_put(desc, batch.schema)
        for _ in range(args.batches):
            writer.write_batch(batch)
        writer.done_writing()
        acks = 0
        while reader.read() is not None:
            acks += 1
        writer.close()
        took = time.perf_counter() - start
        if acks == 0:
            raise SystemExit("no acknowledgement")
        best = took if best is None else min(best, took)
    after = resource.getrusage(resource.RUSAGE_SELF)
    client.close()
    print(best, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, flush=True)


if __name__ == "__main__":
    main()
