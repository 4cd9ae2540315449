"""Progress for long work that suits where it is read: a tqdm bar on a terminal, and in a log file
(batch jobs, nohup, SLURM) one plain line every MMDX_PROGRESS_SECONDS (default 30) instead of
thousands of carriage-return frames. `--quiet` turns both off; `-v` adds debug logging."""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("mmdx")


def interactive() -> bool:
    return sys.stderr.isatty()


class _LogLines:
    """The part of tqdm's interface mmdx uses, written as periodic log lines."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", every=None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.every = float(os.environ.get("MMDX_PROGRESS_SECONDS", "30")) if every is None else every
        self.n, self.t0 = 0, time.perf_counter()
        self._last, self._said = self.t0, 0  # when the last line was written, and the count it gave
        self._postfix = ""
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self._said = self.n
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(now - self.t0, 1e-9)
        log.info("%s: %d%s %s (%.1f %s/s)%s", self.desc, self.n, of, self.unit, rate, self.unit,
                    f" {self._postfix}" if self._postfix else "")

    def set_postfix(self, **kw) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        """The final count, for a run long enough to have lines at all, unless the last line gave it
        already: the last update of a run used to be written twice, once by update and once here."""
        if self.n != self._said and time.perf_counter() - self.t0 >= self.every:
            self._line(time.perf_counter())

    @staticmethod
    def write(msg: str) -> None:
        log.info("%s", msg)


class _Off(_LogLines):
    def update(self, k: int = 1) -> None:
        self.n += k

    def close(self) -> None:
        pass

    @staticmethod
    def write(msg: str) -> None:
        pass


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True):
    """tqdm on a terminal, periodic log lines elsewhere, nothing when not enabled."""
    if not enabled:
        return _Off(iterable, total, desc, unit)
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    return _LogLines(iterable, total, desc, unit)


def say(msg: str, enabled: bool = True) -> None:
    """A line between bars (an epoch summary): tqdm.write on a terminal, a log line elsewhere."""
    if not enabled:
        return
    if interactive():
        from tqdm.auto import tqdm

        tqdm.write(msg)
    else:
        log.info("%s", msg)
