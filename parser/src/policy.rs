//! The safety policy for untrusted images: header-level rules that decide
//! whether an image may be processed at all, independent of whether it is
//! well formed. Every command applies it before touching guest data.

use crate::error::What;
use crate::extensions::Extensions;
use crate::finding::{Category, Finding, Severity};
use crate::header::{
    field, CryptMethod, Header, AUTOCLEAR_KNOWN, INCOMPAT_CORRUPT, INCOMPAT_KNOWN,
};

/// What the caller is willing to accept. The default refuses everything
/// that could make a reader touch another file or misread the data.
///
/// Acceptance only: what an image may make the library allocate is
/// [`crate::Limits`], how much work a check may do is
/// [`crate::CheckOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Accept images that name a backing file.
    pub allow_backing: bool,
    /// Accept images whose data lives in an external data file.
    pub allow_data_file: bool,
    /// Accept encrypted images (AES or LUKS).
    pub allow_encryption: bool,
    /// Largest virtual disk accepted. Default 64 TiB.
    pub max_virtual_size: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_backing: false,
            allow_data_file: false,
            allow_encryption: false,
            max_virtual_size: 64 << 40,
        }
    }
}

/// Policy finding codes.
pub mod code {
    /// Refused: the image names a backing file (unless [`crate::Policy::allow_backing`]).
    pub const BACKING_FILE: &str = "policy_backing_file";
    /// Refused: guest data lives in an external data file (unless
    /// [`crate::Policy::allow_data_file`]).
    pub const DATA_FILE: &str = "policy_external_data_file";
    /// Refused: the image is encrypted (unless [`crate::Policy::allow_encryption`]).
    pub const ENCRYPTION: &str = "policy_encryption";
    /// Refused: incompatible feature bits this reader does not know.
    pub const UNKNOWN_INCOMPATIBLE: &str = "policy_unknown_incompatible_features";
    /// Refused: QEMU marked the image corrupt (incompatible bit 1).
    pub const CORRUPT_BIT: &str = "policy_corrupt_bit";
    /// Refused: the virtual size exceeds [`crate::Policy::max_virtual_size`].
    pub const VIRTUAL_SIZE: &str = "policy_virtual_size";
    /// Warning: the dirty bit is set, so refcounts may be stale.
    pub const DIRTY_BIT: &str = "dirty_bit";
    /// Warning: autoclear bits this reader does not know (QEMU clears them).
    pub const UNKNOWN_AUTOCLEAR: &str = "unknown_autoclear_features";
}

impl Policy {
    /// Set [`Policy::max_virtual_size`].
    pub fn with_max_virtual_size(mut self, bytes: u64) -> Self {
        self.max_virtual_size = bytes;
        self
    }

    /// Apply the rules to a decoded header and its extensions.
    pub fn evaluate(&self, h: &Header, ext: &Extensions) -> Vec<Finding> {
        let max_virtual_size = self.max_virtual_size;
        let mut out = Vec::new();
        let mut refuse = |code, offset, msg: String| {
            out.push(Finding::new(
                code,
                Severity::Error,
                Category::Policy,
                offset,
                msg,
            ));
        };
        // QEMU treats an empty name as no backing file: nothing can be opened.
        if h.has_backing_file() && h.backing_file_size > 0 && !self.allow_backing {
            refuse(
                code::BACKING_FILE,
                field::BACKING_FILE_OFFSET,
                format!(
                    "image names a {} at {:#x}; reading it would open another file",
                    What::BackingFileName,
                    h.backing_file_offset
                ),
            );
        }
        if (h.has_data_file() || ext.data_file.is_some()) && !self.allow_data_file {
            let offset = ext
                .data_file
                .as_ref()
                .map_or(field::INCOMPATIBLE_FEATURES, |d| d.offset);
            refuse(
                code::DATA_FILE,
                offset,
                "image stores guest data in an external data file".to_owned(),
            );
        }
        match h.crypt() {
            Some(CryptMethod::None) | None => {}
            Some(m) if !self.allow_encryption => refuse(
                code::ENCRYPTION,
                field::CRYPT_METHOD,
                format!("image is encrypted ({m:?}); guest data cannot be verified"),
            ),
            Some(_) => {}
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            refuse(
                code::UNKNOWN_INCOMPATIBLE,
                field::INCOMPATIBLE_FEATURES,
                format!("unknown incompatible feature bits {unknown:#x}"),
            );
        }
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
            refuse(
                code::CORRUPT_BIT,
                field::INCOMPATIBLE_FEATURES,
                "image is marked corrupt (incompatible bit 1)".to_owned(),
            );
        }
        if h.size > max_virtual_size {
            refuse(
                code::VIRTUAL_SIZE,
                field::SIZE,
                format!(
                    "virtual size {} exceeds the accepted maximum of {}",
                    h.size, max_virtual_size
                ),
            );
        }
        if h.is_dirty() {
            out.push(Finding::new(
                code::DIRTY_BIT,
                Severity::Warning,
                Category::Other,
                field::INCOMPATIBLE_FEATURES,
                "image is marked dirty: refcounts may be stale (lazy refcounts)",
            ));
        }
        let autoclear = h.autoclear_features & !AUTOCLEAR_KNOWN;
        if autoclear != 0 {
            out.push(Finding::new(
                code::UNKNOWN_AUTOCLEAR,
                Severity::Warning,
                Category::Other,
                field::AUTOCLEAR_FEATURES,
                format!("unknown autoclear feature bits {autoclear:#x}"),
            ));
        }
        out
    }
}
