"""The one exception type for mistakes a user can fix (bad config, data, files).

The CLI turns a `UserError` into a single `error: ...` line and exit status 2, with no
traceback. Its message says what is wrong, where (key, file, line) and what to do.
Internal bugs raise ordinary exceptions and keep their tracebacks.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""
