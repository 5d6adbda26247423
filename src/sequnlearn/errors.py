"""The one exception type the CLI turns into a short message and exit code 2 (and its kinds)."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class NonFiniteModel(UserError):
    """A model whose weights or logits hold NaN or infinity: broken, so never scored nor saved as a result."""


def warn(message: str) -> None:
    """One line on stderr for something the user can act on but that does not stop the command."""
    import sys

    print(f"sequnlearn: warning: {message}", file=sys.stderr)
