"""Failures a stage reports in one line, without a traceback: expected ones, such as a dead mirror or a bad input
file, whose message already says what went wrong and what to do. Anything else is a bug and keeps its traceback."""


class Failure(RuntimeError):
    """An expected failure with a one-line explanation (stage_main prints `nanochat stage X: error: <message>`)."""
