//! Where a conversion writes the raw disk.

use std::fs::File;
use std::io::{self, Write};
use std::num::NonZeroU64;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Zeros for sinks that must write holes.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The destination of a conversion.
///
/// A positional sink ([`Sink::sequential`] false) is written by several
/// workers at once, chunks in any order; a sequential one receives every
/// guest byte exactly once, in order from offset 0. Either way every
/// range of the disk arrives once, as data ([`Sink::write_at`]) or as
/// zeros ([`Sink::write_zeros`]), and [`Sink::finish`] is called last,
/// after every write succeeded.
pub trait Sink: Sync {
    /// Whether writes must come in guest order.
    fn sequential(&self) -> bool;

    /// Write guest bytes `data` at guest offset `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Every guest byte below `end` has been written (data or zeros);
    /// called now and then as the conversion advances (from any worker:
    /// a call may name a smaller `end` than one before it). A sink may
    /// start flushing that range
    /// ([`FileSink::write_behind`]); by default nothing happens.
    fn settled(&self, _end: u64) {}

    /// Guest bytes `offset .. offset + len` read as zeros. A sink whose
    /// destination already reads as zeros there (a new file) does nothing.
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Every byte of the `size`-byte disk has been written.
    fn finish(&self, size: u64) -> io::Result<()>;
}

/// Write `len` zeros through `write(offset, piece)`.
fn zeros_by(
    offset: u64,
    len: u64,
    mut write: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len.saturating_sub(done))
            .unwrap_or(usize::MAX)
            .min(ZEROS.len());
        let piece = ZEROS.get(..n).unwrap_or(&[]);
        write(offset.saturating_add(done), piece)?;
        done = done.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }
    Ok(())
}

/// A positional sink over a file or block device.
#[derive(Debug)]
pub struct FileSink<'a> {
    file: &'a File,
    fresh: bool,
    behind: Option<WriteBehind>,
}

/// Data settled between two write-behind hints.
const BEHIND_STEP: u64 = 16 << 20;

/// Write-behind state ([`FileSink::write_behind`]): the end of the range
/// handed to the kernel so far.
#[derive(Debug, Default)]
struct WriteBehind {
    hinted: AtomicU64,
}

impl WriteBehind {
    /// Everything below `end` is written: once [`BEHIND_STEP`] bytes more
    /// than last time are, ask the kernel to start writing them back
    /// (`POSIX_FADV_DONTNEED`: writeback of the dirty pages starts
    /// without waiting for it, pages already clean leave the page cache).
    /// Only complete ranges are handed over, so the file system allocates
    /// them in one piece, as a later sync would. A hint: a failure changes
    /// nothing, the caller's sync still writes everything.
    fn settled(&self, file: &File, end: u64) {
        let from = self.hinted.load(Ordering::Relaxed);
        let Some(len) = end
            .checked_sub(from)
            .filter(|&n| n >= BEHIND_STEP)
            .and_then(NonZeroU64::new)
        else {
            return;
        };
        // One thread hints a given range.
        if self
            .hinted
            .compare_exchange(from, end, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let _ = rustix::fs::fadvise(file, from, Some(len), rustix::fs::Advice::DontNeed);
        }
    }
}

