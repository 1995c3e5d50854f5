"""Live fan-out: the hub's per-run pacing, and many paced watchers of a real run each
getting every step, in order, in fewer messages than the worker sent."""
from __future__ import annotations

import asyncio
import re
import threading
import urllib.request

import grpc
import pytest

from tests.conftest import Cluster, digits_spec, free_port
from trainctl.server import hub as hub_mod
from trainctl.server.hub import Hub
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc


def test_pace_grows_with_the_watchers_of_a_run_and_is_capped():
    async def main():
        hub = Hub()
        assert hub.pace(1) == 0
        subs = [hub.subscribe(1) for _ in range(100)]
        hub.subscribe(2)
        assert hub.pace(1) == pytest.approx(100 * hub_mod.PACE_PER_WATCHER_S)
        assert hub.pace(2) == pytest.approx(hub_mod.PACE_PER_WATCHER_S)  # other runs are not slowed
        for _ in range(10_000):
            hub.subscribe(1)
        assert hub.pace(1) == hub_mod.MAX_PACE_S
        for s in subs:
            hub.unsubscribe(s)
        assert hub.pace(1) == hub_mod.MAX_PACE_S  # 10,000 left

    asyncio.run(main())


def _watch(address: str, exp_id: int, out: dict, key: int, ready: threading.Barrier) -> None:
    with grpc.insecure_channel(address) as ch:
        stream = pb_grpc.ExperimentsStub(ch).Watch(pb.WatchRequest(id=exp_id, live_only=True))
        ready.wait()
        steps, messages = [], 0
        for ev in stream:
            if ev.WhichOneof("event") == "metrics" and ev.metrics.scope == pb.STEP:
                messages += 1
                steps += [r.step for r in ev.metrics.rows]
            elif ev.WhichOneof("event") == "experiment" and ev.experiment.state == pb.COMPLETED:
                break
        out[key] = (steps, messages)


def _batches_ingested(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(re.search(r"^trainctl_metric_batches_ingested_total (\S+)", text, re.M).group(1))


@pytest.mark.slow
def test_many_watchers_get_every_step_in_order_in_fewer_messages(tmp_path):
    port = free_port()
    cluster = Cluster(tmp_path, ["--metrics-port", str(port)])
    try:
        _many_watchers(cluster, port)
    finally:
        cluster.stop()


def _many_watchers(cluster: Cluster, port: int) -> None:
    cluster.add_worker("w0")
    n = 100  # paced at 100 x 0.5 ms = 50 ms between two sends to each watcher
    with cluster.client() as c:
        # A tiny model: batches come from the worker faster than the pace.
        spec = digits_spec("fanout", epochs=3, max_steps=0)
        spec["model"] = {"name": "test_vit", "kwargs": {"img_size": 16}}
        spec["data"] = {"dataset": "digits", "batch_size": 8, "img_size": 16}
        x = c.submit(spec)
        out: dict = {}
        ready = threading.Barrier(n + 1)
        threads = [threading.Thread(target=_watch, args=(cluster.address, x.id, out, i, ready)) for i in range(n)]
        for t in threads:
            t.start()
        ready.wait()
        final = c.wait(x.id, timeout=300)
        for t in threads:
            t.join(60)
        assert final.state == "COMPLETED", cluster.logs()
        all_steps = c.metrics(x.id, scope="step", names=["loss"])["STEP/loss"]["step"]
        batches = _batches_ingested(port)
    first = min(s[0] for s, _ in out.values() if s)
    expected = [s for s in all_steps if s >= first]
    assert len(out) == n
    for steps, messages in out.values():
        # live_only: a watcher starts wherever the run was when it subscribed
        assert steps == [s for s in expected if s >= steps[0]], "a watcher missed or reordered a step"
        # Unpaced, a watcher that keeps up gets one message per batch the worker sent.
        sent_meanwhile = batches * len(steps) / len(all_steps)
        assert messages < 0.7 * sent_meanwhile, (messages, sent_meanwhile)
