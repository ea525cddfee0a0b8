"""Argument types the commands share: one-line usage errors (exit 2) for numbers that would
otherwise be taken silently and misbehave later."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def port(value: str) -> int:
    """A TCP port: the socket layer would take 99999 as 34463 (mod 65536) without a word."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535)")
    return number


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type for numbers above zero: a negative poll interval would make the
    watcher poll without pause (a core at 100 %), a negative body limit refuse every body."""
    def parse(value: str) -> float:
        number = kind(value)
        if not 0 < number < math.inf:
            raise argparse.ArgumentTypeError(f"{value} must be a finite number above zero")
        return number
    parse.__name__ = getattr(kind, "__name__", "number")  # argparse: "invalid int value"
    return parse
