"""User-facing errors.

`UserError` marks bad input (unknown model card, missing file, wrong architecture, bad option):
the CLI prints its message on one line and exits with status 2, before any work starts and
without writing output. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""


def nearest(name: str, options, what: str) -> str:
    """`unknown {what} 'name'; did you mean ...? known: ...`: the message for a misspelt name."""
    import difflib

    near = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown {what} {name!r}; {hint}known: {', '.join(sorted(options))}"
