//! vhost-user round trips, Outboard's transport against rust-vmm's `vhost` 0.18, over
//! the same kind of socket pair with the back-end served on its own thread:
//!
//! - `GET_FEATURES`: a request with no body and a u64 reply;
//! - `SET_MEM_TABLE` with 8 memfd-backed regions (8 fds per message), acked with
//!   `REPLY_ACK` so that each iteration is a full round trip.
//!
//! After the criterion groups, a summary prints both figures and the ratio (rust-vmm
//! time / Outboard time: above 1 means Outboard is faster), measured in alternating
//! rounds so that a busy machine does not favour whichever runs first.

// Benchmark code: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::File;
use std::hint::black_box;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::Criterion;
use outboard_protocol::vhost_user as ob;
use outboard_transport as ours;
use vhost::vhost_user as rv;
use vhost::vhost_user::message as rvm;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const FEATURES: u64 = (1 << 32) | (1 << 30);
const REGIONS: usize = 8;
const REGION_SIZE: u64 = 0x10_0000;

fn memfds() -> Vec<OwnedFd> {
    (0..REGIONS)
        .map(|_| {
            let fd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
            rustix::fs::ftruncate(&fd, REGION_SIZE).unwrap();
            fd
        })
        .collect()
}

// ---------------------------------------------------------------- Outboard

struct OurDevice;

impl ours::VhostUserBackendReqHandler for OurDevice {
    fn max_queues(&self) -> u32 {
        1
    }
    fn get_features(&mut self) -> ours::HandlerResult<u64> {
        Ok(FEATURES)
    }
    fn set_features(&mut self, _: u64) -> ours::HandlerResult<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> ours::HandlerResult<ob::VhostUserProtocolFeatures> {
        Ok(ob::VhostUserProtocolFeatures::REPLY_ACK)
    }
    fn set_mem_table(&mut self, regions: Vec<ours::MemoryRegion>) -> ours::HandlerResult<()> {
        black_box(regions);
        Ok(())
    }
    fn set_vring_num(&mut self, _: u32, _: u32) -> ours::HandlerResult<()> {
        Ok(())
    }
    fn set_vring_addr(&mut self, _: &ob::VhostUserVringAddr) -> ours::HandlerResult<()> {
        Ok(())
    }
    fn set_vring_base(&mut self, _: u32, _: u32) -> ours::HandlerResult<()> {
        Ok(())
    }
    fn get_vring_base(&mut self, _: u32) -> ours::HandlerResult<u32> {
        Ok(0)
    }
    fn set_vring_kick(&mut self, _: u32, _: Option<OwnedFd>) -> ours::HandlerResult<()> {
        Ok(())
    }
    fn set_vring_call(&mut self, _: u32, _: Option<OwnedFd>) -> ours::HandlerResult<()> {
        Ok(())
    }
    fn set_vring_enable(&mut self, _: u32, _: bool) -> ours::HandlerResult<()> {
        Ok(())
    }
}

struct Ours {
    fe: Option<ours::Frontend>,
    fds: Vec<OwnedFd>,
    server: Option<thread::JoinHandle<()>>,
}

impl Ours {
    fn new() -> Self {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut h = ours::BackendReqHandler::new(ours::Connection::new(b), OurDevice);
            h.run().unwrap();
        });
        let mut fe = ours::Frontend::new(ours::Connection::new(a));
        fe.get_features().unwrap();
        fe.set_owner().unwrap();
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(pf).unwrap();
        Ours {
            fe: Some(fe),
            fds: memfds(),
            server: Some(server),
        }
    }

    fn get_features(&mut self) -> u64 {
        self.fe.as_mut().unwrap().get_features().unwrap()
    }

    fn set_mem_table(&mut self) {
        let regions: Vec<ours::MemoryRegionRef<'_>> = self
            .fds
            .iter()
            .enumerate()
            .map(|(i, fd)| ours::MemoryRegionRef {
                region: ob::VhostUserMemoryRegion::new(
                    i as u64 * REGION_SIZE,
                    REGION_SIZE,
                    0x7000_0000_0000 + i as u64 * REGION_SIZE,
                    0,
                ),
                fd: fd.as_fd(),
            })
            .collect();
        self.fe.as_mut().unwrap().set_mem_table(&regions).unwrap();
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        // Closing the front-end ends the server's run().
        drop(self.fe.take());
        if let Some(s) = self.server.take() {
            s.join().unwrap();
        }
    }
}

