//! Per-bucket async reader-writer locks for one shard (single-threaded, no atomics).
//!
//! A bucket's chain is read and rewritten across await points (block reads, extent writes), so
//! operations on one bucket take its lock: readers (GET, EXISTS) share it, writers (SET, DEL,
//! cleanups) hold it alone. Waiting writers block new readers, so writers cannot starve. Lock
//! entries exist only while held or waited for: memory is bounded by the tasks in flight.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use corebuf_shard::WaitList;
use hashbrown::HashMap;

#[derive(Debug, Default)]
struct Entry {
    readers: Cell<u32>,
    writer: Cell<bool>,
    writers_waiting: Cell<u32>,
    changed: WaitList,
}

/// Idle entries kept for reuse, so that taking a lock allocates nothing once warm.
const SPARE_ENTRIES_MAX: usize = 1024;

/// The locks of one shard's buckets, by bucket id.
#[derive(Debug, Default)]
pub struct BucketLocks {
    map: RefCell<HashMap<u64, Rc<Entry>>>,
    spare: RefCell<Vec<Rc<Entry>>>,
}

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct Guard<'a> {
    locks: &'a BucketLocks,
    id: u64,
    entry: Rc<Entry>,
    write: bool,
}

/// Counts a writer as waiting while its future lives (a dropped waiter uncounts itself).
struct Waiting<'a>(&'a Entry);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.writers_waiting.set(self.0.writers_waiting.get() - 1);
        self.0.changed.notify_all();
    }
}

impl BucketLocks {
    fn entry(&self, id: u64) -> Rc<Entry> {
        let mut map = self.map.borrow_mut();
        if let Some(entry) = map.get(&id) {
            return Rc::clone(entry);
        }
        // An idle entry's counters are all zero and nobody waits on it: as good as new.
        let entry = self.spare.borrow_mut().pop().unwrap_or_default();
        map.insert(id, Rc::clone(&entry));
        entry
    }

    /// Takes bucket `id`'s lock shared.
    pub async fn read(&self, id: u64) -> Guard<'_> {
        let entry = self.entry(id);
        entry
            .changed
            .wait_for(|| (!entry.writer.get() && entry.writers_waiting.get() == 0).then_some(()))
            .await;
        entry.readers.set(entry.readers.get() + 1);
        Guard { locks: self, id, entry, write: false }
    }

    /// Takes bucket `id`'s lock exclusively.
    pub async fn write(&self, id: u64) -> Guard<'_> {
        let entry = self.entry(id);
        if entry.writer.get() || entry.readers.get() > 0 {
            entry.writers_waiting.set(entry.writers_waiting.get() + 1);
            let waiting = Waiting(&entry);
            entry
                .changed
                .wait_for(|| (!entry.writer.get() && entry.readers.get() == 0).then_some(()))
                .await;
            drop(waiting);
        }
        entry.writer.set(true);
        Guard { locks: self, id, entry, write: true }
    }

    /// Bucket locks held or waited for now.
    /// Whether no one holds or awaits `id`'s lock (so a change made without an await needs
    /// none).
    pub fn is_free(&self, id: u64) -> bool {
        !self.map.borrow().contains_key(&id)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.write {
            self.entry.writer.set(false);
        } else {
            self.entry.readers.set(self.entry.readers.get() - 1);
        }
        self.entry.changed.notify_all();
        let idle = !self.entry.writer.get()
            && self.entry.readers.get() == 0
            && self.entry.writers_waiting.get() == 0;
        // The map and this guard hold the only references: nobody waits for this bucket.
        if idle && Rc::strong_count(&self.entry) == 2 {
            let removed = self.locks.map.borrow_mut().remove(&self.id);
            let mut spare = self.locks.spare.borrow_mut();
            if let Some(entry) = removed.filter(|_| spare.len() < SPARE_ENTRIES_MAX) {
                spare.push(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_and_entries_are_dropped() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let locks = Rc::new(BucketLocks::default());
                let log = Rc::new(RefCell::new(Vec::new()));
                let w = locks.write(1).await;
                let mut tasks = Vec::new();
                for i in 0..3 {
                    let (locks, log) = (Rc::clone(&locks), Rc::clone(&log));
                    tasks.push(glommio::spawn_local(async move {
                        let _g = locks.read(1).await;
                        log.borrow_mut().push(i);
                    }));
                }
                glommio::yield_if_needed().await;
                futures_lite::future::yield_now().await;
                assert!(log.borrow().is_empty(), "readers wait for the writer");
                drop(w);
                for t in tasks {
                    t.await;
                }
                assert_eq!(log.borrow().len(), 3);
                assert_eq!(locks.len(), 0, "idle entries are removed");
                let r = locks.read(2).await;
                let (l2, log2) = (Rc::clone(&locks), Rc::clone(&log));
                let writer = glommio::spawn_local(async move {
                    let _g = l2.write(2).await;
                    log2.borrow_mut().push(100);
                });
                futures_lite::future::yield_now().await;
                assert_eq!(log.borrow().len(), 3, "the writer waits for the reader");
                drop(r);
                writer.await;
                assert_eq!(log.borrow().last(), Some(&100));
                assert_eq!(locks.len(), 0);
            })
            .expect("spawn executor")
            .join()
            .expect("join executor");
    }
}
