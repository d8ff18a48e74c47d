//! [`Conversion::run`]: workers fill chunks, the sink takes them.
//!
//! [`ConvertOptions::threads`](super::ConvertOptions::threads) workers
//! (fewer when their buffers would pass
//! [`crate::parallel::WORKER_MEMORY`]) take chunks in turn (worker `w` of
//! `n` takes chunks `w, w + n, ...`), each reading, decompressing and
//! zero-scanning its own. Into a positional sink each worker writes its
//! own chunks, so there are no hand-offs and many small hole chunks cost nothing; into a
//! sequential sink the calling thread writes the chunks in order. At most
//! a few chunks are in flight, so memory does not grow with the image.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

use super::chunks::{chunk_size, chunks, fill, Chunk, Piece, Worker};
use super::{Conversion, ConvertError, Sink};
use crate::source::Source;
use crate::Image;

/// Chunk buffers per worker (sequential sinks): one being filled, one
/// queued, one being written.
const BUFFERS: usize = 3;

/// A progress callback: called with the number of guest bytes just done.
pub type Progress<'a> = Option<&'a (dyn Fn(u64) + Sync)>;

impl<S: Source> Conversion<S> {
    /// Write the whole guest disk into `sink`, then call
    /// [`Sink::finish`]. `progress` is called with each chunk's length as
    /// it is done. On error the sink holds part of the disk: the caller
    /// discards it.
    pub fn run(&self, sink: &dyn Sink, progress: Progress<'_>) -> Result<(), ConvertError> {
        let image = &self.image;
        // A worker holds its chunk buffers (BUFFERS of them for a
        // sequential sink, one for a positional one) and one compressed
        // stream; with 2 MiB clusters fewer workers start.
        let buffers = if sink.sequential() { BUFFERS } else { 1 };
        let per_worker = chunk_size(image)
            .saturating_mul(u64::try_from(buffers).unwrap_or(u64::MAX))
            .saturating_add(image.geometry().cluster_size);
        let workers = crate::parallel::workers(self.threads, per_worker);
        if sink.sequential() {
            to_sequential(image, &self.holes, sink, progress, workers)?;
        } else {
            to_positional(image, &self.holes, sink, progress, workers)?;
        }
        sink.finish(image.virtual_size())
            .map_err(ConvertError::Sink)
    }
}

fn write_chunk(sink: &dyn Sink, c: &Chunk) -> Result<(), ConvertError> {
    for p in c.pieces() {
        match p {
            Piece::Data(at, data) => sink.write_at(at, data),
            Piece::Hole(at, len) => sink.write_zeros(at, len),
        }
        .map_err(ConvertError::Sink)?;
    }
    Ok(())
}

fn len_of(start: u64, end: u64) -> Result<usize, ConvertError> {
    end.checked_sub(start)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or(ConvertError::image(crate::Error::Overflow {
            what: crate::What::L2Table,
            offset: start,
        }))
}

fn worker_died() -> ConvertError {
    ConvertError::Sink(std::io::Error::other(
        "a conversion worker stopped unexpectedly",
    ))
}

fn to_positional<S: Source>(
    image: &Image<S>,
    holes: &[bool],
    sink: &dyn Sink,
    progress: Progress<'_>,
    workers: usize,
) -> Result<(), ConvertError> {
    let stop = AtomicBool::new(false);
    // Per worker: the start of the chunk it is on (u64::MAX when done).
    // Each takes its chunks in guest order, so everything below the
    // smallest is written: that is what the sink hears as settled.
    let at: Vec<AtomicU64> = (0..workers).map(|_| AtomicU64::new(0)).collect();
    let settled = || at.iter().map(|a| a.load(Ordering::Relaxed)).min();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..workers)
            .map(|w| {
                let (stop, at, settled) = (&stop, &at, &settled);
                s.spawn(move || -> Result<(), ConvertError> {
                    let mut buf = Vec::new();
                    let mut worker = Worker::default();
                    let mine = at.get(w);
                    for (start, end, hole) in chunks(image, holes).skip(w).step_by(workers) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Some(a) = mine {
                            a.store(start, Ordering::Relaxed);
                        }
                        if let Some(done) = settled() {
                            sink.settled(done);
                        }
                        let r = if hole {
                            sink.write_zeros(start, end.saturating_sub(start))
                                .map_err(ConvertError::Sink)
                        } else {
                            fill(image, start, end, std::mem::take(&mut buf), &mut worker)
                                .map_err(ConvertError::image)
                                .and_then(|c| write_chunk(sink, &c).map(|()| buf = c.data))
                        };
                        if let Err(e) = r {
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        if let Some(p) = progress {
                            p(end.saturating_sub(start));
                        }
                    }
                    if let Some(a) = mine {
                        a.store(u64::MAX, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        let mut result = Ok(());
        for h in workers {
            let r = h.join().unwrap_or_else(|_| Err(worker_died()));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

fn to_sequential<S: Source>(
    image: &Image<S>,
    holes: &[bool],
    sink: &dyn Sink,
    progress: Progress<'_>,
    workers: usize,
) -> Result<(), ConvertError> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut lanes = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = mpsc::sync_channel::<Result<Chunk, ConvertError>>(1);
            let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
            lanes.push((rx, back_tx));
            let stop = &stop;
            handles.push(s.spawn(move || {
                let mut buffers = 0usize;
                let mut worker = Worker::default();
                for (start, end, hole) in chunks(image, holes).skip(w).step_by(workers) {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let r = len_of(start, end).and_then(|len| {
                        if hole {
                            return Ok(Chunk::hole(start, len));
                        }
                        // Reuse written buffers; at most BUFFERS per worker.
                        let buf = match back_rx.try_recv() {
                            Ok(b) => b,
                            Err(_) if buffers < BUFFERS => {
                                buffers = buffers.saturating_add(1);
                                Vec::new()
                            }
                            Err(_) => back_rx.recv().map_err(|_| worker_died())?,
                        };
                        fill(image, start, end, buf, &mut worker).map_err(ConvertError::image)
                    });
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            }));
        }
        let size = image.virtual_size();
        let mut pos = 0u64;
        let mut result = Ok(());
        for (rx, back) in lanes.iter().cycle() {
            if pos >= size {
                break;
            }
            let chunk = match rx.recv() {
                Ok(Ok(c)) if c.start == pos => Ok(c),
                Ok(Ok(_)) => Err(ConvertError::Sink(std::io::Error::other(
                    "conversion chunks out of order",
                ))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(worker_died()),
            }
            .and_then(|c| write_chunk(sink, &c).map(|()| c));
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let len = u64::try_from(chunk.len).unwrap_or(u64::MAX);
            pos = pos.saturating_add(len);
            if let Some(p) = progress {
                p(len);
            }
            if !chunk.data.is_empty() {
                // The worker may be gone already; then the buffer is freed.
                let _ = back.send(chunk.data);
            }
        }
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // Dropping the receivers unblocks any worker waiting to send.
        drop(lanes);
        // Joined by hand: the scope's implicit join returns before a
        // thread's thread-local destructors (its decoder contexts) have
        // run, so the conversion would return with workers still alive.
        for h in handles {
            let _ = h.join();
        }
        result
    })
}
