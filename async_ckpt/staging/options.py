"""Stager options, each with an ``ASYNC_CKPT_<NAME>`` environment override.

Every value is checked when it is set (at construction, and on assignment
later), so a bad one fails where it is written, naming the option, rather
than inside the first ``save()``. Byte counts (``max_staging_bytes``,
``wave_bytes``) take an ``int`` or a size string such as ``"512MiB"``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    from typing import TypedDict

    from typing_extensions import Unpack

    class StagerOverrides(TypedDict, total=False):
        """The keyword arguments of ``StagerOptions.from_env`` and ``Stager(...)``."""

        num_buffers: int
        async_staging: bool
        copy_threads: int
        pin_memory: bool
        skip_unchanged: bool
        prefault: bool
        max_staging_bytes: int | str
        wave_bytes: int | str


class InvalidOptionError(CheckpointError, ValueError):
    """A stager option has a value of the wrong type, or out of range.

    Both a :class:`~async_ckpt.CheckpointError` and a ``ValueError``.
    """


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE_EXAMPLE = "an int, or a size string such as '512MiB', '2G', '100MB' or '1048576'"


def parse_size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"100MB"`` or ``"1048576"`` as bytes (K/M/G/T are binary).

    Fractions of a byte are rounded down (``"1.5KiB"`` is 1536).
    """
    if not isinstance(text, str):
        raise InvalidOptionError(f"a size must be a string here, not {type(text).__name__}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidOptionError(f"cannot read {text!r} as a number or a size like '512MiB'")
    # exact arithmetic: float("1048577") * 1 is exact, but "1.1TiB" in floats is not
    return int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])


# The fields by kind: byte counts, counts (with their minimum), and flags.
_SIZES = ("max_staging_bytes", "wave_bytes")
_COUNTS = {"num_buffers": 1, "copy_threads": 0}
_FLAGS = ("async_staging", "pin_memory", "skip_unchanged", "prefault")
_TRUE_WORDS = ("1", "true", "yes", "on", "y")
_FALSE_WORDS = ("0", "false", "no", "off", "n", "")


def _size(name: str, value: object) -> int:
    """``value`` as a byte count for option ``name``, or an :class:`InvalidOptionError`."""
    where = f"StagerOptions.{name}={value!r}"
    if isinstance(value, bool):  # True would silently be 1 byte
        raise InvalidOptionError(f"{where}: a byte count must be {_SIZE_EXAMPLE}, not a bool")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise InvalidOptionError(f"{where}: a byte count cannot be negative (0 means off)")
        return int(value)
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise InvalidOptionError(f"{where}: a byte count must be a whole number of bytes")
        return _size(name, int(value))
    if isinstance(value, str):
        try:
            return parse_size(value)
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"{where}: {exc}; use {_SIZE_EXAMPLE}") from None
    raise InvalidOptionError(
        f"{where}: a byte count must be {_SIZE_EXAMPLE}, not {type(value).__name__}"
    )


