"""Exceptions the launcher turns into one-line messages instead of tracebacks."""


class UserError(Exception):
    """Bad input (flags, paths, data, checkpoints). The CLI prints `error: <message>` and exits 2."""


class Diverged(Exception):
    """A non-finite loss stopped training; the run is recorded with status `diverged`."""
