//! `qcow2_guard._native`: the private native module of the `qcow2_guard`
//! Python package.
//!
//! Holds no format logic and no policy of its own: each function turns
//! Python arguments into library calls, releases the GIL while the library
//! works, and turns the library's results into Python objects (the JSON
//! documents of [`qcow2_guard::json`] as dicts, library errors as the
//! package's exception classes from `qcow2_guard._errors`).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};
use serde_json::{json, Value};

use qcow2_guard::convert::{prepare, ConvertError, ConvertOptions, FileSink, Inputs, WriteSink};
use qcow2_guard::stream::{Early, Inspector, SpoolFile};
use qcow2_guard::{
    check, CheckOptions, Error, FileSource, Finding, Header, Image, Limits, Policy, Report,
    Severity, Source, Verdict,
};

/// Where the image bytes come from.
enum Input {
    /// A path, opened by the library (no Python involved while it reads).
    Path(PathBuf),
    /// Bytes copied from a `bytes`/`bytearray`/`memoryview`.
    Bytes(Vec<u8>),
    /// Positional reads through a Python callable.
    Reader(PyReader),
}

/// A [`Source`] over a Python callable `pread(offset, length) -> bytes`
/// and a known length: the package passes `os.pread` on a file's
/// descriptor, or a locked seek + read for other file objects. The GIL is
/// taken for each read only.
struct PyReader {
    len: Length,
    pread: Py<PyAny>,
}

/// A source's length: fixed, or asked of a Python callable at each call
/// (a spool the caller is still writing).
enum Length {
    Fixed(u64),
    Live(Py<PyAny>),
}

impl Source for PyReader {
    fn len(&self) -> u64 {
        match &self.len {
            Length::Fixed(n) => *n,
            Length::Live(f) => {
                Python::attach(|py| f.call0(py).and_then(|n| n.extract::<u64>(py)).unwrap_or(0))
            }
        }
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Python::attach(|py| {
            let got = self
                .pread
                .call1(py, (offset, buf.len()))
                .map_err(|e| io::Error::other(e.to_string()))?;
            let got = got
                .cast_bound::<PyBytes>(py)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let bytes = got.as_bytes();
            if bytes.len() != buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "short read at {offset}: {} of {} bytes",
                        bytes.len(),
                        buf.len()
                    ),
                ));
            }
            buf.copy_from_slice(bytes);
            Ok(())
        })
    }
}

/// An opened source, whatever its kind.
enum Opened {
    File(FileSource),
    Bytes(Vec<u8>),
    Reader(PyReader),
}

impl Source for Opened {
    fn len(&self) -> u64 {
        match self {
            Opened::File(s) => s.len(),
            Opened::Bytes(s) => Source::len(s),
            Opened::Reader(s) => s.len(),
        }
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Opened::File(s) => s.read_exact_at(offset, buf),
            Opened::Bytes(s) => s.read_exact_at(offset, buf),
            Opened::Reader(s) => s.read_exact_at(offset, buf),
        }
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        match self {
            Opened::File(s) => s.data_run(offset),
            Opened::Bytes(s) => s.data_run(offset),
            Opened::Reader(s) => s.data_run(offset),
        }
    }
}

