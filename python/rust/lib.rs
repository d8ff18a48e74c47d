//! `qcow2_guard._native`: the private native module of the `qcow2_guard`
//! Python package.
//!
//! Holds no format logic and no policy of its own: each function turns
//! Python arguments into library calls, releases the GIL while the library
//! works, and turns the library's results into Python objects (the JSON
//! documents of [`qcow2_guard::json`] as dicts, library errors as the
//! package's exception classes from `qcow2_guard._errors`).

use std::io;
use std::path::PathBuf;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};
use serde_json::Value;

use qcow2_guard::{
    check, CheckOptions, Error, FileSource, Header, Image, Limits, Policy, Report, Source,
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
    len: u64,
    pread: Py<PyAny>,
}

impl Source for PyReader {
    fn len(&self) -> u64 {
        self.len
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
            let (len, pread): (u64, Py<PyAny>) = t.extract()?;
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
}

/// The caller's policy options.
fn policy_and_limits(
    allow_backing: bool,
    allow_data_file: bool,
    allow_encryption: bool,
    max_virtual_size: Option<u64>,
) -> (Policy, Limits) {
    let policy = Policy {
        allow_backing,
        allow_data_file,
        allow_encryption,
    };
    let limits = Limits::default();
    let limits = match max_virtual_size {
        Some(max) => limits.with_max_virtual_size(max),
        None => limits,
    };
    (policy, limits)
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
    let kind = if e.is_io() {
        "io"
    } else if e.is_not_qcow2() {
        "not_qcow2"
    } else if e.is_refusal() {
        "refused"
    } else {
        "corrupt"
    };
    match py
        .import("qcow2_guard._errors")
        .and_then(|m| m.call_method1("from_native", (kind, e.code(), e.offset(), e.to_string())))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// Check an image: the `check --json` document (without `exit-code`).
/// Never fails on the image's content (problems are findings); fails with
/// `OSError` when the source cannot be opened.
#[pyfunction]
#[pyo3(signature = (source, filename, allow_backing, allow_data_file, allow_encryption, max_virtual_size, metadata_only))]
#[allow(clippy::too_many_arguments)]
fn check_image(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    filename: &str,
    allow_backing: bool,
    allow_data_file: bool,
    allow_encryption: bool,
    max_virtual_size: Option<u64>,
    metadata_only: bool,
) -> PyResult<Py<PyAny>> {
    let input = Input::extract(source)?;
    let (policy, limits) = policy_and_limits(
        allow_backing,
        allow_data_file,
        allow_encryption,
        max_virtual_size,
    );
    let doc = py.detach(move || -> io::Result<Value> {
        let src = input.open()?;
        let opts = CheckOptions {
            policy,
            decompress: !metadata_only,
            ..CheckOptions::default()
        };
        Ok(match Image::open_with(src, limits) {
            Ok(image) => {
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
    })?;
    to_py(py, &doc)
}

/// What `qemu-img info --output=json` shows (plus feature names and the
/// policy findings), without `exit-code`. Fails with the package's
/// exception when the image cannot be opened.
#[pyfunction]
#[pyo3(signature = (source, filename, actual_size, allow_backing, allow_data_file, allow_encryption, max_virtual_size))]
#[allow(clippy::too_many_arguments)]
fn info_image(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    filename: &str,
    actual_size: Option<u64>,
    allow_backing: bool,
    allow_data_file: bool,
    allow_encryption: bool,
    max_virtual_size: Option<u64>,
) -> PyResult<Py<PyAny>> {
    let input = Input::extract(source)?;
    let (policy, limits) = policy_and_limits(
        allow_backing,
        allow_data_file,
        allow_encryption,
        max_virtual_size,
    );
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

/// The native module.
#[pymodule]
mod _native {
    #[pymodule_export]
    use super::{check_image, info_image, probe_header};
}
