"""The one exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input or a data setting that cannot work; the message starts with the spec field it is about."""
