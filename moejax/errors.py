"""The one exception type for user mistakes: scripts print it on one line and exit with code 2."""


class UserError(ValueError):
    """Bad input from the user (a flag, a file, a config); never a bug in moejax."""
