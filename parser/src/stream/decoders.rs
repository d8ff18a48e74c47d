//! Payloads of a streamed inspection decompressed on worker threads.
//!
//! The inspector hands each whole compressed payload to [`Decoders::send`]
//! and takes the outcomes back with [`Decoders::next`]; what it does with
//! them (the memo, the conversion's tap) stays on its own thread, so the
//! result is the one-thread result whatever the order the workers finish
//! in. At most [`Decoders::full`] payloads are out at once (two per
//! worker): memory is bounded by the cluster size, not by the stream.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::compressed;
use crate::header::CompressionType;

/// One payload to decompress: its keys, its bytes, a cluster buffer.
pub(super) struct Job {
    /// The payload's (start, end) (the tap's key).
    pub key: (u64, u64),
    /// Its (start, bytes read) (the memo's key).
    pub memo: (u64, u64),
    pub kind: CompressionType,
    pub buf: Vec<u8>,
    /// One cluster long.
    pub out: Vec<u8>,
}

/// A job done. `outcome` is `None` when the worker could not decompress
/// it (it panicked): the inspector then does it itself.
pub(super) struct Done {
    pub job: Job,
    pub outcome: Option<std::result::Result<(), String>>,
}

/// Payloads in flight per worker.
const PER_WORKER: usize = 2;

/// The worker threads, started on the first payload.
pub(super) struct Decoders {
    threads: usize,
    jobs: Option<SyncSender<Job>>,
    /// In a mutex only so that the inspector stays `Sync` (the Python
    /// binding shares it); one thread uses it.
    done: Option<Mutex<Receiver<Done>>>,
    handles: Vec<JoinHandle<()>>,
    out: usize,
    spare: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Decoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoders")
            .field("workers", &self.handles.len())
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

impl Decoders {
    /// Decoders for `threads` threads of `cluster_size`-byte clusters:
    /// `None` for one thread (the inspector decompresses inline).
    pub fn new(threads: usize, cluster_size: u64) -> Option<Decoders> {
        // Per worker: PER_WORKER payloads and clusters, and its decoder.
        let per_worker = cluster_size
            .saturating_mul(2)
            .saturating_add(512)
            .saturating_mul(PER_WORKER as u64);
        let threads = crate::parallel::workers(threads, per_worker);
        (threads > 1).then(|| Decoders {
            threads,
            jobs: None,
            done: None,
            handles: Vec::new(),
            out: 0,
            spare: Vec::new(),
        })
    }

    /// Whether as many payloads are out as allowed.
    pub fn full(&self) -> bool {
        self.out >= self.threads.saturating_mul(PER_WORKER)
    }

    /// A cluster buffer of `len` bytes (reused from earlier jobs).
    pub fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    /// A buffer back for reuse.
    pub fn recycle(&mut self, b: Vec<u8>) {
        if self.spare.len() < self.threads.saturating_mul(PER_WORKER) {
            self.spare.push(b);
        }
    }

    fn start(&mut self) -> bool {
        if self.jobs.is_some() {
            return true;
        }
        let (tx, rx) = mpsc::sync_channel::<Job>(self.threads.saturating_mul(PER_WORKER));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..self.threads {
            let (rx, done_tx) = (Arc::clone(&rx), done_tx.clone());
            let spawned = std::thread::Builder::new()
                .name("qcow2-guard-stream-decoder".into())
                .spawn(move || work(&rx, &done_tx));
            match spawned {
                Ok(h) => self.handles.push(h),
                Err(_) => break,
            }
        }
        if self.handles.is_empty() {
            return false;
        }
        // Only the workers hold senders: if they were all gone, waiting
        // for an outcome ends instead of hanging.
        drop(done_tx);
        self.jobs = Some(tx);
        self.done = Some(Mutex::new(done_rx));
        true
    }

    /// Hand `job` to a worker; `Err(job)` back when none can take it
    /// (the caller decompresses it inline). The caller keeps
    /// [`Decoders::full`] false by taking outcomes first.
    pub fn send(&mut self, job: Job) -> std::result::Result<(), Job> {
        if !self.start() {
            return Err(job);
        }
        let Some(tx) = self.jobs.as_ref() else {
            return Err(job);
        };
        match tx.send(job) {
            Ok(()) => {
                self.out = self.out.saturating_add(1);
                Ok(())
            }
            Err(mpsc::SendError(job)) => Err(job),
        }
    }

    /// The next outcome: waiting for one when `wait`, else only one
    /// already there. `None` when nothing is out (or nothing is ready).
    pub fn next(&mut self, wait: bool) -> Option<Done> {
        if self.out == 0 {
            return None;
        }
        let rx = self.done.as_ref()?.lock().ok()?;
        let got = if wait {
            rx.recv().ok()
        } else {
            rx.try_recv().ok()
        };
        if got.is_some() {
            self.out = self.out.saturating_sub(1);
        }
        got
    }
}

fn work(rx: &Mutex<Receiver<Job>>, done: &mpsc::Sender<Done>) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(mut job) = job else {
            return;
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            compressed::decompress(job.kind, &job.buf, &mut job.out)
        }))
        .ok();
        if done.send(Done { job, outcome }).is_err() {
            return;
        }
    }
}

impl Drop for Decoders {
    /// Close the queue and join every worker (their decoder states are
    /// freed before the inspector is gone).
    fn drop(&mut self) {
        // Outcomes not taken keep no worker waiting: the done channel is
        // unbounded.
        self.jobs = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
