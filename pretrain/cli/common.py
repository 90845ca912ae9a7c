"""What every program shares: user errors become one `error:` line and exit status 2."""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from ..config import ConfigError
from ..distributed import shutdown
from ..errors import UserError


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run `main`, turning user errors into one line on stderr and exit status 2."""
    try:
        code = main(argv) or 0
        shutdown()
        return code
    except (ConfigError, UserError, FileNotFoundError, FileExistsError, ValueError) as e:
        if isinstance(e, ValueError) and not isinstance(e, ConfigError) and os.environ.get("RRWKV_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
