"""SIGINT / SIGTERM during training: finish the current step, save, say how to resume, exit 128 + the signal.

`StopSignals` turns the first SIGINT or SIGTERM into a request (`.signum`) that the loop reads after each step; the
step in flight completes, so the checkpoint written then is a consistent state and `--resume` continues the exact
trajectory. A second SIGINT while the request is pending raises KeyboardInterrupt (the user really wants out; the
last periodic checkpoint is still intact). Handlers can only be installed from the main thread; elsewhere (a training
loop run in a thread) the signals keep their previous behaviour.
"""

from __future__ import annotations

import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + (self.signum or 0))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_CODES:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def ignore_in_workers(worker_id: int) -> None:
    """DataLoader worker_init_fn: a Ctrl-C reaches the whole process group; the workers leave it to the trainer,
    which stops them once the current step is saved."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
