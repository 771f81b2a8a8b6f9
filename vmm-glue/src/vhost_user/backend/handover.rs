//! What a front-end set up on a [`DeviceBackend`], written down for another process
//! ([`DeviceBackend::save_setup`]) and set up again there
//! ([`DeviceBackend::load_setup`], then [`DeviceBackend::start_loaded`]), so the
//! front-end's session goes on in the new process without a message.
//!
//! Record fields, in order ([`outboard_protocol::record`] encoding):
//!
//! 1. `u64` acked virtio features (with `VHOST_USER_F_PROTOCOL_FEATURES` if acked),
//!    `u64` acked protocol features, `bool` the device is active, `bool` + 16-byte
//!    `VhostUserLog` if the front-end gave a dirty log (`SET_LOG_BASE`; its fd
//!    follows), so a migration in progress goes on being logged;
//! 2. a count, then each memory region: its 32-byte `VhostUserMemoryRegion` as the
//!    front-end sent it (an fd each);
//! 3. a count (the device's ring count), then each ring: `u16` size, `bool` + 40-byte
//!    `VhostUserVringAddr` if set, `u16` next available index, `bool` started, `bool`
//!    enabled, `bool` running, `bool` + `u16` + 3 × `u64` where it last stopped, and
//!    three `bool`s saying whether its kick, call and error eventfds follow (an fd
//!    each, in that order).
//!
//! Loading replays the setup through the same checks as the front-end's own requests
//! (`SET_MEM_TABLE`, `SET_VRING_*`), and checks each running ring's next available
//! index against the ring in guest memory: it must equal the used index the old
//! process left (it held no chain when it handed over), or the record is refused.

use std::fs::File;
use std::os::fd::OwnedFd;

use outboard_devices::virtio::VirtioDevice;
use outboard_protocol::record::{RecordReader, RecordWriter};
use outboard_protocol::vhost_user::{
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVringAddr,
};
use outboard_protocol::Validate;
use outboard_transport::{MemoryRegion, VhostUserBackendReqHandler};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{FromBytes, IntoBytes};

use super::{DeviceBackend, MAX_MEM_SLOTS};

fn fd_of(what: &str, r: std::io::Result<OwnedFd>) -> Result<OwnedFd, String> {
    r.map_err(|e| format!("cannot duplicate {what}: {e}"))
}

fn next_fd(fds: &mut impl Iterator<Item = OwnedFd>, what: &str) -> Result<OwnedFd, String> {
    fds.next()
        .ok_or_else(|| format!("the handover ran out of fds at {what}"))
}

