"""What every benchmark script shares on its command line.

- `ArgumentParser`: argparse, but a usage error is one line on stderr (exit code 2).
- Argument types that reject bad values with argparse's one-line usage error (exit code 2),
  never a traceback: `positive_int`, `positive_float`, `non_negative_float`, `duration`
  and the comma-separated `int_list` / `float_list` (each element positive).
- `Output`, the one meaning of `--json` (see benchmarks/README.md): with `--json`, stdout
  carries exactly one JSON object per result row and nothing else, and the human output
  (table, progress, targets) goes to stderr; without it the human output goes to stdout
  and no JSON is printed. Non-finite numbers are written as null (strict JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from epp.config import parse_duration
from epp.errors import ConfigError

__all__ = [
    "ArgumentParser",
    "Output",
    "duration",
    "float_list",
    "int_list",
    "json_line",
    "non_negative_float",
    "positive_float",
    "positive_int",
]


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are a single line (`prog: error: ...`), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _float(text, lambda v: v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return _float(text, lambda v: v >= 0, "a number >= 0")


def duration(text: str) -> float:
    """A positive Go-style duration (`50ms`, `2s`) or plain seconds (`0.05`), in seconds."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ConfigError:
            raise argparse.ArgumentTypeError(f"expected a duration such as 50ms or 0.05, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. `10,100,500`."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [positive_int(x) for x in items]


def float_list(text: str) -> list[float]:
    """Comma-separated positive numbers, e.g. `0.5,0.7,0.85`."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return [positive_float(x) for x in items]


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_line(row: Mapping[str, Any]) -> str:
    """One result row as `--json` prints it: strict JSON (NaN and infinities become null)."""
    return json.dumps({k: _finite(v) for k, v in row.items()}, allow_nan=False)


class Output:
    """Where a script's result rows and human output go, by the one `--json` rule."""

    def __init__(self, json_rows: bool) -> None:
        self.json_rows = json_rows
        self._human = sys.stderr if json_rows else sys.stdout

    def row(self, row: Mapping[str, Any]) -> None:
        """One result row: a JSON line on stdout with `--json`, nothing otherwise."""
        if self.json_rows:
            print(json_line(row), flush=True)

    def say(self, text: str = "") -> None:
        """Human output: stdout, or stderr with `--json`."""
        print(text, file=self._human, flush=True)
