"""The one exception root of edgehook, so callers can catch ours apart from bugs."""


class EdgehookError(Exception):
    """Base of every error edgehook raises on purpose."""


class ConfigError(EdgehookError, ValueError):
    """The configuration is wrong; carries every problem found, each with FILE:LINE:COL."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CommandError(EdgehookError, ValueError):
    """A command (output set, simulate, publish) was refused; the message says why."""


class NoGpioError(EdgehookError, RuntimeError):
    """No GPIO pin factory could be loaded on this machine."""
