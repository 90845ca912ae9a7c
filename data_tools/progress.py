"""Progress of a long data job: a tqdm bar on a terminal, plain periodic lines in a log file.

Both show input MB/s, documents/s, tokens/s and the ETA (from input bytes still to do).
"""
from __future__ import annotations

import sys
import time


class Progress:
    """update(bytes, docs, tokens) as work completes; close() prints the last line."""

    def __init__(self, what: str, total_bytes: int, units: int, enabled: bool | None = None,
                 log_every: float = 30.0, stream=None):
        self.what, self.total, self.units = what, max(int(total_bytes), 1), units
        self.stream = stream or sys.stderr
        self.done_bytes = self.docs = self.tokens = self.done_units = 0
        self.t0 = self.last = time.perf_counter()
        self.log_every = log_every
        self.bar = None
        self.mode = "off" if enabled is False else "log"
        if enabled is None and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.mode = "bar"
            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, file=self.stream,
                            desc=f"{what} {units} unit(s)", dynamic_ncols=True)

    def _rates(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"docs/s": self.docs / dt, "MB/s": self.done_bytes / dt / 1e6,
                "tokens/s": self.tokens / dt, "elapsed": dt}

    def line(self) -> str:
        from tqdm import tqdm

        r = self._rates()
        left = self.total - self.done_bytes
        eta = left / (self.done_bytes / r["elapsed"]) if self.done_bytes else float("nan")
        eta_s = tqdm.format_interval(eta) if eta == eta else "?"
        return (f"{self.what}: {self.done_units}/{self.units} units, "
                f"{self.done_bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
                f"({100 * self.done_bytes / self.total:.1f}%), {r['docs/s']:,.0f} docs/s, "
                f"{r['MB/s']:,.2f} MB/s, {r['tokens/s']:,.0f} tokens/s, "
                f"elapsed {tqdm.format_interval(r['elapsed'])}, ETA {eta_s}")

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.done_bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        self.done_units += 1
        if self.mode == "bar":
            r = self._rates()
            self.bar.set_postfix({"docs/s": f"{r['docs/s']:,.0f}",
                                  "tok/s": f"{r['tokens/s']:,.0f}"}, refresh=False)
            self.bar.update(nbytes)
        elif self.mode == "log" and time.perf_counter() - self.last >= self.log_every:
            self.last = time.perf_counter()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.mode == "bar":
            self.bar.close()
        elif self.mode == "log":
            print(self.line(), file=self.stream, flush=True)
