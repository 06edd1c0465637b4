//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`): one pool of
//! equally sized buffers per worker, shared by all of its tunnels.
//!
//! A multishot recv picks a buffer from the ring only when bytes arrive, so
//! an idle tunnel holds none. The worker hands a buffer back with
//! [`BufRing::provide`] once the bytes in it were sent (or dropped because
//! the tunnel ended).
//!
//! Both regions (the ring of entries and the buffers) are anonymous
//! mappings owned by this struct; they live until it is dropped, which the
//! worker does only after the io_uring instance is gone and no operation can
//! still write into a buffer.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::Submitter;

/// An anonymous, private, read-write mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping with no address hint touches no
        // existing memory; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A worker unwinding may leave operations in flight that can
            // still write here: leak the region rather than free it.
            return;
        }
        // SAFETY: `ptr`/`len` are exactly what mmap returned; the owner
        // guarantees nothing (including the kernel) uses the region anymore.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The buffer ring of one worker.
pub struct BufRing {
    entries: Mapping,
    data: Mapping,
    count: u16,
    buf_size: u32,
    /// Our copy of the tail: the next slot we fill.
    tail: u16,
    bgid: u16,
}

// SAFETY: the raw mappings are owned exclusively by this struct; it is
// created on one thread and then used only by the worker thread owning it.
unsafe impl Send for BufRing {}

impl BufRing {
    /// Maps `count` buffers of `buf_size` bytes (count a power of two,
    /// at most 32768) and fills the ring with all of them.
    pub fn new(count: u16, buf_size: u32, bgid: u16) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer count must be a power of two up to 32768"));
        }
        let entries = Mapping::new(count as usize * std::mem::size_of::<BufRingEntry>())?;
        let data = Mapping::new(count as usize * buf_size as usize)?;
        let mut ring = BufRing { entries, data, count, buf_size, tail: 0, bgid };
        for bid in 0..count {
            ring.provide(bid);
        }
        Ok(ring)
    }

    /// Registers the ring with `submitter`'s io_uring under `bgid`.
    pub fn register(&self, submitter: &Submitter<'_>) -> io::Result<()> {
        // SAFETY: the entry region is page aligned (mmap), holds `count`
        // entries and stays mapped until `self` is dropped, which the worker
        // does only after the io_uring instance itself is dropped (the kernel
        // pins the ring pages while registered).
        unsafe { submitter.register_buf_ring_with_flags(self.entries.ptr.as_ptr() as u64, self.count, self.bgid, 0) }
    }

    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// The start of buffer `bid`.
    pub fn addr(&self, bid: u16) -> *mut u8 {
        assert!(bid < self.count, "buffer id out of range");
        // SAFETY: bid < count, so the offset stays inside the data mapping.
        unsafe { self.data.ptr.as_ptr().add(bid as usize * self.buf_size as usize) }
    }

    /// Drops the pages of all buffers (they read as zeros afterwards), so
    /// memory goes back to the system while the worker has no tunnel. The
    /// caller guarantees no buffer holds bytes still to be sent and no
    /// operation can write into one (no recv armed).
    pub fn release_memory(&self) {
        // SAFETY: the range is exactly the data mapping; per the caller's
        // guarantee, no buffer content is needed and the kernel is not
        // writing into it, so discarding the pages loses nothing.
        unsafe {
            libc::madvise(self.data.ptr.as_ptr().cast(), self.data.len, libc::MADV_DONTNEED);
        }
    }

    /// Gives buffer `bid` back to the kernel. The caller guarantees `bid` is
    /// not in the ring already and no operation still reads from it.
    pub fn provide(&mut self, bid: u16) {
        let mask = self.count - 1;
        let slot = (self.tail & mask) as usize;
        let base = self.entries.ptr.as_ptr().cast::<BufRingEntry>();
        // SAFETY: slot < count, so the entry lies in the entry mapping. The
        // kernel consumes entries between its head and our published tail;
        // at most `count` buffers exist and `bid` is not in the ring, so the
        // slot at `tail` is free for us to write.
        unsafe {
            let entry = &mut *base.add(slot);
            entry.set_addr(self.addr(bid) as u64);
            entry.set_len(self.buf_size);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail lives in the `resv` field of the first entry,
        // inside the mapping, 2-byte aligned; the kernel reads it with an
        // acquire load, so the release store publishes the entry above.
        unsafe {
            let tail = BufRingEntry::tail(base).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_fills_and_wraps() {
        let mut ring = BufRing::new(4, 4096, 7).expect("map");
        assert_eq!(ring.tail, 4);
        let a = ring.addr(1) as usize - ring.addr(0) as usize;
        assert_eq!(a, 4096);
        // Wrapping the 16-bit tail keeps working.
        for i in 0..70_000u32 {
            ring.provide((i % 4) as u16);
        }
        assert_eq!(ring.tail, 4u16.wrapping_add(70_000u32 as u16));
        assert!(BufRing::new(3, 4096, 0).is_err());
    }
}