impl Input {
    /// `str` (a path), a bytes-like object, or `(length, pread)`.
    fn extract(obj: &Bound<'_, PyAny>) -> PyResult<Input> {
        if obj.is_instance_of::<PyString>() {
            return Ok(Input::Path(obj.extract::<PathBuf>()?));
        }
        if let Ok(t) = obj.cast::<PyTuple>() {
            let (len, pread): (Bound<'_, PyAny>, Py<PyAny>) = t.extract()?;
            let len = if len.is_callable() {
                Length::Live(len.unbind())
            } else {
                Length::Fixed(len.extract()?)
            };
            return Ok(Input::Reader(PyReader { len, pread }));
        }
        if let Ok(b) = obj.extract::<Vec<u8>>() {
            return Ok(Input::Bytes(b));
        }
        Err(PyTypeError::new_err(
            "expected a path, a bytes-like object or (length, pread)",
        ))
    }

    fn open(self) -> io::Result<Opened> {
        Ok(match self {
            Input::Path(p) => Opened::File(FileSource::open(p)?),
            Input::Bytes(b) => Opened::Bytes(b),
            Input::Reader(r) => Opened::Reader(r),
        })
    }

    /// A spool: a path is opened as a [`SpoolFile`] (its length is asked
    /// at every read, as the caller is still writing it).
    fn open_spool(self) -> io::Result<Arc<dyn Source>> {
        Ok(match self {
            Input::Path(p) => Arc::new(SpoolFile::new(File::open(p)?)),
            Input::Bytes(b) => Arc::new(b),
            Input::Reader(r) => Arc::new(r),
        })
    }
}

/// The caller's policy options, which every function takes: one dict
/// from the Python side (`_api._policy`).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct PolicyOptions {
    allow_backing: bool,
    allow_data_file: bool,
    allow_encryption: bool,
    max_virtual_size: Option<u64>,
}

impl PolicyOptions {
    /// The library's policy for these options, and the default limits.
    fn policy_and_limits(self) -> (Policy, Limits) {
        let mut policy = Policy {
            allow_backing: self.allow_backing,
            allow_data_file: self.allow_data_file,
            allow_encryption: self.allow_encryption,
            ..Policy::default()
        };
        if let Some(max) = self.max_virtual_size {
            policy.max_virtual_size = max;
        }
        (policy, Limits::default())
    }
}

/// A JSON value as the equivalent Python object (dicts keep key order).
fn to_py(py: Python<'_>, v: &Value) -> PyResult<Py<PyAny>> {
    Ok(match v {
        Value::Null => py.None(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any().unbind()
            } else if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any().unbind()
            } else {
                n.as_f64()
                    .unwrap_or(f64::NAN)
                    .into_pyobject(py)?
                    .into_any()
                    .unbind()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any().unbind(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any().unbind()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, item) in map {
                dict.set_item(k, to_py(py, item)?)?;
            }
            dict.into_any().unbind()
        }
    })
}

/// A library error as the package's exception (`qcow2_guard._errors`),
/// chosen by the library's own classification.
fn raise(py: Python<'_>, e: &Error) -> PyErr {
    raise_as(
        py,
        error_kind(e),
        e.code(),
        e.offset(),
        &e.to_string(),
        None,
    )
}

/// The library's classification of an error.
fn error_kind(e: &Error) -> &'static str {
    if e.is_io() {
        "io"
    } else if e.is_not_qcow2() {
        "not_qcow2"
    } else if e.is_refusal() {
        "refused"
    } else {
        "corrupt"
    }
}

