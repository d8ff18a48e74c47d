"""check() and info(): thin wrappers over the native module, which calls the
Rust library. Nothing here knows the qcow2 format; this module only turns
Python inputs (paths, file objects, bytes) into something the library can
read, and the library's JSON documents into Python objects."""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass
from typing import (
    Any,
    BinaryIO,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Tuple,
    Union,
)

from . import _native

PathOrFile = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

__all__ = [
    "Early",
    "Finding",
    "Report",
    "StreamInspector",
    "Verdict",
    "check",
    "convert",
    "info",
    "inspect_stream",
]


class Verdict(str, enum.Enum):
    """The overall outcome of a check, worst first: ``INVALID`` >
    ``CORRUPT`` > ``UNSAFE`` > ``LEAKS`` > ``OK``. Compares equal to its
    string (``report.verdict == "ok"``)."""

    OK = "ok"
    LEAKS = "leaks"
    UNSAFE = "unsafe"
    CORRUPT = "corrupt"
    INVALID = "invalid"
    #: A streamed inspection without a spool needed bytes the stream had
    #: already passed (a backward reference); see :class:`StreamInspector`.
    NEEDS_RANDOM_ACCESS = "needs_random_access"

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
    command-line tool: the package carries the verdict and the findings;
    an ``invalid`` report whose findings are ``bad_magic``,
    ``file_too_short``, ``io_error`` or ``too_large_to_check`` was not
    judged, any other is a malformed qcow2).

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
    threads: Optional[int] = None,
    data_file: Optional[PathOrFile] = None,
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
    ``threads`` (1 to 64; default: the available cores, at most 4) is the
    CLI's ``--threads``: threads decompressing payloads; the report is the
    same for any value. The GIL is released while the library works.

    ``data_file`` is the image's external data file (a path, bytes or a
    file object; needs ``allow_data_file``), the CLI's ``--data-file``:
    the check then also finds guest data mapped past its end. It is read
    only when handed in here; the name inside the image is never opened.
    ``ValueError`` when the image has no external data file.
    """
    if data_file is not None and not allow_data_file:
        raise ValueError("data_file= needs allow_data_file=True")
    src, filename, _ = _source(source)
    data = _source(data_file)[0] if data_file is not None else None
    doc = _native.check_image(
        src,
        filename,
        _policy(allow_backing, allow_data_file, allow_encryption, max_virtual_size),
        metadata_only,
        _threads(threads),
        data,
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
        _policy(allow_backing, allow_data_file, allow_encryption, max_virtual_size),
    )


def _threads(threads: Optional[int]) -> Optional[int]:
    """A ``threads`` argument, checked as the CLI checks ``--threads`` /
    ``-m``: an integer from 1 to 64, or None for the default."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 64:
        raise ValueError(f"threads must be an integer from 1 to 64, not {threads!r}")
    return threads


def _policy(
    allow_backing: bool,
    allow_data_file: bool,
    allow_encryption: bool,
    max_virtual_size: Optional[int],
) -> Dict[str, Any]:
    """The policy options as the native module takes them (one dict)."""
    return {
        "allow_backing": allow_backing,
        "allow_data_file": allow_data_file,
        "allow_encryption": allow_encryption,
        "max_virtual_size": max_virtual_size,
    }


def _same_file(a: Any, b: Any) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False


def convert(
    src: PathOrFile,
    dst: Union[str, "os.PathLike[str]", BinaryIO],
    *,
    backing: Optional[PathOrFile] = None,
    data_file: Optional[PathOrFile] = None,
    progress: Optional[Callable[[int, int], Any]] = None,
    allow_backing: bool = False,
    allow_data_file: bool = False,
    allow_encryption: bool = False,
    max_virtual_size: Optional[int] = None,
    threads: Optional[int] = None,
) -> List[Finding]:
    """Write the raw guest disk of ``src`` (byte-identical to ``qemu-img
    convert -O raw``) without QEMU; what ``qcow2-guard convert`` does, with
    the same refusals.

    The policy and the metadata audit run before anything is written; a
    refusal raises :class:`RefusedError` (``findings``; ``report`` when the
    audit refused) or :class:`CorruptImageError`. ``dst`` is a path
    (written through a temporary file beside it, renamed at the end,
    removed on any error; sparse, sized to the virtual disk) or a writable
    binary file object (written in order, holes as zeros). ``backing`` /
    ``data_file`` are read only when handed in here (they need
    ``allow_backing`` / ``allow_data_file``); names inside the image are
    never opened, and without ``backing`` unallocated clusters read as
    zeros. ``progress(done, total)`` is called as guest bytes are written
    (from worker threads); if it raises, the conversion's output is not
    kept and the exception is re-raised. Returns the warnings (e.g.
    ``convert_no_backing``). ``threads`` (1 to 64; default: the available
    cores, at most 4) is the CLI's ``-m``: workers reading and
    decompressing; the output is the same for any value. The GIL is
    released while the library works.
    """
    if backing is not None and not allow_backing:
        raise ValueError("backing= needs allow_backing=True")
    if data_file is not None and not allow_data_file:
        raise ValueError("data_file= needs allow_data_file=True")
    nthreads = _threads(threads)
    if isinstance(dst, (str, os.PathLike)):
        out: Any = os.fsdecode(os.fspath(dst))
        for i in (src, backing, data_file):
            if isinstance(i, (str, os.PathLike)) and _same_file(out, i):
                raise ValueError(f"{out}: the output is the input file {os.fspath(i)!s}; refusing to replace it")
    else:
        out = dst
    image, filename, _ = _source(src)
    back = _source(backing)[0] if backing is not None else None
    data = _source(data_file)[0] if data_file is not None else None
    warnings = _native.convert_image(
        image,
        filename,
        out,
        back,
        data,
        _policy(allow_backing, allow_data_file, allow_encryption, max_virtual_size),
        progress,
        nthreads,
    )
    return [Finding(**f) for f in warnings]


