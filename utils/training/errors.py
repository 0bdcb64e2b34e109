"""The training errors the command line turns into one sentence (and an exit code)."""


class ConfigError(ValueError):
    """Options that do not make sense together; the message says what to change."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; nothing was saved over the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the message says which checkpoint holds the work and how to resume."""
