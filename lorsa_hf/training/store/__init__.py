"""Activation stores: the base model's attention inputs and outputs written to disk once (`writer`), verified
and read back by the rows they belong to (`reader`), so that many training runs share one base-model pass."""

from .layout import SPLITS, StoreError, plan_splits
from .reader import ActivationStore, StoredActivations
from .writer import build_store, check_disk, planned_bytes

__all__ = ["SPLITS", "ActivationStore", "StoreError", "StoredActivations", "build_store", "check_disk", "plan_splits",
           "planned_bytes"]
