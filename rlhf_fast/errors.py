"""The one exception type for bad user input (config, paths, data, reward specs).

The CLI prints it as a single ``error: ...`` line and exits with status 2; anything else is a bug and keeps
its traceback. It subclasses ValueError so library callers can catch it the usual way.
"""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and how to fix it."""
