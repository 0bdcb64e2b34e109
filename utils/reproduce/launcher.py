"""Child processes of reproduce.py: each in its own session (a Ctrl-C in the terminal reaches only
reproduce.py, which forwards it exactly once, so a training run saves ``last.pt`` instead of
aborting), its output written straight into a log file (never a pipe: a child outlives a killed
reproduce.py and still finishes its step), that file followed for epoch and error lines, echoed
with the row's prefix."""
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

ECHOED = ("epoch ", "error:", "resuming", "stopped by", "nothing to do")
POLL_SECONDS = 0.2


class Launcher:
    """Starts commands, remembers the running ones, and forwards stop signals to them."""

    def __init__(self, echo=print, poll=POLL_SECONDS):
        self.echo = echo
        self.poll = poll
        self._active = set()
        self._lock = threading.Lock()
        self._forwarded = []  # signals already forwarded: a child started late gets them too

    def run(self, command, env, log_path, prefix="", keep_fds=()):
        """Run ``command`` to the end, its stdout and stderr appended to ``log_path``; returns
        ``(exit code, its last output lines)``."""
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            start = log.tell()
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, pass_fds=tuple(keep_fds))
        with self._lock:
            self._active.add(process)
            late = list(self._forwarded)
        for signum in late:
            self._send(process, signum)
        try:
            tail = self._follow(process, log_path, start, prefix)
        finally:
            with self._lock:
                self._active.discard(process)
        return process.returncode, tail

    def _follow(self, process, log_path, start, prefix):
        """Read what the child appends to its log until it exits; echo the lines worth showing."""
        tail, pending = deque(maxlen=40), b""
        with open(log_path, "rb") as log:
            log.seek(start)
            while True:
                finished = process.poll() is not None
                pending += log.read()
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._line(raw.decode("utf-8", errors="replace"), tail, prefix)
                if finished:
                    break
                time.sleep(self.poll)
        if pending:
            self._line(pending.decode("utf-8", errors="replace"), tail, prefix)
        return list(tail)

    def _line(self, line, tail, prefix):
        line = line.rstrip("\r")
        tail.append(line)
        if line.lstrip().startswith(ECHOED):
            self.echo(f"{prefix} {line.strip()}")

    def forward(self, signum):
        """Send ``signum`` to every running child (and to any child started from now on)."""
        with self._lock:
            self._forwarded.append(signum)
            active = list(self._active)
        for process in active:
            self._send(process, signum)

    @staticmethod
    def _send(process, signum):
        try:
            os.kill(process.pid, signum)  # the child itself: torchrun forwards to its workers
        except ProcessLookupError:
            pass


def child_environment(slot, extra_path):
    """The environment of a child: ours, plus ``CUDA_VISIBLE_DEVICES`` for its slot, the repository
    on ``PYTHONPATH`` (for ``python -m utils.reproduce.bn``) and unbuffered output (its log shows
    each line as it is printed)."""
    env = dict(os.environ)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
