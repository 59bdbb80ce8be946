"""Errors a user can fix: bad settings, missing inputs, unusable data.

Every such error is a :class:`UserError`. A stage script (:func:`dfpipe.harness.run`) and the ``dfpipe``
CLI show it as one line naming the file or key and the fix, exit code 2, no traceback. Anything else
is a bug and keeps its traceback. Each class also subclasses the builtin that callers used to catch
(``ValueError``, ``KeyError``, ``FileNotFoundError``), so ``except ValueError`` still works.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration: the message names the file or key and says the fix."""

    def __str__(self) -> str:  # the plain message, also for the KeyError subclass (no repr quotes)
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(UserError, ValueError):
    """A setting (a params.yaml key or value, a CLI option) that cannot be used."""


class UnknownNameError(ConfigError, KeyError):
    """A name that is not in its registry or table (an expert, a method...)."""


class InputError(UserError, FileNotFoundError):
    """An input file or folder that does not exist (often: an earlier stage has not run)."""


class DataError(UserError, ValueError):
    """Input data that exists but cannot be used (no rows, one class only, stale outputs...)."""


def did_you_mean(word: object, choices, template: str = " (did you mean {}?)") -> str:
    """``template`` filled with the closest of ``choices`` to ``word`` (difflib), or "" if none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return template.format(repr(close[0])) if close else ""
