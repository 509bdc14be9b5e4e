"""Progress of long harness work: a tqdm bar on a terminal, a plain line every few seconds in a log file.

tqdm redraws one line with carriage returns, which a log file (nohup, CI) shows as nothing until the end;
off a terminal `Progress` prints `desc: done/total unit (pct, elapsed, note)` at most every `interval` s.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts `done` of `total` units; `note` (e.g. the images written, the best FD) rides along."""

    def __init__(self, total: int, desc: str, unit: str = "step", interval: float = 5.0,
                 stream: TextIO | None = None) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}.")
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.note = 0, ""
        self.start = self.last = time.monotonic()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.set(self.done + n, note)

    def set(self, done: int, note: str | None = None) -> None:
        """Move to `done` units (capped at `total`); print when due."""
        done = min(done, self.total)
        if note is not None:
            self.note = note
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
        moved, self.done = done != self.done, done
        now = time.monotonic()
        if self.bar is None and moved and (now - self.last >= self.interval or done == self.total):
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        pct = 100 * self.done / self.total if self.total else 100.0
        note = f", {self.note}" if self.note else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%, {now - self.start:.0f} s{note})",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
