"""Wire messages <-> plain Python values, shared by server, worker and client."""
from __future__ import annotations

from typing import Optional

from google.protobuf import struct_pb2

from trainctl.spec import CONTROL_VERBS
from trainctl.v1 import trainctl_pb2 as pb


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


def verb_of(kind: int) -> Optional[str]:
    """The spec verb of a wire `ControlKind` (SET_LR -> "set_lr"), None if unknown."""
    verb = pb.ControlKind.Name(kind).lower() if kind in pb.ControlKind.values() else ""
    return verb if verb in CONTROL_VERBS else None
