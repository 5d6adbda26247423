"""The one exception type the CLI turns into a short message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


def warn(message: str) -> None:
    """One line on stderr for something the user can act on but that does not stop the command."""
    import sys

    print(f"sequnlearn: warning: {message}", file=sys.stderr)
