"""The one exception type for mistakes a user can fix (bad paths, values, files)."""


class HsaeError(Exception):
    """A user-facing error: the message names the bad input and how to fix it.

    Entry points print it on one line and exit with status 2, without a traceback.
    """
