"""What every program shares: user errors become one `error:` line and exit status 2."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..config import ConfigError
from ..distributed import shutdown
from ..errors import UserError


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run `main`, turning user errors into one line on stderr and exit status 2."""
    try:
        code = main(argv) or 0
        shutdown()
        return code
    except (ConfigError, UserError, FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        if isinstance(e, ValueError) and not isinstance(e, ConfigError) and os.environ.get("RRWKV_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (a bad or missing argument) are UserErrors: one `error:` line, no usage block."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def number(kind: type, low: Optional[float] = None, high: Optional[float] = None, open_low: bool = False):
    """An argparse type: an int or float (`kind`) in [low, high] ((low, high] with open_low; None: no bound)."""
    name = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        allowed = f"{name} in {'(' if open_low else '['}{low}, {high}]"
    elif low is not None:
        allowed = f"{name} {'>' if open_low else '>='} {low}"
    else:
        allowed = f"{name} <= {high}" if high is not None else name

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) or \
                (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"takes {allowed}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def output_file(path: str, flag: str) -> Path:
    """The file a program will write its result to, checked (and its folder made) before the work."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file path, e.g. {path / 'report.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: its folder {path.parent} cannot be made ({e.strerror}); "
                        f"give a path in a writable folder") from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path} cannot be written (permission denied); give a path in a writable folder")
    return path
