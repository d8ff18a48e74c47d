//! Header extensions: the type-length-value records after the fixed header.
//!
//! They start at header_length (72 for v2), end at a type-0 record, and must
//! stay inside the first cluster and before the backing file name. Each
//! known type is decoded and checked once; unknown types are recorded.

use crate::codec::{Need, Reader, Writer};
use crate::error::{Error, Result, What};
use crate::header::{self, field, CryptMethod, Header};
use crate::qemu;

/// End of the extension list.
pub const EXT_END: u32 = 0;
/// Backing file format name (e.g. "qcow2", "raw").
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_BE77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

const KNOWN: [u32; 5] = [
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
];

/// One feature name table entry is this many bytes.
pub const FEATURE_ENTRY_BYTES: u32 = 48;
/// Longest backing format name QEMU accepts (its buffer is 16 bytes).
pub const MAX_BACKING_FORMAT: u32 = 15;

/// How many unknown extensions are kept in [`Extensions::unknown`].
pub const MAX_UNKNOWN_RECORDED: usize = 64;

/// Which feature field a feature name describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// incompatible_features.
    Incompatible,
    /// compatible_features.
    Compatible,
    /// autoclear_features.
    Autoclear,
    /// A type byte this reader does not know.
    Unknown(u8),
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// The feature field the bit belongs to.
    pub kind: FeatureKind,
    /// Bit number within that field (0..=63 for the known kinds).
    pub bit: u8,
    /// The name, up to its first NUL, decoded lossily as UTF-8.
    pub name: String,
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// File offset of the extension's data.
    pub offset: u64,
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// File offset of the bitmap directory (cluster aligned).
    pub directory_offset: u64,
}

/// The full disk encryption extension: where the LUKS header is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExt {
    /// File offset of the extension's data.
    pub offset: u64,
    /// File offset of the encryption (LUKS) header.
    pub header_offset: u64,
    /// Length of the encryption header in bytes.
    pub header_length: u64,
}

/// A header extension of a type this reader does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExt {
    /// The extension's type code.
    pub ext_type: u32,
    /// File offset of the extension's data.
    pub offset: u64,
    /// Length of the data in bytes (without padding).
    pub len: u32,
}

/// A string stored in the image, with the file offset it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredString {
    /// File offset of the first byte.
    pub offset: u64,
    /// Raw bytes as stored (not necessarily UTF-8).
    pub bytes: Vec<u8>,
}

impl StoredString {
    /// The string for display (invalid UTF-8 replaced).
    pub fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// All header extensions of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format name, e.g. "raw" (never used to open anything).
    pub backing_format: Option<StoredString>,
    /// Feature name table entries, in table order.
    pub feature_names: Vec<FeatureName>,
    /// The bitmaps extension; when autoclear bit 0 is clear it is stale,
    /// kept only to be reported, and its fields are unchecked.
    pub bitmaps: Option<BitmapsExt>,
    /// The full disk encryption header extension.
    pub crypto: Option<CryptoExt>,
    /// External data file name (never opened by this crate).
    pub data_file: Option<StoredString>,
    /// Unknown extensions, the first [`MAX_UNKNOWN_RECORDED`] of them.
    pub unknown: Vec<UnknownExt>,
    /// How many unknown extensions there were in all.
    pub unknown_count: usize,
    /// Whether the list ended with a type-0 record (QEMU accepts a list that
    /// simply runs to the end of the area).
    pub terminated: bool,
}

