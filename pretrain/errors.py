"""The error users can fix: raised anywhere, printed by the programs as one line without a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad input, config, data or checkpoint); the message says what to do."""
