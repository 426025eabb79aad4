//! Provided-buffer rings: a shard's receive buffers. The kernel picks a buffer only when data
//! arrives, so an idle connection with a receive armed holds none.
//!
//! A filled buffer leaves the ring as a [`bytes::Bytes`] whose owner puts the buffer id on a
//! lock-free return queue when the last reference drops; the shard gives returned buffers back
//! to the kernel once per loop turn. The memory stays allocated (owned by an `Arc`) until the
//! last buffer and the ring are gone, so a slice never dangles.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use io_uring::types::BufRingEntry;
use io_uring::Submitter;

/// The buffer memory and the queue of buffers handed back by their last owner.
#[derive(Debug)]
pub(crate) struct BufPool {
    mem: *mut u8,
    layout: Layout,
    size: usize,
    returned: ArrayQueue<u16>,
}

// SAFETY: the memory is only read through `Filled` (a buffer the kernel has finished writing and
// will not touch again until the id comes back through `returned`), and `returned` is a
// thread-safe queue. Nothing else aliases it mutably from user space.
unsafe impl Send for BufPool {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for BufPool {}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `BufRing::new` with this layout; dropped once (Arc).
        unsafe { dealloc(self.mem, self.layout) };
    }
}

/// One filled buffer, owned by the `Bytes` made from it.
struct Filled {
    pool: Arc<BufPool>,
    bid: u16,
    len: usize,
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `bid` is in range (checked when the completion was taken), `len` ≤ size, and
        // the kernel does not write this buffer until the id is returned in `drop`.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.mem.add(self.bid as usize * self.pool.size),
                self.len,
            )
        }
    }
}

impl Drop for Filled {
    fn drop(&mut self) {
        // Cannot fail: every id is in exactly one place and the queue holds them all.
        let _ = self.pool.returned.push(self.bid);
    }
}

/// A registered provided-buffer ring with its buffers.
#[derive(Debug)]
pub(crate) struct BufRing {
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    entries: u16,
    tail: u16,
    bgid: u16,
    pool: Arc<BufPool>,
    /// Buffers currently owned by the kernel.
    in_kernel: usize,
}

impl BufRing {
    /// Registers a ring of `count` (a power of two) buffers of `size` bytes as group `bgid`.
    pub(crate) fn new(
        submitter: &Submitter<'_>,
        bgid: u16,
        count: u16,
        size: usize,
    ) -> io::Result<BufRing> {
        assert!(count.is_power_of_two() && count > 0 && size > 0);
        let ring_bytes = (count as usize * std::mem::size_of::<BufRingEntry>()).max(4096);
        // SAFETY: anonymous private mapping; checked below.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = ring as *mut BufRingEntry;
        let layout = Layout::from_size_align(count as usize * size, 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: non-zero size (count, size > 0).
        let mem = unsafe { alloc_zeroed(layout) };
        if mem.is_null() {
            // SAFETY: mapped above.
            unsafe { libc::munmap(ring.cast(), ring_bytes) };
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let pool = Arc::new(BufPool {
            mem,
            layout,
            size,
            returned: ArrayQueue::new(count as usize),
        });
        // SAFETY: `ring` is page-aligned, zeroed, `count` entries long and stays mapped until
        // `unregister` (which the shard calls before dropping the ring).
        let reg = unsafe { submitter.register_buf_ring_with_flags(ring as u64, count, bgid, 0) };
        if let Err(e) = reg {
            // SAFETY: mapped above, not registered.
            unsafe { libc::munmap(ring.cast(), ring_bytes) };
            return Err(e);
        }
        let mut r = BufRing {
            ring,
            ring_bytes,
            entries: count,
            tail: 0,
            bgid,
            pool,
            in_kernel: 0,
        };
        for bid in 0..count {
            r.give(bid);
        }
        r.publish();
        Ok(r)
    }

    /// The buffer group id to name in receives.
    pub(crate) fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Buffers the kernel can fill right now.
    pub(crate) fn available(&self) -> usize {
        self.in_kernel
    }

    fn give(&mut self, bid: u16) {
        let mask = self.entries - 1;
        // SAFETY: the index is masked into the ring; the entry is ours to write until the
        // tail store below publishes it.
        let e = unsafe { &mut *self.ring.add((self.tail & mask) as usize) };
        // SAFETY: bid < entries, so the address is inside the pool.
        e.set_addr(unsafe { self.pool.mem.add(bid as usize * self.pool.size) } as u64);
        e.set_len(self.pool.size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.in_kernel += 1;
    }

    fn publish(&mut self) {
        // SAFETY: the tail field lives in the first entry's reserved word of our mapping.
        let tail = unsafe { BufRingEntry::tail(self.ring) } as *const AtomicU16;
        // SAFETY: aligned u16 in our mapping; the kernel reads it with acquire semantics.
        unsafe { (*tail).store(self.tail, Ordering::Release) };
    }

    /// Gives every buffer whose last owner has dropped back to the kernel. Returns how many.
    pub(crate) fn recycle(&mut self) -> usize {
        let mut n = 0;
        while let Some(bid) = self.pool.returned.pop() {
            self.give(bid);
            n += 1;
        }
        if n > 0 {
            self.publish();
        }
        n
    }

    /// Takes the buffer a completion filled, as bytes that return it when dropped.
    pub(crate) fn take(&mut self, bid: u16, len: usize) -> Bytes {
        assert!(bid < self.entries && len <= self.pool.size);
        self.in_kernel -= 1;
        Bytes::from_owner(Filled {
            pool: self.pool.clone(),
            bid,
            len,
        })
    }

    /// Unregisters the ring. Call once no receive naming this group can still complete.
    pub(crate) fn unregister(self, submitter: &Submitter<'_>) {
        let _ = submitter.unregister_buf_ring(self.bgid);
        // SAFETY: unregistered above, so the kernel no longer reads the ring; mapped in `new`.
        unsafe { libc::munmap(self.ring.cast(), self.ring_bytes) };
        // The pool memory stays until the last `Bytes` drops (Arc).
    }
}
