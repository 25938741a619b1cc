"""DoPut of data that pyarrow sends but an Arrow IPC file cannot simply hold
(dictionaries that change between batches), and of batches that lie about
themselves (a null count that contradicts the validity bitmap), against the
real pyarrow.flight client and serving/internal/testserver.
"""
import json

import pytest

pa = pytest.importorskip("pyarrow")
fl = pytest.importorskip("pyarrow.flight")

from conftest import start_testserver, stop_testserver  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, testserver_bin):
    tmp = tmp_path_factory.mktemp("flight-put")
    (tmp / "repo").mkdir()
    info = start_testserver(testserver_bin, tmp / "server.log", "-repo", str(tmp / "repo"),
                            "-flight", "127.0.0.1:0", "-data", str(tmp / "data"), "-trainer", "none")
    info["data"] = tmp / "data"
    yield info
    assert stop_testserver(info) == 0, info["log"].read_text()


@pytest.fixture
def client(server):
    c = fl.FlightClient("grpc://" + server["flight"])
    yield c
    c.close()


def put(client, name, batches, schema):
    writer, reader = client.do_put(fl.FlightDescriptor.for_path("datasets", name), schema)
    for b in batches:
        writer.write_batch(b)
    writer.done_writing()
    last = None
    while True:
        buf = reader.read()
        if buf is None:
            break
        last = json.loads(buf.to_pybytes())
    writer.close()
    return last


def get(client, name):
    info = client.get_flight_info(fl.FlightDescriptor.for_path("datasets", name))
    return client.do_get(info.endpoints[0].ticket).read_all()


def categorical(values, n0):
    return pa.table({"n": pa.array(range(n0, n0 + len(values)), pa.int64()),
                     "c": pa.array(values).dictionary_encode()})


def test_concatenated_categorical_tables_round_trip(client, server):
    # pa.concat_tables keeps each table's dictionary: pyarrow's stream
    # writer sends a replacement dictionary with the second chunk.
    t1 = categorical(["red", "green", None, "red"], 0)
    t2 = categorical(["blue", "red", "violet"], 4)
    many = categorical(["cat%03d" % i for i in range(200)], 7)  # outgrows int8 indices
    table = pa.concat_tables([t1, t2, many])
    assert table.column("c").num_chunks == 3
    ack = put(client, "categories", table.to_batches(), table.schema)
    assert ack["committed"] and ack["batches"] == 3 and ack["rows"] == 207
    back = get(client, "categories")
    back.validate(full=True)
    assert back.column("c").to_pylist() == table.column("c").to_pylist()
    assert back.column("n").to_pylist() == table.column("n").to_pylist()
    assert pa.types.is_dictionary(back.schema.field("c").type)
    assert back.schema.field("c").type.value_type == pa.string()
    # The stored file is one Arrow IPC file that pyarrow reads and validates.
    with pa.memory_map(str(server["data"] / "categories.arrow")) as f:
        stored = pa.ipc.open_file(f).read_all()
    stored.validate(full=True)
    assert stored.column("c").to_pylist() == table.column("c").to_pylist()


def test_steady_categorical_keeps_its_type(client):
    table = categorical(["a", "b", "a", None], 0)
    batches = table.to_batches(max_chunksize=2)
    assert len(batches) == 2
    put(client, "steady", batches, table.schema)
    back = get(client, "steady")
    assert back.schema == table.schema
    assert back.equals(table)


def lying_strings(null_count):
    """4 strings whose validity bitmap (0b0101) marks rows 1 and 3 null,
    declaring null_count nulls."""
    valid = pa.py_buffer(bytes([0b0101]))
    offsets = pa.array([0, 1, 1, 2, 2], pa.int32()).buffers()[1]
    data = pa.py_buffer(b"ac")
    return pa.Array.from_buffers(pa.string(), 4, [valid, offsets, data], null_count=null_count)


@pytest.mark.parametrize("nulls", [1, 3])
def test_lying_null_count_is_refused(client, server, nulls):
    honest = pa.record_batch([pa.array([1, 2, 3, 4]), lying_strings(2)], names=["n", "s"])
    honest.validate(full=True)
    lying = pa.record_batch([pa.array([1, 2, 3, 4]), lying_strings(nulls)], names=["n", "s"])
    with pytest.raises(pa.ArrowInvalid):
        lying.validate(full=True)  # pyarrow agrees that it lies
    with pytest.raises(pa.ArrowInvalid, match='column "s"'):
        put(client, "lying", [honest, lying, honest], honest.schema)
    assert not (server["data"] / "lying.arrow").exists()
    # The honest one is stored and validates in full when read back.
    put(client, "honest", [honest, honest], honest.schema)
    back = get(client, "honest")
    back.validate(full=True)
    assert back.column("s").to_pylist() == ["a", None, "c", None] * 2
