"""The one exception type for problems a user can fix."""


class HingeError(Exception):
    """A user-fixable problem: says what was wrong and what to do about it.

    The CLI prints it as a single line and exits with status 2, so the message
    must stand on its own without a traceback.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(". ")
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem
