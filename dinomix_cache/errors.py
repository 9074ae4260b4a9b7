"""Errors a user can fix.

The CLI prints a :class:`UserError` as one line (no traceback) and exits with code 2. Raise it
for bad input: missing or corrupt files, inconsistent stores, wrong settings. The message names
the file or setting at fault and says how to fix it. :func:`writing` turns the ``OSError`` of a
write (a read-only folder, a full disk) into one.
"""

from __future__ import annotations

import errno
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input the user can fix; the CLI prints the message on one line and exits 2."""

    exit_code = 2


class SettingsError(UserError, ValueError):
    """Settings that cannot work, refused when the settings dataclass is built (a ValueError too; the CLI
    prints it as one line, exit 2). The message names the CLI option."""


def check_choice(value: Any, choices: Collection[Any], option: str, what: str) -> None:
    """Refuse ``value`` unless it is one of ``choices`` (the values of a settings field's ``Literal``).

    Args:
        value: the setting.
        choices: its allowed values, in the order the message lists them.
        option: the CLI option that sets it (``--targets``), named in the message.
        what: what it is, in words (``targets``, ``teacher view``).

    Raises:
        SettingsError: ``unknown <what> '<value>' (<option>): use one of <choices>``.
    """
    if value not in choices:
        raise SettingsError(f"unknown {what} {value!r} ({option}): use one of {', '.join(map(str, choices))}")


_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}


def write_failed(path: Path | str, exc: OSError, what: str = "") -> UserError:
    """The one-line error for a failed write of ``path`` (the file the OS names, if it names one)."""
    named = exc.filename if isinstance(exc.filename, str | Path) and str(exc.filename) else None
    # The temporary file of an atomic write means nothing to the user: name its target.
    temporary = named is not None and Path(named).name.startswith(f".{Path(path).name}.")
    target = named if named is not None and not temporary else path
    reason = _REASONS.get(exc.errno or 0) or exc.strerror or str(exc) or type(exc).__name__
    label = f"{what} " if what else ""
    return UserError(f"cannot write {label}{target} ({reason}); choose a writable location with free space, "
                     "or free some, and rerun")


@contextmanager
def writing(path: Path | str, what: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into :func:`write_failed` for ``path``."""
    try:
        yield
    except OSError as exc:
        raise write_failed(path, exc, what) from None
