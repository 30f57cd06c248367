"""Progress of long loops (encoding, training, downloads, drawing scenes), fit for where
it is read.

On a terminal: a tqdm bar that redraws itself in place. In a log (stderr is not a
terminal, as in ``make demo > log``), a redrawn bar would write hundreds of carriage
returns into one line, so instead a short line is written each time another 10% is
done or 30 s have passed since the last line, and one at the end.
"""
from __future__ import annotations

import sys
import time


def progress_bar(total=None, initial=0, desc="", unit="it", enabled=True, leave=True, file=None, **tqdm_options):
    """A bar with tqdm's ``update(n)``, ``set_postfix_str(s)``, ``reset(total)`` and
    ``close()``: tqdm on a terminal, ``LogProgress`` elsewhere, silent when not
    ``enabled``. ``tqdm_options`` (``smoothing``, ``unit_scale``, ...) go to tqdm only."""
    file = sys.stderr if file is None else file
    if enabled and _is_terminal(file):
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=file,
                        **tqdm_options)
        except ImportError:
            pass
    return LogProgress(total, initial, desc, unit, file=file, enabled=enabled)


def progress_iter(iterable, desc="", unit="it", enabled=True, total=None, **options):
    """Yield from ``iterable`` while a ``progress_bar`` counts the items."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = progress_bar(total=total, desc=desc, unit=unit, enabled=enabled, **options)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _is_terminal(file):
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LogProgress:
    """Progress as short lines: ``desc: n/total unit (p%), elapsed, rate[, postfix]``,
    written at every further 10% of ``total`` (or, without a total, only by time), when
    ``seconds`` have passed since the last line, and at ``close`` (the end, or where
    it stopped; nothing when nothing was done)."""

    def __init__(self, total=None, initial=0, desc="", unit="it", file=None, enabled=True,
                 step=0.1, seconds=30.0, clock=time.monotonic):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file = sys.stderr if file is None else file
        self.enabled, self.step, self.seconds, self.clock = enabled, step, seconds, clock
        self.postfix = ""
        self.start = self.last = clock()
        self.start_n = initial
        self.mark = self._mark()
        self.closed = False

    def _mark(self):
        """How many steps of 10% are done."""
        return int(self.n / self.total / self.step + 1e-9) if self.total else 0

    def update(self, n=1):
        self.n += n
        if self.total and self.n >= self.total:
            return  # the end has its own line, at close
        mark, now = self._mark(), self.clock()
        if mark > self.mark or now - self.last >= self.seconds:
            self.mark = max(mark, self.mark)
            self._write(now)

    def set_postfix_str(self, s="", refresh=False):
        self.postfix = s

    def reset(self, total=None):
        self.total, self.n, self.start_n = total, 0, 0
        self.start = self.last = self.clock()
        self.mark = 0

    def close(self):
        """The last line, where there was any progress to tell of."""
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._write(self.clock())

    def _write(self, now):
        self.last = now
        if not self.enabled:
            return
        elapsed = now - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        postfix = f", {self.postfix}" if self.postfix else ""
        head = f"{self.desc}: " if self.desc else ""
        print(f"{head}{done} {self.unit}{pct}, {elapsed:.0f} s, {rate:,.1f} {self.unit}/s{postfix}",
              file=self.file, flush=True)