impl<'a> FileSink<'a> {
    /// A new, empty regular file: holes are skipped (they stay
    /// unallocated, so the output is sparse) and the file is sized to the
    /// virtual disk at the end.
    pub fn new(file: &'a File) -> FileSink<'a> {
        FileSink {
            file,
            fresh: true,
            behind: None,
        }
    }

    /// A destination with old contents (a block device): holes are
    /// written as zeros and the size is left alone (writing past the end
    /// of a device fails).
    pub fn overwrite(file: &'a File) -> FileSink<'a> {
        FileSink {
            file,
            fresh: false,
            behind: None,
        }
    }

    /// Start writing the data back to the disk while the conversion
    /// goes on, behind the writers ([`Sink::settled`]), for a caller that syncs the
    /// file at the end (`fsync` then has only the last MiB to wait for,
    /// instead of the whole disk after the last write). Written ranges
    /// also leave the page cache once on disk, so a large conversion does
    /// not push everything else out of it. Durability still comes from
    /// the caller's sync alone: this only moves the disk writes earlier.
    #[must_use]
    pub fn write_behind(mut self) -> FileSink<'a> {
        self.behind = Some(WriteBehind::default());
        self
    }
}

impl Sink for FileSink<'_> {
    fn sequential(&self) -> bool {
        false
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn settled(&self, end: u64) {
        if let Some(b) = &self.behind {
            b.settled(self.file, end);
        }
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.fresh {
            return Ok(());
        }
        zeros_by(offset, len, |at, z| self.write_at(at, z))
    }

    fn finish(&self, size: u64) -> io::Result<()> {
        if self.fresh {
            self.file.set_len(size)?;
        }
        Ok(())
    }
}

/// A sequential sink over any [`Write`] (a pipe, stdout, a socket): holes
/// are written as zeros.
#[derive(Debug)]
pub struct WriteSink<W> {
    state: Mutex<(W, u64)>,
}

impl<W: Write + Send> WriteSink<W> {
    /// Write the disk into `w`.
    pub fn new(w: W) -> WriteSink<W> {
        WriteSink {
            state: Mutex::new((w, 0)),
        }
    }

    /// The writer back, after the conversion.
    pub fn into_inner(self) -> io::Result<W> {
        self.state
            .into_inner()
            .map(|(w, _)| w)
            .map_err(|_| io::Error::other("a writer panicked"))
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, (W, u64)>> {
        self.state
            .lock()
            .map_err(|_| io::Error::other("a writer panicked"))
    }
}

fn write_in_order<W: Write>(state: &mut (W, u64), offset: u64, data: &[u8]) -> io::Result<()> {
    if offset != state.1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "sequential sink: write at {offset:#x}, expected {:#x}",
                state.1
            ),
        ));
    }
    state.0.write_all(data)?;
    state.1 = state
        .1
        .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
    Ok(())
}

impl<W: Write + Send> Sink for WriteSink<W> {
    fn sequential(&self) -> bool {
        true
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        write_in_order(&mut *self.lock()?, offset, data)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.lock()?;
        zeros_by(offset, len, |at, z| write_in_order(&mut state, at, z))
    }

    fn finish(&self, size: u64) -> io::Result<()> {
        let mut state = self.lock()?;
        if state.1 != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sequential sink: {:#x} bytes written of {size:#x}", state.1),
            ));
        }
        state.0.flush()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    /// Hints go forward only, in steps of at least `BEHIND_STEP`; the data
    /// written is the data read back.
    #[test]
    fn write_behind_hints_settled_ranges_forward() {
        let path = std::env::temp_dir().join(format!(
            "qcow2-guard-write-behind-{}.raw",
            std::process::id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let sink = FileSink::new(&file).write_behind();
        let hinted = |s: &FileSink<'_>| s.behind.as_ref().unwrap().hinted.load(Ordering::Relaxed);
        let mib = 1u64 << 20;
        let piece: Vec<u8> = (0..mib).map(|i| (i % 251) as u8).collect();
        let mut steps = Vec::new();
        for i in 0..40u64 {
            sink.write_at(i * mib, &piece).unwrap();
            sink.settled((i + 1) * mib);
            // A late call from a slower worker names less: ignored.
            sink.settled(i * mib / 2);
            steps.push(hinted(&sink));
        }
        sink.finish(40 * mib).unwrap();
        let want: Vec<u64> = (1..=40u64).map(|n| n / 16 * 16 * mib).collect();
        assert_eq!(steps, want);
        let back = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.len() as u64, 40 * mib);
        assert!(back.chunks(piece.len()).all(|c| c == piece.as_slice()));
        // Without write_behind, settled does nothing.
        let plain = FileSink::new(&file);
        plain.settled(64 * mib);
        assert!(plain.behind.is_none());
    }
}
