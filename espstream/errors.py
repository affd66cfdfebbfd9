"""The errors a user can meet, and the exit status each one maps to.

`UserError` is anything the user can fix (bad file, bad option, unsupported graph): exit 2.
`CheckFailed` is a numerical comparison that did not hold: exit 1.
"""

from __future__ import annotations


class EspstreamError(Exception):
    """Base of the errors the CLI turns into one line on stderr."""

    exit_code = 2


class UserError(EspstreamError):
    """Bad input or an unsupported model: the message says what is wrong and how to fix it."""

    exit_code = 2


class CheckFailed(EspstreamError):
    """A numerical check (optimize's equivalence, verify) exceeded its tolerance."""

    exit_code = 1


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (libraries' errors run to many lines), or
    `default`, or the exception's type name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else (default or type(e).__name__)
