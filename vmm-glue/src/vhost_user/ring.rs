//! Rings as the device sees them while the front-end starts and stops them.
//!
//! An Outboard device is activated once with all its queues, but vhost-user starts and
//! stops each ring on its own (a ring starts on `SET_VRING_KICK` and stops on
//! `GET_VRING_BASE`; some rings, such as vsock's event queue under QEMU, are never
//! handed over). So the device gets a [`SharedQueue`] per ring: a slot that holds the
//! live rust-vmm queue while the ring runs and is empty while it does not (an empty
//! ring has nothing available and takes nothing used). Likewise [`RingInterrupt`] holds
//! the call eventfds that `SET_VRING_CALL` may replace at any time.
//!
//! The daemon runs the device and the vhost-user connection on one worker thread, so the
//! locks here are never contended; they exist to make the sharing sound.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use outboard_devices::virtio::{DescChain, Interrupt, QueueError, VirtQueue};
use outboard_transport::BackendReqSender;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::rust_vmm::RustVmmQueue;

/// The guest memory a daemon's queues live in.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The queue of a running ring, or nothing.
pub type Slot = Arc<Mutex<Option<RustVmmQueue<Mem>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data has no invariant a panic could break half-way: keep using it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device's view of one ring (see the module docs).
#[derive(Debug)]
pub struct SharedQueue {
    slot: Slot,
}

impl SharedQueue {
    /// A queue backed by `slot`.
    pub fn new(slot: Slot) -> Self {
        SharedQueue { slot }
    }
}

const STOPPED: &str = "the ring is stopped";

impl VirtQueue for SharedQueue {
    fn pop(&mut self, chain: &mut DescChain) -> Result<bool, QueueError> {
        match lock(&self.slot).as_mut() {
            Some(q) => q.pop(chain),
            None => {
                chain.clear();
                Ok(false)
            }
        }
    }

    fn undo_pop(&mut self) {
        if let Some(q) = lock(&self.slot).as_mut() {
            q.undo_pop();
        }
    }

    fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        match lock(&self.slot).as_mut() {
            Some(q) => q.add_used(head, len),
            None => Err(QueueError::Used {
                head,
                reason: STOPPED.into(),
            }),
        }
    }

    fn needs_notification(&mut self) -> Result<bool, QueueError> {
        match lock(&self.slot).as_mut() {
            Some(q) => q.needs_notification(),
            None => Ok(false),
        }
    }

    fn enable_notification(&mut self) -> Result<bool, QueueError> {
        match lock(&self.slot).as_mut() {
            Some(q) => q.enable_notification(),
            None => Ok(false),
        }
    }

    fn disable_notification(&mut self) -> Result<(), QueueError> {
        match lock(&self.slot).as_mut() {
            Some(q) => q.disable_notification(),
            None => Ok(()),
        }
    }
}

/// Call eventfds per ring and the back-end channel, replaceable at any time.
///
/// While [`RingInterrupt::defer`] is on, used-ring signals are only recorded and
/// [`RingInterrupt::flush`] sends each at most once: the worker defers while it handles
/// one batch of epoll events, so several passes over a ring cost the front-end one
/// wake-up.
#[derive(Debug)]
pub struct RingInterrupt {
    calls: Vec<Mutex<Option<File>>>,
    channel: Mutex<Option<BackendReqSender>>,
    deferring: AtomicBool,
    pending: AtomicU64,
}

impl RingInterrupt {
    /// An interrupt for `rings` rings, none of them wired yet.
    pub fn new(rings: usize) -> Self {
        RingInterrupt {
            calls: (0..rings).map(|_| Mutex::new(None)).collect(),
            channel: Mutex::new(None),
            deferring: AtomicBool::new(false),
            pending: AtomicU64::new(0),
        }
    }

    /// Starts recording used-ring signals instead of sending them.
    pub fn defer(&self) {
        self.deferring.store(true, Ordering::Relaxed);
    }

    /// Sends the recorded signals (once per ring) and stops deferring.
    pub fn flush(&self) {
        self.deferring.store(false, Ordering::Relaxed);
        let mut bits = self.pending.swap(0, Ordering::Relaxed);
        while bits != 0 {
            let ring = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            self.send(ring);
        }
    }

