"""Stable import path of the metrics: :mod:`stage2_train.evaluate.metrics` holds them."""

from stage2_train.evaluate.metrics import *  # noqa: F403
from stage2_train.evaluate.metrics import __all__  # noqa: F401
