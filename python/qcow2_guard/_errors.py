"""Exceptions of qcow2_guard: every library error, with its stable code and
the file offset it concerns."""

from __future__ import annotations

from typing import Optional


class Qcow2GuardError(Exception):
    """An error from the qcow2-guard library.

    ``code`` is the stable snake_case identifier (listed in SECURITY.md),
    ``offset`` the byte offset in the image that the problem concerns,
    ``message`` the library's description.
    """

    def __init__(self, code: str, offset: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.offset = offset
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} [{self.code}] at offset {self.offset:#x}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, offset={self.offset}, "
            f"message={self.message!r})"
        )


class NotQcow2Error(Qcow2GuardError):
    """The data is not a qcow2 image (wrong magic, too short)."""


class CorruptImageError(Qcow2GuardError):
    """The image is malformed or corrupt."""


class RefusedError(Qcow2GuardError):
    """The image is well formed as far as it was read, but refused: over
    the caller's limits, refused by the safety policy, or needing a file
    the caller did not hand in.

    ``report`` is the check report that refused it, when there is one (a
    refused conversion).
    """

    def __init__(
        self, code: str, offset: int, message: str, report: Optional[object] = None
    ) -> None:
        super().__init__(code, offset, message)
        self.report = report


class ImageReadError(Qcow2GuardError, OSError):
    """Reading the image (or a file handed in with it) failed."""


_KINDS = {
    "io": ImageReadError,
    "not_qcow2": NotQcow2Error,
    "refused": RefusedError,
    "corrupt": CorruptImageError,
}


def from_native(kind: str, code: str, offset: int, message: str) -> Qcow2GuardError:
    """The exception for a library error, by the library's classification
    (called by the native module)."""
    return _KINDS.get(kind, Qcow2GuardError)(code, offset, message)
