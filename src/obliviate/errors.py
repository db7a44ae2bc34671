"""The one exception type users see: a single line naming the problem and the fix."""


class ObliviateError(Exception):
    """Bad input or an unusable model. The CLI prints the message on one line, exits 2."""
