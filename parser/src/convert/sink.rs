//! Where a conversion writes the raw disk.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
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
#[derive(Debug, Clone, Copy)]
pub struct FileSink<'a> {
    file: &'a File,
    fresh: bool,
}

impl<'a> FileSink<'a> {
    /// A new, empty regular file: holes are skipped (they stay
    /// unallocated, so the output is sparse) and the file is sized to the
    /// virtual disk at the end.
    pub fn new(file: &'a File) -> FileSink<'a> {
        FileSink { file, fresh: true }
    }

    /// A destination with old contents (a block device): holes are
    /// written as zeros and the size is left alone (writing past the end
    /// of a device fails).
    pub fn overwrite(file: &'a File) -> FileSink<'a> {
        FileSink { file, fresh: false }
    }
}

impl Sink for FileSink<'_> {
    fn sequential(&self) -> bool {
        false
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.fresh {
            return Ok(());
        }
        zeros_by(offset, len, |at, z| self.file.write_all_at(z, at))
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
