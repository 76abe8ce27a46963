"""User-facing errors."""


class MedSeqFTError(Exception):
    """Bad input or state. The message names the problem and the fix; the CLI prints it without a traceback.

    ``resumable``: re-running the same command can get past it (an interrupted or crashed child process), as
    opposed to a setting, a dataset or a file that has to be fixed first."""

    def __init__(self, message: str = "", resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable
