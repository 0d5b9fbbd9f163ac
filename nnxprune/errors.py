"""User-facing errors.

`UserError` marks bad input (unknown model card, missing file, wrong architecture, bad option):
the CLI prints its message on one line and exits with status 2, before any work starts and
without writing output. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""
