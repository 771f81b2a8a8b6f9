//! `proxy_ring`: the sandbox ProxyDevice's channels as a hostile peer sees them,
//! without forking.
//!
//! - The hot-path ring (`outboard_sandbox::ring`): a `Producer` (the VMM side) and a
//!   `Consumer` (the device child) on one sealed memfd, with a third mapping through
//!   which the input writes any word of the shared layout at any time (a compromised
//!   peer). Operations: raw word writes, `push` on a slot, `wait_for` an entry,
//!   `poll` + `entry` + `complete` on the consumer.
//! - The cold path (`outboard_sandbox::cold::recv`): a fuzzed datagram, optionally with
//!   a memfd payload (sealed or not, of a fuzzed size and content), decoded as JSON.
//!
//! The typed decoding behind both (the child's entry executor and the `ColdCommand` /
//! `ColdResult` enums in `sandbox/src/proxy.rs`) is private and only runs in a forked
//! child, so it is not reached here; `serde_json` decodes into `Value` instead.
//!
//! Asserts: nothing panics or faults; the producer never blocks on a hostile counter
//! (calls are only made when the documented rules say they complete at once) and its
//! answers follow those rules: a `done` more than 16 behind its own head is a protocol
//! error, a head moved by someone else is a foreign producer, otherwise `push` returns
//! the next sequence number; the consumer only reports slots that exist, and
//! `complete` publishes its new tail as `done`.
#![no_main]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use libfuzzer_sys::fuzz_target;
use outboard_fuzz::{memfd, Input};
use outboard_sandbox::cold;
use outboard_sandbox::ring::{
    Consumer, Next, Producer, RingError, SharedRing, SLOTS, SLOT_ENTRIES,
};
use outboard_transport::Tube;

/// Byte offsets in the shared layout (asserted against the real ring below).
const SLOTS_AT: usize = 5 * 64;
const SLOT_SIZE: usize = 64 + 64 + 64 * SLOT_ENTRIES as usize;
fn head_at(slot: usize) -> usize {
    SLOTS_AT + slot * SLOT_SIZE
}
fn done_at(slot: usize) -> usize {
    head_at(slot) + 64
}

struct Map {
    ptr: *mut u32,
    words: usize,
}

impl Map {
    fn new(fd: &OwnedFd) -> Map {
        // SAFETY: fstat into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on our fd.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        let len = st.st_size as usize;
        // SAFETY: a new shared mapping of the whole memfd; checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Map {
            ptr: ptr.cast(),
            words: len / 4,
        }
    }
    fn atomic(&self, byte: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(byte % 4 == 0 && byte / 4 < self.words);
        // SAFETY: in bounds and aligned (checked); the peers access it atomically too.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.ptr.add(byte / 4)) }
    }
    fn get(&self, byte: usize) -> u32 {
        self.atomic(byte).load(std::sync::atomic::Ordering::SeqCst)
    }
    fn set(&self, byte: usize, v: u32) {
        self.atomic(byte)
            .store(v, std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.words * 4) };
    }
}

