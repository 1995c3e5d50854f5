"""Reading a Watch stream that may break: the cursor behind `Client.watch` reconnects,
and `read_history` (a Watch read only as far as what is stored).

A Watch stream is history (rows with step >= from_step, then the resolved controls),
then live events. When it breaks before the final state, the SDK reopens it at the
last step row seen (`WatchCursor.next_from_step` says why that misses no epoch row)
and drops what it already yielded: a row is new
only if its step is past the last one seen in its scope (rows of one scope arrive in
step order), a control only if its (command id, status) is new, and a state only if
it differs from the last one yielded.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

from trainctl.client.sdk_types import FINAL

if TYPE_CHECKING:
    from trainctl.client.sdk import Client, Event


class WatchCursor:
    def __init__(self, from_step: int = 0, live_only: bool = False):
        self.from_step = max(int(from_step), 0)
        self.live_only = live_only
        self.last = {"step": self.from_step - 1, "epoch": self.from_step - 1}
        self.rows_seen = False
        self.controls: set[tuple[str, str]] = set()
        self.state: Optional[tuple] = None
        self.final = False

    @property
    def next_from_step(self) -> int:
        # An epoch row sits at the step count after its epoch's last step: it comes after
        # step row s-1 (live) or after step row s (history, which orders step rows first
        # at equal steps). So once step row S was seen, every epoch row below S was too,
        # and reopening at S (not S+1) misses nothing; S itself is dropped as seen.
        # Past an epoch row that came before its step row (live order), reopen at it.
        s, e = self.last["step"], self.last["epoch"]
        if s >= self.from_step:
            return e if e == s + 1 else s
        return max(self.from_step, e + 1)

    @property
    def next_live_only(self) -> bool:
        # live_only asked for no history; once rows were seen, resume right after them
        return self.live_only and not self.rows_seen

    def accept(self, events: Iterable["Event"]) -> Iterator["Event"]:
        for ev in events:
            if ev.kind in ("step", "epoch"):
                if ev.step <= self.last[ev.kind]:
                    continue
                self.last[ev.kind] = ev.step
                self.rows_seen = True
            elif ev.kind == "control":
                key = (ev.control.command_id, ev.control.status)
                if key in self.controls:
                    continue
                self.controls.add(key)
            elif ev.kind == "experiment":
                x = ev.experiment
                key = (x.state, x.attempt, x.message)
                if key == self.state:
                    continue
                self.state = key
                self.final = x.state in FINAL
            yield ev


def read_history(client: "Client", id: int, from_step: int = 0, *, idle: float = 0.3) -> Iterator["Event"]:
    """The stored rows and resolved controls of an experiment, read from a Watch
    stream. A finished run's stream ends by itself; a running one's is left once a row
    at or past the experiment's last stored step arrived and the stream then stays idle
    for `idle` seconds (Watch has no end-of-history marker)."""
    q: queue.Queue = queue.Queue(maxsize=10_000)
    done = object()
    stop = threading.Event()

    def pump():
        try:
            for ev in client.watch(id, from_step=from_step, retries=2):
                while not stop.is_set():
                    try:
                        q.put(ev, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except Exception as exc:  # handed to the reader, raised there
            q.put(exc)
        q.put(done)

    t = threading.Thread(target=pump, name=f"history-{id}", daemon=True)
    t.start()
    last_step: Optional[int] = None
    reached = False
    try:
        while True:
            try:
                item = q.get(timeout=idle if reached or last_step == 0 else 30.0)
            except queue.Empty:
                if reached or last_step == 0:
                    return
                continue
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            if item.kind == "experiment":
                if last_step is None:
                    last_step = item.experiment.last_step
                if item.experiment.state in FINAL:
                    continue  # the stream ends right after: the pump hands `done`
            elif item.kind in ("step", "epoch") and last_step is not None and item.step >= last_step:
                reached = True
            yield item
    finally:
        stop.set()
        time.sleep(0)  # the pump exits at its next event; it is a daemon thread either way
