//! `qcow2-guard info`: what `qemu-img info` shows for a qcow2 image, plus
//! the safety policy's verdict on its header.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::{json, Value};

use qcow2_guard::{FileSource, Image, Severity};

use crate::exit::Exit;
use crate::qemu::QemuArgs;
use crate::report;
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
    let mut v = qcow2_guard::json::info(path, image, actual_size, findings);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("exit-code".into(), json!(exit.code()));
    }
    v
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
