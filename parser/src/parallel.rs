//! How many threads decompress: the `threads` options of
//! [`crate::CheckOptions`] and [`crate::convert::ConvertOptions`].
//!
//! Compressed clusters are independent, so `check` verifies them and
//! `convert` fills its chunks on several threads; everything a thread
//! holds (one cluster in and out, a decoder context, a few chunk buffers)
//! is bounded, so memory grows with the thread count, never with the
//! image.

use std::sync::OnceLock;

/// The default thread count never exceeds this: past four decoders the
/// page-cache reads and the writer become the limit, and each thread
/// holds up to a few MiB with 2 MiB clusters.
pub const DEFAULT_MAX_THREADS: usize = 4;

/// The most threads any option may ask for; larger values are clamped.
pub const MAX_THREADS: usize = 64;

/// The machine's available parallelism (`std::thread::available_parallelism`,
/// which follows CPU affinity and cgroup quotas), capped at
/// [`DEFAULT_MAX_THREADS`]; 1 when it cannot be told. Asked once per
/// process.
///
/// ```
/// let n = qcow2_guard::parallel::default_threads();
/// assert!((1..=qcow2_guard::parallel::DEFAULT_MAX_THREADS).contains(&n));
/// ```
pub fn default_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .clamp(1, DEFAULT_MAX_THREADS)
    })
}

/// What the workers of one check or conversion may hold together, at
/// most: their buffers scale with the cluster size, which the image
/// chooses (up to 2 MiB), so the worker count is cut to fit.
pub const WORKER_MEMORY: u64 = 16 << 20;

/// A `threads` option as used: at least 1, at most [`MAX_THREADS`].
pub fn clamp(threads: usize) -> usize {
    threads.clamp(1, MAX_THREADS)
}

/// Workers to start for a `threads` option when each worker holds
/// `per_worker` bytes: [`clamp`]`(threads)`, cut so that all of them hold
/// at most [`WORKER_MEMORY`] (never below 1).
///
/// ```
/// use qcow2_guard::parallel::workers;
/// // 64 KiB clusters: buffers of a few hundred KiB, no cut.
/// assert_eq!(workers(4, 512 << 10), 4);
/// // 2 MiB clusters, 8 MiB per worker: two.
/// assert_eq!(workers(4, 8 << 20), 2);
/// assert_eq!(workers(0, 64 << 20), 1);
/// ```
pub fn workers(threads: usize, per_worker: u64) -> usize {
    let fit = WORKER_MEMORY
        .checked_div(per_worker)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(MAX_THREADS);
    clamp(threads).min(fit.max(1))
}
