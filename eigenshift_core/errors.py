"""Errors that mean "the input is wrong", as opposed to a bug.

Front ends (CLI, workers, API) turn an `InputError` into one clear line (exit code 2, HTTP 4xx);
anything else is a defect and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InputError(ValueError):
    """A user-supplied value is invalid; `field` names it when one field is to blame."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def unknown_name(kind: str, name: str, known: Iterable[str], *, field: str | None = None) -> InputError:
    """An `InputError` for an unknown registry name that lists the known ones and the nearest match."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}", field=field or kind)
