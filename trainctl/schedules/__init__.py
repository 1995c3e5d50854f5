"""LR schedules for trainctl (torch-free: the server validates and previews specs).

See API.md next to this file for the contract with the training loop and
docs/schedules.md for every schedule's parameters.
"""
from .ahead import consequence
from .base import CommonParams, DecayCannotAct, NoDecayFactor, NoiseParams, Schedule
from .factory import ScheduleParams, apply_control, build_schedule, parse_schedule, preview
from .registry import REGISTRY, decay_schedules

__all__ = [
    "CommonParams",
    "DecayCannotAct",
    "NoDecayFactor",
    "NoiseParams",
    "REGISTRY",
    "Schedule",
    "ScheduleParams",
    "apply_control",
    "build_schedule",
    "consequence",
    "decay_schedules",
    "parse_schedule",
    "preview",
]
