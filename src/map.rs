//! `qcow2-guard map`: what `qemu-img map` prints, byte for byte (the
//! records come from the library's `qemu_map`; this file only formats
//! them).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use qcow2_guard::qemu_map::{qemu_map, MapEntry, MapFile, MapLayer};

use crate::exit::Exit;
use crate::open::{self, Layer};
use crate::qemu::QemuArgs;
use crate::{parse_size, ImageArg, PolicyArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    image: ImageArg,
    #[command(flatten)]
    qemu: QemuArgs,
    /// Same as --output=json.
    #[arg(long)]
    json: bool,
    /// First guest byte to map (qemu-img's --start-offset).
    #[arg(long, value_name = "OFFSET", value_parser = parse_size, default_value = "0")]
    start_offset: u64,
    /// Most guest bytes to map (qemu-img's --max-length).
    #[arg(long, value_name = "LEN", value_parser = parse_size)]
    max_length: Option<u64>,
    /// Backing image (qcow2 or raw) below IMAGE; repeat for a longer chain,
    /// top first. Needs --allow-backing. The backing file named inside an
    /// image is never opened: without --backing, unallocated ranges are
    /// shown as in an image without a backing file.
    #[arg(long, value_name = "FILE", requires = "allow_backing")]
    backing: Vec<PathBuf>,
    /// External data file of IMAGE. Needs --allow-data-file.
    #[arg(long, value_name = "FILE", requires = "allow_data_file")]
    data_file: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
}

pub fn run(args: &Args) -> Exit {
    let path = &args.image.image;
    if let Err(e) = args.qemu.require_qcow2(path) {
        return e;
    }
    let chain = match open::open_chain(
        path,
        &args.policy.policy(),
        &args.policy.limits(),
        args.data_file.as_deref(),
        &args.backing,
    ) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let views: Vec<_> = chain.iter().map(Layer::map_view).collect();
    let layers: Vec<&dyn MapLayer> = views.iter().map(|v| v.as_map()).collect();
    let len = args.max_length.unwrap_or(u64::MAX);
    let mut out = BufWriter::new(std::io::stdout().lock());
    let result = if args.qemu.json(args.json) {
        print_json(&layers, args.start_offset, len, &mut out)
    } else {
        let name = |e: &MapEntry| -> String { file_name(args, e) };
        print_human(&layers, args.start_offset, len, &name, &mut out)
    };
    let _ = out.flush();
    match result {
        Ok(Ok(())) => Exit::Ok,
        Ok(Err(())) => {
            errln!("qcow2-guard: File contains external, encrypted or compressed clusters.");
            Exit::NotChecked
        }
        Err(e) => crate::report::fatal(path, &e, false),
    }
}

/// The file a record's offset lies in, as given on the command line.
fn file_name(args: &Args, e: &MapEntry) -> String {
    let p: Option<&Path> = match e.file {
        Some((_, MapFile::DataFile)) => args.data_file.as_deref(),
        Some((0, MapFile::Image)) => Some(&args.image.image),
        Some((i, MapFile::Image)) => args.backing.get(i.saturating_sub(1)).map(PathBuf::as_path),
        None => None,
    };
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

/// One record as qemu-img's `dump_map_entry` prints it in JSON.
fn json_record(e: &MapEntry) -> String {
    let b = |v: bool| if v { "true" } else { "false" };
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start,
        e.length,
        e.depth,
        b(e.present),
        b(e.zero),
        b(e.data),
        b(e.compressed)
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

type Printed = qcow2_guard::Result<Result<(), ()>>;

fn print_json(layers: &[&dyn MapLayer], start: u64, len: u64, out: &mut impl Write) -> Printed {
    let mut first = true;
    let mut ok = out.write_all(b"[").is_ok();
    qemu_map(layers, start, len, |e| {
        if !first {
            ok &= out.write_all(b",\n").is_ok();
        }
        first = false;
        ok &= out.write_all(json_record(e).as_bytes()).is_ok();
        ok
    })?;
    let _ = out.write_all(b"]\n");
    Ok(Ok(()))
}

/// C's `%#x`: `0` for zero, else `0x...`.
fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

/// qemu-img's human map: the data records, with where they are stored;
/// compressed (or otherwise offset-less) data is an error, as in qemu-img.
fn print_human(
    layers: &[&dyn MapLayer],
    start: u64,
    len: u64,
    name: &dyn Fn(&MapEntry) -> String,
    out: &mut impl Write,
) -> Printed {
    let mut ok = writeln!(
        out,
        "{:<16}{:<16}{:<16}File",
        "Offset", "Length", "Mapped to"
    )
    .is_ok();
    let mut unmappable = false;
    qemu_map(layers, start, len, |e| {
        if e.data && e.offset.is_none() {
            unmappable = true;
            return false;
        }
        if e.data && !e.zero {
            ok &= writeln!(
                out,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                name(e)
            )
            .is_ok();
        }
        ok
    })?;
    Ok(if unmappable { Err(()) } else { Ok(()) })
}
