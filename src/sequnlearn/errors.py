"""The one exception type the CLI turns into a short message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
