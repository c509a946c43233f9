"""Errors that mean "the user gave us bad input": printed as one line, exit code 2."""


class SaltUsageError(Exception):
    """Bad input of any kind (paths, config values, a store that does not fit).

    The CLI wrapper prints ``str(err)`` on one line to stderr and exits with 2,
    never a traceback: the message must say what was wrong and what to do.
    """


EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def one_line(what: BaseException | str, limit: int | None = 300) -> str:
    """An exception as ``Type: message``, or a text, on one line (every run of white space, newlines
    too, as one space), cut to ``limit`` characters with ``...`` (torch's load errors span many lines)."""
    text = f"{type(what).__name__}: {what}" if isinstance(what, BaseException) else what
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message on one line, or its type's name when it has none."""
    text = str(exc).strip()
    return one_line(text.splitlines()[0], None) if text else type(exc).__name__
