"""The one exception type the CLI turns into a one-line error and exit code 2."""


class RagtopError(Exception):
    """A user-facing problem (bad input, missing file, ...). The message names it."""
