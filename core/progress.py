"""Progress of long work, in the form the place it runs in can show.

On a terminal: a tqdm bar with rate and ETA. Anywhere else (CI, nohup, a pipe): a plain line every few seconds and
one at the end, instead of a redrawn bar. For `--json` runs: JSON lines on stderr (stdout keeps the one JSON
document). The command line picks the form once (configure); a stage asks for a bar and never knows which it got.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable

_MODE = {"form": "auto", "every": 10.0}
FORMS = ("auto", "bar", "lines", "json", "off")


def configure(form: str = "auto", every: float | None = None) -> None:
    """form: auto (a bar on a terminal, lines elsewhere), bar, lines, json or off; every: seconds between lines."""
    if form not in FORMS:
        raise ValueError(f"progress form {form!r}: one of {', '.join(FORMS)}")
    _MODE["form"] = form
    if every is not None:
        _MODE["every"] = float(every)


def form() -> str:
    if _MODE["form"] != "auto":
        return _MODE["form"]
    return "bar" if sys.stderr.isatty() else "lines"


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str, initial: int = 0,
        enabled: bool = True):  # fmt: skip
    """A progress display over `total` units (or over `iterable`): update(n), set_postfix(...), close(), a context
    manager, iterable when given one. Disabled (enabled=False, or form off) it shows nothing."""
    from tqdm import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    kind = form() if enabled else "off"
    if kind in ("bar", "off"):
        return tqdm(
            iterable, total=total, initial=initial, desc=desc, unit=unit, disable=kind == "off", mininterval=0.5
        )
    return LineProgress(iterable, total, desc, unit, initial, as_json=kind == "json", every=_MODE["every"])


class LineProgress:
    """Progress as whole lines on stderr: the first update, then one every `every` seconds, and the last."""

    def __init__(self, iterable, total, desc, unit, initial=0, as_json=False, every=10.0):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.initial, self.as_json, self.every = initial, initial, as_json, every
        self.postfix: dict[str, str] = {}
        self.started = time.monotonic()
        self.last_shown: float | None = None
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.last_shown is None or now - self.last_shown >= self.every:
            self._show(now, "progress")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n > self.initial or self.last_shown is not None:
            self._show(time.monotonic(), "done")

    def figures(self, now: float) -> dict:
        elapsed = now - self.started
        done_here = self.n - self.initial
        rate = done_here / elapsed if elapsed > 0 and done_here else None
        left = None if rate is None or self.total is None else max(self.total - self.n, 0) / rate
        return {"done": self.n, "total": self.total, "elapsed_s": round(elapsed, 2), "rate": rate, "eta_s": left}

    def _show(self, now: float, event: str) -> None:
        self.last_shown = now
        f = self.figures(now)
        if self.as_json:
            rate, eta = f["rate"], f["eta_s"]
            doc = {"event": event, "task": self.desc, "unit": self.unit, **f}
            if self.postfix:
                doc["postfix"] = self.postfix
            doc.update(rate=None if rate is None else round(rate, 4), eta_s=None if eta is None else round(eta, 1))
            line = json.dumps(doc)
        else:
            count = f"{f['done']}/{f['total']}" if f["total"] is not None else str(f["done"])
            pct = f" ({100 * f['done'] / f['total']:.0f}%)" if f["total"] else ""
            rate = f", {f['rate']:.3g} {self.unit}/s" if f["rate"] else ""
            tail = f", {f['elapsed_s']:.1f} s" if event == "done" else _eta(f["eta_s"])
            extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
            line = f"{self.desc}: {count} {self.unit}{pct}{rate}{tail}{extra}"
        print(line, file=sys.stderr, flush=True)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(round(seconds)), 60)
    return f", ETA {m // 60:d}:{m % 60:02d}:{s:02d}" if m >= 60 else f", ETA {m:d}:{s:02d}"
