"""The messages on the pipe between the worker agent and a run process, one type each.

One pickled instance per message. The run process (workers/run_process.py) sends the
first seven, the agent (workers/runner.py) the last three; each side dispatches on the
type, so a message the other side does not know is a TypeError, not a silently ignored
tuple. Plain frozen dataclasses: pickled by class name, as cheap as a tuple for the
~50 messages a second a run sends at most (rows are batched, see BatchingSink).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

from trainctl.workers.engine.context import Ack, Command

# (scope, step, epoch, wall_time, values): one metrics row as the MetricsSink got it.
Row = tuple[str, int, int, float, dict[str, float]]

LINGER_S = 0.02  # how long rows may wait in the run process before they are sent
# The agent pings its run process this often; a run process that has not heard from
# its agent for AGENT_SILENCE_S pauses at the next step until it does. A frozen or hung
# agent stops sending heartbeats, so the server will fence the attempt and start it
# elsewhere: by then this copy must not train on (and write checkpoints) unseen.
PING_S = 0.25
AGENT_SILENCE_S = 1.0


# ---------------------------------------------------------------- run process -> agent

@dataclass(frozen=True)
class Rows:
    rows: list[Row]


@dataclass(frozen=True)
class Acked:
    """A command was applied (or refused) at a step boundary."""
    ack: Ack


@dataclass(frozen=True)
class Progress:
    step: int


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True)
class Checkpointed:
    """A checkpoint file is complete on disk (the agent uploads it to the artifact store)."""
    path: str
    step: int


@dataclass(frozen=True)
class LogText:
    """A formatted record of the run's Python logging (trainctl.* loggers, INFO and up):
    the agent ships it as a LOGGING line of the run's output (workers/logship.py)."""
    text: str


@dataclass(frozen=True)
class Done:
    """The run's end: payload is Summary.as_dict() when completed, else the reason."""
    outcome: Literal["completed", "cancelled", "failed"]
    payload: Any


# ---------------------------------------------------------------- agent -> run process

@dataclass(frozen=True)
class Control:
    command: Command


@dataclass(frozen=True)
class Cancel:
    reason: str


@dataclass(frozen=True)
class Ping:
    """A heartbeat: the agent is alive (see AGENT_SILENCE_S)."""


FromRun = Union[Rows, Acked, Progress, Note, Checkpointed, LogText, Done]
ToRun = Union[Control, Cancel, Ping]


def relay(msg, ctx, on_rows) -> bool:
    """Hand a run-side message to the agent's context: rows to `on_rows`, acks to the
    inbox, progress, notes, checkpoints and log lines to their callbacks. False for a message it does not relay
    (Done, or something unknown), which the caller handles."""
    if isinstance(msg, Rows):
        on_rows(msg.rows)
    elif isinstance(msg, Acked):
        ctx.inbox.ack(msg.ack)
    elif isinstance(msg, Progress):
        ctx.on_progress(msg.step)
    elif isinstance(msg, Note):
        ctx.on_note(msg.text)
    elif isinstance(msg, Checkpointed):
        ctx.on_checkpoint(msg.path, msg.step)
    elif isinstance(msg, LogText):
        ctx.on_log(msg.text)
    else:
        return False
    return True
