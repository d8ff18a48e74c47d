"""qcow2_guard: check, inspect and convert untrusted qcow2 images without
QEMU.

Everything is done by the qcow2-guard Rust library (through the private
native module ``qcow2_guard._native``); this package holds no format logic.

- :func:`check` audits an image completely and returns a :class:`Report`
  (the content of ``qcow2-guard check --json``);
- :func:`info` returns what ``qemu-img info --output=json`` shows;
- :mod:`qcow2_guard.format_inspector` is a drop-in for oslo.utils'
  ``format_inspector`` for qcow2 (``QcowInspector``, ``InspectWrapper``).

Errors are :class:`Qcow2GuardError` subclasses with ``code`` and ``offset``.
"""

from ._api import Finding, Report, Verdict, check, info
from ._errors import (
    CorruptImageError,
    ImageReadError,
    NotQcow2Error,
    Qcow2GuardError,
    RefusedError,
)

__all__ = [
    "CorruptImageError",
    "Finding",
    "ImageReadError",
    "NotQcow2Error",
    "Qcow2GuardError",
    "RefusedError",
    "Report",
    "Verdict",
    "check",
    "info",
]
