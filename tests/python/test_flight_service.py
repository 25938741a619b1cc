"""Kiln's Arrow Flight service against the real pyarrow.flight client.

The server is serving/internal/testserver with -flight: Kiln's gRPC
inference server and its Flight service in one process (serving.Run),
sharing one model manager and its dynamic batchers, over the repository that
the flight-repo fixture (tests/fixtures/kiln_fixtures.py) writes, with the column
statistics trainer of serving/internal/flighttest.
"""
import json
import pathlib
import subprocess
import textwrap
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
fl = pytest.importorskip("pyarrow.flight")
grpcclient = pytest.importorskip("tritonclient.grpc")
grpc = pytest.importorskip("grpc")

from conftest import PYTHON, make_fixture, start_testserver, stop_testserver  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory, testserver_bin):
    tmp = tmp_path_factory.mktemp("flight")
    repo = make_fixture("flight-repo", tmp / "repo")
    return {"tmp": tmp, "repo": repo, "binary": testserver_bin}


def launch(built, name, *args):
    data = built["tmp"] / (name + "-data")
    info = start_testserver(built["binary"], built["tmp"] / (name + ".log"), "-repo", str(built["repo"]),
                            "-flight", "127.0.0.1:0", "-data", str(data), *args)
    info["data"] = data
    return info


def stop(info):
    stop_testserver(info)


@pytest.fixture(scope="module")
def server(built):
    info = launch(built, "plain")
    yield info
    stop(info)
    assert info["proc"].returncode == 0, info["log"].read_text()


@pytest.fixture
def client(server):
    c = fl.FlightClient("grpc://" + server["flight"])
    yield c
    c.close()


def dataset(name):
    return fl.FlightDescriptor.for_path("datasets", name)


def model(*path):
    return fl.FlightDescriptor.for_path("models", *path)


def sample_table(rows=1000, seed=0):
    rng = np.random.default_rng(seed)
    tensors = rng.standard_normal((rows, 2, 3)).astype(np.float32)
    strings = pa.array([None if i % 5 == 0 else "row-%d" % i for i in range(rows)])
    return pa.table(
        {
            "f32": rng.standard_normal(rows).astype(np.float32),
            "i64": rng.integers(-(2**62), 2**62, rows),
            "u8": rng.integers(0, 255, rows).astype(np.uint8),
            "s": strings,
            "t": pa.FixedShapeTensorArray.from_numpy_ndarray(tensors),
        },
        metadata={"origin": "pytest"},
    )


def put(client, name, table, chunk):
    writer, reader = client.do_put(dataset(name), table.schema)
    for batch in table.to_batches(max_chunksize=chunk):
        writer.write_batch(batch)
    writer.done_writing()
    acks = []
    while True:
        buf = reader.read()
        if buf is None:
            break
        acks.append(json.loads(buf.to_pybytes()))
    writer.close()
    return acks


def data_files(server):
    return sorted(p.name for p in server["data"].iterdir())


def test_upload_list_read_back_bit_identical(client, server):
    # Eight batches built apart (not slices of one table), so that each
    # serializes canonically and the comparison below is byte for byte.
    sent = [sample_table(rows=125, seed=i).combine_chunks().to_batches()[0] for i in range(8)]
    table = pa.Table.from_batches(sent)
    acks = put(client, "sample", table, chunk=None)
    assert acks[-1] == {"batches": 8, "rows": 1000, "bytes": acks[-1]["bytes"], "committed": True}
    assert all(a["batches"] <= b["batches"] for a, b in zip(acks, acks[1:]))

    listed = {tuple(p.decode() for p in f.descriptor.path): f for f in client.list_flights()}
    assert ("datasets", "sample") in listed
    info = client.get_flight_info(dataset("sample"))
    assert info.total_records == 1000
    assert info.total_bytes == (server["data"] / "sample.arrow").stat().st_size
    assert info.schema.equals(table.schema, check_metadata=True)
    assert isinstance(info.schema.field("t").type, pa.FixedShapeTensorType)

    back = client.do_get(info.endpoints[0].ticket).read_all()
    assert back.schema.equals(table.schema, check_metadata=True)
    assert back.equals(table)
    # Bit for bit: every batch, as it was put, serializes to the same bytes.
    got = back.to_batches()
    assert len(got) == len(sent)
    for a, b in zip(sent, got):
        assert a.serialize().to_pybytes() == b.serialize().to_pybytes()
    # The stored file is an Arrow IPC file pyarrow reads directly.
    with pa.ipc.open_file(server["data"] / "sample.arrow") as f:
        assert f.read_all().equals(table)


