"""Client side of trainctl: the Python SDK and the `trainctl` CLI."""
from trainctl.client.sdk import Client, ControlResult, Event, ExperimentInfo, TrainctlError

__all__ = ["Client", "ControlResult", "Event", "ExperimentInfo", "TrainctlError"]
