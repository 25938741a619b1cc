"""Kiln's proto/*.proto must match the inference protocol that the stock
tritonclient speaks: same package, message names, field names, numbers,
types and labels for everything Kiln declares."""
import importlib
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

grpc_tools = pytest.importorskip("grpc_tools.protoc")
tc_service = pytest.importorskip("tritonclient.grpc.service_pb2")
tc_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def kiln_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("kilnpb")
    rc = grpc_tools.main(
        [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"--descriptor_set_out={out / 'set.pb'}",
            "model_config.proto",
            "grpc_service.proto",
        ]
    )
    assert rc == 0
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString((out / "set.pb").read_bytes())
    return {f.name: f for f in fds.file}


def _proto(mod):
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto()
    mod.DESCRIPTOR.CopyToProto(fd)
    return fd


def _messages(fd):
    out = {}

    def walk(prefix, msgs):
        for m in msgs:
            name = prefix + m.name
            out[name] = m
            walk(name + ".", m.nested_type)

    walk("", fd.message_type)
    return out


def _enums(fd):
    out = {e.name: e for e in fd.enum_type}
    for name, m in _messages(fd).items():
        for e in m.enum_type:
            out[name + "." + e.name] = e
    return out


@pytest.mark.parametrize(
    "ours,theirs", [("grpc_service.proto", tc_service), ("model_config.proto", tc_config)]
)
def test_wire_compatible(kiln_files, ours, theirs):
    mine = kiln_files[ours]
    ref = _proto(theirs)
    assert mine.package == ref.package == "inference"
    ref_msgs = _messages(ref)
    mine_msgs = _messages(mine)
    assert mine_msgs, "no messages"
    for name, m in mine_msgs.items():
        assert name in ref_msgs, f"message {name} is not in the published protocol"
        r = {f.name: f for f in ref_msgs[name].field}
        for f in m.field:
            assert f.name in r, f"{name}.{f.name} is not in the published protocol"
            g = r[f.name]
            assert (f.number, f.type, f.label, f.type_name) == (
                g.number,
                g.type,
                g.label,
                g.type_name,
            ), f"{name}.{f.name} differs"
    ref_enums = _enums(ref)
    for name, e in _enums(mine).items():
        assert name in ref_enums, f"enum {name} is not in the published protocol"
        assert {v.name: v.number for v in e.value}.items() <= {
            v.name: v.number for v in ref_enums[name].value
        }.items(), f"enum {name} differs"


def test_service_methods(kiln_files):
    mine = {m.name: m for m in kiln_files["grpc_service.proto"].service[0].method}
    ref = {m.name: m for m in _proto(tc_service).service[0].method}
    assert kiln_files["grpc_service.proto"].service[0].name == "GRPCInferenceService"
    for want in [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    ]:
        assert want in mine, want
        m, r = mine[want], ref[want]
        assert (m.input_type, m.output_type, m.client_streaming, m.server_streaming) == (
            r.input_type, r.output_type, r.client_streaming, r.server_streaming,
        ), want
