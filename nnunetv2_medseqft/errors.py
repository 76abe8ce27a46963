"""User-facing errors."""


class MedSeqFTError(Exception):
    """Bad input or state. The message names the problem and the fix; the CLI prints it without a traceback."""
