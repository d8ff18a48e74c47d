//! JSON documents for reports (feature `json`): what `qcow2-guard check
//! --json` and `info --json` print, built in one place so the command-line
//! tool and embedding services (the Python package) give the same content.
//!
//! The documents hold no process exit status: callers that have one (the
//! command-line tool) add their `"exit-code"` themselves.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::check::{Report, Stats};
use crate::extensions::FeatureKind;
use crate::header::{
    CryptMethod, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT,
};
use crate::{Error, Finding, Image, Source};

/// `{"code", "severity", "offset", "message"}` for a finding.
pub fn finding(f: &Finding) -> Value {
    json!({
        "code": f.code,
        "severity": f.severity.as_str(),
        "offset": f.offset,
        "message": f.message,
    })
}

/// `{"code", "offset", "message"}` for an error.
pub fn error(e: &Error) -> Value {
    json!({
        "code": e.code(),
        "offset": e.offset(),
        "message": e.to_string(),
    })
}

/// The `check --json` document (schema in the README) for `rep`, the
/// report of `image` (`None` when it could not be opened), without
/// `"exit-code"`.
pub fn check<S: Source>(
    filename: &str,
    image: Option<&Image<S>>,
    rep: &Report,
    metadata_only: bool,
) -> Value {
    let mut v = Map::new();
    v.insert("filename".into(), json!(filename));
    v.insert("format".into(), json!("qcow2"));
    v.insert("verdict".into(), json!(rep.verdict.as_str()));
    v.insert(
        "findings".into(),
        Value::Array(rep.findings.iter().map(finding).collect()),
    );
    v.insert("findings-omitted".into(), json!(rep.omitted));
    v.insert("finding-counts".into(), json!(rep.counts));
    if let Some(image) = image {
        let h = image.header();
        let g = image.geometry();
        v.insert(
            "image".into(),
            json!({
                "virtual-size": h.size,
                "file-length": image.file_len(),
                "cluster-size": g.cluster_size,
                "compat": if h.version >= 3 { "1.1" } else { "0.10" },
                "refcount-bits": g.refcount_bits,
                "compression-type": h.compression().map_or("unknown", |c| c.as_str()),
                "extended-l2": g.extended_l2,
                "lazy-refcounts": h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
                "dirty": h.is_dirty(),
                "snapshots": image.snapshots().len(),
                "bitmaps": image.bitmaps().len(),
                "backing-file": h.has_backing_file(),
                "data-file": h.has_data_file(),
                "encrypted": h.crypt() != Some(CryptMethod::None),
            }),
        );
        let s = &rep.stats;
        v.insert(
            "stats".into(),
            json!({
                "total-clusters": s.total_clusters,
                "host-clusters": s.host_clusters,
                "allocated-clusters": s.allocated_clusters,
                "compressed-clusters": s.compressed_clusters,
                "fragmented-clusters": s.fragmented_clusters,
                "image-end-offset": s.image_end_offset,
                "corruptions": s.corruptions,
                "leaks": s.leaks,
                "l2-tables": s.l2_tables,
                "decompressed-clusters": s.decompressed_clusters,
            }),
        );
        qemu_check_fields(&mut v, s);
    }
    v.insert("metadata-only".into(), json!(metadata_only));
    Value::Object(v)
}

/// The fields of `qemu-img check --output=json`, present when qemu-img
/// shows them (counts only when non-zero, cluster totals only when
/// something is allocated).
fn qemu_check_fields(obj: &mut Map<String, Value>, s: &Stats) {
    let mut put = |k: &str, v: u64, show: bool| {
        if show {
            obj.insert(k.into(), json!(v));
        }
    };
    let allocated = s.allocated_clusters > 0 && s.total_clusters > 0;
    put(
        "image-end-offset",
        s.image_end_offset,
        s.image_end_offset > 0,
    );
    put(
        "compressed-clusters",
        s.compressed_clusters,
        allocated && s.compressed_clusters > 0,
    );
    put("total-clusters", s.total_clusters, allocated);
    put("corruptions", s.corruptions, s.corruptions > 0);
    put("check-errors", 0, true);
    put("leaks", s.leaks, s.leaks > 0);
    put("allocated-clusters", s.allocated_clusters, allocated);
    put(
        "fragmented-clusters",
        s.fragmented_clusters,
        allocated && s.fragmented_clusters > 0,
    );
}

