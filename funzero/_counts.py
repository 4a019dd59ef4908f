"""Counts and sizes as people write them: ``70B`` parameters, ``31.41 GB``.

Units are decimal (GB = 1e9 bytes, the ZeRO paper's unit).
"""

from __future__ import annotations

import math
import re

__all__ = ["GB", "format_bytes", "parse_count"]

GB = 10**9

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


def parse_count(text: str | int | float) -> int:
    """A parameter count written the way people say it: ``70B``, ``1.5B``, ``350M``, ``7e9``.

    Suffixes are decimal: K = 1e3, M = 1e6, B (or G) = 1e9, T = 1e12, case-insensitive.

    Args:
        text: the count, or an int (returned as it is when positive).

    Returns:
        The count as an int (rounded to the nearest element).

    Raises:
        ValueError: naming ``text`` when it is not a positive count.

    Example:
        >>> parse_count("1.5B")
        1500000000
    """
    if isinstance(text, bool):
        raise ValueError(f"cannot parse {text!r} as a parameter count")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _COUNT_RE.match(str(text))
        if m is None:
            raise ValueError(
                f"cannot parse {text!r} as a parameter count; write it like 70B, 1.5B, 350M or 7e9"
            )
        value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(value) or round(value) < 1:
        raise ValueError(f"a parameter count must be a positive number, got {text!r}")
    return int(round(value))


def format_bytes(n: float, *, unit: str = "GB", digits: int = 2) -> str:
    """``n`` bytes as text in decimal units (``GB`` = 1e9 bytes, the ZeRO paper's unit).

    Args:
        n: bytes.
        unit: ``B``, ``KB``, ``MB``, ``GB`` or ``TB`` (powers of 1000).
        digits: decimals to print.

    Returns:
        e.g. ``"31.41 GB"``.

    Example:
        >>> format_bytes(31.40625e9)
        '31.41 GB'
    """
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    if unit not in scale:
        raise ValueError(f"unit must be one of {sorted(scale)}, got {unit=}")
    return f"{n / scale[unit]:,.{digits}f} {unit}"