// ---------------------------------------------------------------- rust-vmm

struct TheirDevice;

impl rv::VhostUserBackendReqHandlerMut for TheirDevice {
    fn set_owner(&mut self) -> rv::Result<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> rv::Result<()> {
        Ok(())
    }
    fn reset_device(&mut self) -> rv::Result<()> {
        Ok(())
    }
    fn get_features(&mut self) -> rv::Result<u64> {
        Ok(FEATURES)
    }
    fn set_features(&mut self, _: u64) -> rv::Result<()> {
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[rvm::VhostUserMemoryRegion],
        files: Vec<File>,
        _: Option<bool>,
    ) -> rv::Result<Option<Vec<u64>>> {
        black_box((ctx, files));
        Ok(None)
    }
    fn set_vring_num(&mut self, _: u32, _: u32) -> rv::Result<()> {
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        _: u32,
        _: rvm::VhostUserVringAddrFlags,
        _: u64,
        _: u64,
        _: u64,
        _: u64,
    ) -> rv::Result<()> {
        Ok(())
    }
    fn set_vring_base(&mut self, _: u32, _: u32) -> rv::Result<()> {
        Ok(())
    }
    fn get_vring_base(&mut self, i: u32) -> rv::Result<rvm::VhostUserVringState> {
        Ok(rvm::VhostUserVringState::new(i, 0))
    }
    fn set_vring_kick(&mut self, _: u8, _: Option<File>) -> rv::Result<()> {
        Ok(())
    }
    fn set_vring_call(&mut self, _: u8, _: Option<File>) -> rv::Result<()> {
        Ok(())
    }
    fn set_vring_err(&mut self, _: u8, _: Option<File>) -> rv::Result<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> rv::Result<rvm::VhostUserProtocolFeatures> {
        Ok(rvm::VhostUserProtocolFeatures::REPLY_ACK)
    }
    fn set_protocol_features(&mut self, _: u64) -> rv::Result<()> {
        Ok(())
    }
    fn get_queue_num(&mut self) -> rv::Result<u64> {
        Ok(1)
    }
    fn set_vring_enable(&mut self, _: u32, _: bool) -> rv::Result<()> {
        Ok(())
    }
    fn get_config(&mut self, _: u32, _: u32, _: rvm::VhostUserConfigFlags) -> rv::Result<Vec<u8>> {
        Err(rv::Error::InvalidOperation("no config"))
    }
    fn set_config(&mut self, _: u32, _: &[u8], _: rvm::VhostUserConfigFlags) -> rv::Result<()> {
        Err(rv::Error::InvalidOperation("no config"))
    }
    fn set_gpu_socket(&mut self, _: rv::GpuBackend) -> rv::Result<()> {
        Err(rv::Error::InvalidOperation("no gpu"))
    }
    fn get_shared_object(&mut self, _: rvm::VhostUserSharedMsg) -> rv::Result<File> {
        Err(rv::Error::InvalidOperation("no shared objects"))
    }
    fn get_inflight_fd(
        &mut self,
        _: &rvm::VhostUserInflight,
    ) -> rv::Result<(rvm::VhostUserInflight, File)> {
        Err(rv::Error::InvalidOperation("no inflight"))
    }
    fn set_inflight_fd(&mut self, _: &rvm::VhostUserInflight, _: File) -> rv::Result<()> {
        Err(rv::Error::InvalidOperation("no inflight"))
    }
    fn get_max_mem_slots(&mut self) -> rv::Result<u64> {
        Ok(8)
    }
    fn add_mem_region(
        &mut self,
        _: &rvm::VhostUserSingleMemoryRegion,
        _: File,
        _: Option<bool>,
    ) -> rv::Result<Option<u64>> {
        Ok(None)
    }
    fn remove_mem_region(&mut self, _: &rvm::VhostUserSingleMemoryRegion) -> rv::Result<()> {
        Ok(())
    }
    fn set_device_state_fd(
        &mut self,
        _: rvm::VhostTransferStateDirection,
        _: rvm::VhostTransferStatePhase,
        _: File,
    ) -> rv::Result<Option<File>> {
        Err(rv::Error::InvalidOperation("no device state"))
    }
    fn check_device_state(&mut self) -> rv::Result<()> {
        Err(rv::Error::InvalidOperation("no device state"))
    }
    fn get_shmem_config(&mut self) -> rv::Result<rvm::VhostUserShMemConfig> {
        Err(rv::Error::InvalidOperation("no shmem"))
    }
    fn set_log_base(&mut self, _: &rvm::VhostUserLog, _: File) -> rv::Result<()> {
        Err(rv::Error::InvalidOperation("no log"))
    }
}