impl<D: VirtioDevice> DeviceBackend<D> {
    /// Writes what the front-end set up (see the module docs) to `w`, duplicates of
    /// its fds to `fds`. Call it between two calls of the worker loop; nothing changes.
    pub fn save_setup(&self, w: &mut RecordWriter, fds: &mut Vec<OwnedFd>) -> Result<(), String> {
        w.u64(self.acked_features)
            .u64(self.protocol.bits())
            .bool(self.active);
        match self.dirty.handover() {
            Some(log) => {
                let (desc, fd) = log.map_err(|e| format!("cannot duplicate the dirty log: {e}"))?;
                w.bool(true).raw(desc.as_bytes());
                fds.push(fd);
            }
            None => {
                w.bool(false);
            }
        }
        let regions = self
            .table
            .handover()
            .map_err(|e| format!("memory table: {e}"))?;
        w.count(regions.len());
        for r in regions {
            w.raw(r.region.as_bytes());
            fds.push(r.fd);
        }
        w.count(self.rings.len());
        for (i, ring) in self.rings.iter().enumerate() {
            let live = self.ring_live(i);
            let base = match self.slots.get(i).and_then(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|q| q.queue().next_avail())
            }) {
                Some(next) => next,
                None => ring.base,
            };
            w.u16(ring.num).bool(ring.addr.is_some());
            if let Some(a) = &ring.addr {
                w.raw(a.as_bytes());
            }
            w.u16(base)
                .bool(ring.started)
                .bool(ring.enabled)
                .bool(live)
                .bool(ring.stopped_at.is_some());
            if let Some((b, a)) = ring.stopped_at {
                w.u16(b).u64(a[0]).u64(a[1]).u64(a[2]);
            }
            let kick = ring
                .kick
                .as_ref()
                .map(|f| fd_of("a kick fd", f.try_clone().map(OwnedFd::from)))
                .transpose()?;
            let call = self
                .irq
                .call_fd(i)
                .map(|r| fd_of("a call fd", r))
                .transpose()?;
            let err = ring
                .err
                .as_ref()
                .map(|f| fd_of("an error fd", f.try_clone().map(OwnedFd::from)))
                .transpose()?;
            w.bool(kick.is_some())
                .bool(call.is_some())
                .bool(err.is_some());
            fds.extend(kick);
            fds.extend(call);
            fds.extend(err);
        }
        Ok(())
    }

    /// Sets up again what [`DeviceBackend::save_setup`] wrote, on a backend fresh from
    /// [`DeviceBackend::new`] whose device holds the handed-over state. Memory is
    /// mapped and every ring configured and checked, but no ring runs and the device
    /// is not touched until [`DeviceBackend::start_loaded`]: until then the old
    /// process may still be serving.
    pub fn load_setup(
        &mut self,
        r: &mut RecordReader<'_>,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<(), String> {
        let e = |e: std::io::Error| e.to_string();
        let acked = r.u64("acked features").map_err(|e| e.to_string())?;
        let bits = r.u64("protocol features").map_err(|e| e.to_string())?;
        let active = r.bool("active").map_err(|e| e.to_string())?;
        // The log first, so that logging is never on without it.
        if r.bool("dirty log").map_err(|e| e.to_string())? {
            let raw = r
                .raw("dirty log", std::mem::size_of::<VhostUserLog>())
                .map_err(|e| e.to_string())?;
            let log = VhostUserLog::read_from_bytes(raw)
                .map_err(|_| "a dirty log description of the wrong size".to_string())?;
            log.validate().map_err(|e| e.to_string())?;
            self.set_log_base(&log, next_fd(fds, "the dirty log")?)
                .map_err(e)?;
        }
        let offered = self.get_features().map_err(e)?;
        if acked & !offered != 0 {
            return Err(format!(
                "the front-end acked features {:#x} this build does not offer",
                acked & !offered
            ));
        }
        self.set_features(acked).map_err(e)?;
        let protocol = VhostUserProtocolFeatures::from_bits(bits)
            .filter(|p| self.protocol_features().contains(*p))
            .ok_or_else(|| {
                format!("protocol features {bits:#x} are not all offered by this build")
            })?;
        self.set_protocol_features(protocol).map_err(e)?;
        let n = r
            .count(
                "memory regions",
                MAX_MEM_SLOTS,
                std::mem::size_of::<VhostUserMemoryRegion>(),
            )
            .map_err(|e| e.to_string())?;
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            let raw = r
                .raw(
                    "memory region",
                    std::mem::size_of::<VhostUserMemoryRegion>(),
                )
                .map_err(|e| e.to_string())?;
            let region = VhostUserMemoryRegion::read_from_bytes(raw)
                .map_err(|_| "a memory region of the wrong size".to_string())?;
            regions.push(MemoryRegion {
                region,
                fd: next_fd(fds, "a memory region")?,
            });
        }
        self.set_mem_table(regions).map_err(e)?;
        let rings = r
            .count("rings", self.rings.len(), 10)
            .map_err(|e| e.to_string())?;
        if rings != self.rings.len() {
            return Err(format!(
                "the record has {rings} rings, this device {}",
                self.rings.len()
            ));
        }
        for i in 0..rings {
            let index = i as u32;
            let rd =
                |r: &mut RecordReader<'_>, f: &'static str| r.bool(f).map_err(|e| e.to_string());
            let num = r.u16("ring size").map_err(|e| e.to_string())?;
            if num != 0 {
                self.set_vring_num(index, u32::from(num)).map_err(e)?;
            }
            if rd(r, "ring address set")? {
                let raw = r
                    .raw("ring addresses", std::mem::size_of::<VhostUserVringAddr>())
                    .map_err(|e| e.to_string())?;
                let addr = VhostUserVringAddr::read_from_bytes(raw)
                    .map_err(|_| "ring addresses of the wrong size".to_string())?;
                addr.validate().map_err(|e| e.to_string())?;
                if addr.index != index {
                    return Err(format!("ring {i}'s addresses name ring {}", addr.index));
                }
                self.set_vring_addr(&addr).map_err(e)?;
            }
            let base = r.u16("ring base").map_err(|e| e.to_string())?;
            self.set_vring_base(index, u32::from(base)).map_err(e)?;
            let started = rd(r, "ring started")?;
            let enabled = rd(r, "ring enabled")?;
            let live = rd(r, "ring running")?;
            let stopped_at = if rd(r, "ring stopped")? {
                let b = r.u16("ring stop index").map_err(|e| e.to_string())?;
                let mut a = [0u64; 3];
                for x in &mut a {
                    *x = r.u64("ring stop address").map_err(|e| e.to_string())?;
                }
                Some((b, a))
            } else {
                None
            };
            let (kick, call, err) = (
                rd(r, "kick fd follows")?,
                rd(r, "call fd follows")?,
                rd(r, "error fd follows")?,
            );
            let kick = kick.then(|| next_fd(fds, "a kick fd")).transpose()?;
            let call = call.then(|| next_fd(fds, "a call fd")).transpose()?;
            let err = err.then(|| next_fd(fds, "an error fd")).transpose()?;
            self.set_vring_call(index, call).map_err(e)?;
            self.set_vring_err(index, err).map_err(e)?;
            if let Some(k) = kick {
                let file = File::from(k);
                super::check_eventfd(&file, "kick", index).map_err(e)?;
                super::set_nonblocking(&file);
                self.set_kick(i, Some(file)).map_err(e)?;
            }
            let ring = &mut self.rings[i];
            ring.started = started;
            ring.enabled = enabled;
            ring.stopped_at = stopped_at;
            if live != (started && enabled) {
                return Err(format!(
                    "ring {i} is recorded as {} but {}started and {}enabled",
                    if live { "running" } else { "stopped" },
                    if started { "" } else { "not " },
                    if enabled { "" } else { "not " }
                ));
            }
            if live {
                self.check_resume_point(i, base)?;
            }
        }
        self.loaded_active = active;
        Ok(())
    }

    /// Checks that ring `i` resumes where the ring itself says: the used index in
    /// guest memory must be `base`.
    fn check_resume_point(&self, i: usize, base: u16) -> Result<(), String> {
        let ring = &self.rings[i];
        let Some(addr) = ring.addr else {
            return Err(format!("ring {i} runs without addresses"));
        };
        let used = self
            .gpa(addr.used, 6 + 8 * u64::from(ring.num), "used ring", i)
            .map_err(|e| e.to_string())?;
        let mem = vm_memory::GuestAddressSpace::memory(&self.mem);
        let idx: u16 = mem
            .read_obj(GuestAddress(used + 2))
            .map_err(|e| format!("ring {i}: cannot read its used index: {e}"))?;
        if idx != base {
            return Err(format!(
                "ring {i}: the old process recorded next available index {base}, the \
                 used ring says {idx}: it did not stop between two chains"
            ));
        }
        Ok(())
    }

    /// Starts what [`DeviceBackend::load_setup`] set up: every running ring again,
    /// which activates the device (if it was active) and lets it look at each ring
    /// once, so that whatever the guest queued during the handover is served.
    pub fn start_loaded(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.loaded_active) {
            return Ok(());
        }
        for i in 0..self.rings.len() {
            self.try_start(i).map_err(|e| e.to_string())?;
        }
        // Whatever the old process signalled late, the guest gets one interrupt per
        // ring now (a spurious one costs nothing; a lost one would stall it).
        for i in 0..self.rings.len() {
            if self.ring_live(i) {
                outboard_devices::virtio::Interrupt::signal_used_queue(&*self.irq, i);
            }
        }
        Ok(())
    }
}
