"""User-facing errors: ``lit-cf`` prints their message and exits non-zero, without a traceback."""


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, output directory)."""