def affine_input(rows, seed=1):
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


def exchange(client, descriptor, table, chunk=None):
    writer, reader = client.do_exchange(descriptor)
    writer.begin(table.schema)
    for batch in table.to_batches(max_chunksize=chunk):
        writer.write_batch(batch)
    writer.done_writing()
    out = reader.read_all()
    writer.close()
    return out


def test_exchange_matches_grpc(client, server):
    x = affine_input(300)
    table = pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(x)})
    out = exchange(client, model("affine"), table, chunk=64)
    assert out.num_rows == 300
    assert out.schema.names == ["y", "s"]
    y = out.column("y").combine_chunks().to_numpy_ndarray()
    s = out.column("s").to_numpy()

    g = grpcclient.InferenceServerClient(url=server["grpc"])
    try:
        ys, ss = [], []
        for lo in range(0, 300, 8):
            inp = grpcclient.InferInput("x", [min(8, 300 - lo), 4], "FP32")
            inp.set_data_from_numpy(x[lo : lo + 8])
            res = g.infer("affine", [inp])
            ys.append(res.as_numpy("y"))
            ss.append(res.as_numpy("s"))
        stats = g.get_inference_statistics("affine", "2", as_json=True)
    finally:
        g.close()
    assert np.array_equal(y, np.concatenate(ys))
    assert np.array_equal(s, np.concatenate(ss))
    np.testing.assert_allclose(y, x * 3 + 1, rtol=1e-6)
    # Both paths share the version's batcher and statistics.
    count = int(stats["model_stats"][0]["inference_count"])
    assert count >= 600


def test_exchange_permuted_tensor(client):
    # A non-C-contiguous ndarray: pyarrow stores its rows physically as
    # [3, 2] with permutation [1, 0]; the model sees the logical [2, 3] rows.
    x = np.arange(40 * 3 * 2, dtype=np.float32).reshape(40, 3, 2).transpose(0, 2, 1)
    col = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    assert col.type.permutation == [1, 0] and col.type.shape == [3, 2]
    out = exchange(client, model("image"), pa.table({"x": col}), chunk=16)
    flat = out.column("flat").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(flat, 2 * x.reshape(40, 6))
    np.testing.assert_allclose(out.column("mean").to_numpy(), x.reshape(40, 6).mean(axis=1), rtol=1e-6)


def test_exchange_stacked_columns_and_version(client):
    x = affine_input(50, seed=2)
    cols = {"f%d" % j: x[:, j] for j in range(4)}
    table = pa.table(cols)
    out = exchange(client, model("affine", "1"), table)
    np.testing.assert_allclose(out.column("y").combine_chunks().to_numpy_ndarray(), x * 2 + 1, rtol=1e-6)
    # With an id column, the metadata names the features.
    table = pa.table({"id": np.arange(50), **cols}).replace_schema_metadata({"kiln.features": "f0,f1,f2,f3"})
    out = exchange(client, model("affine", "1"), table)
    np.testing.assert_allclose(out.column("s").to_numpy(), x.sum(axis=1), rtol=1e-5)


