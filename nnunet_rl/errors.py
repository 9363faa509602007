"""The one exception type our tools raise for bad input; the CLI prints it without a traceback."""


class NnunetRLError(Exception):
    """A user-facing error: the message names the files, values or commands involved."""
