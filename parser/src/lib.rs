//! qcow2-guard: a fuzzing-hardened, no-panic qcow2 parser for untrusted
//! disk images.
//!
//! Every read is bounds checked against the file, every allocation sized
//! from the file is bounded by the file length, QEMU's caps and a
//! caller-supplied [`Limits`], and every problem is a typed [`Error`] with a
//! stable code and the file offset it concerns. The library never opens a
//! path named inside an image and never writes to the image.
//!
//! [`Image::open`] reads and checks the header, extensions and top-level
//! tables; [`Image::policy_findings`] says whether the image may be
//! processed at all; [`check()`] walks everything else; [`Image::read_at`],
//! [`Image::map`] and [`Image::reader`] read guest data ([`read`] module);
//! [`convert`] writes the raw disk into a file or any `Write`.
//! `build` (cargo feature `build`, off by default) encodes valid images
//! from a model, for tests and fuzzing; the examples below use it.
//!
//! # Opening an image
//!
//! What `qemu-img info` shows, from the sample image in the repository:
//!
//! ```
//! use qcow2_guard::{CompressionType, FileSource, Image, Policy};
//!
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/sample.qcow2");
//! let image = Image::open(FileSource::open(path)?)?;
//! assert_eq!(image.header().version, 3); // compat 1.1
//! assert_eq!(image.virtual_size(), 4 << 20);
//! assert_eq!(image.geometry().cluster_size, 4096);
//! assert_eq!(image.geometry().refcount_bits, 16);
//! assert_eq!(image.header().compression(), Some(CompressionType::Deflate));
//! assert_eq!(image.snapshots()[0].name, "first");
//! assert!(image.backing_file().is_none());
//! // No backing file, data file, encryption or unknown features: nothing to refuse.
//! assert!(image.policy_findings(&Policy::default()).is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The safety policy is separate from parsing: an image QEMU marked corrupt
//! (incompatible bit 1) opens, and the policy refuses it, naming the field.
//!
//! ```
//! use qcow2_guard::build::ImageModel;
//! use qcow2_guard::header::{field, INCOMPAT_CORRUPT};
//! use qcow2_guard::{Category, Image, Policy, Severity};
//!
//! let mut bytes = ImageModel::default().build()?.bytes;
//! let at = field::INCOMPATIBLE_FEATURES as usize;
//! let bits = u64::from_be_bytes(bytes[at..at + 8].try_into()?) | INCOMPAT_CORRUPT;
//! bytes[at..at + 8].copy_from_slice(&bits.to_be_bytes());
//!
//! let image = Image::open(bytes)?;
//! let findings = image.policy_findings(&Policy::default());
//! assert_eq!(findings.len(), 1);
//! let f = &findings[0];
//! assert_eq!(f.code, "policy_corrupt_bit");
//! assert_eq!((f.severity, f.category), (Severity::Error, Category::Policy));
//! assert_eq!(f.offset, field::INCOMPATIBLE_FEATURES);
//! assert_eq!(
//!     f.to_string(),
//!     "error [policy_corrupt_bit] at 0x48: image is marked corrupt (incompatible bit 1)",
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Auditing an upload
//!
//! The README's library example (kept identical; its copy there is compiled
//! by `cargo test --doc`), run on the sample image:
//!
//! ```
//! use qcow2_guard::{check, CheckOptions, FileSource, Image, Limits, Policy, Verdict};
//!
//! fn audit(path: &str) -> Result<bool, Box<dyn std::error::Error>> {
//!     // Allocation caps: QEMU's, tighter ones for hostile uploads if wanted.
//!     let image = Image::open_with(FileSource::open(path)?, Limits::default())?;
//!     println!("virtual size {}", image.virtual_size());
//!     let report = check(&image, &CheckOptions {
//!         // No backing file, data file, encryption; at most 2 TiB of disk.
//!         policy: Policy::default().with_max_virtual_size(2 << 40),
//!         ..CheckOptions::default()
//!     });
//!     for f in &report.findings {
//!         println!("{} at {:#x}: {}", f.code, f.offset, f.message);
//!     }
//!     // Guest data, bounds checked: the first 4 KiB of the disk.
//!     let mut buf = vec![0u8; 4096];
//!     image.read_at(0, &mut buf)?;
//!     Ok(report.verdict == Verdict::Ok)
//! }
//! # assert!(audit(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/sample.qcow2"))?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Converting to a raw disk
//!
//! The README's conversion examples (kept identical), run on the sample
//! image; the output equals the guest disk read through [`Image::read_at`]:
//!
//! ```
//! use std::fs::File;
//! use std::io::Write;
//!
//! use qcow2_guard::convert::{prepare, ConvertError, ConvertOptions, FileSink, Inputs, WriteSink};
//! use qcow2_guard::FileSource;
//!
//! /// Into a new raw file: holes are skipped (sparse), the file is sized to
//! /// the virtual disk. Nothing is written unless the policy and the
//! /// metadata audit pass.
//! fn to_file(image: &str, out: &str) -> Result<(), Box<dyn std::error::Error>> {
//!     let inputs = Inputs::new(FileSource::open(image)?);
//!     let conversion = match prepare(inputs, &ConvertOptions::default()) {
//!         Err(ConvertError::Refused { findings, .. }) => {
//!             for f in &findings {
//!                 eprintln!("refused: {f}"); // e.g. policy_backing_file at 0x8
//!             }
//!             return Err("refused".into());
//!         }
//!         other => other?,
//!     };
//!     let file = File::create_new(out)?;
//!     conversion.run(&FileSink::new(&file), None)?;
//!     file.sync_all()?;
//!     Ok(())
//! }
//!
//! /// Into any `Write` (a pipe, a socket), in order, holes as zeros, with a
//! /// progress callback.
//! fn to_writer(image: &str, w: impl Write + Send) -> Result<(), Box<dyn std::error::Error>> {
//!     let conversion = prepare(Inputs::new(FileSource::open(image)?), &ConvertOptions::default())?;
//!     let progress = |bytes: u64| eprint!("+{bytes}");
//!     conversion.run(&WriteSink::new(w), Some(&progress))?;
//!     Ok(())
//! }
//! # let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/sample.qcow2");
//! # let image = qcow2_guard::Image::open(FileSource::open(sample)?)?;
//! # let mut want = vec![0u8; usize::try_from(image.virtual_size())?];
//! # image.read_at(0, &mut want)?;
//! # let mut streamed = Vec::new();
//! # to_writer(sample, &mut streamed)?;
//! # assert_eq!(streamed, want);
//! # let out = std::env::temp_dir().join(format!("qcow2-guard-doctest-{}.raw", std::process::id()));
//! # let _ = std::fs::remove_file(&out);
//! # to_file(sample, out.to_str().ok_or("path")?)?;
//! # let written = std::fs::read(&out)?;
//! # std::fs::remove_file(&out)?;
//! # assert_eq!(written, want);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! More examples: [`check()`] (verdicts), [`read`] (guest data),
//! [`Limits`] (tightened limits), [`compressed::Descriptor::decode`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod bitmap;
mod bounds;
#[cfg(any(test, feature = "build"))]
pub mod build;
pub mod check;
mod codec;
pub mod compare;
pub mod compressed;
pub mod convert;
pub mod error;
pub mod extensions;
pub mod finding;
pub mod header;
pub mod image;
#[cfg(feature = "json")]
pub mod json;
pub mod l1l2;
pub mod limits;
pub mod metadata;
pub mod parallel;
pub mod policy;
pub mod qemu;
pub mod qemu_map;
pub mod read;
pub mod refcount;
pub mod snapshot;
pub mod source;
pub mod stream;
pub mod walker;

pub use check::{check, check_metadata, CheckOptions, Report, Verdict};
pub use error::{Error, Result, What};
pub use finding::{Category, Finding, Severity};
pub use header::{CompressionType, CryptMethod, Geometry, Header};
pub use image::Image;
pub use limits::Limits;
pub use policy::Policy;
pub use qemu_map::{qemu_map, MapEntry, MapLayer};
pub use read::{Extent, ExtentKind, GuestReader};
pub use source::{FileSource, Source};

/// Compiles the README's Rust code blocks, so its library example cannot
/// drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