def test_training_job(client):
    rng = np.random.default_rng(3)
    v = rng.standard_normal(5000)
    w = rng.integers(-100, 100, 5000).astype(np.int32)
    put(client, "train-data", pa.table({"v": v, "w": w}), chunk=500)
    [res] = client.do_action(fl.Action("train", json.dumps({"dataset": "train-data", "delay_ms": 30}).encode()))
    job = json.loads(res.body.to_pybytes())["job_id"]
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        [res] = client.do_action(fl.Action("job-status", job.encode()))
        st = json.loads(res.body.to_pybytes())
        seen.append(st["progress"].get("step", 0))
        if st["state"] != "RUNNING":
            break
        time.sleep(0.01)
    assert st["state"] == "SUCCEEDED", st
    assert st["progress"]["total"] == 10 and st["fraction"] == 1
    assert any(0 < s < 10 for s in seen), seen
    result = st["result"]
    assert result["v"]["count"] == 5000
    np.testing.assert_allclose(result["v"]["mean"], v.mean(), rtol=1e-9)
    assert result["w"]["min"] == w.min() and result["w"]["max"] == w.max()

    [res] = client.do_action(fl.Action("train", json.dumps({"dataset": "train-data", "delay_ms": 60000}).encode()))
    job = json.loads(res.body.to_pybytes())["job_id"]
    [res] = client.do_action(fl.Action("cancel", json.dumps({"job_id": job}).encode()))
    deadline = time.time() + 60
    while time.time() < deadline:
        [res] = client.do_action(fl.Action("job-status", job.encode()))
        st = json.loads(res.body.to_pybytes())
        if st["state"] != "RUNNING":
            break
        time.sleep(0.01)
    assert st["state"] == "CANCELLED"

    with pytest.raises(pa.ArrowKeyError, match="does not exist"):
        list(client.do_action(fl.Action("train", b'{"dataset": "nope"}')))


def still_serves(client):
    x = affine_input(3)
    out = exchange(client, model("affine"), pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}))
    assert out.num_rows == 3


@pytest.mark.parametrize(
    "descriptor,table,error,message",
    [
        (("affine",), pa.table({"z": pa.array([1.0], pa.float32()), "q": pa.array([1.0], pa.float32())}), pa.ArrowInvalid, "feature width is 4"),
        (("pair",), pa.table({"a": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((2, 3), np.float32))}), pa.ArrowInvalid, 'missing input column "b"'),
        (("affine",), pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((2, 4), np.float64))}), pa.ArrowInvalid, "expected FP32"),
        (("pair",), pa.table({"a": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((2, 3), np.float32)), "b": pa.array([1, 2], pa.int32())}), pa.ArrowInvalid, '"b" has type int32'),
        (("nope",), pa.table({"x": [1.0]}), pa.ArrowKeyError, "nope"),
        (("affine", "7"), pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((1, 4), np.float32))}), pa.ArrowKeyError, "7"),
    ],
)
def test_exchange_bad_input(client, descriptor, table, error, message):
    with pytest.raises(error, match=message):
        exchange(client, model(*descriptor), table)
    still_serves(client)


def encode_varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, payload):
    return encode_varint(num << 3 | 2) + encode_varint(len(payload)) + payload


def flight_data(header, body=b"", path=None):
    """A FlightData protobuf, encoded by hand."""
    msg = b""
    if path is not None:
        desc = encode_varint(1 << 3 | 0) + encode_varint(1)  # type = PATH
        for p in path:
            desc += field(3, p.encode())
        msg += field(1, desc)
    msg += field(2, header)
    if body:
        msg += field(1000, body)
    return msg


def raw_put(server, messages):
    """A DoPut of raw FlightData messages through grpcio; returns the error."""
    channel = grpc.insecure_channel(server["flight"])
    call = channel.stream_stream("/arrow.flight.protocol.FlightService/DoPut", request_serializer=None, response_deserializer=None)
    try:
        for _ in call(iter(messages)):
            pass
    except grpc.RpcError as e:
        return e
    finally:
        channel.close()
    return None


def ipc_messages(batch):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    schema_msg = reader.read_next_message()
    batch_msg = reader.read_next_message()
    return schema_msg, batch_msg


