"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class QpeftError(Exception):
    """A problem with what the user asked for (bad input, missing file, bad config)."""
