//! Compressed payloads verified on several threads, findings in walk order.
//!
//! The audit ([`super::walk`]) meets compressed clusters one L2 entry at a
//! time and decompresses each (the only costly part of a full check).
//! With more than one thread, [`walk_l2`] puts an [`Ahead`] between the
//! walker and the audit: each compressed entry the audit will verify (its
//! descriptor passes [`Descriptor::validate`] and the decompression
//! [`Budget`] has room, the same rules the audit applies) is handed to a
//! worker as it is walked, and the entries are held back in walk order
//! until the payload at their head is done; the audit then receives every
//! item in the order of the single-thread walk, with the outcome of each
//! payload handed in just before its entry ([`Verifier::precomputed`]).
//! So findings, their order, the stored/omitted split and the statistics
//! are those of the single-thread run, whatever the threads' timing.
//! Only tables with a compressed entry are taken apart: every other table
//! goes to the audit whole ([`Visitor::l2_entries`], its fast path for
//! common entries), held back as one item while a payload before it is
//! unfinished, so an uncompressed image costs what it costs on one thread.
//!
//! Memory stays bounded: at most [`IN_FLIGHT_PER_THREAD`] payloads per
//! thread are being decoded or waiting, at most [`MAX_HELD`] items and
//! [`MAX_HELD_WORDS`] words of whole tables are held back, and each worker owns one cluster of input and one of output
//! (plus its decoder context), and fewer workers start when the clusters
//! are so large that their buffers would pass
//! [`crate::parallel::WORKER_MEMORY`]. Workers are started as payloads pile
//! up, so an image without compressed clusters, or with a single one,
//! starts none.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use crate::compressed::{Descriptor, OFLAG_COMPRESSED};
use crate::error::Result;
use crate::header::Geometry;
use crate::l1l2::Cluster;
use crate::source::Source;
use crate::walker::{self, Item, L2Ref, Visitor};
use crate::Image;

/// Payloads queued or being decoded, per thread: enough that no worker
/// waits while the walk reads the next L2 table.
const IN_FLIGHT_PER_THREAD: usize = 16;
/// Payloads handed to a worker at a time, and their outcomes handed back
/// together: one wake-up of a thread per batch instead of per payload
/// (two futex calls a payload cost about a third of a 2-core full check's
/// system time).
const BATCH: usize = 8;
/// Walk items held back behind an unfinished payload.
const MAX_HELD: usize = 4096;
/// Words of whole L2 tables held back behind an unfinished payload (1 MiB).
const MAX_HELD_WORDS: usize = 1 << 17;

/// The decompression budget ([`super::CheckOptions::max_decompressed_bytes`]):
/// once a cluster no longer fits, no later one does.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    spent: u64,
    max: u64,
}

impl Budget {
    pub(super) fn new(max: u64) -> Budget {
        Budget { spent: 0, max }
    }

    /// Spend `n` bytes if they fit.
    pub(super) fn take(&mut self, n: u64) -> bool {
        let spent = self.spent.saturating_add(n);
        if spent > self.max {
            return false;
        }
        self.spent = spent;
        true
    }

    pub(super) fn max(&self) -> u64 {
        self.max
    }
}

/// A visitor that verifies compressed payloads and can be handed the
/// outcome of one verified elsewhere.
pub(super) trait Verifier<'a>: Visitor<'a> {
    /// The outcome of [`Image::verify_compressed`] for the compressed
    /// entry at `at`, which is the next entry this visitor receives.
    fn precomputed(&mut self, at: u64, outcome: Result<()>);
}

