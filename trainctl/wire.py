"""Wire messages <-> plain Python values, shared by server, worker and client."""
from __future__ import annotations


from google.protobuf import struct_pb2



def struct_from_dict(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def dict_from_struct(s: struct_pb2.Struct) -> dict:
    """Plain Python values; unlike json_format this keeps NaN/inf as floats, so the spec
    validator (not a JSON encoder) is the one that refuses them, naming the field."""
    return _plain(s)


def _plain(v):
    if isinstance(v, struct_pb2.Struct):
        return {k: _plain(v[k]) for k in v.keys()}
    if isinstance(v, struct_pb2.ListValue):
        return [_plain(x) for x in v]
    return v


def largest_field(s: struct_pb2.Struct) -> tuple[str, int]:
    """(dotted path, serialized bytes) of the biggest leaf in a Struct, found by following
    the biggest value down (protobuf's C++ ByteSize, no conversion to Python): what an
    oversized spec's error names."""
    path: list[str] = []
    node: struct_pb2.Value | None = None
    fields = s.fields
    size = s.ByteSize()
    while fields is not None:
        items = list(fields.items()) if hasattr(fields, "items") else list(enumerate(fields))
        if not items:
            break
        key, node = max(items, key=lambda kv: kv[1].ByteSize())
        path.append(str(key))
        size = node.ByteSize()
        kind = node.WhichOneof("kind")
        fields = node.struct_value.fields if kind == "struct_value" else \
            node.list_value.values if kind == "list_value" else None
    return ".".join(path) or "spec", size
