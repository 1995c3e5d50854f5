"""Wire messages -> the console's JSON. One way in: everything the console shows comes
as the same protobuf messages gRPC clients get (store entities go through
server/convert.py first), so the browser and the CLI can never disagree.

NaN and infinities are not JSON: they become null.
"""
from __future__ import annotations

import json
import math

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.wire import dict_from_struct

FINAL = frozenset({pb.COMPLETED, pb.FAILED, pb.CANCELLED})


def _num(v: float):
    return v if math.isfinite(v) else None


def _ts(ts) -> float | None:
    return ts.ToNanoseconds() / 1e9 if ts.seconds or ts.nanos else None


def experiment(m: pb.Experiment, *, spec: bool = False) -> dict:
    out = {
        "id": m.id, "name": m.name, "state": pb.ExperimentState.Name(m.state), "attempt": m.attempt,
        "worker_id": m.worker_id, "message": m.message, "summary": {k: _num(v) for k, v in m.summary.items()},
        "last_step": m.last_step, "replay_of": m.replay_of, "tags": list(m.tags), "note": m.note,
        "created_at": _ts(m.created_at), "started_at": _ts(m.started_at), "finished_at": _ts(m.finished_at),
        "epochs": None,
    }
    d = dict_from_struct(m.spec) if m.spec.fields else {}
    train = d.get("train") if isinstance(d.get("train"), dict) else {}
    if isinstance(train.get("epochs"), (int, float)):
        out["epochs"] = int(train["epochs"])
    if spec:
        out["spec"] = json.loads(m.spec_json) if m.spec_json else d
    return out


def control(m: pb.ControlRecord) -> dict:
    return {
        "command_id": m.command_id, "experiment_id": m.experiment_id, "kind": pb.ControlKind.Name(m.kind),
        "value": _num(m.value), "status": pb.ControlStatus.Name(m.status), "source": pb.ControlSource.Name(m.source),
        "requested_at": _ts(m.requested_at), "applied_at": _ts(m.applied_at),
        "applied_step": m.applied_step if m.applied_step >= 0 and m.status == pb.APPLIED else None,
        "old_value": _num(m.old_value), "new_value": _num(m.new_value), "message": m.message,
        "at_step": m.at_step if m.HasField("at_step") and m.at_step >= 0 else None,
        "consequence": m.consequence, "hold": m.hold,
    }


def batch(m: pb.MetricBatch) -> dict:
    """Column-batch form kept: names once, then [step, epoch, wall_time, *values] rows."""
    return {"scope": pb.Scope.Name(m.scope), "names": list(m.names),
            "rows": [[r.step, r.epoch, r.wall_time, *(_num(v) for v in r.values)] for r in m.rows]}


def worker(w: pb.WorkerInfo) -> dict:
    return {
        "worker_id": w.worker_id, "hostname": w.hostname, "connected": w.connected, "last_seen": _ts(w.last_seen),
        "experiment_id": w.experiment_id or None, "attempt": w.attempt,
        "devices": [{"kind": d.kind, "index": d.index, "name": d.name, "memory_bytes": d.memory_bytes}
                    for d in w.devices],
        "usage": [{"kind": u.kind, "index": u.index, "utilization": _num(u.utilization),
                   "memory_used_bytes": u.memory_used_bytes, "memory_total_bytes": u.memory_total_bytes}
                  for u in w.usage],
    }


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)