struct Theirs {
    fe: Option<rv::Frontend>,
    fds: Vec<OwnedFd>,
    server: Option<thread::JoinHandle<()>>,
}

impl Theirs {
    fn new() -> Self {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut h = rv::BackendReqHandler::from_stream(b, Arc::new(Mutex::new(TheirDevice)));
            while h.handle_request().is_ok() {}
        });
        let mut fe = rv::Frontend::from_stream(a, 1);
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(pf).unwrap();
        fe.set_hdr_flags(rvm::VhostUserHeaderFlag::NEED_REPLY);
        Theirs {
            fe: Some(fe),
            fds: memfds(),
            server: Some(server),
        }
    }

    fn fe(&mut self) -> &mut rv::Frontend {
        self.fe.as_mut().unwrap()
    }

    fn get_features(&mut self) -> u64 {
        self.fe().get_features().unwrap()
    }

    fn set_mem_table(&mut self) {
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .fds
            .iter()
            .enumerate()
            .map(|(i, fd)| VhostUserMemoryRegionInfo {
                guest_phys_addr: i as u64 * REGION_SIZE,
                memory_size: REGION_SIZE,
                userspace_addr: 0x7000_0000_0000 + i as u64 * REGION_SIZE,
                mmap_offset: 0,
                mmap_handle: fd.as_raw_fd(),
            })
            .collect();
        self.fe().set_mem_table(&regions).unwrap();
    }
}

impl Drop for Theirs {
    fn drop(&mut self) {
        drop(self.fe.take());
        if let Some(s) = self.server.take() {
            s.join().unwrap();
        }
    }
}

// ---------------------------------------------------------------- benches

fn bench(c: &mut Criterion) {
    let mut ours = Ours::new();
    let mut theirs = Theirs::new();
    let mut g = c.benchmark_group("get_features");
    g.bench_function("outboard", |b| b.iter(|| black_box(ours.get_features())));
    g.bench_function("rust-vmm", |b| b.iter(|| black_box(theirs.get_features())));
    g.finish();
    let mut g = c.benchmark_group("set_mem_table_8_memfds");
    g.bench_function("outboard", |b| b.iter(|| ours.set_mem_table()));
    g.bench_function("rust-vmm", |b| b.iter(|| theirs.set_mem_table()));
    g.finish();
}

/// Median over `rounds` rounds of the mean time per call, the two implementations
/// alternating round by round so that a change in machine load hits both alike.
fn compare(rounds: u32, n: u32, mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..n {
        a();
        b();
    }
    let mut ta = Vec::new();
    let mut tb = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..n {
            a();
        }
        ta.push(start.elapsed() / n);
        let start = Instant::now();
        for _ in 0..n {
            b();
        }
        tb.push(start.elapsed() / n);
    }
    ta.sort();
    tb.sort();
    (ta[ta.len() / 2], tb[tb.len() / 2])
}

fn summary(quick: bool) {
    let (rounds, n_feat, n_mem) = if quick { (3, 50, 20) } else { (21, 2_000, 500) };
    let mut ours = Ours::new();
    let mut theirs = Theirs::new();
    let (feat_o, feat_t) = compare(
        rounds,
        n_feat,
        || {
            black_box(ours.get_features());
        },
        || {
            black_box(theirs.get_features());
        },
    );
    let (mem_o, mem_t) = compare(
        rounds,
        n_mem,
        || ours.set_mem_table(),
        || theirs.set_mem_table(),
    );
    let rows = [
        ("GET_FEATURES round trip", feat_o, feat_t),
        ("SET_MEM_TABLE, 8 memfd regions, acked", mem_o, mem_t),
    ];
    println!();
    println!(
        "{:<40} {:>12} {:>12} {:>8}   (median of {rounds} alternating rounds)",
        "", "outboard", "rust-vmm", "ratio"
    );
    for (name, o, t) in rows {
        println!(
            "{:<40} {:>9.2} us {:>9.2} us {:>7.2}x",
            name,
            o.as_secs_f64() * 1e6,
            t.as_secs_f64() * 1e6,
            t.as_secs_f64() / o.as_secs_f64()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs this with `--test`: one quick pass, no statistics.
    let quick = args.iter().any(|a| a == "--test");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary(quick);
}