def test_corrupt_ipc_stores_nothing(client, server):
    batch = pa.record_batch({"v": np.arange(1000, dtype=np.float64)})
    schema_msg, batch_msg = ipc_messages(batch)
    before = data_files(server)
    path = ["datasets", "corrupt"]
    cases = [
        [flight_data(schema_msg.metadata.to_pybytes(), path=path), flight_data(b"\x00garbage\xff" * 4, b"xx")],
        [flight_data(schema_msg.metadata.to_pybytes(), path=path), flight_data(batch_msg.metadata.to_pybytes(), batch_msg.body.to_pybytes()[:100])],
        [flight_data(b"not a schema", path=path)],
    ]
    for msgs in cases:
        err = raw_put(server, msgs)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "descriptor" not in err.details(), err.details()
        assert data_files(server) == before
    # The well-formed version of the same stream is stored.
    err = raw_put(server, [flight_data(schema_msg.metadata.to_pybytes(), path=path), flight_data(batch_msg.metadata.to_pybytes(), batch_msg.body.to_pybytes())])
    assert err is None
    assert client.do_get(client.get_flight_info(dataset("corrupt")).endpoints[0].ticket).read_all().equals(pa.Table.from_batches([batch]))
    still_serves(client)


def test_disconnect_mid_put_stores_nothing(client, server):
    script = textwrap.dedent(
        """
        import sys, numpy as np, pyarrow as pa, pyarrow.flight as fl
        c = fl.FlightClient("grpc://" + sys.argv[1])
        t = pa.table({"v": np.arange(100000, dtype=np.float64)})
        w, r = c.do_put(fl.FlightDescriptor.for_path("datasets", "half"), t.schema)
        for b in t.to_batches(max_chunksize=10000)[:3]:
            w.write_batch(b)
        r.read()  # one batch is durable
        print("acked", flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen([PYTHON, "-c", script, server["flight"]], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "acked"
    child.kill()
    child.wait()
    deadline = time.time() + 60
    while any(n.startswith(".put-") for n in data_files(server)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(n.startswith(".put-") or n.startswith("half") for n in data_files(server))
    assert all(f.descriptor.path[1] != b"half" for f in client.list_flights())
    with pytest.raises(pa.ArrowKeyError):
        client.get_flight_info(dataset("half"))
    still_serves(client)


def test_bad_names_and_tickets(client):
    for name in ["../x", ".hidden", "a/b"]:
        with pytest.raises(pa.ArrowInvalid, match="dataset name"):
            put(client, name, pa.table({"v": [1]}), chunk=1)
    with pytest.raises(pa.ArrowInvalid):
        client.do_get(fl.Ticket(b"datasets/../../etc/passwd")).read_all()


def test_no_trainer_is_unimplemented(built):
    info = launch(built, "notrainer", "-trainer", "none")
    try:
        c = fl.FlightClient("grpc://" + info["flight"])
        with pytest.raises(pa.ArrowNotImplementedError, match="no trainer"):
            list(c.do_action(fl.Action("train", b'{"dataset": "x"}')))
        c.close()
    finally:
        stop(info)


def test_auth_and_tls(built, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    token = "static-token-for-tests-0123"
    info = launch(built, "secure", "-user", "alice", "-password", "s3cret", "-token", token, "-tls-cert", str(cert), "-tls-key", str(key))
    try:
        c = fl.FlightClient("grpc+tls://" + info["flight"], tls_root_certs=cert.read_bytes())
        with pytest.raises(fl.FlightUnauthenticatedError):
            list(c.list_flights())
        with pytest.raises(fl.FlightUnauthenticatedError):
            c.authenticate_basic_token("alice", "wrong")
        pair = c.authenticate_basic_token("alice", "s3cret")
        opts = fl.FlightCallOptions(headers=[pair])
        writer, reader = c.do_put(dataset("secret"), pa.schema([("v", pa.int64())]), options=opts)
        writer.write_table(pa.table({"v": [1, 2, 3]}))
        writer.close()
        assert c.get_flight_info(dataset("secret"), options=opts).total_records == 3
        static = fl.FlightCallOptions(headers=[(b"authorization", b"Bearer " + token.encode())])
        assert [f.descriptor.path[1] for f in c.list_flights(options=static)] == [b"secret"]
        c.close()
        plain = fl.FlightClient("grpc://" + info["flight"])
        with pytest.raises(fl.FlightUnavailableError):
            list(plain.list_flights(options=fl.FlightCallOptions(timeout=5)))
        plain.close()
    finally:
        stop(info)
