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
    read_config_bytes, ActivateError, DescChain, Interrupt, QueueError, VirtQueue, VirtioDevice,
};

// The one feature bit this device offers, from the specification's constants (this
// path is public, so it stays).
pub use crate::virtio::VIRTIO_F_VERSION_1;
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

    /// Counts into `metrics` from now on: the runner, the device and the event buffer
    /// ([`MediaRunner::set_metrics`], [`EventBuffer::set_metrics`]). For counters the
    /// caller holds before the device exists or moves away, such as a daemon's.
    pub fn set_metrics(&mut self, metrics: Arc<MediaMetrics>) {
        self.events.set_metrics(metrics.clone());
        self.runner.set_metrics(metrics);
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
                    let mut w = ChainWriter::new(&self.chain.writable);
                    let n = if w.write_bytes(bytes).is_ok() {
                        w.written()
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

    fn config_size(&self) -> usize {
        std::mem::size_of::<MediaConfig>()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_bytes(), offset, data);
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

#[cfg(test)]
mod tests {
    use outboard_protocol::media::{
        CloseCmd, CmdHeader, ErrorEvent, MediaCmd, OpenResp, RespHeader,
    };
    use outboard_protocol::v4l2::V4l2Ioctl;

    use zerocopy::FromBytes;

    use super::super::{Errno, EventQueue, MediaError, MediaSession};
    use super::*;
    use crate::testing::{CountingInterrupt, QueueDriver};

    /// A device whose sessions hold nothing and whose ioctls all fail with `ENOTTY`.
    struct Null;
    struct NullSession;

    impl MediaSession for NullSession {
        fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
    }

    impl MediaDevice for Null {
        type Session = NullSession;
        fn new_session(&mut self, _: u32) -> Result<NullSession, Errno> {
            Ok(NullSession)
        }
        fn close_session(&mut self, _: NullSession) {}
        fn do_ioctl(
            &mut self,
            _: &mut NullSession,
            _: V4l2Ioctl,
            _: &mut ChainReader<'_>,
            w: &mut ChainWriter<'_>,
        ) -> Result<(), MediaError> {
            w.write_err(libc::ENOTTY)
        }
        fn do_mmap(&mut self, _: &mut NullSession, _: u32, _: u32) -> Result<(u64, u64), Errno> {
            Err(libc::EINVAL)
        }
        fn do_munmap(&mut self, _: u64) -> Result<(), Errno> {
            Err(libc::EINVAL)
        }
    }

    /// An activated device with its two queues' drivers, its event buffer and interrupt.
    struct Bench {
        dev: VirtioMedia<Null>,
        commands: QueueDriver,
        events_q: QueueDriver,
        events: EventBuffer,
        irq: Arc<CountingInterrupt>,
    }

    fn bench() -> Bench {
        let events = EventBuffer::new();
        let config = MediaConfig::new(0, 0, "null");
        let mut dev = VirtioMedia::new(Null, events.clone(), config).unwrap();
        let (commands, events_q) = (QueueDriver::new(8), QueueDriver::new(8));
        let irq = Arc::new(CountingInterrupt::new());
        dev.activate(
            vec![Box::new(commands.queue()), Box::new(events_q.queue())],
            irq.clone(),
        )
        .unwrap();
        Bench {
            dev,
            commands,
            events_q,
            events,
            irq,
        }
    }

    const OPEN: CmdHeader = CmdHeader::new(MediaCmd::Open);

    #[test]
    fn a_command_gets_its_reply_across_descriptors() {
        let mut b = bench();
        // The 8-byte OPEN header in two readable descriptors, room for the 16-byte
        // response in two writable ones.
        let open = OPEN.as_bytes();
        let head = b
            .commands
            .chain()
            .readable(&open[..3])
            .readable(&open[3..])
            .writable(10)
            .writable(10)
            .post();
        b.dev.handle_queue(COMMAND_QUEUE);
        let used = b.commands.pop_used().unwrap();
        assert_eq!((used.head, used.len), (head, 16));
        assert_eq!(used.written, OpenResp::ok(0).as_bytes());
        assert_eq!(b.irq.used_signals(COMMAND_QUEUE), 1);
        assert_eq!(b.dev.runner().session_count(), 1);
        assert!(b.commands.kicks_enabled());

        // Two commands in one pass: a second OPEN and a CLOSE of the first session,
        // which has no response. One interrupt for the pass.
        let mut close = CmdHeader::new(MediaCmd::Close).as_bytes().to_vec();
        close.extend_from_slice(CloseCmd::default().as_bytes());
        b.commands.chain().readable(open).writable(16).post();
        b.commands.chain().readable(&close).writable(8).post();
        b.dev.handle_queue(COMMAND_QUEUE);
        let used = b.commands.take_used();
        assert_eq!(used.len(), 2);
        assert_eq!(used[0].written, OpenResp::ok(1).as_bytes());
        assert_eq!(used[1].len, 0);
        assert_eq!(b.irq.used_signals(COMMAND_QUEUE), 2);
        assert_eq!(b.dev.runner().session_count(), 1);
    }

    #[test]
    fn set_metrics_moves_every_count_to_the_callers_counters() {
        let mut b = bench();
        let open = OPEN.as_bytes();
        b.commands.chain().readable(open).writable(16).post();
        b.dev.handle_queue(COMMAND_QUEUE);
        let old = b.dev.metrics();
        let held = Arc::new(MediaMetrics::default());
        b.dev.set_metrics(held.clone());
        b.commands.chain().readable(open).writable(16).post();
        b.dev.handle_queue(COMMAND_QUEUE);
        assert_eq!(old.snapshot().sessions_opened, 1);
        assert_eq!(held.snapshot().sessions_opened, 1);
        assert!(Arc::ptr_eq(&b.dev.metrics(), &held));
        // The event buffer counts there too.
        assert!(Arc::ptr_eq(&b.events.metrics(), &held));
    }

    #[test]
    fn a_bad_command_chain_is_returned_empty_and_the_next_one_served() {
        let mut b = bench();
        let open = OPEN.as_bytes();
        let outside = b
            .commands
            .chain()
            .readable(open)
            .writable(16)
            .malformed("descriptor outside guest memory")
            .post();
        let late = b.commands.chain().writable(16).readable(open).post();
        let good = b.commands.chain().readable(open).writable(16).post();
        b.dev.handle_queue(COMMAND_QUEUE);
        let used: Vec<(u16, u32)> = b
            .commands
            .take_used()
            .iter()
            .map(|u| (u.head, u.len))
            .collect();
        assert_eq!(used, vec![(outside, 0), (late, 0), (good, 16)]);
        assert_eq!(b.commands.in_flight(), 0);
        assert_eq!(b.commands.rejected_used(), 0);
        assert_eq!(b.irq.used_signals(COMMAND_QUEUE), 1);
        // Only the good chain opened a session.
        assert_eq!(b.dev.metrics().snapshot().sessions_opened, 1);
    }

    #[test]
    fn short_requests_and_unknown_commands_get_error_headers() {
        let mut b = bench();
        let truncated = b.commands.chain().readable(&[1, 0]).writable(8).post();
        let unknown = b
            .commands
            .chain()
            .readable(
                CmdHeader {
                    cmd: 99,
                    reserved: 0,
                }
                .as_bytes(),
            )
            .writable(8)
            .post();
        // OPEN with no room for its response: an error header, and no session.
        let no_room = b
            .commands
            .chain()
            .readable(OPEN.as_bytes())
            .writable(8)
            .post();
        b.dev.handle_queue(COMMAND_QUEUE);
        let used = b.commands.take_used();
        let heads: Vec<u16> = used.iter().map(|u| u.head).collect();
        assert_eq!(heads, vec![truncated, unknown, no_room]);
        let status = |u: &crate::testing::UsedChain| {
            assert_eq!(u.len, 8);
            RespHeader::read_from_bytes(&u.written).unwrap().status
        };
        assert_ne!(status(&used[0]), 0);
        assert_eq!(status(&used[1]), libc::ENOTTY as u32);
        assert_ne!(status(&used[2]), 0);
        assert_eq!(b.dev.runner().session_count(), 0);
    }

    #[test]
    fn a_broken_command_queue_ends_the_pass_without_an_interrupt() {
        let mut b = bench();
        b.commands
            .chain()
            .readable(OPEN.as_bytes())
            .writable(16)
            .post();
        b.commands
            .break_ring("available index 9 ahead on 8 entries");
        b.dev.handle_queue(COMMAND_QUEUE);
        assert_eq!(b.commands.take_used(), vec![]);
        assert_eq!(b.irq.used_signals(COMMAND_QUEUE), 0);
        assert_eq!(b.dev.runner().session_count(), 0);
        // After the transport resets the ring the device serves it again.
        b.commands.reset();
        b.commands
            .chain()
            .readable(OPEN.as_bytes())
            .writable(16)
            .post();
        b.dev.handle_queue(COMMAND_QUEUE);
        assert_eq!(b.commands.pop_used().map(|u| u.len), Some(16));
    }

    #[test]
    fn events_wait_for_buffers_and_skip_bad_ones() {
        let mut b = bench();
        b.events.clone().send_error(3, libc::EIO);
        // No event buffer yet: the event waits.
        b.dev.handle_queue(EVENT_QUEUE);
        assert_eq!(b.dev.pending_events(), 1);
        assert_eq!(b.irq.used_signals(EVENT_QUEUE), 0);

        // A malformed buffer is returned empty and the event stays for the next one.
        let bad = b.events_q.chain().writable(16).malformed("loop").post();
        let good = b.events_q.chain().writable(8).writable(32).post();
        b.dev.handle_queue(EVENT_QUEUE);
        let used = b.events_q.take_used();
        assert_eq!((used[0].head, used[0].len), (bad, 0));
        assert_eq!((used[1].head, used[1].len), (good, 16));
        assert_eq!(
            used[1].written,
            ErrorEvent::new(3, libc::EIO as u32).as_bytes()
        );
        assert_eq!(b.dev.pending_events(), 0);
        assert_eq!(b.irq.used_signals(EVENT_QUEUE), 1);

        // A buffer too small for the event is returned empty (the event is dropped).
        b.events.clone().send_error(4, libc::EIO);
        let small = b.events_q.chain().writable(15).post();
        b.dev.handle_queue(EVENT_QUEUE);
        let used = b.events_q.pop_used().unwrap();
        assert_eq!((used.head, used.len), (small, 0));
    }

    #[test]
    fn suppressed_interrupts_are_not_signalled() {
        let mut b = bench();
        b.commands.suppress_interrupts(true);
        b.commands
            .chain()
            .readable(OPEN.as_bytes())
            .writable(16)
            .post();
        b.dev.handle_queue(COMMAND_QUEUE);
        assert_eq!(b.commands.pop_used().map(|u| u.len), Some(16));
        assert_eq!(b.irq.used_signals(COMMAND_QUEUE), 0);
    }

    #[test]
    fn activation_checks_queues_and_reset_closes_sessions() {
        let mut b = bench();
        let q = QueueDriver::new(8);
        let irq = Arc::new(CountingInterrupt::new());
        assert!(matches!(
            b.dev
                .activate(vec![Box::new(q.queue()), Box::new(q.queue())], irq.clone()),
            Err(ActivateError::AlreadyActive)
        ));
        b.commands
            .chain()
            .readable(OPEN.as_bytes())
            .writable(16)
            .post();
        b.dev.handle_queue(COMMAND_QUEUE);
        b.dev.ack_features(u64::MAX);
        assert_eq!(b.dev.acked_features(), VIRTIO_F_VERSION_1);
        b.dev.reset();
        assert_eq!(b.dev.runner().session_count(), 0);
        assert_eq!(b.dev.metrics().snapshot().sessions_closed, 1);
        assert_eq!(b.dev.acked_features(), 0);
        assert!(matches!(
            b.dev.activate(vec![Box::new(q.queue())], irq.clone()),
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
        b.dev
            .activate(
                vec![Box::new(q.queue()), Box::new(QueueDriver::new(8).queue())],
                irq.clone(),
            )
            .unwrap();
        q.chain().readable(OPEN.as_bytes()).writable(16).post();
        b.dev.handle_queue(COMMAND_QUEUE);
        assert_eq!(
            q.pop_used().map(|u| u.written),
            Some(OpenResp::ok(0).as_bytes().to_vec())
        );
        assert_eq!(irq.used_signals(COMMAND_QUEUE), 1);
    }

    #[test]
    fn config_space_is_read_only() {
        let mut b = bench();
        let mut cfg = [0u8; 4];
        b.dev.write_config(0, &[0xff; 4]);
        b.dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 4]);
        let len = std::mem::size_of::<MediaConfig>() as u64;
        let mut past = [7u8; 4];
        b.dev.read_config(len - 2, &mut past);
        assert_eq!(past[2..], [0, 0]);
        b.dev.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
        assert_eq!(b.dev.device_type(), VIRTIO_ID_MEDIA);
    }
}