fn ring_ops(input: &mut Input<'_>) {
    let ring = SharedRing::new().unwrap();
    let fd = ring.into_fd();
    let map = Map::new(&fd);
    let (producer, mut slots) =
        Producer::new(SharedRing::from_fd(fd.try_clone().unwrap()).unwrap()).unwrap();
    let mut consumer = Consumer::new(SharedRing::from_fd(fd.try_clone().unwrap()).unwrap());
    // Our heads (what the producer believes) and the consumer's tails.
    let mut heads = [0u32; SLOTS];
    let mut tails = [0u32; SLOTS];
    let mut no = || false;
    while !input.is_empty() {
        let op = input.u8();
        match op {
            0x00..=0x3f => {
                let word = usize::from(input.u16()) % map.words;
                map.set(word * 4, input.u32());
            }
            0x40..=0x7f => {
                let s = usize::from(op) % SLOTS;
                let sp = &mut slots[s];
                let shared = map.get(head_at(s));
                let behind = heads[s].wrapping_sub(map.get(done_at(s)));
                let wait = op & 0x20 != 0;
                let (op_, len) = (input.u32(), input.u32());
                if !wait {
                    if shared == heads[s] && behind == SLOT_ENTRIES {
                        continue; // full: push would wait for the child
                    }
                    let r = producer.push(
                        sp,
                        |e| {
                            e.op.store(op_, std::sync::atomic::Ordering::Relaxed);
                            e.len.store(len, std::sync::atomic::Ordering::Relaxed);
                        },
                        std::time::Duration::ZERO,
                        &mut no,
                    );
                    match r {
                        Ok(seq) => {
                            assert_eq!(shared, heads[s]);
                            assert!(behind < SLOT_ENTRIES, "push with done {behind} behind");
                            assert_eq!(seq, heads[s]);
                            heads[s] = heads[s].wrapping_add(1);
                            assert_eq!(
                                map.get(head_at(s)),
                                heads[s],
                                "layout: head not where expected"
                            );
                        }
                        Err(RingError::ForeignProducer { .. }) => assert_ne!(shared, heads[s]),
                        Err(RingError::Protocol { .. }) => {
                            assert_eq!(shared, heads[s]);
                            assert!(behind > SLOT_ENTRIES);
                        }
                        Err(e) => panic!("push: {e}"),
                    }
                } else {
                    let back = input.u8() as u32 % (SLOT_ENTRIES + 1);
                    let seq = heads[s].wrapping_sub(back.max(1));
                    let missing = heads[s].wrapping_sub(seq.wrapping_add(1));
                    if behind <= SLOT_ENTRIES && behind > missing {
                        continue; // not done yet: wait_for would sleep
                    }
                    let r = producer.wait_for(sp, seq, std::time::Duration::ZERO, &mut no);
                    match r {
                        Ok(()) => assert!(behind <= missing),
                        Err(RingError::Protocol { .. }) => assert!(behind > SLOT_ENTRIES),
                        Err(e) => panic!("wait_for: {e}"),
                    }
                    let _ = producer
                        .entry(sp, seq)
                        .data
                        .load(std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ => {
                let _ = consumer.pending();
                match consumer.poll() {
                    Next::Ready(slot) => {
                        assert!(slot < SLOTS);
                        let e = consumer.entry(slot).unwrap();
                        e.status.store(0, std::sync::atomic::Ordering::Relaxed);
                        consumer.complete(slot).unwrap();
                        tails[slot] = tails[slot].wrapping_add(1);
                        // The consumer's tails start from `done` at creation (0 here) and
                        // only move on `complete`.
                        assert_eq!(map.get(done_at(slot)), tails[slot]);
                    }
                    Next::Corrupt(slot) => assert!(slot < SLOTS),
                    Next::Idle => {}
                }
            }
        }
    }
}

fn cold_ops(input: &mut Input<'_>) {
    let (a, b) = Tube::pair().unwrap();
    let flags = input.u8();
    let len = usize::from(input.u16() % 2048);
    let mut datagram = input.bytes(len).to_vec();
    if datagram.is_empty() {
        datagram.push(b'I');
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    if flags & 1 != 0 {
        let content = input.rest();
        let f = memfd(0);
        // SAFETY: write of our buffer to our fd.
        unsafe { libc::write(f.as_raw_fd(), content.as_ptr().cast(), content.len()) };
        if flags & 2 != 0 {
            // SAFETY: fcntl on our fd with constant flags.
            unsafe {
                libc::fcntl(
                    f.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK
                        | libc::F_SEAL_GROW
                        | libc::F_SEAL_WRITE
                        | libc::F_SEAL_SEAL,
                )
            };
        }
        fds.push(f);
    }
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    if a.send_bytes(&datagram, &borrowed).is_err() {
        return;
    }
    let _ = cold::recv::<serde_json::Value>(&b);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    if input.u8() & 1 == 0 {
        ring_ops(&mut input);
    } else {
        cold_ops(&mut input);
    }
});
