"""UserError: the user's input is wrong (exit code 2); RunFailed: a run stopped for a named reason (exit 1).
Neither prints a traceback."""


class UserError(Exception):
    """Bad arguments, config or input files. The message names the key or file and what is wrong."""


class RunFailed(RuntimeError):
    """A run that stopped for a reason it names (a diverged loss, every actor lost): the command prints
    the message and exits 1 without a traceback, which would only point at the line that raised this."""


def short_error(err: BaseException) -> str:
    """`Type: first line` of an exception (its cause, for Ray's wrapped task errors), for one-line reports."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:500] if lines else ''}"
