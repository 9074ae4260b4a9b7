"""Errors a user can fix.

The CLI prints a :class:`UserError` as one line (no traceback) and exits with code 2. Raise it
for bad input: missing or corrupt files, inconsistent stores, wrong settings. The message names
the file or setting at fault and says how to fix it.
"""


class UserError(Exception):
    """Bad input the user can fix; the CLI prints the message on one line and exits 2."""

    exit_code = 2
