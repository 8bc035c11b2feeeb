"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class AgrpoError(ValueError):
    """A mistake in the input (config, data, model, arguments): the message says what and how to fix it."""


def say(line: str) -> None:
    """One line on stderr, from the first process only (also before accelerate knows the ranks):
    what the user should read once, not once per process, and without a Python source line."""
    import os
    import sys

    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
