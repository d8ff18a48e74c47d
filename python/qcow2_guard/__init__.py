"""qcow2_guard: check, inspect and convert untrusted qcow2 images without
QEMU.

Everything is done by the qcow2-guard Rust library (through the private
native module ``qcow2_guard._native``); this package holds no format logic.

- :func:`check` audits an image completely and returns a :class:`Report`
  (the content of ``qcow2-guard check --json``);
- :func:`info` returns what ``qemu-img info --output=json`` shows;
- :func:`convert` writes the raw guest disk (``qemu-img convert -O raw``);
- :class:`StreamInspector` / :func:`inspect_stream` give the same report
  from a stream as it arrives (an upload), with an early verdict;
- :mod:`qcow2_guard.format_inspector` is a drop-in for oslo.utils'
  ``format_inspector`` for qcow2 (``QcowInspector``, ``InspectWrapper``).

Errors are :class:`Qcow2GuardError` subclasses with ``code`` and ``offset``.
"""

from ._api import (
    Early,
    Finding,
    Report,
    StreamInspector,
    Verdict,
    check,
    convert,
    info,
    inspect_stream,
)
from ._errors import (
    CorruptImageError,
    ImageReadError,
    NotQcow2Error,
    Qcow2GuardError,
    RefusedError,
)

__all__ = [
    "CorruptImageError",
    "Early",
    "Finding",
    "StreamInspector",
    "convert",
    "inspect_stream",
    "ImageReadError",
    "NotQcow2Error",
    "Qcow2GuardError",
    "RefusedError",
    "Report",
    "Verdict",
    "check",
    "info",
]
