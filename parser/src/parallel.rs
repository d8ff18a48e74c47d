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

/// A `threads` option as used: at least 1, at most [`MAX_THREADS`].
pub fn clamp(threads: usize) -> usize {
    threads.clamp(1, MAX_THREADS)
}
