//! qcow2-guard: a fuzzing-hardened, no-panic qcow2 parser for untrusted
//! disk images.
//!
//! Every read is bounds checked against the file, every allocation sized
//! from the file is bounded by the file length, QEMU's caps and a
//! caller-supplied [`Limits`], and every problem is a typed [`Error`] with a
//! stable code and the file offset it concerns. The library never opens a
//! path named inside an image and never writes to the image.
//!
//! ```no_run
//! use qcow2_guard::{FileSource, Image, Policy};
//!
//! let image = Image::open(FileSource::open("disk.qcow2")?)?;
//! println!("virtual size {}", image.virtual_size());
//! for f in image.policy_findings(&Policy::default()) {
//!     println!("{f}");
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod bitmap;
pub mod build;
pub mod check;
mod codec;
pub mod compressed;
pub mod error;
pub mod extensions;
pub mod finding;
pub mod header;
pub mod image;
pub mod l1l2;
pub mod limits;
pub mod metadata;
pub mod policy;
pub mod qemu;
pub mod read;
pub mod refcount;
pub mod snapshot;
pub mod source;

pub use check::{check, check_metadata, CheckOptions, Report, Verdict};
pub use error::{Error, Result, What};
pub use finding::{Category, Finding, Severity};
pub use header::{CompressionType, CryptMethod, Geometry, Header};
pub use image::Image;
pub use limits::Limits;
pub use policy::Policy;
pub use read::{Extent, ExtentKind, GuestReader};
pub use source::{FileSource, Source};