    fn send(&self, queue: usize) {
        let Some(slot) = self.calls.get(queue) else {
            return;
        };
        if let Some(f) = lock(slot).as_mut() {
            // An eventfd write of 1; it only fails if the counter would overflow, which
            // means the front-end is not reading it and one more signal changes nothing.
            if let Err(e) = f.write(&1u64.to_ne_bytes()) {
                outboard_protocol::log_limited!(
                    log::Level::Debug,
                    "cannot signal ring {queue}: {e}"
                );
            }
        }
    }

    /// Sets (or clears) the call eventfd of `ring`; out-of-range rings are ignored (the
    /// server checks indexes before).
    pub fn set_call(&self, ring: usize, fd: Option<File>) {
        if let Some(slot) = self.calls.get(ring) {
            *lock(slot) = fd;
        }
    }

    /// A duplicate of ring `ring`'s call eventfd, if it has one.
    pub fn call_fd(&self, ring: usize) -> Option<std::io::Result<std::os::fd::OwnedFd>> {
        let slot = self.calls.get(ring)?;
        let guard = lock(slot);
        guard
            .as_ref()
            .map(|f| f.try_clone().map(std::os::fd::OwnedFd::from))
    }

    /// Sets (or clears) the back-end channel used for config-change notifications.
    pub fn set_channel(&self, channel: Option<BackendReqSender>) {
        *lock(&self.channel) = channel;
    }

    /// Forgets every fd and the channel.
    pub fn clear(&self) {
        for c in &self.calls {
            *lock(c) = None;
        }
        self.set_channel(None);
    }
}

impl Interrupt for RingInterrupt {
    fn signal_used_queue(&self, queue: usize) {
        if queue < 64 && self.deferring.load(Ordering::Relaxed) {
            self.pending.fetch_or(1 << queue, Ordering::Relaxed);
        } else {
            self.send(queue);
        }
    }

    fn signal_config_change(&self) {
        if let Some(ch) = lock(&self.channel).as_ref() {
            if let Err(e) = ch.config_change() {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "cannot send CONFIG_CHANGE_MSG: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn eventfd() -> File {
        // SAFETY: eventfd(2) with constant flags returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: fd is new and owned by nobody else.
        File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    #[test]
    fn empty_slot_has_nothing_and_takes_nothing() {
        let mut q = SharedQueue::new(Slot::default());
        let mut chain = DescChain {
            head: 7,
            ..DescChain::default()
        };
        assert_eq!(q.pop(&mut chain), Ok(false));
        assert_eq!(chain.head, 0);
        assert!(matches!(
            q.add_used(3, 0),
            Err(QueueError::Used { head: 3, .. })
        ));
        assert_eq!(q.needs_notification(), Ok(false));
        assert_eq!(q.enable_notification(), Ok(false));
        assert_eq!(q.disable_notification(), Ok(()));
        q.undo_pop();
    }

    #[test]
    fn interrupt_signals_the_current_call_fd() {
        let irq = RingInterrupt::new(2);
        let fd = eventfd();
        irq.set_call(1, Some(fd.try_clone().unwrap()));
        irq.signal_used_queue(1);
        irq.signal_used_queue(1);
        irq.signal_used_queue(0); // not wired: nothing happens
        irq.signal_used_queue(9); // out of range: ignored
        let mut buf = [0u8; 8];
        (&fd).read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 2);
        irq.clear();
        irq.signal_used_queue(1);
        assert!((&fd).read(&mut buf).is_err()); // EAGAIN: nothing was written
    }

    #[test]
    fn deferred_signals_are_sent_once_on_flush() {
        let irq = RingInterrupt::new(2);
        let fd = eventfd();
        irq.set_call(0, Some(fd.try_clone().unwrap()));
        irq.defer();
        irq.signal_used_queue(0);
        irq.signal_used_queue(0);
        irq.signal_used_queue(0);
        let mut buf = [0u8; 8];
        assert!(
            (&fd).read(&mut buf).is_err(),
            "nothing sent while deferring"
        );
        irq.flush();
        (&fd).read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1);
        irq.signal_used_queue(0); // not deferring any more: sent at once
        (&fd).read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1);
    }
}
