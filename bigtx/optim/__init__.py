"""Optimizer parameter groups and the learning-rate schedule."""

from bigtx.optim.param_groups import param_groups
from bigtx.optim.schedule import lr_at

__all__ = ["lr_at", "param_groups"]
