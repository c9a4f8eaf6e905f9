"""The one exception type the CLI turns into a one-line message and an exit code (never a traceback)."""

EXIT_FAILURE = 1  # the daemon or a command failed at run time
EXIT_USAGE = 2  # bad input: flags, config, addresses, key files, unreachable bootstrap peers


class NodeError(Exception):
    """An expected failure: ``str(e)`` is the whole message shown to the user."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code
