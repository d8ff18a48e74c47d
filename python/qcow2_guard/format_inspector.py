"""A drop-in for oslo.utils' ``oslo_utils.imageutils.format_inspector``,
for qcow2.

A service that inspects uploads with oslo.utils switches with one line::

    from qcow2_guard import format_inspector   # was: from oslo_utils.imageutils import format_inspector

and keeps calling ``InspectWrapper(stream, "qcow2")``, ``wrapper.format``,
``inspector.safety_check()``, ``get_inspector("qcow2")``,
``detect_file_format(path)``. qcow2 is then judged by the qcow2-guard
library's full check (every table, refcount and compressed cluster, plus
the safety policy), streamed as the upload passes
(:class:`qcow2_guard.StreamInspector`), instead of oslo's header-only look.
Other formats are left to oslo.utils' own inspectors when it is installed
(a plain ``raw`` fallback otherwise).

``safety_check()`` raises :class:`SafetyCheckFailed` whose ``failures``
maps check names to :class:`SafetyViolation` reasons: oslo's names
``backing_file``, ``data_file`` and ``unknown_features`` for the checks
oslo has, and the library's stable finding codes (listed in SECURITY.md:
``policy_encryption``, ``policy_corrupt_bit``, ``refcount_too_low``,
``metadata_overlap``, ``unsupported_version``, ...) for the rest. When
oslo.utils is installed, the exception classes here subclass oslo's, so
existing ``except format_inspector.SafetyCheckFailed`` clauses written
against either module catch them.

Nothing here decodes the format: the header probe, the check and the
streaming inspector are the library's.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple, Type

from . import _native
from ._api import Report, StreamInspector, Verdict, check

try:  # pragma: no cover - exercised when oslo.utils is installed (the tests)
    from oslo_utils.imageutils import format_inspector as _oslo
except ImportError:  # pragma: no cover
    _oslo = None  # type: ignore[assignment]

__all__ = [
    "ImageFormatError",
    "InspectWrapper",
    "QcowInspector",
    "RawFileInspector",
    "SafetyCheckFailed",
    "SafetyViolation",
    "detect_file_format",
    "get_inspector",
]


def _bases(name: str) -> Tuple[type, ...]:
    return (getattr(_oslo, name),) if _oslo is not None else (Exception,)


class ImageFormatError(*_bases("ImageFormatError")):  # type: ignore[misc]
    """The content cannot be inspected as the requested format (or as any
    single format)."""


class SafetyViolation(*_bases("SafetyViolation")):  # type: ignore[misc]
    """One failed check: the reason, with the library's ``code``, the
    file ``offset`` and every finding (``findings``) behind it."""

    def __init__(self, message: str, code: str = "", offset: int = 0, findings: Any = ()) -> None:
        Exception.__init__(self, message)
        self.code = code
        self.offset = offset
        self.findings = list(findings)


class SafetyCheckFailed(*_bases("SafetyCheckFailed")):  # type: ignore[misc]
    """One or more checks failed: ``failures`` maps check names to
    :class:`SafetyViolation`."""

    def __init__(self, failures: Dict[str, Any]) -> None:
        Exception.__init__(self, "Safety checks failed: %s" % ",".join(failures.keys()))
        self.failures = failures


#: Library finding codes reported under oslo's check names.
OSLO_CHECK_NAMES = {
    "policy_backing_file": "backing_file",
    "policy_external_data_file": "data_file",
    "policy_unknown_incompatible_features": "unknown_features",
}


def failures_of(report: Report, accept_leaks: bool = True) -> Dict[str, SafetyViolation]:
    """The ``failures`` mapping for a report: empty when the verdict is
    ``ok`` (or ``leaks`` with ``accept_leaks``: leaked clusters waste space
    and harm no data), otherwise one entry per error code."""
    if report.verdict is Verdict.OK or (accept_leaks and report.verdict is Verdict.LEAKS):
        return {}
    failures: Dict[str, SafetyViolation] = {}
    for f in report.findings:
        if f.severity != "error" and not (f.code == "leaked_cluster" and not accept_leaks):
            continue
        name = OSLO_CHECK_NAMES.get(f.code, f.code)
        if name in failures:
            failures[name].findings.append(f)
        else:
            failures[name] = SafetyViolation(f.message, f.code, f.offset, [f])
    if not failures:
        # Findings past the cap are only counted: name them by code.
        for code, n in report.finding_counts.items():
            failures[OSLO_CHECK_NAMES.get(code, code)] = SafetyViolation(
                f"{n} finding(s) {code}", code, 0, []
            )
    if not failures:
        failures["verdict_" + report.verdict.value] = SafetyViolation(
            f"the check says {report.verdict.value}", report.verdict.value, 0, []
        )
    return failures


#: Bytes of the stream kept to decide whether it is qcow2 (as oslo's
#: header region).
_PROBE_BYTES = 512


class QcowInspector:
    """qcow2 with oslo's ``QcowInspector`` surface: ``eat_chunk`` /
    ``finish`` / ``complete``, ``format_match``, ``virtual_size``,
    ``actual_size``, ``safety_check()``, ``from_file``.

    Chunks go to the library's streaming inspector; ``safety_check()``
    needs the whole stream (``complete`` turns true at ``finish()``, or as
    soon as the header shows it is not qcow2) and judges the library's
    full report (:attr:`report`). Keyword options: the policy options of
    :func:`qcow2_guard.check`, ``metadata_only``, ``accept_leaks``
    (default true) and ``spool`` (see :class:`qcow2_guard.StreamInspector`:
    without one, an image whose tables point backwards fails with
    ``needs_random_access``).
    """

    NAME = "qcow2"

    def __init__(
        self,
        tracing: bool = False,
        params: Optional[Dict[str, str]] = None,
        *,
        spool: Any = None,
        allow_backing: bool = False,
        allow_data_file: bool = False,
        allow_encryption: bool = False,
        max_virtual_size: Optional[int] = None,
        metadata_only: bool = False,
        accept_leaks: bool = True,
    ) -> None:
        self._params = params or {}
        self._policy: Dict[str, Any] = dict(
            allow_backing=allow_backing,
            allow_data_file=allow_data_file,
            allow_encryption=allow_encryption,
            max_virtual_size=max_virtual_size,
            metadata_only=metadata_only,
        )
        self._accept_leaks = accept_leaks
        self._stream: Optional[StreamInspector] = StreamInspector(spool=spool, **self._policy)
        self._prefix = b""
        self._probe: Optional[Tuple[bool, Optional[int]]] = None
        self._total = 0
        self._finished = False
        self._report: Optional[Report] = None
        self._path: Optional[str] = None

    # --- oslo's streaming surface -------------------------------------

    def eat_chunk(self, chunk: bytes) -> None:
        """Present the next chunk of the file."""
        if self._finished:
            raise RuntimeError("Inspector has been marked finished, no more data processing allowed")
        self._total += len(chunk)
        if self._probe is None:
            self._prefix = (self._prefix + bytes(chunk))[:_PROBE_BYTES]
            self._probe = _native.probe_header(self._prefix)
        if self._probe is not None and not self._probe[0]:
            self._stream = None  # not qcow2: nothing more to inspect
            return
        if self._stream is not None:
            self._stream.feed(chunk)

    def finish(self) -> None:
        """The entire stream has been read."""
        self._finished = True
        if self._probe is None:
            # Too short for a header: let the decoder say what it can.
            self._probe = _native.probe_header(self._prefix) or (False, None)

    @property
    def complete(self) -> bool:
        """Whether everything needed has been seen: the whole stream, or
        enough of it to know it is not qcow2."""
        return self._finished or (self._probe is not None and not self._probe[0])

    @property
    def format_match(self) -> bool:
        """Whether the content is qcow2 (its magic, as the library's
        header decoder reads it)."""
        return self._probe is not None and self._probe[0]

    @property
    def virtual_size(self) -> int:
        """The header's virtual size, or 0 while unknown."""
        if self._probe is None or not self._probe[0]:
            return 0
        return self._probe[1] or 0

    @property
    def actual_size(self) -> int:
        """Bytes of the stream presented so far (the file's length once it
        has all been read)."""
        return self._total

    @property
    def context_info(self) -> Dict[str, int]:
        """Bytes held in memory for the inspection."""
        held = self._stream.retained_bytes if self._stream is not None else 0
        return {"header": len(self._prefix), "retained": held}

    def __str__(self) -> str:
        return self.NAME

    # --- the verdict ----------------------------------------------------

    @property
    def early_failures(self) -> Dict[str, SafetyViolation]:
        """Failures already certain while the stream is still arriving
        (the library's early verdict: malformed header or tables, safety
        policy); empty when there is no objection so far."""
        if self._stream is None or self._report is not None:
            return {}
        early = self._stream.early
        if not early.refused:
            return {}
        out: Dict[str, SafetyViolation] = {}
        for f in early.findings:
            name = OSLO_CHECK_NAMES.get(f.code, f.code)
            out.setdefault(name, SafetyViolation(f.message, f.code, f.offset, [f]))
        return out

    @property
    def report(self) -> Report:
        """The library's report (the whole stream must have been read)."""
        if self._report is None:
            if self._path is not None:
                self._report = check(self._path, **self._policy)
            elif self._stream is not None and self._finished:
                self._report = self._stream.finish()
                self._stream = None
            else:
                raise ImageFormatError("Incomplete file cannot be safety checked")
        return self._report

    def safety_check(self) -> None:
        """Raise :class:`SafetyCheckFailed` unless the library's check
        accepts the image; :class:`ImageFormatError` when incomplete or
        not qcow2."""
        if not self.complete:
            raise ImageFormatError("Incomplete file cannot be safety checked")
        if not self.format_match:
            raise ImageFormatError(
                "Unable to safety check format %s because content does not match" % self
            )
        failures = failures_of(self.report, self._accept_leaks)
        if failures:
            raise SafetyCheckFailed(failures)

    @classmethod
    def from_file(cls, filename: str, **options: Any) -> "QcowInspector":
        """Inspect a file by random access (the library's check on the
        path). Raises :class:`ImageFormatError` when it is not qcow2."""
        insp = cls(**options)
        insp._path = os.fsdecode(os.fspath(filename))
        insp._stream = None
        with open(insp._path, "rb") as f:
            insp._prefix = f.read(_PROBE_BYTES)
            insp._total = os.fstat(f.fileno()).st_size
        insp._probe = _native.probe_header(insp._prefix) or (False, None)
        insp._finished = True
        if not insp.format_match:
            raise ImageFormatError("File is not in requested format")
        return insp


