//! Deadlines of connections (a REQUEST or a shutdown the guest must answer) and of
//! pending host clients (their `CONNECT` line), on one timerfd.
//!
//! Deadlines are queued in the order they were set; all are `CONN_TIMEOUT` after
//! being set, so the queue stays sorted. A deadline that was met or replaced (the
//! connection or client no longer has it) stays queued until it reaches the front,
//! where [`Muxer::rearm_timer`] drops it before arming: the timer never fires for it.
//! Every connection set-up leaves one or two such deadlines behind (the host client's
//! `CONNECT` line, the guest's RESPONSE); firing for each would wake an idle daemon
//! once or twice per connection, `CONN_TIMEOUT` after it opened.

use std::os::fd::RawFd;
use std::time::Instant;

use super::Muxer;
use crate::vsock::conn::ConnKey;
use crate::vsock::{sys, VsockMetrics, MAX_PENDING_HOST_CONNECTIONS};

/// What a queued deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerKey {
    /// A connection ([`crate::vsock::conn::Conn::deadline`]).
    Conn(ConnKey),
    /// A host client that has not sent its `CONNECT` line.
    Pending(RawFd),
}

impl Muxer {
    /// Queues deadline `at` of `key`. A queue grown to four times the live entries is
    /// first cleared of stale deadlines.
    pub(super) fn push_deadline(&mut self, at: Instant, key: TimerKey) {
        let live = self.max_connections + MAX_PENDING_HOST_CONNECTIONS;
        if self.deadlines.len() >= 4 * live {
            let mut deadlines = std::mem::take(&mut self.deadlines);
            deadlines.retain(|&(d, k)| self.deadline_live(d, k));
            self.deadlines = deadlines;
        }
        self.deadlines.push_back((at, key));
    }

    /// Whether deadline `at` of `key` still stands: its connection or pending client
    /// is there and has that deadline.
    fn deadline_live(&self, at: Instant, key: TimerKey) -> bool {
        match key {
            TimerKey::Conn(k) => self.conns.get(&k).is_some_and(|c| c.deadline() == Some(at)),
            TimerKey::Pending(fd) => self.pending.get(&fd).is_some_and(|p| p.deadline == at),
        }
    }

    /// Arms the timerfd for the earliest deadline that still stands (the ones met or
    /// replaced before it are dropped), or disarms it when none does.
    pub fn rearm_timer(&mut self) {
        while let Some(&(at, key)) = self.deadlines.front() {
            if self.deadline_live(at, key) {
                break;
            }
            self.deadlines.pop_front();
        }
        let front = self.deadlines.front().map(|(d, _)| *d);
        if front == self.timer_armed {
            return;
        }
        let after = front.map(|d| d.saturating_duration_since(Instant::now()));
        if sys::timerfd_arm(&self.timer, after).is_err() {
            VsockMetrics::inc(&self.metrics.err_muxer);
        }
        self.timer_armed = front;
    }

    /// The timerfd fired: every deadline that passed is handed to its connection
    /// ([`crate::vsock::conn::Conn::timed_out`]) or drops its pending host client.
    pub(super) fn on_timer(&mut self) {
        sys::timerfd_clear(&self.timer);
        self.timer_armed = None;
        let now = Instant::now();
        while let Some(&(at, key)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            match key {
                TimerKey::Conn(k) => {
                    self.on_conn(k, |conn, _| conn.timed_out(at));
                }
                TimerKey::Pending(fd) => {
                    if self.deadline_live(at, key) {
                        VsockMetrics::inc(&self.metrics.err_bad_connect_line);
                        self.drop_pending(fd);
                    }
                }
            }
        }
    }
}
