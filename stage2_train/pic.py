"""Stable import path of PIC: :mod:`stage2_train.method.pic` holds it."""

from stage2_train.method.pic import *  # noqa: F403
from stage2_train.method.pic import __all__  # noqa: F401
