"""The one exception type that means "the user's input is wrong" (exit code 2, no traceback)."""


class UserError(Exception):
    """Bad arguments, config or input files. The message names the key or file and what is wrong."""
