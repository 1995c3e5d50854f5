"""The spec's parameter models (`model:`, `data:`, `loss:`) and the checks on them that
need no torch: server, workers, client and the attached-run SDK all import them from here."""
from .loss import LOSS_NAMES, LossParams
from .model_data import DataParams, ModelParams

__all__ = ["DataParams", "ModelParams", "LossParams", "LOSS_NAMES"]
