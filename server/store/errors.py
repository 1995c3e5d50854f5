"""Errors the store raises.

Each carries the ids/values at fault in its message, because the gRPC layer passes the
message straight to the client (NOT_FOUND, FAILED_PRECONDITION, ...), and "not found"
without saying what was looked up is useless in a log.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error the store raises on purpose."""


class NotFound(StoreError):
    def __init__(self, kind: str, key: object):
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} {key} not found")


class StaleAttempt(StoreError):
    """A message from a run of the experiment that is no longer the live one (fencing).

    Raised when `attempt` is not the experiment's current attempt, or when it is but the
    store has already taken the experiment away from that run (lease expired, requeued).
    """

    def __init__(self, experiment_id: int, attempt: int, current_attempt: int, *, revoked: bool = False):
        self.experiment_id = experiment_id
        self.attempt = attempt
        self.current_attempt = current_attempt
        if revoked:
            detail = f"its lease was revoked (current attempt {current_attempt}, not assigned)"
        else:
            detail = f"current attempt {current_attempt}"
        super().__init__(f"experiment {experiment_id}: attempt {attempt} is fenced ({detail})")


class InvalidTransition(StoreError):
    def __init__(self, experiment_id: int, current: str, target: str):
        self.experiment_id = experiment_id
        self.current = current
        self.target = target
        super().__init__(f"experiment {experiment_id} is {current}; cannot move to {target}")


class SchemaTooNew(StoreError):
    def __init__(self, revision: str, head: str):
        self.revision = revision
        self.head = head
        super().__init__(
            f"database schema revision {revision} is newer than this trainctl knows "
            f"(head {head}); upgrade trainctl"
        )


class AlreadyExists(StoreError):
    """A client-chosen key (a command id within its experiment) is taken by other content."""

    def __init__(self, kind: str, key: object, detail: str = ""):
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} {key} already exists" + (f" {detail}" if detail else ""))


class StoreUnavailable(StoreError):
    """The database could not be reached or written (locked, disk full, connection lost).

    Nothing was changed; the same call may succeed later. The gRPC layer answers
    UNAVAILABLE with this message, never the driver's text, and the dispatcher retries.
    """

    def __init__(self, operation: str, cause: BaseException):
        self.operation = operation
        self.cause = cause
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if first.startswith("(") and ") " in first:  # "(sqlite3.OperationalError) database is locked"
            first = first.split(") ", 1)[1]
        super().__init__(f"the database is unavailable ({operation}: {first[:200]}); try again")