def _count(name: str, value: object) -> int:
    minimum = _COUNTS[name]
    where = f"StagerOptions.{name}={value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidOptionError(f"{where}: must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidOptionError(f"{where}: must be at least {minimum}")
    return int(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(
            f"StagerOptions.{name}={value!r}: must be True or False, not {type(value).__name__}"
        )
    return value


def _check(name: str, value: object) -> object:
    """The value option ``name`` stores for ``value`` (sizes become ints); refuses bad ones."""
    if name in _SIZES:
        return _size(name, value)
    if name in _COUNTS:
        return _count(name, value)
    if name in _FLAGS:
        return _flag(name, value)
    return value


def _unknown(name: str) -> InvalidOptionError:
    names = [f.name for f in fields(StagerOptions)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return InvalidOptionError(
        f"unknown stager option {name!r}: {hint}the options are {', '.join(names)}"
    )


def _from_text(name: str, raw: str, var: str) -> object:
    """An environment variable's text as the value of option ``name``."""
    text = raw.strip()
    if name in _FLAGS:
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise InvalidOptionError(
            f"{var}={raw!r}: expected 1/true/yes/on or 0/false/no/off (StagerOptions.{name})"
        )
    if name in _COUNTS:
        try:
            return int(text)
        except ValueError:
            raise InvalidOptionError(
                f"{var}={raw!r}: expected a whole number (StagerOptions.{name})"
            ) from None
    try:
        return parse_size(raw)
    except InvalidOptionError as exc:
        raise InvalidOptionError(f"{var}: {exc} (StagerOptions.{name})") from None


@dataclass(init=False)
class StagerOptions:
    """Tunable staging behaviour; every field has an ``ASYNC_CKPT_<NAME>`` env override.

    Values are checked when set: a wrong type (a bool or a float where bytes
    are expected), a negative size or an unknown option raises
    :class:`InvalidOptionError` (a ``CheckpointError`` and a ``ValueError``)
    naming the option.
    """

    num_buffers: int = 1
    async_staging: bool = False
    copy_threads: int = 0  # 0: the cores this process may use, at most 4
    pin_memory: bool = True  # for CUDA states; ignored without CUDA
    # Re-copy only tensors whose storage or ``_version`` changed since this buffer's
    # last stage. In-place writes through ``tensor.data`` do not bump ``_version``
    # and are missed: leave this off if the training loop writes that way.
    skip_unchanged: bool = False
    prefault: bool = True
    # Cap on all staging buffers together, in bytes (0: no cap, one buffer the size of
    # the state). A bigger state is staged and written in waves: each buffer holds
    # max_staging_bytes / num_buffers, and save() stalls until all but the last
    # num_buffers waves are written. Use the same value on every rank. Also accepts a
    # size string ("512MiB"); read back, it is always an int.
    max_staging_bytes: int = 0
    # Hand the state to the writer in parts of about this many bytes, so that writing
    # starts while the rest is still being copied (0: in one piece). Opt-in: on a
    # 2-core machine the writer competes with the copy, and the measured effect on
    # the commit ranged from 14% sooner to 9% later (docs/performance.md). Also
    # accepts a size string ("128MiB").
    wave_bytes: int = 0

    def __init__(
        self,
        num_buffers: int = 1,
        async_staging: bool = False,
        copy_threads: int = 0,
        pin_memory: bool = True,
        skip_unchanged: bool = False,
        prefault: bool = True,
        max_staging_bytes: int | str = 0,
        wave_bytes: int | str = 0,
    ) -> None:
        self.num_buffers = num_buffers
        self.async_staging = async_staging
        self.copy_threads = copy_threads
        self.pin_memory = pin_memory
        self.skip_unchanged = skip_unchanged
        self.prefault = prefault
        self.max_staging_bytes = _size("max_staging_bytes", max_staging_bytes)
        self.wave_bytes = _size("wave_bytes", wave_bytes)

    def __setattr__(self, name: str, value: object) -> None:
        if not name.startswith("_") and name not in self.__dataclass_fields__:
            raise _unknown(name)  # a typo would otherwise be ignored
        super().__setattr__(name, _check(name, value))

    @classmethod
    def from_env(cls, **overrides: Unpack[StagerOverrides]) -> StagerOptions:
        """The options from ``overrides``, then ``ASYNC_CKPT_<NAME>``, then the defaults."""
        known = {f.name for f in fields(cls)}
        for name in overrides:
            if name not in known:
                raise _unknown(name)
        values: dict[str, object] = dict(overrides)
        for name in sorted(known - set(overrides)):
            var = f"ASYNC_CKPT_{name.upper()}"
            raw = os.environ.get(var)
            if raw is None:
                continue
            try:
                values[name] = _check(name, _from_text(name, raw, var))
            except InvalidOptionError as exc:
                if str(exc).startswith(var):
                    raise
                raise InvalidOptionError(f"{var}={raw!r}: {exc}") from None
        return cls(**values)  # type: ignore[arg-type]