impl Extensions {
    /// Decode the extensions of a (validated) `header` from `first_cluster`,
    /// the file's first bytes (up to one cluster).
    pub fn decode(header: &Header, first_cluster: &[u8]) -> Result<Extensions> {
        let start = header.length();
        let cluster_size = 1u64.checked_shl(header.cluster_bits).unwrap_or(0);
        let area_end = if header.has_backing_file() {
            header.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        };
        let have = u64::try_from(first_cluster.len()).unwrap_or(u64::MAX);
        let end = area_end.min(have);
        let area = usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| first_cluster.get(s..e))
            .unwrap_or(&[]);
        let mut r = Reader::new(area, start);
        let mut ext = Extensions::default();
        let mut seen = Vec::with_capacity(KNOWN.len());
        while r.remaining() > 0 {
            let at = r.offset();
            let (Some(ext_type), Some(len)) = (r.u32(), r.u32()) else {
                return Err(Error::Truncated {
                    what: What::HeaderExtension,
                    offset: at,
                });
            };
            // QEMU checks the length before the type, so even the end
            // marker's length must fit in the area ("Header extension too
            // large" otherwise).
            if ext_type == EXT_END {
                if usize::try_from(len).map_or(true, |l| l > r.remaining()) {
                    return Err(Error::ExtensionTooLarge {
                        offset: at,
                        ext_type,
                        len,
                        end: area_end,
                    });
                }
                ext.terminated = true;
                break;
            }
            let data_at = r.offset();
            let data = r.take(usize::try_from(len).unwrap_or(usize::MAX)).ok_or(
                Error::ExtensionTooLarge {
                    offset: at,
                    ext_type,
                    len,
                    end: area_end,
                },
            )?;
            // Padding to 8 may run off the area only for the last record.
            if r.align(8).is_none() {
                let rest = r.remaining();
                r.take(rest);
            }
            if KNOWN.contains(&ext_type) {
                if seen.contains(&ext_type) {
                    return Err(Error::DuplicateExtension {
                        offset: at,
                        ext_type,
                    });
                }
                seen.push(ext_type);
            }
            ext.add(header, ext_type, at, data_at, len, data)?;
        }
        ext.cross_check(header)?;
        Ok(ext)
    }

    fn add(
        &mut self,
        header: &Header,
        ext_type: u32,
        at: u64,
        data_at: u64,
        len: u32,
        data: &[u8],
    ) -> Result<()> {
        let bad_len = |reason| Error::InvalidExtensionLength {
            offset: at,
            ext_type,
            len,
            reason,
        };
        match ext_type {
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT {
                    return Err(bad_len("backing format name longer than 15 bytes"));
                }
                self.backing_format = Some(StoredString {
                    offset: data_at,
                    bytes: data.to_vec(),
                });
            }
            EXT_FEATURE_TABLE => {
                if !len.is_multiple_of(FEATURE_ENTRY_BYTES) {
                    return Err(bad_len("not a multiple of 48 bytes"));
                }
                self.feature_names = data
                    .chunks_exact(48)
                    .filter_map(|c| {
                        let (&kind, rest) = c.split_first()?;
                        let (&bit, name) = rest.split_first()?;
                        let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        Some(FeatureName {
                            kind: match kind {
                                0 => FeatureKind::Incompatible,
                                1 => FeatureKind::Compatible,
                                2 => FeatureKind::Autoclear,
                                k => FeatureKind::Unknown(k),
                            },
                            bit,
                            name: String::from_utf8_lossy(name.get(..name_len).unwrap_or(&[]))
                                .into_owned(),
                        })
                    })
                    .collect();
            }
            EXT_BITMAPS => {
                if len != 24 {
                    return Err(bad_len("bitmaps extension must be 24 bytes"));
                }
                let mut r = Reader::new(data, data_at);
                let t = Need(What::HeaderExtension, at);
                let nb_bitmaps = t.get(r.u32())?;
                let reserved = t.get(r.u32())?;
                let directory_size = t.get(r.u64())?;
                let directory_offset = t.get(r.u64())?;
                let ext = BitmapsExt {
                    offset: data_at,
                    nb_bitmaps,
                    directory_size,
                    directory_offset,
                };
                // Like QEMU, a stale extension (autoclear bit 0 clear: a
                // program without bitmap support wrote the image) is only
                // recorded, to be reported; its contents are not checked
                // and never used.
                if header.autoclear_features & header::AUTOCLEAR_BITMAPS == 0 {
                    self.bitmaps = Some(ext);
                    return Ok(());
                }
                let bad = |reason| Error::InvalidBitmapsExtension {
                    offset: data_at,
                    reason,
                };
                if reserved != 0 {
                    return Err(Error::ReservedBits {
                        what: What::HeaderExtension,
                        offset: data_at.saturating_add(4),
                        value: u64::from(reserved),
                    });
                }
                if nb_bitmaps == 0 {
                    return Err(bad("zero bitmaps"));
                }
                if u64::from(nb_bitmaps) > qemu::MAX_BITMAPS {
                    return Err(Error::TooLarge {
                        what: What::BitmapDirectory,
                        offset: data_at,
                        value: u64::from(nb_bitmaps),
                        limit: qemu::MAX_BITMAPS,
                    });
                }
                if directory_size > qemu::MAX_BITMAP_DIRECTORY_BYTES {
                    return Err(Error::TooLarge {
                        what: What::BitmapDirectory,
                        offset: data_at.saturating_add(8),
                        value: directory_size,
                        limit: qemu::MAX_BITMAP_DIRECTORY_BYTES,
                    });
                }
                let cluster_size = 1u64.checked_shl(header.cluster_bits).unwrap_or(0);
                if !crate::bounds::is_aligned(directory_offset, cluster_size) {
                    return Err(Error::Unaligned {
                        what: What::BitmapDirectory,
                        offset: data_at.saturating_add(16),
                        value: directory_offset,
                    });
                }
                self.bitmaps = Some(ext);
            }
            EXT_CRYPTO => {
                if len != 16 {
                    return Err(bad_len("encryption header extension must be 16 bytes"));
                }
                let mut r = Reader::new(data, data_at);
                let t = Need(What::HeaderExtension, at);
                self.crypto = Some(CryptoExt {
                    offset: data_at,
                    header_offset: t.get(r.u64())?,
                    header_length: t.get(r.u64())?,
                });
            }
            EXT_DATA_FILE => {
                self.data_file = Some(StoredString {
                    offset: data_at,
                    bytes: data.to_vec(),
                });
            }
            _ => {
                // Unknown types are kept for display, up to a small count;
                // a hostile first cluster could otherwise hold 256 Ki of them.
                self.unknown_count = self.unknown_count.saturating_add(1);
                if self.unknown.len() < MAX_UNKNOWN_RECORDED {
                    self.unknown.push(UnknownExt {
                        ext_type,
                        offset: data_at,
                        len,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks that need both the header and the extensions.
    fn cross_check(&self, header: &Header) -> Result<()> {
        match (header.crypt(), self.crypto) {
            (Some(CryptMethod::Luks), None) => Err(Error::MissingCryptoHeader {
                offset: field::CRYPT_METHOD,
            }),
            (Some(CryptMethod::Luks), Some(_)) | (_, None) => Ok(()),
            (_, Some(c)) => Err(Error::UnexpectedCryptoHeader { offset: c.offset }),
        }
    }

    /// Encode the extensions (with the end marker) in a canonical order.
    /// Used to build test and fuzz images.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        let record = |w: &mut Writer, ext_type: u32, data: &[u8]| {
            w.u32(ext_type)
                .u32(u32::try_from(data.len()).unwrap_or(u32::MAX))
                .bytes(data)
                .pad_to(8);
        };
        if let Some(f) = &self.backing_format {
            record(&mut w, EXT_BACKING_FORMAT, &f.bytes);
        }
        if let Some(c) = &self.crypto {
            let mut d = Writer::default();
            d.u64(c.header_offset).u64(c.header_length);
            record(&mut w, EXT_CRYPTO, &d.buf);
        }
        if let Some(b) = &self.bitmaps {
            let mut d = Writer::default();
            d.u32(b.nb_bitmaps)
                .u32(0)
                .u64(b.directory_size)
                .u64(b.directory_offset);
            record(&mut w, EXT_BITMAPS, &d.buf);
        }
        if let Some(f) = &self.data_file {
            record(&mut w, EXT_DATA_FILE, &f.bytes);
        }
        if !self.feature_names.is_empty() {
            let mut d = Writer::default();
            for f in &self.feature_names {
                let kind = match f.kind {
                    FeatureKind::Incompatible => 0,
                    FeatureKind::Compatible => 1,
                    FeatureKind::Autoclear => 2,
                    FeatureKind::Unknown(k) => k,
                };
                let mut name = [0u8; 46];
                for (dst, src) in name.iter_mut().zip(f.name.bytes()) {
                    *dst = src;
                }
                d.u8(kind).u8(f.bit).bytes(&name);
            }
            record(&mut w, EXT_FEATURE_TABLE, &d.buf);
        }
        w.u32(EXT_END).u32(0);
        w.buf
    }

    /// The name of a feature bit from the feature name table, if present.
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.as_str())
    }
}