@dataclass(frozen=True)
class Early:
    """What a :class:`StreamInspector` can say before the stream ends:
    ``state`` is ``"pending"`` (the header cluster has not passed),
    ``"clear"`` (no objection so far) or ``"refused"`` (``findings`` say
    why; the final verdict will not be ``ok``)."""

    state: str
    findings: Tuple[Finding, ...] = ()

    @property
    def refused(self) -> bool:
        return self.state == "refused"


def _spool_source(spool: Any) -> Any:
    if spool is None:
        return None
    if isinstance(spool, (str, os.PathLike)):
        return os.fsdecode(os.fspath(spool))
    _, pread = _file_reader(spool)

    def live_length() -> int:
        try:
            return os.fstat(spool.fileno()).st_size
        except (AttributeError, OSError, ValueError):
            here = spool.tell()
            end = spool.seek(0, os.SEEK_END)
            spool.seek(here)
            return end

    return (live_length, pread)


class StreamInspector:
    """The library's streaming inspector: :meth:`feed` it the file's bytes
    in order (chunks of any size), look at :attr:`early` to abort a refused
    upload, then :meth:`finish` for the same :class:`Report` that
    :func:`check` gives on the whole file.

    It keeps only what the check needs (tables, refcount blocks,
    compressed clusters until decompressed; never data clusters), bounded
    by the library's limits. Tables that point backwards are read back
    from ``spool`` (a path, or a readable binary file object, holding at
    least every byte fed before the current :meth:`feed`: the file the
    upload is written to); without one such a layout ends with verdict
    ``needs_random_access``, never a verdict built on missing bytes.
    """

    def __init__(
        self,
        *,
        allow_backing: bool = False,
        allow_data_file: bool = False,
        allow_encryption: bool = False,
        max_virtual_size: Optional[int] = None,
        metadata_only: bool = False,
        spool: Any = None,
        filename: str = "-",
    ) -> None:
        self._native = _native.StreamInspector(
            filename,
            _policy(allow_backing, allow_data_file, allow_encryption, max_virtual_size),
            metadata_only,
            _spool_source(spool),
        )
        self.read_back: List[Tuple[int, int]] = []

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """The next bytes of the file (the GIL is released while they are
        inspected)."""
        self._native.feed(data if isinstance(data, bytes) else bytes(data))

    @property
    def early(self) -> Early:
        """What can be said now (see :class:`Early`)."""
        state, findings = self._native.early()
        return Early(state, tuple(Finding(**f) for f in findings))

    @property
    def position(self) -> int:
        """Bytes fed so far."""
        return self._native.position()

    @property
    def retained_bytes(self) -> int:
        """Bytes held now (bounded by the library's limits)."""
        return self._native.retained_bytes()

    def finish(self) -> Report:
        """The stream has ended: the report. ``read_back`` then lists the
        byte ranges (start, end) that had to be read back from the spool
        (empty for a layout that streams)."""
        doc, read_back = self._native.finish()
        self.read_back = [tuple(r) for r in read_back]  # type: ignore[misc]
        return Report(doc)


def inspect_stream(
    stream: Union[BinaryIO, Iterable[bytes]],
    *,
    chunk_size: int = 64 << 10,
    stop_early: bool = False,
    **options: Any,
) -> Report:
    """Run a :class:`StreamInspector` over a readable binary file object
    (read in ``chunk_size`` pieces) or an iterable of byte chunks, and
    return the report. With ``stop_early``, reading stops as soon as the
    early verdict refuses the image, and the report is that of the bytes
    seen so far (not ``ok``). ``options`` are :class:`StreamInspector`'s.
    """
    insp = StreamInspector(**options)
    if hasattr(stream, "read"):
        chunks: Iterable[bytes] = iter(lambda: stream.read(chunk_size), b"")  # type: ignore[union-attr]
    else:
        chunks = stream  # type: ignore[assignment]
    for chunk in chunks:
        insp.feed(chunk)
        if stop_early and insp.early.refused:
            break
    return insp.finish()
