"""The project's own error family.

Why one family: the command line prints an error that comes from the user's *input* (a
config field, a data path, a batch size that does not divide, a missing checkpoint) as one
line, and lets every other exception (a bug, a library failure) keep its full traceback.
Library code raises a subclass of `InputError` for the first kind and nothing else is
caught. `InputError` is also a `ValueError`, so callers that catch `ValueError` keep working.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input from the user: the message says what is wrong and what to change."""