/// The feature name table QEMU writes, for encoders.
pub fn qemu_feature_names() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_owned(),
    };
    vec![
        f(FeatureKind::Incompatible, 0, "dirty bit"),
        f(FeatureKind::Incompatible, 1, "corrupt bit"),
        f(FeatureKind::Incompatible, 2, "external data file"),
        f(FeatureKind::Incompatible, 3, "compression type"),
        f(FeatureKind::Incompatible, 4, "extended L2 entries"),
        f(FeatureKind::Compatible, 0, "lazy refcounts"),
        f(FeatureKind::Autoclear, 0, "bitmaps"),
        f(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn header() -> Header {
        let mut b = vec![0u8; 112];
        b[..4].copy_from_slice(&header::MAGIC.to_be_bytes());
        b[7] = 3;
        b[23] = 16;
        b[99] = 4;
        b[103] = 112;
        Header::decode(&b).unwrap()
    }

    fn image(ext: &[u8]) -> Vec<u8> {
        let mut b = header().encode();
        b.extend_from_slice(ext);
        b.resize(65536, 0);
        b
    }

    #[test]
    fn round_trip() {
        let e = Extensions {
            backing_format: Some(StoredString {
                offset: 120,
                bytes: b"qcow2".to_vec(),
            }),
            feature_names: qemu_feature_names(),
            data_file: Some(StoredString {
                offset: 0,
                bytes: b"x.raw".to_vec(),
            }),
            terminated: true,
            ..Default::default()
        };
        let got = Extensions::decode(&header(), &image(&e.encode())).unwrap();
        assert_eq!(got.backing_format.unwrap().bytes, b"qcow2");
        assert_eq!(got.feature_names, qemu_feature_names());
        assert_eq!(got.data_file.unwrap().lossy(), "x.raw");
        assert!(got.terminated);
    }

    #[test]
    fn hostile_lists() {
        let h = header();
        // A one-byte feature table (a peer reader panicked on this).
        let mut w = Writer::default();
        w.u32(EXT_FEATURE_TABLE)
            .u32(1)
            .u8(0)
            .pad_to(8)
            .u32(0)
            .u32(0);
        let e = Extensions::decode(&h, &image(&w.buf)).unwrap_err();
        assert_eq!((e.code(), e.offset()), ("invalid_extension_length", 112));
        // A length that runs off the first cluster.
        let mut w = Writer::default();
        w.u32(0x1234).u32(u32::MAX);
        let e = Extensions::decode(&h, &image(&w.buf)).unwrap_err();
        assert_eq!(e.code(), "extension_too_large");
        // A known extension twice.
        let mut w = Writer::default();
        w.u32(EXT_BACKING_FORMAT).u32(3).bytes(b"raw").pad_to(8);
        w.u32(EXT_BACKING_FORMAT).u32(3).bytes(b"raw").pad_to(8);
        w.u32(0).u32(0);
        let e = Extensions::decode(&h, &image(&w.buf)).unwrap_err();
        assert_eq!((e.code(), e.offset()), ("duplicate_extension", 128));
        // A truncated record header at the very end of the cluster.
        let mut b = image(&[]);
        for x in b[112..].iter_mut() {
            *x = 0xff;
        }
        let e = Extensions::decode(&h, &b[..65536 - 4]).unwrap_err();
        assert!(
            matches!(e.code(), "extension_too_large" | "truncated"),
            "{e}"
        );
    }
}
