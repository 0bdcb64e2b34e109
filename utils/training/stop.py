"""Ctrl-C / SIGTERM during training: a flag set by the signal handler, checked at batch
boundaries, and agreed on by every rank so that all stop after the same batch."""
import signal
import sys
import threading
from contextlib import contextmanager

import torch

from utils import distributed


class StopControl:
    """Turns SIGINT / SIGTERM into :attr:`reason` (None until a stop was asked for)."""

    def __init__(self, context: distributed.Context = distributed.SINGLE):
        self.context = context
        self.reason = None
        self._poll = distributed.StopPoll(context)

    @contextmanager
    def handling_signals(self):
        """Install the handlers for the duration (main thread only); a second signal aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, _frame):
            if self.reason:  # second request: give up at once, without saving
                raise KeyboardInterrupt
            self.reason = signal.Signals(signum).name
            sys.stderr.write(f"\n{self.reason}: stopping after this batch "
                             f"(send it again to abort at once)\n")

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def poll(self):
        """Per batch, without stalling the device: whether any rank asked to stop (one batch late
        in distributed runs, the same answer on every rank)."""
        stop = self._poll(self.reason)
        if stop and not self.reason:
            self.reason = "a stop request on another rank"
        return stop

    def agreed(self, device):
        """At an epoch end: whether any rank was asked to stop (a blocking collective)."""
        if not self.context.enabled:
            return bool(self.reason)
        flag = torch.tensor([float(bool(self.reason))], device=device)
        if distributed.all_reduce_sum(self.context, flag).item() > 0:
            self.reason = self.reason or "a stop request on another rank"
        return bool(self.reason)

    def finish(self):
        """Wait for the last poll (before the process group goes away)."""
        self._poll.finish()