/// [`walker::walk_l2`], verifying payloads on `threads` threads when
/// `verify` (payloads are decompressed at all) and `threads > 1`.
/// `budget` is the audit's budget before the walk. Returns the number of
/// worker threads started.
pub(super) fn walk_l2<'a, S: Source, V: Verifier<'a>>(
    image: &'a Image<S>,
    tables: &[L2Ref],
    visit: &mut V,
    verify: bool,
    budget: Budget,
    threads: usize,
) -> usize {
    let g = *image.geometry();
    // A worker holds one cluster of input (plus a sector) and one of output.
    let per_worker = g.cluster_size.saturating_mul(2);
    let threads = crate::parallel::workers(threads, per_worker);
    if !verify || threads < 2 {
        walker::walk_l2(image, tables, visit);
        return 0;
    }
    let (job_tx, job_rx) = mpsc::channel::<Vec<Job>>();
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<Vec<Done>>();
    std::thread::scope(|scope| {
        let mut ahead = Ahead {
            visit,
            image,
            scope,
            g,
            file_len: image.file_len(),
            budget,
            threads,
            spawned: 0,
            workers: Vec::new(),
            jobs: Some(job_tx),
            batch: Vec::with_capacity(BATCH),
            job_rx: &job_rx,
            done_tx: Some(done_tx),
            done_rx,
            held: VecDeque::new(),
            held_words: 0,
            spare: Vec::new(),
            results: HashMap::new(),
            next: 0,
            in_flight: 0,
            max_in_flight: threads.saturating_mul(IN_FLIGHT_PER_THREAD),
        };
        walker::walk_l2(image, tables, &mut ahead);
        ahead.finish();
        ahead.join();
        ahead.spawned
    })
}

/// One payload to verify.
struct Job {
    seq: u64,
    d: Descriptor,
    guest: u64,
}

/// A payload's outcome; `None` when its worker could not compute it (then
/// the audit verifies it itself).
type Done = (u64, Option<Result<()>>);

/// A walk item held back, in walk order.
enum Held<'a> {
    Item(Item<'a>),
    Entry {
        table: L2Ref,
        index: u64,
        at: u64,
        raw: u64,
        cluster: Result<Cluster>,
        /// The payload job of a compressed entry.
        ticket: Option<u64>,
    },
    /// A whole L2 table without compressed entries (its words), for the
    /// audit's [`Visitor::l2_entries`].
    Table {
        table: L2Ref,
        words: Vec<u64>,
        data_file: bool,
    },
}

struct Ahead<'a, 'v, 's, 'e, S, V> {
    visit: &'v mut V,
    image: &'a Image<S>,
    scope: &'s Scope<'s, 'e>,
    g: Geometry,
    file_len: u64,
    budget: Budget,
    threads: usize,
    spawned: usize,
    workers: Vec<ScopedJoinHandle<'s, ()>>,
    /// `None` once no worker can be reached: payloads are then left to
    /// the audit.
    jobs: Option<mpsc::Sender<Vec<Job>>>,
    /// Jobs not yet sent (at most [`BATCH`]): sent when full, and before
    /// this thread waits for an outcome.
    batch: Vec<Job>,
    job_rx: &'e Mutex<mpsc::Receiver<Vec<Job>>>,
    /// Cloned into each worker; dropped once all are started.
    done_tx: Option<mpsc::Sender<Vec<Done>>>,
    done_rx: mpsc::Receiver<Vec<Done>>,
    held: VecDeque<Held<'a>>,
    /// Words of the [`Held::Table`]s in `held`.
    held_words: usize,
    /// Word buffers of delivered tables, for reuse.
    spare: Vec<Vec<u64>>,
    results: HashMap<u64, Option<Result<()>>>,
    next: u64,
    in_flight: usize,
    max_in_flight: usize,
}

