"""Metric batches sent but not yet acknowledged by the server, oldest first.

They are resent after a reconnect, so they must survive a long server outage: beyond
`in_memory` batches the oldest go to an append-only file, so an outage costs disk, not
RAM or data. The file is removed as soon as everything in it is acknowledged.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

from trainctl.v1 import trainctl_pb2 as pb

Key = tuple[int, int, int]  # (experiment_id, attempt, seq)


class UnackedBatches:
    def __init__(self, in_memory: int = 10_000, spill_path: Optional[Path] = None):
        self.in_memory = in_memory
        self.spill_path = spill_path
        self._memory: "OrderedDict[Key, pb.MetricBatch]" = OrderedDict()
        self._spilled: "OrderedDict[Key, tuple[int, int]]" = OrderedDict()  # key -> (offset, length)
        self._file = None
        self.dropped = 0  # only without a spill path

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    @property
    def spilled(self) -> int:
        return len(self._spilled)

    def add(self, key: Key, batch: pb.MetricBatch) -> None:
        self._memory[key] = batch
        while len(self._memory) > self.in_memory:
            old_key, old = self._memory.popitem(last=False)
            if self.spill_path is None:
                self.dropped += 1
                continue
            if self._file is None:
                self.spill_path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.spill_path, "w+b")
            data = old.SerializeToString()
            self._file.seek(0, os.SEEK_END)
            self._spilled[old_key] = (self._file.tell(), len(data))
            self._file.write(data)

    def ack(self, experiment_id: int, attempt: int, seq: int) -> None:
        """Drop every batch of that run with a sequence number up to `seq`."""
        for store in (self._spilled, self._memory):
            for key in list(store):
                if key[:2] != (experiment_id, attempt):
                    continue
                if key[2] > seq:
                    break  # a run's batches are in seq order: the rest are newer
                del store[key]
        self._maybe_drop_file()

    def forget(self, experiment_id: int, attempt: int) -> None:
        for store in (self._spilled, self._memory):
            for key in [k for k in store if k[:2] == (experiment_id, attempt)]:
                del store[key]
        self._maybe_drop_file()

    def __iter__(self) -> Iterator[pb.MetricBatch]:
        """Every unacknowledged batch, oldest first (spilled ones read back from disk)."""
        for offset, length in list(self._spilled.values()):
            self._file.seek(offset)
            yield pb.MetricBatch.FromString(self._file.read(length))
        yield from list(self._memory.values())

    def _maybe_drop_file(self) -> None:
        if self._file is not None and not self._spilled:
            self._file.close()
            self._file = None
            self.spill_path.unlink(missing_ok=True)
