"""The project's own error family.

Why one family: the command line prints an error that comes from the user's *input* (a
config field, a data path, a batch size that does not divide, a missing checkpoint) as one
line, and lets every other exception (a bug, a library failure) keep its full traceback.
Library code raises a subclass of `InputError` for the first kind and nothing else is
caught. `InputError` is also a `ValueError`, so callers that catch `ValueError` keep working.
"""

from __future__ import annotations

__all__ = ["InputError", "NonFiniteError"]


class InputError(ValueError):
    """Bad input from the user: the message says what is wrong and what to change."""


class NonFiniteError(InputError):
    """A training or validation loss, or the trained weights, went NaN/inf: the run stops
    with one line naming the step and the last good checkpoint, and exports no model.

    An `InputError` because the cause is the run's settings or data (a learning rate too high,
    a corrupt input), not a bug: the traceback would say nothing more.
    """
