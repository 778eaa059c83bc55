//! Append-only byte buffers whose committed prefix tensors share: the storage of the in-place
//! KV cache.
//!
//! An [`AppendBuffer`] owns `capacity` bytes and a committed length. Bytes below the committed
//! length are never written again, so any number of tensors may view a prefix of them while
//! new bytes are appended past it. [`AppendBuffer::try_append`] claims the next bytes only at
//! the committed length (an atomic compare-and-swap), so of two tensors that view the same
//! prefix, one appends in place and the other gets `false` and copies (a cloned cache that
//! branches off never overwrites the one it came from).

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// Alignment of every buffer: a cache line, enough for any element type and for SIMD loads.
const ALIGN: usize = 64;

/// Invariants: `committed <= claimed <= capacity`; bytes below `committed` are initialized and
/// never written again; bytes in `[committed, claimed)` are being written by the one appender
/// that claimed them; bytes past `claimed` are uninitialized and nothing reads them.
pub struct AppendBuffer {
    ptr: NonNull<u8>,
    capacity: usize,
    claimed: AtomicUsize,
    committed: AtomicUsize,
}

// SAFETY: the buffer is plain bytes. The committed prefix is only read; bytes past it are
// written only by the one caller whose compare-and-swap claimed them, and become visible
// (committed) only after they are written.
unsafe impl Send for AppendBuffer {}
unsafe impl Sync for AppendBuffer {}

impl AppendBuffer {
    /// An empty buffer of `capacity` bytes, or `None` when the allocator cannot provide them.
    /// The memory is left uninitialized (nothing reads past the committed length), so the
    /// operating system backs a large buffer with pages only as appends touch them: a cache
    /// sized for the whole context costs what it holds, not a zero-fill of all of it.
    pub fn with_capacity(capacity: usize) -> Option<Arc<AppendBuffer>> {
        let layout = Layout::from_size_align(capacity.max(1), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc(layout) })?;
        Some(Arc::new(AppendBuffer {
            ptr,
            capacity,
            claimed: AtomicUsize::new(0),
            committed: AtomicUsize::new(0),
        }))
    }

    /// Where the buffer starts (a tensor viewing a prefix starts here).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes appended so far.
    pub fn committed(&self) -> usize {
        self.committed.load(Ordering::Acquire)
    }

    /// Appends `src` when `at` is the committed length and `src` fits; false otherwise (the
    /// caller then copies into a new buffer).
    pub fn try_append(&self, at: usize, src: &[u8]) -> bool {
        let Some(end) = at.checked_add(src.len()) else {
            return false;
        };
        if end > self.capacity {
            return false;
        }
        // Only at the committed end: an appender holds a view of the first `at` bytes, so
        // every earlier claim has been written and published, and `claimed == at` unless
        // another appender got there first.
        if at != self.committed.load(Ordering::Acquire)
            || self
                .claimed
                .compare_exchange(at, end, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        // SAFETY: `[at, end)` lies inside the allocation and was claimed by the compare-and-swap
        // above, so no view covers it and no other writer can claim it.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(at), src.len());
        }
        // Published only now: a view of these bytes cannot exist before they are written.
        self.committed.store(end, Ordering::Release);
        true
    }

    /// The first `len` committed bytes, shared (no copy).
    pub fn prefix(self: &Arc<Self>, len: usize) -> Bytes {
        assert!(
            len <= self.committed(),
            "a view of {len} bytes past the committed {}",
            self.committed()
        );
        Bytes::from_owner(Prefix {
            buf: Arc::clone(self),
            len,
        })
    }
}

impl Drop for AppendBuffer {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity.max(1), ALIGN).expect("as allocated");
        // SAFETY: allocated in `with_capacity` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AppendBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AppendBuffer({} of {} bytes)",
            self.committed(),
            self.capacity
        )
    }
}

/// A committed prefix of a buffer, as the owner of a [`Bytes`].
struct Prefix {
    buf: Arc<AppendBuffer>,
    len: usize,
}

impl AsRef<[u8]> for Prefix {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` ≤ the committed length when the view was made, and committed bytes are
        // never written again.
        unsafe { std::slice::from_raw_parts(self.buf.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_in_place_only_at_the_committed_end() {
        let buf = AppendBuffer::with_capacity(16).unwrap();
        assert!(buf.try_append(0, &[1, 2, 3, 4]));
        let first = buf.prefix(4);
        assert!(buf.try_append(4, &[5, 6]));
        // A second append from the same old end is refused: the bytes are taken.
        assert!(!buf.try_append(4, &[9, 9]));
        // Past the capacity is refused too.
        assert!(!buf.try_append(6, &[0; 11]));
        assert_eq!(&first[..], &[1, 2, 3, 4]);
        assert_eq!(&buf.prefix(6)[..], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(buf.committed(), 6);
        assert_eq!(buf.prefix(6).as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn an_impossible_capacity_is_refused_not_aborted() {
        assert!(AppendBuffer::with_capacity(usize::MAX / 2).is_none());
        assert!(AppendBuffer::with_capacity(1 << 60).is_none());
    }

    /// Appenders race for the end while a reader views what is committed: every record a
    /// view shows is whole (its bytes written before they became visible), and in the end every
    /// appender's records are there, each claimed by one thread.
    #[test]
    fn racing_appenders_claim_disjoint_bytes_that_readers_see_whole() {
        const REC: usize = 64;
        const PER_THREAD: usize = 1000;
        let total = 4 * PER_THREAD * REC;
        let buf = AppendBuffer::with_capacity(total).unwrap();
        let whole = |rec: &[u8]| rec[0] != 0 && rec.iter().all(|&b| b == rec[0]);
        std::thread::scope(|s| {
            for t in 1..=4u8 {
                let buf = &buf;
                s.spawn(move || {
                    let mut done = 0;
                    while done < PER_THREAD {
                        if buf.try_append(buf.committed(), &[t; REC]) {
                            done += 1;
                        }
                    }
                });
            }
            let buf = &buf;
            s.spawn(move || {
                while buf.committed() < total {
                    let view = buf.prefix(buf.committed());
                    assert!(view.chunks(REC).all(whole), "a torn record in a view");
                }
            });
        });
        let all = buf.prefix(total);
        assert!(all.chunks(REC).all(whole), "a torn record");
        for t in 1..=4u8 {
            assert_eq!(all.chunks(REC).filter(|r| r[0] == t).count(), PER_THREAD);
        }
    }
}
