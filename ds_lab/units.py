"""Bytes as people read them: the one formatter every table, plot and log line in ds_lab uses.

    format_bytes(31.4e9)                  -> '31.4 GB'    decimal (1 GB = 1e9 B), as the ZeRO paper counts
    format_bytes(1.5e6, significant=3)    -> '1.50 MB'    three significant figures, for plot labels
    format_bytes(4096, binary=True)       -> '4.0 KB'     1 KB = 1024 B, as DeepSpeed's comms logger prints

Whole bytes print without decimals ('512 B'); nothing is ever written in scientific notation.
This module imports nothing, so every layer of ds_lab may use it.
"""
from __future__ import annotations

UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def byte_unit(nbytes: float, binary: bool = False) -> tuple[int, str]:
    """The largest unit not above `nbytes`: 3e6 -> (10**6, 'MB'); binary: 3e6 -> (2**20, 'MB')."""
    base = 1024 if binary else 1000
    power = 0
    while power < len(UNITS) - 1 and abs(nbytes) >= base ** (power + 1):
        power += 1
    return base ** power, UNITS[power]


def format_bytes(nbytes: float, digits: int = 1, significant: int | None = None, binary: bool = False) -> str:
    """`nbytes` in the largest fitting unit, with `digits` decimals (or `significant` figures)."""
    divisor, unit = byte_unit(nbytes, binary)
    value = nbytes / divisor
    if unit == "B":
        return f"{value:.0f} B"
    if significant is not None:
        whole_digits = len(str(int(abs(value)))) if abs(value) >= 1 else 1
        digits = max(0, significant - whole_digits)
    return f"{value:.{digits}f} {unit}"