class RawFileInspector:
    """Raw (unrecognised) content, used when oslo.utils is not installed:
    always matches, nothing to check."""

    NAME = "raw"

    def __init__(self, tracing: bool = False, params: Optional[Dict[str, str]] = None) -> None:
        self._total = 0
        self._finished = False

    def eat_chunk(self, chunk: bytes) -> None:
        self._total += len(chunk)

    def finish(self) -> None:
        self._finished = True

    complete = True
    format_match = True

    @property
    def virtual_size(self) -> int:
        return self._total

    @property
    def actual_size(self) -> int:
        return self._total

    def safety_check(self) -> None:
        return None

    def __str__(self) -> str:
        return self.NAME


def _other_formats() -> Dict[str, Type[Any]]:
    if _oslo is None:
        return {"raw": RawFileInspector}
    return {k: v for k, v in _oslo.ALL_FORMATS.items() if k != "qcow2"}


def get_inspector(format_name: str) -> Optional[Type[Any]]:
    """The inspector class for a disk format name (qcow2: ours; others:
    oslo.utils' when installed), or None."""
    if format_name == "qcow2":
        return QcowInspector
    return _other_formats().get(format_name)


class InspectWrapper:
    """A file-like wrapper of an upload stream that detects its format as
    it is read, with oslo's ``InspectWrapper`` semantics (``read``,
    iteration, ``close``, ``formats``, ``format``, ``expected_format``,
    ``allowed_formats``); qcow2 is inspected by :class:`QcowInspector`.

    With ``expected_format="qcow2"`` reading stops with an exception as
    soon as the content is known not to be qcow2 (as oslo's does) and, with
    ``abort_early`` (the default), as soon as the library's early verdict
    refuses the image (:class:`SafetyCheckFailed` from ``read``). Keyword
    options (``spool``, policy options, ...) go to :class:`QcowInspector`.
    """

    def __init__(
        self,
        source: BinaryIO,
        expected_format: Optional[str] = None,
        allowed_formats: Optional[List[str]] = None,
        tracing: bool = False,
        params: Optional[Dict[str, str]] = None,
        *,
        abort_early: bool = True,
        **qcow2_options: Any,
    ) -> None:
        self._source = source
        self._iter: Optional[Iterator[bytes]] = None
        self._expected = expected_format
        self._abort_early = abort_early
        self._inspectors: List[Any] = []
        if not allowed_formats or "qcow2" in allowed_formats:
            self._inspectors.append(QcowInspector(tracing, params, **qcow2_options))
        for name, cls in _other_formats().items():
            if not allowed_formats or name in allowed_formats:
                self._inspectors.append(cls(tracing=tracing, params=params))
        self._errored: set = set()
        self._finished = False

    def _process_chunk(self, chunk: bytes) -> None:
        for insp in self._inspectors:
            if id(insp) in self._errored:
                continue
            expected = insp.NAME == self._expected
            try:
                insp.eat_chunk(chunk)
            except Exception:
                if expected:
                    raise
                # Another format's inspector failing must not break the
                # stream: it is no longer considered.
                self._errored.add(id(insp))
                continue
            if not expected:
                continue
            if insp.complete and not insp.format_match:
                raise ImageFormatError(f"Content does not match expected format {insp.NAME!r}")
            if self._abort_early and isinstance(insp, QcowInspector):
                early = insp.early_failures
                if early:
                    raise SafetyCheckFailed(early)

    def __iter__(self) -> "InspectWrapper":
        return self

    def __next__(self) -> bytes:
        if self._iter is None:
            self._iter = self._source if hasattr(self._source, "__next__") else iter(self._source)  # type: ignore[assignment]
        try:
            chunk = next(self._iter)  # type: ignore[arg-type]
        except StopIteration:
            self._finish()
            raise
        self._process_chunk(chunk)
        return chunk

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self._process_chunk(chunk)
        return chunk

    def _finish(self) -> None:
        for insp in self._inspectors:
            insp.finish()
        self._finished = True

    def close(self) -> None:
        if hasattr(self._source, "close"):
            self._source.close()
        self._finish()

    def _usable(self) -> List[Any]:
        return [i for i in self._inspectors if id(i) not in self._errored]

    @property
    def formats(self) -> Optional[List[Any]]:
        """The matching inspectors (never raw together with another), raw
        when nothing specific matched, or None while undecided."""
        specific = [i for i in self._usable() if i.NAME != "raw"]
        if not self._finished and not all(i.complete for i in specific):
            return None
        matches = [i for i in specific if i.format_match]
        if matches:
            return matches
        return [i for i in self._inspectors if i.NAME == "raw"]

    @property
    def format(self) -> Optional[Any]:
        """The one matching inspector, None while undecided;
        :class:`ImageFormatError` when several match or none is allowed."""
        matches = self.formats
        if matches is None:
            return None
        if len(matches) > 1:
            raise ImageFormatError(
                "Multiple formats detected: %s" % ",".join(str(i) for i in matches)
            )
        if not matches:
            raise ImageFormatError("Content does not match any allowed format")
        return matches[0]


def detect_file_format(
    filename: str, tracing: bool = False, params: Optional[Dict[str, str]] = None, **qcow2_options: Any
) -> Optional[Any]:
    """Detect the format of a file (all inspectors over one read of it)
    and return the matching inspector; for qcow2 the file itself serves as
    the spool, so any layout is checked."""
    qcow2_options.setdefault("spool", filename)
    with open(filename, "rb") as f:
        wrapper = InspectWrapper(f, tracing=tracing, params=params, abort_early=False, **qcow2_options)
        try:
            while wrapper.read(64 << 10):
                if wrapper.format is not None:
                    break
        finally:
            wrapper.close()
    return wrapper.format
