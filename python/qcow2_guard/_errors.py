"""Exceptions of qcow2_guard: every library error, with its stable code and
the file offset it concerns."""

from __future__ import annotations

from typing import Any, Dict, List, Optional


class Qcow2GuardError(Exception):
    """An error from the qcow2-guard library.

    ``code`` is the stable snake_case identifier (listed in SECURITY.md),
    ``offset`` the byte offset in the image that the problem concerns,
    ``message`` the library's description.
    """

    #: Which input of a conversion the error concerns (``"image"``,
    #: ``"backing image"``, ``"data file"``), or ``None``.
    input: Optional[str] = None
    #: A refused conversion's error findings (:class:`qcow2_guard.Finding`).
    findings: List[Any] = []
    #: The metadata audit's report when it refused a conversion.
    report: Optional[Any] = None

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
    the caller did not hand in."""


class ImageReadError(Qcow2GuardError, OSError):
    """Reading the image (or a file handed in with it) failed."""


_KINDS = {
    "io": ImageReadError,
    "not_qcow2": NotQcow2Error,
    "refused": RefusedError,
    "corrupt": CorruptImageError,
}


def from_native(
    kind: str,
    code: str,
    offset: int,
    message: str,
    extra: Optional[Dict[str, Any]] = None,
) -> Qcow2GuardError:
    """The exception for a library error, by the library's classification
    (called by the native module)."""
    exc = _KINDS.get(kind, Qcow2GuardError)(code, offset, message)
    if extra:
        from ._api import Finding, Report

        exc.input = extra.get("input")
        exc.findings = [Finding(**f) for f in extra.get("findings", [])]
        if "report" in extra:
            exc.report = Report(extra["report"])
            exc.findings = exc.report.errors()
    return exc
