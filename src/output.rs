//! A new OUTPUT file that no one sees until it is complete.
//!
//! On Linux the file is made with `O_TMPFILE` in OUTPUT's directory: it
//! has no name while it is written, so whatever stops the process
//! (an error, SIGTERM, SIGKILL, a power cut) leaves nothing behind, and
//! `linkat` gives it its name once the data is written (and, unless told
//! otherwise, synced). Where the file system lacks `O_TMPFILE` (or
//! `QCOW2_GUARD_NO_TMPFILE=1` asks for it, which is how the tests reach
//! this path), the file is a hidden temporary beside OUTPUT, renamed at
//! the end, removed on any error and on SIGTERM, SIGINT and SIGHUP.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::Errno;

/// The named temporary of the fallback path, removed by the signal thread.
static PENDING: Mutex<Option<PathBuf>> = Mutex::new(None);

/// A new file that becomes OUTPUT on [`NewFile::commit`].
pub struct NewFile {
    file: File,
    target: PathBuf,
    dir: PathBuf,
    /// The fallback's named temporary (removed on drop unless committed).
    named: Option<tempfile::TempPath>,
}

fn dir_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn hidden_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".to_owned());
    format!(".{name}.")
}

impl NewFile {
    /// Create the file that will become `target`.
    pub fn create(target: &Path) -> io::Result<NewFile> {
        let dir = dir_of(target);
        if std::env::var_os("QCOW2_GUARD_NO_TMPFILE").is_none_or(|v| v.is_empty()) {
            // Like any new file: 0666 less the umask.
            let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
            match rustix::fs::openat(CWD, &dir, flags, Mode::from_raw_mode(0o666)) {
                Ok(fd) => {
                    return Ok(NewFile {
                        file: File::from(fd),
                        target: target.to_path_buf(),
                        dir,
                        named: None,
                    })
                }
                // The file system (or kernel) has no O_TMPFILE.
                Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS) => {}
                Err(e) => return Err(e.into()),
            }
        }
        watch_signals();
        let tmp = tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o666))
            .prefix(&hidden_prefix(target))
            .suffix(".qcow2-guard-tmp")
            .tempfile_in(&dir)?;
        let (file, path) = tmp.into_parts();
        if let Ok(mut p) = PENDING.lock() {
            *p = Some(path.to_path_buf());
        }
        Ok(NewFile {
            file,
            target: target.to_path_buf(),
            dir,
            named: Some(path),
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Give the complete file its name, replacing an existing regular
    /// OUTPUT. With `sync`, the data reaches the disk before the name
    /// does, and the directory entry after.
    pub fn commit(mut self, sync: bool) -> io::Result<()> {
        if sync {
            self.file.sync_all()?;
        }
        match self.named.take() {
            None => self.link()?,
            Some(tmp) => {
                // Hold the lock: the signal thread must not remove the
                // temporary while it is being renamed.
                let mut pending = PENDING.lock().map_err(|_| io::Error::other("lock"))?;
                tmp.persist(&self.target).map_err(|e| e.error)?;
                *pending = None;
            }
        }
        if sync {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// `linkat` the anonymous file to OUTPUT.
    fn link(&self) -> io::Result<()> {
        match link_anonymous(&self.file, &self.target) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            r => return r,
        }
        // OUTPUT exists: link under a hidden name, then rename over it
        // (the hidden name exists only between the two calls, and holds
        // the complete disk).
        for n in 0..16u32 {
            let hidden = self.dir.join(format!(
                "{}{}.{n}.qcow2-guard-tmp",
                hidden_prefix(&self.target),
                std::process::id()
            ));
            match link_anonymous(&self.file, &hidden) {
                Ok(()) => {
                    return std::fs::rename(&hidden, &self.target).inspect_err(|_| {
                        let _ = std::fs::remove_file(&hidden);
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("cannot find a free temporary name"))
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        // An uncommitted named temporary is removed by its TempPath.
        if self.named.is_some() {
            if let Ok(mut p) = PENDING.lock() {
                *p = None;
            }
        }
    }
}

/// Name an `O_TMPFILE` file: through /proc/self/fd (no privilege
/// needed), else `AT_EMPTY_PATH` (needs CAP_DAC_READ_SEARCH).
fn link_anonymous(file: &File, to: &Path) -> io::Result<()> {
    let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
    match rustix::fs::linkat(CWD, proc.as_str(), CWD, to, AtFlags::SYMLINK_FOLLOW) {
        Ok(()) => Ok(()),
        Err(Errno::NOENT) if !Path::new("/proc/self/fd").exists() => {
            rustix::fs::linkat(file, "", CWD, to, AtFlags::EMPTY_PATH).map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}

/// On SIGTERM, SIGINT or SIGHUP: remove the pending temporary, then exit
/// as the signal would have (128 + signal).
fn watch_signals() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                // Keep the lock until exit: no commit can start after this.
                let pending = PENDING.lock();
                if let Ok(p) = &pending {
                    if let Some(path) = p.as_ref() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                std::process::exit(128 + sig);
            }
        });
    });
}
