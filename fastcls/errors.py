"""The one exception type a user sees: a clear message, no traceback."""

__all__ = ["FastclsError", "RunInterrupted", "suggest"]

import difflib


class FastclsError(Exception):
    """An error the user can act on; the CLI prints its message and exits with status 2."""


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM; the run is stored as 'interrupted' and can be resumed.

    A KeyboardInterrupt, so whatever stops on Ctrl-C (a sweep, a notebook cell) still stops; the CLI prints its
    message (how to resume) and exits with status 130, as shells report a process stopped by Ctrl-C.
    """

    exit_code = 130

    def __init__(self, message: str, run_id: str):
        super().__init__(message)
        self.run_id = run_id


def suggest(name: str, choices) -> str:
    """' Did you mean: a, b?' for the closest of `choices`, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
