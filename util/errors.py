"""The CLI edge. Library modules raise ordinary exceptions (ValueError, FileNotFoundError, ...) with plain
messages; the entry points turn those a user can cause into one line `error: <problem> (<what to do>)`."""
from contextlib import contextmanager


class UserError(Exception):
    """A mistake in the user's inputs, worded for the command line: '<problem> (<what to do>)'."""


@contextmanager
def user_errors(remedies):
    """At an entry point's call into a library: an exception of a type in `remedies` ({type: what to do}, the
    first matching type wins) becomes UserError('<its message> (<what to do>)')."""
    try:
        yield
    except UserError:
        raise
    except tuple(remedies) as err:
        remedy = next(text for kind, text in remedies.items() if isinstance(err, kind))
        message = " ".join(str(err.args[-1] if isinstance(err, OSError) and err.args else err).split())
        raise UserError(f"{message} ({remedy})") from None