impl<'a, 'e, S: Source, V: Verifier<'a>> Ahead<'a, '_, '_, 'e, S, V>
where
    'a: 'e,
{
    /// Hand the payload of `cluster` to a worker if the audit will
    /// verify it: its ticket.
    fn submit(
        &mut self,
        cluster: &Result<Cluster>,
        table: &L2Ref,
        index: u64,
        at: u64,
    ) -> Option<u64> {
        let Ok(Cluster::Compressed(d)) = cluster else {
            return None;
        };
        // The audit's own rules, in the same order: a descriptor that
        // fails validation is not decompressed and spends no budget.
        if d.validate(at, &self.g, self.file_len).is_err() || !self.budget.take(self.g.cluster_size)
        {
            return None;
        }
        // A worker starts once a payload is already waiting: an image with
        // a single compressed cluster (or one at a time, far apart) costs
        // no thread; see also `wait` and `finish`.
        if self.in_flight > self.spawned && self.spawned < self.threads {
            self.spawn();
        }
        let seq = self.next;
        self.batch.push(Job {
            seq,
            d: *d,
            guest: table.guest_offset(index, &self.g),
        });
        self.next = seq.saturating_add(1);
        self.in_flight = self.in_flight.saturating_add(1);
        if self.batch.len() >= BATCH {
            self.send();
        }
        Some(seq)
    }

    /// Hand the unsent jobs to the workers. When none can be reached,
    /// their payloads are left to the audit (no outcome will come).
    fn send(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        let n = batch.len();
        let sent = self.jobs.as_ref().is_some_and(|tx| tx.send(batch).is_ok());
        if !sent {
            self.jobs = None;
            self.in_flight = self.in_flight.saturating_sub(n);
        }
    }

    /// Start one more worker (when the system refuses, carry on with
    /// those there are).
    fn spawn(&mut self) {
        let Some(done) = self.done_tx.clone() else {
            return;
        };
        let (image, jobs) = (self.image, self.job_rx);
        let cs = usize::try_from(self.g.cluster_size).unwrap_or(0);
        let worker = move || {
            let mut input = Vec::new();
            let mut out = vec![0u8; cs];
            loop {
                let batch = match jobs.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok(batch) = batch else { return };
                let outcomes = batch
                    .iter()
                    .map(|job| {
                        let outcome = catch_unwind(AssertUnwindSafe(|| {
                            image.verify_compressed(&job.d, job.guest, &mut input, &mut out)
                        }))
                        .ok();
                        (job.seq, outcome)
                    })
                    .collect();
                if done.send(outcomes).is_err() {
                    return;
                }
            }
        };
        match std::thread::Builder::new()
            .name("qcow2-guard-check".into())
            .spawn_scoped(self.scope, worker)
        {
            Ok(handle) => {
                self.workers.push(handle);
                self.spawned = self.spawned.saturating_add(1);
            }
            Err(_) => self.threads = self.spawned,
        }
        if self.spawned >= self.threads {
            self.done_tx = None;
        }
    }

    /// Take the outcomes that are in, without waiting.
    fn collect(&mut self) {
        while let Ok(outcomes) = self.done_rx.try_recv() {
            self.record(outcomes);
        }
    }

    fn record(&mut self, outcomes: Vec<Done>) {
        for (seq, r) in outcomes {
            self.results.insert(seq, r);
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    /// Wait for one outcome (starting the first worker if none has
    /// started: entries are piling up behind a queued payload); `false`
    /// when none can come.
    fn wait(&mut self) -> bool {
        if self.spawned == 0 && self.threads > 0 {
            self.spawn();
        }
        self.send();
        if self.in_flight == 0 || self.spawned == 0 {
            return false;
        }
        match self.done_rx.recv() {
            Ok(outcomes) => {
                self.record(outcomes);
                true
            }
            Err(_) => false,
        }
    }

    /// Hand the audit every held item up to the first unfinished payload
    /// (all of them when `all`: the rest are left to the audit).
    fn deliver(&mut self, all: bool) {
        while let Some(front) = self.held.front() {
            if let Held::Entry {
                ticket: Some(t), ..
            } = front
            {
                if !all && !self.results.contains_key(t) {
                    return;
                }
            }
            match self.held.pop_front() {
                Some(Held::Item(item)) => self.visit.item(item),
                Some(Held::Entry {
                    table,
                    index,
                    at,
                    raw,
                    cluster,
                    ticket,
                }) => {
                    if let Some(Some(outcome)) = ticket.and_then(|t| self.results.remove(&t)) {
                        self.visit.precomputed(at, outcome);
                    }
                    self.visit.l2_entry(&table, index, at, raw, cluster);
                }
                Some(Held::Table {
                    table,
                    words,
                    data_file,
                }) => {
                    self.held_words = self.held_words.saturating_sub(words.len());
                    self.visit.l2_entries(&table, &words, &self.g, data_file);
                    self.spare.push(words);
                }
                None => return,
            }
        }
    }

    /// Deliver what is ready; wait while too much is in flight or held.
    fn pump(&mut self) {
        self.collect();
        self.deliver(false);
        while self.in_flight >= self.max_in_flight
            || self.held.len() >= MAX_HELD
            || self.held_words > MAX_HELD_WORDS
        {
            if !self.wait() {
                self.abandon();
                return;
            }
            self.collect();
            self.deliver(false);
        }
    }

    /// No more outcomes can come: the audit verifies the rest itself.
    fn abandon(&mut self) {
        self.jobs = None;
        self.batch.clear();
        self.deliver(true);
    }

    /// Close the job channel and wait for every worker to exit. The
    /// scope's implicit join would return once each closure is done, but
    /// before the thread's thread-local destructors (its decoder contexts)
    /// have run: the check would return with workers still alive and
    /// their memory still held (LeakSanitizer reports it as a leak).
    fn join(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            // A worker catches its own panics; nothing to report here.
            let _ = worker.join();
        }
    }

    /// The walk is over: deliver everything. Payloads queued while no
    /// worker started (one at a time) are left to the audit: cheaper than
    /// starting a thread for them.
    fn finish(&mut self) {
        if self.spawned == 0 {
            self.abandon();
            return;
        }
        loop {
            self.collect();
            self.deliver(false);
            if self.held.is_empty() {
                return;
            }
            if !self.wait() {
                self.abandon();
                return;
            }
        }
    }
}

impl<'a, 'e, S: Source, V: Verifier<'a>> Visitor<'a> for Ahead<'a, '_, '_, 'e, S, V>
where
    'a: 'e,
{
    fn item(&mut self, item: Item<'a>) {
        if self.held.is_empty() {
            self.visit.item(item);
        } else {
            self.held.push_back(Held::Item(item));
        }
    }

    fn l2_entry(&mut self, table: &L2Ref, index: u64, at: u64, raw: u64, cluster: Result<Cluster>) {
        let ticket = if self.jobs.is_some() {
            self.submit(&cluster, table, index, at)
        } else {
            None
        };
        if ticket.is_none() && self.held.is_empty() {
            self.visit.l2_entry(table, index, at, raw, cluster);
            return;
        }
        self.held.push_back(Held::Entry {
            table: *table,
            index,
            at,
            raw,
            cluster,
            ticket,
        });
        self.pump();
    }

    /// A table without compressed entries has no payload to hand out: it
    /// goes to the audit whole (its fast path for common entries), held
    /// back as one item behind unfinished payloads. A table with one goes
    /// entry by entry, each compressed entry to a worker.
    fn l2_entries(&mut self, table: &L2Ref, words: &[u64], g: &Geometry, data_file: bool) {
        // Standard entries: one OR over the table (vectorised); extended
        // ones: the first word of each pair (bit 62 of a subcluster
        // bitmap is a zero flag).
        let flags = if g.extended_l2 {
            words.iter().step_by(2).fold(0, |a, &w| a | w)
        } else {
            words.iter().fold(0, |a, &w| a | w)
        };
        let compressed = !data_file && self.jobs.is_some() && flags & OFLAG_COMPRESSED != 0;
        if compressed {
            walker::decode_entries(self, table, words, g, data_file);
            return;
        }
        if self.held.is_empty() {
            self.visit.l2_entries(table, words, g, data_file);
            return;
        }
        let mut held = self.spare.pop().unwrap_or_default();
        held.clear();
        held.extend_from_slice(words);
        self.held_words = self.held_words.saturating_add(held.len());
        self.held.push_back(Held::Table {
            table: *table,
            words: held,
            data_file,
        });
        self.pump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{GuestCluster, ImageModel};

    /// What the audit side receives.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        /// A whole table through [`Visitor::l2_entries`].
        Whole(u64),
        /// An entry (at, raw), with whether its payload was verified ahead.
        Entry(u64, u64, Option<bool>),
        Other,
    }

    #[derive(Default)]
    struct Record {
        got: Vec<Got>,
        ready: Option<(u64, bool)>,
    }

    impl<'a> Visitor<'a> for Record {
        fn item(&mut self, _item: Item<'a>) {
            self.got.push(Got::Other);
        }
        fn l2_entry(&mut self, _t: &L2Ref, _i: u64, at: u64, raw: u64, _c: Result<Cluster>) {
            let ready = self.ready.take().filter(|r| r.0 == at).map(|r| r.1);
            self.got.push(Got::Entry(at, raw, ready));
        }
        fn l2_entries(&mut self, t: &L2Ref, words: &[u64], g: &Geometry, data_file: bool) {
            self.got.push(Got::Whole(t.offset));
            walker::decode_entries(self, t, words, g, data_file);
        }
    }

    impl Verifier<'_> for Record {
        fn precomputed(&mut self, at: u64, outcome: Result<()>) {
            self.ready = Some((at, outcome.is_ok()));
        }
    }

    /// A built image of 512-byte clusters (64 entries per L2 table).
    fn built(clusters: Vec<GuestCluster>) -> Vec<u8> {
        let model = ImageModel {
            cluster_bits: 9,
            clusters,
            ..ImageModel::default()
        };
        model.build().unwrap().bytes
    }

    /// What the audit side receives from [`walk_l2`] on `threads`, and the
    /// workers started.
    fn run(image: &Image<&[u8]>, tables: &[L2Ref], threads: usize) -> (Vec<Got>, usize) {
        let mut r = Record::default();
        let workers = walk_l2(image, tables, &mut r, true, Budget::new(u64::MAX), threads);
        (r.got, workers)
    }

    #[test]
    fn tables_without_compressed_entries_go_whole() {
        // 64 entries per L2 table: tables 1 and 3 hold compressed clusters.
        let clusters = (0..320u32)
            .map(|i| match (i / 64, i % 3) {
                (1 | 3, 0) => GuestCluster::Compressed(7),
                (_, 1) => GuestCluster::Unallocated,
                _ => GuestCluster::Data(3),
            })
            .collect();
        let bytes = built(clusters);
        let image = Image::open(bytes.as_slice()).unwrap();
        let tables = walker::walk_tables(&image, &mut |_: Item<'_>| {});
        assert_eq!(tables.len(), 5);
        let run = |threads| run(&image, &tables, threads).0;
        let one = run(1);
        let compressed_tables = [tables[1].offset, tables[3].offset];
        // What two threads must deliver: the same entries in the same
        // order; tables with compressed entries entry by entry, each
        // compressed payload verified ahead; the others whole.
        let want: Vec<Got> = one
            .into_iter()
            .filter(|g| !matches!(g, Got::Whole(t) if compressed_tables.contains(t)))
            .map(|g| match g {
                Got::Entry(at, raw, None) if raw & OFLAG_COMPRESSED != 0 => {
                    Got::Entry(at, raw, Some(true))
                }
                g => g,
            })
            .collect();
        assert_eq!(
            want.iter().filter(|g| matches!(g, Got::Whole(_))).count(),
            3
        );
        for _ in 0..20 {
            assert_eq!(run(2), want);
        }
    }

    /// Workers start once a payload is already waiting: a single
    /// compressed cluster is verified by the audit itself, with no thread;
    /// several start the workers.
    #[test]
    fn a_single_payload_starts_no_thread() {
        for compressed in [1usize, 40] {
            let clusters = (0..200)
                .map(|i| {
                    if i % 5 == 0 && i / 5 < compressed {
                        GuestCluster::Compressed(9)
                    } else {
                        GuestCluster::Data(1)
                    }
                })
                .collect();
            let bytes = built(clusters);
            let image = Image::open(bytes.as_slice()).unwrap();
            let tables = walker::walk_tables(&image, &mut |_: Item<'_>| {});
            let (one, _) = run(&image, &tables, 1);
            let (two, workers) = run(&image, &tables, 2);
            // How many start depends on timing; whether any does, not.
            assert_eq!(
                workers == 0,
                compressed == 1,
                "{compressed} compressed: {workers}"
            );
            // The same entries; without workers nothing is verified ahead.
            let strip = |got: Vec<Got>| -> Vec<Got> {
                got.into_iter()
                    .filter(|g| !matches!(g, Got::Whole(_)))
                    .map(|g| match g {
                        Got::Entry(at, raw, _) => Got::Entry(at, raw, None),
                        g => g,
                    })
                    .collect()
            };
            if workers == 0 {
                assert!(two.iter().all(|g| !matches!(g, Got::Entry(_, _, Some(_)))));
            }
            assert_eq!(strip(one), strip(two));
        }
    }
}
