"""SIGTERM handled like Ctrl-C: a supervisor's `kill`, a container stop or a CI timeout stops a command through the
same clean-up path as KeyboardInterrupt."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt (signals reach the main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)