/// `qcow2_guard._errors.from_native(kind, code, offset, message, extra)`.
fn raise_as(
    py: Python<'_>,
    kind: &str,
    code: &str,
    offset: u64,
    message: &str,
    extra: Option<Value>,
) -> PyErr {
    let extra = match extra.map(|v| to_py(py, &v)).transpose() {
        Ok(x) => x,
        Err(e) => return e,
    };
    match py
        .import("qcow2_guard._errors")
        .and_then(|m| m.call_method1("from_native", (kind, code, offset, message, extra)))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// Check an image: the `check --json` document (without `exit-code`).
/// Never fails on the image's content (problems are findings); fails with
/// `OSError` when the source or `data_file` cannot be opened, and with
/// `ValueError` when a `data_file` is handed in for an image that has
/// none (as `check --data-file` refuses it).
#[pyfunction]
#[pyo3(signature = (source, filename, options, metadata_only, threads, data_file=None))]
fn check_image(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    filename: &str,
    options: PolicyOptions,
    metadata_only: bool,
    threads: Option<usize>,
    data_file: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let input = Input::extract(source)?;
    let data_file = data_file.map(Input::extract).transpose()?;
    let (policy, limits) = options.policy_and_limits();
    let doc = py.detach(move || -> Result<Value, CheckFailure> {
        let src = input.open().map_err(CheckFailure::Open)?;
        let data_file = match data_file {
            Some(d) => Some(d.open().map_err(CheckFailure::Open)?),
            None => None,
        };
        let defaults = CheckOptions::default();
        let opts = CheckOptions {
            policy,
            decompress: !metadata_only,
            threads: threads.unwrap_or(defaults.threads),
            ..defaults
        };
        Ok(match Image::open_with(src, limits) {
            Ok(mut image) => {
                if let Some(df) = data_file {
                    if !image.header().has_data_file() {
                        return Err(CheckFailure::NoDataFile);
                    }
                    image.set_data_file(Arc::new(df));
                }
                let rep = check(&image, &opts);
                qcow2_guard::json::check(filename, Some(&image), &rep, metadata_only)
            }
            Err(e) => qcow2_guard::json::check::<Opened>(
                filename,
                None,
                &Report::from_open_error(&e),
                metadata_only,
            ),
        })
    });
    match doc {
        Ok(doc) => to_py(py, &doc),
        Err(CheckFailure::NoDataFile) => Err(PyValueError::new_err(
            "data_file= given but the image has no external data file",
        )),
        // As OSError's subclass for the errno (FileNotFoundError, ...).
        Err(CheckFailure::Open(e)) => Err(e.into()),
    }
}

/// Why [`check_image`] failed (the image's content never makes it fail).
enum CheckFailure {
    Open(io::Error),
    NoDataFile,
}

/// What `qemu-img info --output=json` shows (plus feature names and the
/// policy findings), without `exit-code`. Fails with the package's
/// exception when the image cannot be opened.
#[pyfunction]
#[pyo3(signature = (source, filename, actual_size, options))]
fn info_image(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    filename: &str,
    actual_size: Option<u64>,
    options: PolicyOptions,
) -> PyResult<Py<PyAny>> {
    let input = Input::extract(source)?;
    let (policy, limits) = options.policy_and_limits();
    let path = PathBuf::from(filename);
    let doc = py.detach(move || -> io::Result<Result<Value, Error>> {
        let src = input.open()?;
        Ok(Image::open_with(src, limits).map(|image| {
            let findings = image.policy_findings(&policy);
            qcow2_guard::json::info(&path, &image, actual_size, &findings)
        }))
    })?;
    match doc {
        Ok(doc) => to_py(py, &doc),
        Err(e) => Err(raise(py, &e)),
    }
}

/// What the first bytes of a stream say, as far as the header decoder can
/// tell: `(True, virtual size)` for a qcow2 header, `(False, None)` for
/// another magic, `None` while more bytes are needed.
#[pyfunction]
fn probe_header(prefix: &[u8]) -> Option<(bool, Option<u64>)> {
    match Header::decode(prefix) {
        Ok(h) => Some((true, Some(h.size))),
        Err(e) if e.is_not_qcow2() => Some((false, None)),
        Err(_) => None,
    }
}

/// A library conversion error as the package's exception: refusals carry
/// their findings, audit refusals the audit's report.
fn convert_error(py: Python<'_>, e: ConvertError, filename: &str) -> PyErr {
    match e {
        ConvertError::Image { input, error } => raise_as(
            py,
            error_kind(&error),
            error.code(),
            error.offset(),
            &format!("{input}: {error}"),
            Some(json!({"input": input.as_str()})),
        ),
        ConvertError::Refused { input, findings } => {
            let first = findings.first();
            raise_as(
                py,
                "refused",
                first.map_or("refused", |f| f.code),
                first.map_or(0, |f| f.offset),
                &format!(
                    "{input}: refused: {}",
                    first.map_or(String::new(), |f| f.message.clone())
                ),
                Some(json!({
                    "input": input.as_str(),
                    "findings": findings.iter().map(qcow2_guard::json::finding).collect::<Vec<_>>(),
                })),
            )
        }
        ConvertError::Audit { input, report } => {
            let first = report
                .findings
                .iter()
                .find(|f| f.severity == Severity::Error);
            let kind = if report.verdict == Verdict::Unsafe {
                "refused"
            } else {
                "corrupt"
            };
            raise_as(
                py,
                kind,
                first.map_or("audit", |f| f.code),
                first.map_or(0, |f| f.offset),
                &format!(
                    "{input}: refused: the metadata check says {}",
                    report.verdict.as_str()
                ),
                Some(json!({
                    "input": input.as_str(),
                    "report": qcow2_guard::json::check::<Opened>(filename, None, &report, true),
                })),
            )
        }
        ConvertError::Sink(e) => PyOSError::new_err(format!("writing the output: {e}")),
        // `ConvertError` may grow variants.
        #[allow(unreachable_patterns)]
        e => PyRuntimeError::new_err(e.to_string()),
    }
}

/// A [`Write`] over a Python binary file object's `write` (the GIL is
/// taken for each chunk).
struct PyWriter(Py<PyAny>);

impl Write for PyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Python::attach(|py| {
            let n = self
                .0
                .call_method1(py, "write", (PyBytes::new(py, buf),))
                .map_err(|e| io::Error::other(e.to_string()))?;
            Ok(n.extract::<Option<usize>>(py)
                .ok()
                .flatten()
                .unwrap_or(buf.len()))
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Convert an image to a raw disk with the library's engine: policy and
/// metadata audit first (nothing is written on refusal), then the guest
/// disk into `dst` (a path: a temporary file beside it, renamed at the
/// end, removed on any error; or a Python writer: written in order).
/// Backing and data files are read only when handed in. `progress` is
/// called with (bytes done, total). Returns the warnings as finding dicts.
#[pyfunction]
#[pyo3(signature = (source, filename, dst, backing, data_file, options, progress, threads))]
#[allow(clippy::too_many_arguments)]
fn convert_image(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    filename: &str,
    dst: &Bound<'_, PyAny>,
    backing: Option<&Bound<'_, PyAny>>,
    data_file: Option<&Bound<'_, PyAny>>,
    options: PolicyOptions,
    progress: Option<Py<PyAny>>,
    threads: Option<usize>,
) -> PyResult<Py<PyAny>> {
    let image = Input::extract(source)?;
    let backing = backing.map(Input::extract).transpose()?;
    let data_file = data_file.map(Input::extract).transpose()?;
    let out = if dst.is_instance_of::<PyString>() {
        Output::Path(dst.extract::<PathBuf>()?)
    } else {
        Output::Writer(PyWriter(dst.clone().unbind()))
    };
    let (policy, limits) = options.policy_and_limits();
    let callback_error: Mutex<Option<PyErr>> = Mutex::new(None);
    let result = py.detach(|| -> Result<Vec<Finding>, Failure> {
        let mut inputs = Inputs::new(image.open().map_err(Failure::Open)?);
        if let Some(b) = backing {
            inputs.backing = Some(Arc::new(b.open().map_err(Failure::Open)?));
        }
        if let Some(d) = data_file {
            inputs.data_file = Some(Arc::new(d.open().map_err(Failure::Open)?));
        }
        let defaults = ConvertOptions::default();
        let opts = ConvertOptions {
            policy,
            limits,
            threads: threads.unwrap_or(defaults.threads),
            ..defaults
        };
        let conversion = prepare(inputs, &opts)?;
        let total = conversion.size();
        let done = AtomicU64::new(0);
        let tick = |n: u64| {
            let now = done.fetch_add(n, Ordering::Relaxed).saturating_add(n);
            if let Some(cb) = &progress {
                Python::attach(|py| {
                    if let Err(e) = cb.call1(py, (now, total)) {
                        if let Ok(mut slot) = callback_error.lock() {
                            slot.get_or_insert(e);
                        }
                    }
                });
            }
        };
        let failed = || callback_error.lock().map(|s| s.is_some()).unwrap_or(true);
        match out {
            Output::Path(path) => {
                let dir = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "output".to_owned());
                // Removed when dropped, i.e. on every error path.
                let tmp = tempfile::Builder::new()
                    .permissions(std::fs::Permissions::from_mode(0o666))
                    .prefix(&format!(".{name}."))
                    .suffix(".qcow2-guard-tmp")
                    .tempfile_in(&dir)
                    .map_err(Failure::Open)?;
                conversion.run(&FileSink::new(tmp.as_file()), Some(&tick))?;
                if !failed() {
                    tmp.persist(&path).map_err(|e| Failure::Open(e.error))?;
                }
            }
            Output::Writer(w) => {
                conversion.run(&WriteSink::new(w), Some(&tick))?;
            }
        }
        Ok(conversion.warnings().to_vec())
    });
    if let Some(e) = callback_error.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    match result {
        Ok(warnings) => to_py(
            py,
            &Value::Array(warnings.iter().map(qcow2_guard::json::finding).collect()),
        ),
        Err(Failure::Open(e)) => Err(PyOSError::new_err(e.to_string())),
        Err(Failure::Convert(e)) => Err(convert_error(py, e, filename)),
    }
}

/// Byte ranges (start, end) read back from the spool.
type ReadBack = Vec<(u64, u64)>;

/// Where a conversion writes.
enum Output {
    Path(PathBuf),
    Writer(PyWriter),
}

/// Why [`convert_image`] failed.
enum Failure {
    Open(io::Error),
    Convert(ConvertError),
}

impl From<ConvertError> for Failure {
    fn from(e: ConvertError) -> Failure {
        Failure::Convert(e)
    }
}

/// The library's streaming inspector ([`qcow2_guard::stream::Inspector`]):
/// fed the file's bytes in order, it keeps only what the check needs and
/// ends with the same report as a random-access check.
#[pyclass(module = "qcow2_guard._native")]
struct StreamInspector {
    inner: Option<Inspector>,
    filename: String,
    metadata_only: bool,
}

#[pymethods]
impl StreamInspector {
    #[new]
    #[pyo3(signature = (filename, options, metadata_only, spool))]
    fn new(
        filename: String,
        options: PolicyOptions,
        metadata_only: bool,
        spool: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<StreamInspector> {
        let (policy, limits) = options.policy_and_limits();
        let opts = CheckOptions {
            policy,
            decompress: !metadata_only,
            ..CheckOptions::default()
        };
        let inner = match spool {
            Some(s) => Inspector::with_spool(limits, opts, Input::extract(s)?.open_spool()?),
            None => Inspector::new(limits, opts),
        };
        Ok(StreamInspector {
            inner: Some(inner),
            filename,
            metadata_only,
        })
    }

    /// Feed the next bytes of the file.
    fn feed(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let inner = self.live()?;
        py.detach(|| inner.feed(data));
        Ok(())
    }

    /// `("pending", [])`, `("clear", [])` or `("refused", findings)`.
    fn early(&mut self, py: Python<'_>) -> PyResult<(String, Py<PyAny>)> {
        let (state, findings) = match self.live()?.early() {
            Early::Pending => ("pending", Vec::new()),
            Early::Clear => ("clear", Vec::new()),
            Early::Refused(f) => ("refused", f),
        };
        let list = Value::Array(findings.iter().map(qcow2_guard::json::finding).collect());
        Ok((state.to_owned(), to_py(py, &list)?))
    }

    /// Bytes fed so far.
    fn position(&mut self) -> PyResult<u64> {
        Ok(self.live()?.position())
    }

    /// Bytes held now.
    fn retained_bytes(&mut self) -> PyResult<u64> {
        Ok(self.live()?.retained_bytes())
    }

    /// End of the stream: `(check document, read-back ranges)`.
    fn finish(&mut self, py: Python<'_>) -> PyResult<(Py<PyAny>, ReadBack)> {
        let inner = self
            .inner
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the inspector has finished"))?;
        let (name, metadata_only) = (self.filename.clone(), self.metadata_only);
        let (doc, read_back) = py.detach(move || {
            let done = inner.finish();
            let doc =
                qcow2_guard::json::check(&name, done.image.as_ref(), &done.report, metadata_only);
            (doc, done.read_back)
        });
        Ok((to_py(py, &doc)?, read_back))
    }
}

impl StreamInspector {
    fn live(&mut self) -> PyResult<&mut Inspector> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("the inspector has finished"))
    }
}

/// The native module.
#[pymodule]
mod _native {
    #[pymodule_export]
    use super::{check_image, convert_image, info_image, probe_header, StreamInspector};
}
