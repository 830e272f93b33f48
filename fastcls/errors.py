"""The one exception type a user sees: a clear message, no traceback."""

__all__ = ["FastclsError", "suggest"]

import difflib


class FastclsError(Exception):
    """An error the user can act on; the CLI prints its message and exits with status 2."""


def suggest(name: str, choices) -> str:
    """' Did you mean: a, b?' for the closest of `choices`, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
