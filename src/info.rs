//! `qcow2-guard info`: what `qemu-img info` shows for a qcow2 image, plus
//! the safety policy's verdict on its header.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::{json, Map, Value};

use qcow2_guard::extensions::FeatureKind;
use qcow2_guard::header::{
    CryptMethod, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};
use qcow2_guard::{FileSource, Image, Severity};

use crate::exit::Exit;
use crate::qemu::QemuArgs;
use crate::report::{self, finding_json};
use crate::{ImageArg, PolicyArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    image: ImageArg,
    /// Print JSON (keys follow `qemu-img info --output=json`); the same
    /// as --output=json.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    qemu: QemuArgs,
    #[command(flatten)]
    policy: PolicyArgs,
}

pub fn run(args: &Args) -> Exit {
    let path = &args.image.image;
    let json = args.qemu.json(args.json);
    if let Err(e) = args.qemu.require_qcow2(path) {
        return e;
    }
    let src = match FileSource::open(path) {
        Ok(s) => s,
        Err(e) => return report::unreadable(path, &e, json),
    };
    let actual_size = std::fs::metadata(path)
        .map(|m| m.blocks().saturating_mul(512))
        .ok();
    let image = match Image::open_with(src, args.policy.limits()) {
        Ok(i) => i,
        Err(e) => return report::fatal(path, &e, json),
    };
    let findings = image.policy_findings(&args.policy.policy());
    let exit = if findings.iter().any(|f| f.severity == Severity::Error) {
        Exit::Refused
    } else {
        Exit::Ok
    };
    let v = info_json(path, &image, actual_size, &findings, exit);
    if json {
        report::print_json(&v);
    } else {
        print_human(&v);
    }
    exit
}

fn info_json(
    path: &Path,
    image: &Image<FileSource>,
    actual_size: Option<u64>,
    findings: &[qcow2_guard::Finding],
    exit: Exit,
) -> Value {
    let h = image.header();
    let g = image.geometry();
    let ext = image.extensions();
    let mut top = Map::new();
    // The protocol node qemu-img shows under the image (the data file,
    // named inside the image, is never opened, so it is not shown).
    let mut file = Map::new();
    file.insert("children".into(), json!([]));
    // QEMU counts the file in 512-byte sectors, the last one partial.
    let file_sectors = image.file_len().div_ceil(512).saturating_mul(512);
    file.insert("virtual-size".into(), json!(file_sectors));
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
    top.insert(
        "children".into(),
        json!([{"name": "file", "info": Value::Object(file)}]),
    );
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
    top.insert(
        "dirty-flag".into(),
        json!(h.incompatible_features & INCOMPAT_DIRTY != 0),
    );
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
        Value::Array(findings.iter().map(finding_json).collect()),
    );
    top.insert("exit-code".into(), json!(exit.code()));
    Value::Object(top)
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u])
    }
}

fn print_human(v: &Value) {
    let s = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    outln!("image: {}", s("filename").as_str().unwrap_or(""));
    outln!("file format: qcow2");
    outln!(
        "virtual size: {} ({} bytes)",
        human_size(n("virtual-size")),
        n("virtual-size")
    );
    outln!(
        "file length: {} ({} bytes)",
        human_size(n("file-length")),
        n("file-length")
    );
    if let Some(a) = v.get("actual-size").and_then(Value::as_u64) {
        outln!("disk size: {}", human_size(a));
    }
    outln!("cluster_size: {}", n("cluster-size"));
    if let Some(b) = v.get("backing-filename").and_then(Value::as_str) {
        outln!("backing file: {b} (never opened)");
    }
    if let Some(b) = v.get("backing-filename-format").and_then(Value::as_str) {
        outln!("backing file format: {b}");
    }
    if v.get("encrypted").is_some() {
        outln!("encrypted: yes");
    }
    if let Some(snaps) = v.get("snapshots").and_then(Value::as_array) {
        outln!("Snapshot list:");
        outln!(
            "{:<8}{:<18}{:>12}{:>14}{:>16}",
            "ID",
            "TAG",
            "VM_SIZE",
            "DATE(s)",
            "VM_CLOCK(ns)"
        );
        for sn in snaps {
            let g = |k: &str| sn.get(k).cloned().unwrap_or(Value::Null);
            let clock = g("vm-clock-sec").as_u64().unwrap_or(0) * 1_000_000_000
                + g("vm-clock-nsec").as_u64().unwrap_or(0);
            outln!(
                "{:<8}{:<18}{:>12}{:>14}{:>16}",
                g("id").as_str().unwrap_or(""),
                g("name").as_str().unwrap_or(""),
                human_size(g("vm-state-size").as_u64().unwrap_or(0)),
                g("date-sec").as_u64().unwrap_or(0),
                clock
            );
        }
    }
    outln!("Format specific information:");
    if let Some(data) = v
        .pointer("/format-specific/data")
        .and_then(Value::as_object)
    {
        for (k, val) in data {
            match val {
                Value::Array(items) => {
                    outln!("    {}:", k.replace('-', " "));
                    for (i, item) in items.iter().enumerate() {
                        outln!("        [{i}]: {item}");
                    }
                }
                Value::String(s) => outln!("    {}: {s}", k.replace('-', " ")),
                other => outln!("    {}: {other}", k.replace('-', " ")),
            }
        }
    }
    if let Some(f) = v.get("features") {
        for kind in ["incompatible", "compatible", "autoclear"] {
            let bits = f
                .get(kind)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if bits.is_empty() {
                continue;
            }
            let names: Vec<String> = bits
                .iter()
                .map(|b| {
                    let bit = b.get("bit").and_then(Value::as_u64).unwrap_or(0);
                    match b.get("name").and_then(Value::as_str) {
                        Some(name) => format!("{bit} ({name})"),
                        None => format!("{bit}"),
                    }
                })
                .collect();
            outln!("{kind} features: {}", names.join(", "));
        }
    }
    if let Some(unknown) = v.get("unknown-extensions").and_then(Value::as_array) {
        for u in unknown {
            outln!("unknown header extension: {u}");
        }
    }
    if let Some(fs) = v.get("findings").and_then(Value::as_array) {
        for f in fs {
            outln!(
                "{} [{}] at {:#x}: {}",
                f.get("severity").and_then(Value::as_str).unwrap_or(""),
                f.get("code").and_then(Value::as_str).unwrap_or(""),
                f.get("offset").and_then(Value::as_u64).unwrap_or(0),
                f.get("message").and_then(Value::as_str).unwrap_or("")
            );
        }
    }
}
