"""Errors that mean "the user gave us bad input": printed as one line, exit code 2."""


class SaltUsageError(Exception):
    """Bad input of any kind (paths, config values, a store that does not fit).

    The CLI wrapper prints ``str(err)`` on one line to stderr and exits with 2,
    never a traceback: the message must say what was wrong and what to do.
    """


EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
