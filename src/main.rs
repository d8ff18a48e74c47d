//! `qcow2-guard`: inspect, check and convert untrusted qcow2 images.
//!
//! Thin on purpose: argument parsing, output formatting and exit codes.
//! Everything about the format lives in the `qcow2-guard` library.

/// `println!` that ignores a closed stdout (`qcow2-guard check IMG | head`):
/// a reader that stops early is not an error, and never a panic.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!` that ignores a closed stderr.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod check;
mod compare;
mod convert;
mod exit;
mod info;
mod map;
mod open;
mod output;
mod qemu;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use exit::Exit;

/// Fuzzing-hardened qcow2 inspector for untrusted disk images.
///
/// Exit codes: 0 accepted, 1 not checked (usage, unreadable, not qcow2),
/// 2 corrupt or malformed, 3 leaked clusters only, 4 refused by the safety
/// policy.
#[derive(Debug, Parser)]
#[command(name = "qcow2-guard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what the image header and tables say (like `qemu-img info`).
    Info(info::Args),
    /// Audit every structure, refcount and compressed payload (stricter
    /// than `qemu-img check`).
    Check(check::Args),
    /// Write the raw guest disk of an image (like `qemu-img convert -O raw`).
    Convert(convert::Args),
    /// Print the guest ranges and where they are stored, as `qemu-img map`
    /// does (byte-identical JSON).
    Map(map::Args),
    /// Compare the guest data of two images (qcow2 or raw), with
    /// `qemu-img compare`'s messages and exit statuses (0 identical,
    /// 1 different, 2 cannot open or refused, 3/4 error while comparing).
    Compare(compare::Args),
}

/// Options shared by every command that applies the safety policy.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Accept images that name a backing file (it is never opened unless
    /// a command is explicitly given one).
    #[arg(long)]
    pub allow_backing: bool,
    /// Accept images whose guest data lives in an external data file.
    #[arg(long)]
    pub allow_data_file: bool,
    /// Accept encrypted images (AES or LUKS).
    #[arg(long)]
    pub allow_encryption: bool,
    /// Largest virtual disk to accept, e.g. 2T, 512G, 1099511627776
    /// (default 64T).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_virtual_size: Option<u64>,
}

impl PolicyArgs {
    pub fn policy(&self) -> qcow2_guard::Policy {
        qcow2_guard::Policy {
            allow_backing: self.allow_backing,
            allow_data_file: self.allow_data_file,
            allow_encryption: self.allow_encryption,
            max_virtual_size: self
                .max_virtual_size
                .unwrap_or(qcow2_guard::Policy::default().max_virtual_size),
        }
    }

    pub fn limits(&self) -> qcow2_guard::Limits {
        qcow2_guard::Limits::default()
    }
}

/// Parse a byte count with an optional K/M/G/T/P/E suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(format!("unknown size suffix {c:?}")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|e| format!("invalid size {s:?}: {e}"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} overflows 64 bits"))
}

/// A path argument that must name the image.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArg {
    /// The qcow2 image to read (never written).
    pub image: PathBuf,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                Exit::NotChecked
            } else {
                Exit::Ok
            };
            let _ = e.print();
            return code.into();
        }
    };
    let exit = match cli.command {
        Command::Info(args) => info::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Map(args) => map::run(&args),
        Command::Compare(args) => return compare::run(&args).into(),
    };
    exit.into()
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("16E").is_err());
        assert!(parse_size("x").is_err());
    }
}
