"""User-facing errors: one line, actionable, shown without a traceback by the CLI."""


class ReasonerError(Exception):
    """A problem with the user's input or environment that they can fix.

    The message is shown as a single line by the CLI, so it should name the bad value
    and say what to do instead.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
