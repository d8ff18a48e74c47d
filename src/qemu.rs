//! qemu-img's flags, accepted beside our own so that a script can switch
//! from `qemu-img CMD ...` to `qcow2-guard CMD ...` unchanged.

use std::path::Path;

use crate::exit::Exit;

/// `-f`, `--output` and `-U`, as qemu-img spells them.
#[derive(Debug, Clone, clap::Args)]
pub struct QemuArgs {
    /// Image format (qemu-img's -f): only qcow2 is read; any other format
    /// is refused.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format, as qemu-img's --output (`--json` is the same as
    /// `--output=json`).
    #[arg(long, value_name = "FMT", value_parser = ["human", "json"])]
    pub output: Option<String>,
    /// Accepted for qemu-img compatibility, no effect: the image is never
    /// locked or written.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

impl QemuArgs {
    /// Whether JSON output was asked for, by `--output=json` or by our own
    /// `--json` flag (`json`).
    pub fn json(&self, json: bool) -> bool {
        json || self.output.as_deref() == Some("json")
    }

    /// Refuse a format other than qcow2 (`-f raw`, `-f vmdk`, ...).
    pub fn require_qcow2(&self, path: &Path) -> Result<(), Exit> {
        match self.format.as_deref() {
            None | Some("qcow2") => Ok(()),
            Some(other) => {
                errln!(
                    "qcow2-guard: {}: -f {other}: only qcow2 images are read (qemu-img would use its {other} driver)",
                    path.display()
                );
                Err(Exit::NotChecked)
            }
        }
    }
}
