"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class AgrpoError(ValueError):
    """A mistake in the input (config, data, model, arguments): the message says what and how to fix it."""