/// The `info --json` document for `image` opened from `path`: the keys of
/// `qemu-img info --output=json` wherever qemu-img has one, plus the
/// feature bits with their names, unknown extensions and the policy
/// `findings`; without `"exit-code"`. `actual_size` is the disk space the
/// file takes (qemu-img's `actual-size`), when known.
pub fn info<S: Source>(
    path: &Path,
    image: &Image<S>,
    actual_size: Option<u64>,
    findings: &[Finding],
) -> Value {
    let h = image.header();
    let g = image.geometry();
    let ext = image.extensions();
    let mut top = Map::new();
    top.insert("children".into(), file_child(path, image, actual_size));
    top.insert("filename".into(), json!(path.display().to_string()));
    top.insert("format".into(), json!("qcow2"));
    // QEMU counts the disk in 512-byte sectors and drops a partial last
    // sector; the header's own value is shown too when they differ.
    top.insert("virtual-size".into(), json!(h.size & !511));
    if !h.size.is_multiple_of(512) {
        top.insert("header-virtual-size".into(), json!(h.size));
    }
    if let Some(a) = actual_size {
        top.insert("actual-size".into(), json!(a));
    }
    top.insert("file-length".into(), json!(image.file_len()));
    top.insert("cluster-size".into(), json!(g.cluster_size));
    if h.crypt() != Some(CryptMethod::None) {
        top.insert("encrypted".into(), json!(true));
    }
    top.insert("dirty-flag".into(), json!(h.is_dirty()));
    // Like QEMU, an empty name (backing_file_size 0) names no backing
    // file, and the backing format is shown only with a name.
    if let Some(b) = image.backing_file().filter(|b| !b.bytes.is_empty()) {
        let name = b.lossy();
        top.insert("backing-filename".into(), json!(name));
        // Resolved the way qemu-img does, as a path only: never opened.
        // Like QEMU, a colon before the first slash is a protocol prefix
        // ("json:{...}", "nbd:..."); "dir/a:b" is a relative file name.
        let has_protocol = name.split('/').next().is_some_and(|p| p.contains(':'));
        let full = if name.starts_with('/') || has_protocol {
            name.clone()
        } else {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or(name.clone(), |p| p.join(&name).display().to_string())
        };
        top.insert("full-backing-filename".into(), json!(full));
        if let Some(f) = &ext.backing_format {
            top.insert("backing-filename-format".into(), json!(f.lossy()));
        }
    }
    if !image.snapshots().is_empty() {
        let snaps: Vec<Value> = image
            .snapshots()
            .iter()
            .map(|s| {
                let mut o = Map::new();
                o.insert("id".into(), json!(s.id));
                o.insert("name".into(), json!(s.name));
                o.insert("vm-state-size".into(), json!(s.vm_state_size));
                o.insert("date-sec".into(), json!(s.date_sec));
                o.insert("date-nsec".into(), json!(s.date_nsec));
                o.insert(
                    "vm-clock-sec".into(),
                    json!(s.vm_clock_nsec / 1_000_000_000),
                );
                o.insert(
                    "vm-clock-nsec".into(),
                    json!(s.vm_clock_nsec % 1_000_000_000),
                );
                if let Some(ic) = s.icount.filter(|&i| i != u64::MAX) {
                    o.insert("icount".into(), json!(ic));
                }
                Value::Object(o)
            })
            .collect();
        top.insert("snapshots".into(), Value::Array(snaps));
    }

    let mut data = Map::new();
    data.insert(
        "compat".into(),
        json!(if h.version >= 3 { "1.1" } else { "0.10" }),
    );
    data.insert(
        "compression-type".into(),
        json!(h.compression().map_or("unknown", |c| c.as_str())),
    );
    if h.version >= 3 {
        data.insert(
            "lazy-refcounts".into(),
            json!(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
        );
    }
    if !image.bitmaps().is_empty() {
        let bms: Vec<Value> = image
            .bitmaps()
            .iter()
            .map(|b| json!({"flags": b.flag_names(), "name": b.name, "granularity": b.granularity()}))
            .collect();
        data.insert("bitmaps".into(), Value::Array(bms));
    }
    data.insert("refcount-bits".into(), json!(g.refcount_bits));
    if let Some(df) = &ext.data_file {
        data.insert("data-file".into(), json!(df.lossy()));
    }
    if h.has_data_file() {
        data.insert(
            "data-file-raw".into(),
            json!(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0),
        );
    }
    match h.crypt() {
        Some(CryptMethod::Luks) => {
            data.insert("encrypt".into(), json!({"format": "luks"}));
        }
        Some(CryptMethod::Aes) => {
            data.insert("encrypt".into(), json!({"format": "aes"}));
        }
        _ => {}
    }
    if h.version >= 3 {
        data.insert(
            "corrupt".into(),
            json!(h.incompatible_features & INCOMPAT_CORRUPT != 0),
        );
        data.insert("extended-l2".into(), json!(h.extended_l2()));
    }
    top.insert(
        "format-specific".into(),
        json!({"type": "qcow2", "data": data}),
    );

    // What qemu-img does not show: the raw feature bits with their names,
    // extensions we do not know, and the safety policy's verdict.
    let named = |kind: FeatureKind, bits: u64| -> Vec<Value> {
        (0u8..64)
            .filter(|b| bits >> b & 1 != 0)
            .map(|b| json!({"bit": b, "name": ext.feature_name(kind, b)}))
            .collect()
    };
    top.insert(
        "features".into(),
        json!({
            "incompatible": named(FeatureKind::Incompatible, h.incompatible_features),
            "compatible": named(FeatureKind::Compatible, h.compatible_features),
            "autoclear": named(FeatureKind::Autoclear, h.autoclear_features),
        }),
    );
    if ext.unknown_count > 0 {
        let unknown: Vec<Value> = ext
            .unknown
            .iter()
            .map(|u| json!({"type": format!("{:#010x}", u.ext_type), "offset": u.offset, "length": u.len}))
            .collect();
        top.insert("unknown-extensions".into(), Value::Array(unknown));
    }
    if image.bitmaps_stale() {
        top.insert("bitmaps-stale".into(), json!(true));
    }
    top.insert(
        "findings".into(),
        Value::Array(findings.iter().map(finding).collect()),
    );
    Value::Object(top)
}

/// qemu-img info's `children`: the protocol node under the image. The
/// external data file, named inside the image, is never opened, so its
/// node is not shown.
fn file_child<S: Source>(path: &Path, image: &Image<S>, actual_size: Option<u64>) -> Value {
    let mut file = Map::new();
    file.insert("children".into(), json!([]));
    // QEMU counts the file in 512-byte sectors, the last one partial.
    let sectors = image.file_len().div_ceil(512).saturating_mul(512);
    file.insert("virtual-size".into(), json!(sectors));
    file.insert("filename".into(), json!(path.display().to_string()));
    file.insert("format".into(), json!("file"));
    if let Some(a) = actual_size {
        file.insert("actual-size".into(), json!(a));
    }
    file.insert(
        "format-specific".into(),
        json!({"type": "file", "data": {}}),
    );
    file.insert("dirty-flag".into(), json!(false));
    json!([{"name": "file", "info": Value::Object(file)}])
}
