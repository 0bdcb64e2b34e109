"""Child processes of reproduce.py: each in its own session (a Ctrl-C in the terminal reaches only
reproduce.py, which forwards it exactly once, so a training run saves ``last.pt`` instead of
aborting), its output appended to a log file, epoch and error lines echoed with the row's prefix."""
import os
import signal
import subprocess
import threading
from collections import deque
from pathlib import Path

ECHOED = ("epoch ", "error:", "resuming", "stopped by", "nothing to do")


class Launcher:
    """Starts commands, remembers the running ones, and forwards stop signals to them."""

    def __init__(self, echo=print):
        self.echo = echo
        self._active = set()
        self._lock = threading.Lock()
        self._forwarded = []  # signals already forwarded: a child started late gets them too

    def run(self, command, env, log_path, prefix="", keep_fds=()):
        """Run ``command`` to the end; returns ``(exit code, its last output lines)``."""
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tail = deque(maxlen=40)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       errors="replace", start_new_session=True, pass_fds=tuple(keep_fds))
            with self._lock:
                self._active.add(process)
                late = list(self._forwarded)
            for signum in late:
                self._send(process, signum)
            try:
                for line in process.stdout:
                    log.write(line)
                    log.flush()
                    line = line.rstrip("\n")
                    tail.append(line)
                    if line.lstrip().startswith(ECHOED):
                        self.echo(f"{prefix} {line.strip()}")
                code = process.wait()
            finally:
                with self._lock:
                    self._active.discard(process)
        return code, list(tail)

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
    """The environment of a child: ours, plus ``CUDA_VISIBLE_DEVICES`` for its slot and the repository
    on ``PYTHONPATH`` (for ``python -m utils.reproduce.bn``)."""
    env = dict(os.environ)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p)
    return env


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
