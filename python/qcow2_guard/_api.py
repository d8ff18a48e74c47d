"""check() and info(): thin wrappers over the native module, which calls the
Rust library. Nothing here knows the qcow2 format; this module only turns
Python inputs (paths, file objects, bytes) into something the library can
read, and the library's JSON documents into Python objects."""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, Union

from . import _native

PathOrFile = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

__all__ = ["Finding", "Report", "Verdict", "check", "info"]


class Verdict(str, enum.Enum):
    """The overall outcome of a check, worst first: ``INVALID`` >
    ``CORRUPT`` > ``UNSAFE`` > ``LEAKS`` > ``OK``. Compares equal to its
    string (``report.verdict == "ok"``)."""

    OK = "ok"
    LEAKS = "leaks"
    UNSAFE = "unsafe"
    CORRUPT = "corrupt"
    INVALID = "invalid"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Finding:
    """One problem or observation, with the file offset it concerns."""

    code: str
    severity: str
    offset: int
    message: str

    def __str__(self) -> str:
        return f"{self.severity} [{self.code}] at {self.offset:#x}: {self.message}"


class Report:
    """The result of :func:`check`: the content of ``qcow2-guard check
    --json`` (without the process exit status, which belongs to the
    command-line tool).

    ``verdict``, ``findings`` (in walk order, capped), ``finding_counts``
    (every finding, per code), ``findings_omitted``, ``image`` (facts:
    ``virtual-size``, ``cluster-size``, ... as in the JSON schema; ``None``
    when the image could not be opened), ``stats`` (same), and
    ``metadata_only``. :meth:`to_dict` returns the JSON document itself.
    """

    def __init__(self, doc: Dict[str, Any]) -> None:
        self._doc = doc
        self.filename: str = doc["filename"]
        self.verdict = Verdict(doc["verdict"])
        self.findings: List[Finding] = [Finding(**f) for f in doc["findings"]]
        self.finding_counts: Dict[str, int] = dict(doc["finding-counts"])
        self.findings_omitted: int = doc["findings-omitted"]
        self.image: Optional[Dict[str, Any]] = doc.get("image")
        self.stats: Optional[Dict[str, int]] = doc.get("stats")
        self.metadata_only: bool = doc["metadata-only"]

    @property
    def ok(self) -> bool:
        """Whether the verdict is ``ok`` (safe to ingest)."""
        return self.verdict is Verdict.OK

    def has(self, code: str) -> bool:
        """Whether any finding (stored or only counted) has ``code``."""
        return code in self.finding_counts

    def errors(self) -> List[Finding]:
        """The stored findings of severity ``error``."""
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> Dict[str, Any]:
        """The ``check --json`` document (a fresh copy)."""
        import copy

        return copy.deepcopy(self._doc)

    def __repr__(self) -> str:
        return (
            f"<Report {self.filename!r} verdict={self.verdict.value} "
            f"findings={sum(self.finding_counts.values())}>"
        )


def _file_reader(f: Any) -> Tuple[int, Callable[[int, int], bytes]]:
    """(length, pread) for a file object: os.pread on its descriptor when
    it has one (the GIL is released while it reads, and the file position
    does not move), otherwise seek + read under a lock."""
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        import stat

        if stat.S_ISREG(st.st_mode):

            def pread(offset: int, length: int) -> bytes:
                out = bytearray()
                while len(out) < length:
                    got = os.pread(fd, length - len(out), offset + len(out))
                    if not got:
                        break
                    out += got
                return bytes(out)

            return st.st_size, pread
    except (AttributeError, OSError, ValueError, TypeError):
        pass
    if not (hasattr(f, "seek") and hasattr(f, "read")):
        raise TypeError(
            "expected a path, a bytes-like object or a seekable binary file object"
        )
    lock = threading.Lock()
    with lock:
        here = f.tell()
        length = f.seek(0, os.SEEK_END)
        f.seek(here)

    def seek_read(offset: int, length: int) -> bytes:
        with lock:
            here = f.tell()
            try:
                f.seek(offset)
                out = bytearray()
                while len(out) < length:
                    got = f.read(length - len(out))
                    if not got:
                        break
                    out += got
                return bytes(out)
            finally:
                f.seek(here)

    return length, seek_read


def _source(obj: PathOrFile) -> Tuple[Any, str, Optional[int]]:
    """(native source, filename, disk space used) for what the caller
    passed."""
    if isinstance(obj, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(obj))
        try:
            used: Optional[int] = os.stat(path).st_blocks * 512
        except (OSError, AttributeError):
            used = None
        return path, path, used
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj), "<bytes>", None
    name = getattr(obj, "name", None)
    filename = name if isinstance(name, str) else "<file>"
    used = None
    try:
        used = os.fstat(obj.fileno()).st_blocks * 512  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError, TypeError):
        pass
    return _file_reader(obj), filename, used


def check(
    source: PathOrFile,
    *,
    allow_backing: bool = False,
    allow_data_file: bool = False,
    allow_encryption: bool = False,
    max_virtual_size: Optional[int] = None,
    metadata_only: bool = False,
) -> Report:
    """Audit an image completely: the safety policy, every structure,
    refcount and (unless ``metadata_only``) compressed cluster; what
    ``qcow2-guard check`` does.

    ``source`` is a path, a bytes-like object, or a seekable binary file
    object (read with positional reads; its position is kept). The policy
    refuses backing files, external data files, encryption and virtual
    sizes over ``max_virtual_size`` (default 64 TiB) unless relaxed here.

    Never raises on the image's content: problems are findings, summed up
    in ``Report.verdict``. Raises ``OSError`` when a path cannot be opened.
    The GIL is released while the library works.
    """
    src, filename, _ = _source(source)
    doc = _native.check_image(
        src,
        filename,
        allow_backing,
        allow_data_file,
        allow_encryption,
        max_virtual_size,
        metadata_only,
    )
    return Report(doc)


def info(
    source: PathOrFile,
    *,
    allow_backing: bool = False,
    allow_data_file: bool = False,
    allow_encryption: bool = False,
    max_virtual_size: Optional[int] = None,
) -> Dict[str, Any]:
    """What ``qemu-img info --output=json`` shows for a qcow2 image, with
    its keys (``virtual-size``, ``cluster-size``, ``format-specific``, ...),
    plus ``features`` (feature bits with their names), ``findings`` (the
    safety policy's, as dicts) and ``file-length``; the content of
    ``qcow2-guard info --json`` without ``exit-code``.

    Names inside the image (backing file, data file) are shown and never
    opened. Raises :class:`NotQcow2Error`, :class:`CorruptImageError` or
    :class:`RefusedError` (with ``code`` and ``offset``) when the image
    cannot be opened.
    """
    src, filename, used = _source(source)
    return _native.info_image(
        src,
        filename,
        used,
        allow_backing,
        allow_data_file,
        allow_encryption,
        max_virtual_size,
    )
