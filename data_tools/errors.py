"""The error type for problems a user can fix (bad input, wrong tokenizer, damaged manifest)."""


class DataError(ValueError):
    """A user-fixable data problem; its message is one sentence naming the file and what to do.

    Missing files are raised as the builtin FileNotFoundError (with the same kind of message);
    the CLI prints either (and a PermissionError) as one line instead of a traceback.
    """
