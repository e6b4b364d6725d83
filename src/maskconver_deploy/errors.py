"""The three errors the command line knows how to report.

`UserError` is bad input (a file, an option, a missing backend): exit code 2, one line, no traceback.
`CheckFailed` is a check that ran and did not pass (parity, a PQ floor): exit code 1.
`ArtifactMissing` and `BackendUnavailable` mean "not built here" / "cannot run here": with "all" candidates they are
skips; every other error of an artifact (it cannot be loaded, is stale, raises while running) is its failure.
"""

from __future__ import annotations

from pathlib import Path


class MaskconverError(Exception):
    """Base class; `exit_code` is what the command line exits with."""

    exit_code = 1


class UserError(MaskconverError):
    """Bad input. The message names the file or option and the problem, on one line."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        text = f"{path}: {message}" if path is not None else message
        super().__init__(" ".join(str(text).split()))


class CheckFailed(MaskconverError):
    """A check ran and failed; the message is a short summary."""

    exit_code = 1


class ArtifactMissing(UserError):
    """An artifact that has not been built in this model folder (the message names the command that builds it).

    With "all" candidates this is "not built here": a skip, not a failure. An artifact that exists but cannot be
    loaded, or was built from another export (`ArtifactStale`), is a failure of that candidate."""


class ArtifactStale(UserError):
    """An artifact whose build record names another export of its source graph: rebuild it with --force."""


class BackendUnavailable(UserError):
    """A backend that cannot run on this machine: why, and how to get it."""

    def __init__(self, backend: str, reason: str, hint: str = "") -> None:
        self.backend = backend
        self.reason = reason
        self.hint = hint
        message = f"backend '{backend}' is unavailable: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)
