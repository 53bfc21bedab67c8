"""Durations read from environment variables, with one rule for bad values."""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger("async_ckpt")


def env_seconds(name: str, default: float) -> float:
    """The non-negative number of seconds in environment variable ``name``, else ``default``.

    A value that is not a finite number >= 0 is ignored with a warning: a typo
    in a clean-up or shutdown setting must not stop training.
    """
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (seconds >= 0 and math.isfinite(seconds)):  # also NaN
        log.warning(
            "ignoring %s=%r (not a non-negative number of seconds); using %s s",
            name,
            text,
            default,
        )
        return default
    return seconds
