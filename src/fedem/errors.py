"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits with status 2; anything else is a bug and keeps
its traceback. Library code raises `UserError` at the boundary where it checks what the user gave it
(a path, a language code, a config key), with a message that names the thing to fix.
"""


class UserError(Exception):
    """A mistake in the user's input: a missing file, a bad flag, an incompatible adapter."""
