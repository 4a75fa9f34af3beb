"""The one exception type for user mistakes: scripts print it on one line and exit with code 2."""


class UserError(ValueError):
    """Bad input from the user (a flag, a file, a config); never a bug in moejax."""


_PLAIN = {FileNotFoundError: "No such file or directory", PermissionError: "Permission denied",
          IsADirectoryError: "Is a directory", NotADirectoryError: "Not a directory"}


def os_reason(e: OSError, path: str = "?") -> str:
    """'PATH: reason' for an OSError, also for those raised with a message but no errno."""
    return f"{e.filename or path}: {e.strerror or _PLAIN.get(type(e)) or str(e) or type(e).__name__}"
