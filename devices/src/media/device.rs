//! [`VirtioMedia`]: a [`VirtioDevice`] that runs a [`MediaDevice`] on virtio-media's
//! command and event queues.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use outboard_protocol::media::{
    MediaConfig, COMMAND_QUEUE, EVENT_QUEUE, NUM_QUEUES, VIRTIO_ID_MEDIA,
};
use zerocopy::IntoBytes;

use super::runner::{EpollSessionPoller, MediaRunner};
use super::{ChainReader, ChainWriter, EventBuffer, EventQueue, MediaDevice, MediaMetrics};
use crate::virtio::{
    write_regions, ActivateError, DescChain, Interrupt, QueueError, VirtQueue, VirtioDevice,
};

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// A virtio-media device: command queue 0, event queue 1, config space
/// [`MediaConfig`], the sessions' poll fds behind [`VirtioDevice::event_fd`].
pub struct VirtioMedia<D: MediaDevice> {
    runner: MediaRunner<D, EpollSessionPoller>,
    events: EventBuffer,
    config: MediaConfig,
    queue_sizes: [u16; NUM_QUEUES],
    acked_features: u64,
    queues: Vec<Box<dyn VirtQueue>>,
    interrupt: Option<Arc<dyn Interrupt>>,
    chain: DescChain,
}

impl<D: MediaDevice> std::fmt::Debug for VirtioMedia<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMedia")
            .field("runner", &self.runner)
            .field("config", &self.config)
            .field("active", &!self.queues.is_empty())
            .finish()
    }
}

impl<D: MediaDevice> VirtioMedia<D> {
    /// A device running `device`, whose events go to `events` (a handle to the buffer the
    /// device was built with), with config space `config`. The runner, the device and
    /// the event buffer count into one [`MediaMetrics`] ([`VirtioMedia::metrics`]).
    pub fn new(device: D, events: EventBuffer, config: MediaConfig) -> io::Result<Self> {
        let runner = MediaRunner::new(device, EpollSessionPoller::new()?);
        events.set_metrics(runner.metrics());
        Ok(VirtioMedia {
            runner,
            events,
            config,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            acked_features: 0,
            queues: Vec::new(),
            interrupt: None,
            chain: DescChain::default(),
        })
    }

    /// The runner (sessions, device).
    pub fn runner(&self) -> &MediaRunner<D, EpollSessionPoller> {
        &self.runner
    }

    /// The runner, mutably (for example to set its session cap).
    pub fn runner_mut(&mut self) -> &mut MediaRunner<D, EpollSessionPoller> {
        &mut self.runner
    }

    /// The device's counters: sessions and every cap refusal (see the caps in the
    /// [`crate::media`] docs).
    pub fn metrics(&self) -> Arc<MediaMetrics> {
        self.runner.metrics()
    }

    /// Events waiting for event buffers from the driver.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn signal(&mut self, queue: usize) {
        crate::virtio::signal_used(&mut self.queues, queue, self.interrupt.as_deref());
    }

    fn process_commands(&mut self) {
        let mut used = false;
        loop {
            let Some(q) = self.queues.get_mut(COMMAND_QUEUE) else {
                return;
            };
            match q.pop(&mut self.chain) {
                Ok(true) => {
                    let mut r = ChainReader::new(&self.chain.readable);
                    let mut w = ChainWriter::new(&self.chain.writable);
                    let n = self.runner.handle_command(&mut r, &mut w);
                    if let Err(e) = q.add_used(self.chain.head, n as u32) {
                        outboard_protocol::log_limited!(log::Level::Warn, "virtio-media: {e}");
                    }
                    used = true;
                }
                Ok(false) => match q.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        outboard_protocol::log_limited!(
                            log::Level::Warn,
                            "virtio-media: command queue: {e}"
                        );
                        break;
                    }
                },
                Err(QueueError::BadChain { head, reason }) => {
                    outboard_protocol::log_limited!(
                        log::Level::Warn,
                        "virtio-media: bad command chain {head}: {reason}"
                    );
                    if let Err(e) = q.add_used(head, 0) {
                        outboard_protocol::log_limited!(log::Level::Warn, "virtio-media: {e}");
                    }
                    used = true;
                }
                Err(e) => {
                    outboard_protocol::log_limited!(
                        log::Level::Warn,
                        "virtio-media: command queue: {e}"
                    );
                    break;
                }
            }
        }
        if used {
            self.signal(COMMAND_QUEUE);
        }
    }

    fn flush_events(&mut self) {
        let mut used = false;
        while let Some(ev) = self.events.pop() {
            let Some(q) = self.queues.get_mut(EVENT_QUEUE) else {
                self.events.push_front(ev);
                return;
            };
            match q.pop(&mut self.chain) {
                Ok(true) => {
                    let bytes = ev.as_bytes();
                    let n = if self.chain.writable_len() >= bytes.len() {
                        write_regions(&self.chain.writable, 0, bytes)
                    } else {
                        outboard_protocol::log_limited!(
                            log::Level::Warn,
                            "virtio-media: event buffer of {} bytes is too small for {}",
                            self.chain.writable_len(),
                            bytes.len()
                        );
                        0
                    };
                    if let Err(e) = q.add_used(self.chain.head, n as u32) {
                        outboard_protocol::log_limited!(log::Level::Warn, "virtio-media: {e}");
                    }
                    used = true;
                }
                Ok(false) => {
                    self.events.push_front(ev);
                    break;
                }
                Err(QueueError::BadChain { head, reason }) => {
                    outboard_protocol::log_limited!(
                        log::Level::Warn,
                        "virtio-media: bad event chain {head}: {reason}"
                    );
                    self.events.push_front(ev);
                    if let Err(e) = q.add_used(head, 0) {
                        outboard_protocol::log_limited!(log::Level::Warn, "virtio-media: {e}");
                    }
                    used = true;
                }
                Err(e) => {
                    outboard_protocol::log_limited!(
                        log::Level::Warn,
                        "virtio-media: event queue: {e}"
                    );
                    self.events.push_front(ev);
                    break;
                }
            }
        }
        if let Some(q) = self.queues.get_mut(EVENT_QUEUE) {
            if let Err(e) = q.enable_notification() {
                outboard_protocol::log_limited!(log::Level::Warn, "virtio-media: event queue: {e}");
            }
        }
        if used {
            self.signal(EVENT_QUEUE);
        }
    }
}

impl<D: MediaDevice> VirtioDevice for VirtioMedia<D> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEDIA
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cfg = self.config.as_bytes();
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = cfg.get(offset..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The virtio-media config space is read-only.
    }

    fn activate(
        &mut self,
        queues: Vec<Box<dyn VirtQueue>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if !self.queues.is_empty() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        self.runner.close_all();
        while self.events.pop().is_some() {}
        self.queues.clear();
        self.interrupt = None;
        self.acked_features = 0;
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.runner.poller().as_fd())
    }

    fn handle_queue(&mut self, queue: usize) {
        if queue == COMMAND_QUEUE {
            self.process_commands();
        }
        self.flush_events();
    }

    fn handle_event(&mut self) {
        for (session, errno) in self.runner.process_ready_sessions() {
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "virtio-media: session {session} failed with errno {errno}"
            );
            self.events.clone().send_error(session, errno);
        }
        self.flush_events();
    }
}
