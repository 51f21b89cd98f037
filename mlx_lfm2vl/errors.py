"""The exception type for errors a user can cause and fix (a subclass where a caller answers one
kind differently, still caught as `Lfm2VlError`)."""


class Lfm2VlError(Exception):
    """A user-facing error: bad input, a missing file, a wrong model folder, an unknown option.

    Its message says what went wrong and how to fix it. The command line prints it as one line on
    stderr; apps catch this type to tell user mistakes from bugs.
    """


class ContextLengthError(Lfm2VlError):
    """A prompt that does not fit the model's context (a server answers it with its own code)."""
