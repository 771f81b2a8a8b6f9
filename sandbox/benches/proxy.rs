//! Proxied MMIO read round trip, three ways, each without and with the jail:
//!
//! - (a) `ProxyDevice`: the shared-memory ring with futex doorbells;
//! - (b) a crosvm-style baseline: a serde_json `Command` enum over `SOCK_SEQPACKET`,
//!   answered with a serde_json `CommandResult`, as the seeds' proxy does;
//! - (c) the socket floor: a raw 16-byte `SOCK_SEQPACKET` ping-pong.
//!
//! The benchmark process is pinned to CPU 0 and every device child to CPU 1 (when the
//! machine has two CPUs), so the figures are for the usual VMM layout where the vCPU
//! thread and the device process run on different CPUs. The `same_cpu` group pins both
//! to CPU 0, to show the ring does not lose when they must share one.
//!
//! The `contended_*` groups measure throughput when 1, 2 or 4 caller threads read
//! from one `ProxyDevice` at the same time (one "element" is one read): with the callers
//! on CPU 0 and the device child on CPU 1, and with nothing pinned. They use only the
//! public API, so the same file measures an older `ProxyDevice` too (the single ring
//! under a mutex, before per-caller slots) when built against it.
//!
//! Run with `cargo bench -p outboard-sandbox --bench proxy` (a criterion filter such as
//! `contended` selects groups).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use outboard_devices::bus::{BusAccessInfo, BusDevice, Suspendable};
use outboard_sandbox::{fork_process, Child, Jail, ProxyDevice};
use rustix::net::{
    recv, send, socketpair, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

const INFO: BusAccessInfo = BusAccessInfo {
    offset: 0x10,
    address: 0xd000_0010,
    id: 0,
};

fn set_affinity(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity
    // only touch that local set (CPU_SET ignores numbers beyond the set's size).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn pin_to(cpu: usize) {
    set_affinity(&[cpu]);
}

/// Pins the calling thread to `cpu`, or lets it run on every CPU.
fn place(cpu: Option<usize>) {
    match cpu {
        Some(cpu) => pin_to(cpu),
        None => set_affinity(&(0..cpus()).collect::<Vec<_>>()),
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The device behind every variant: a register that reads back a constant.
struct Reg {
    /// Where the device child runs (`None`: anywhere).
    cpu: Option<usize>,
}

impl BusDevice for Reg {
    fn debug_label(&self) -> String {
        "bench-reg".to_owned()
    }

    fn read(&mut self, info: BusAccessInfo, data: &mut [u8]) {
        let v = 0x1234_5678_u64 ^ info.offset;
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    fn on_sandboxed(&mut self) {
        place(self.cpu);
    }
}

impl Suspendable for Reg {}

/// The crosvm-style command set (the hot part of it).
#[derive(Serialize, Deserialize)]
enum Command {
    Read { len: u32, info: BusAccessInfo },
    Shutdown,
}

#[derive(Serialize, Deserialize)]
enum CommandResult {
    ReadResult([u8; 8]),
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    match socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    ) {
        Ok(pair) => pair,
        Err(e) => panic!("socketpair: {e}"),
    }
}

/// Forks a child that serves serde_json commands on `sock`.
fn spawn_json_child(jail: &Jail, cpu: usize) -> (OwnedFd, Child) {
    let (ours, theirs) = seqpacket_pair();
    let keep = [theirs.as_raw_fd()];
    let child = fork_process(jail, &keep, Some("bench-json"), move || {
        pin_to(cpu);
        let mut dev = Reg { cpu: Some(cpu) };
        let mut buf = [0u8; 4096];
        loop {
            let n = match recv(&theirs, &mut buf, RecvFlags::empty()) {
                Ok((n, _)) if n > 0 => n,
                _ => return,
            };
            match serde_json::from_slice::<Command>(&buf[..n]) {
                Ok(Command::Read { len, info }) => {
                    let mut out = [0u8; 8];
                    let len = (len as usize).min(8);
                    dev.read(info, &mut out[..len]);
                    let Ok(reply) = serde_json::to_vec(&CommandResult::ReadResult(out)) else {
                        return;
                    };
                    if send(&theirs, &reply, SendFlags::empty()).is_err() {
                        return;
                    }
                }
                Ok(Command::Shutdown) | Err(_) => return,
            }
        }
    });
    match child {
        Ok(c) => (ours, c),
        Err(e) => panic!("fork: {e}"),
    }
}

fn json_read(sock: &OwnedFd, buf: &mut [u8]) -> u32 {
    let Ok(msg) = serde_json::to_vec(&Command::Read { len: 4, info: INFO }) else {
        panic!("encode");
    };
    if send(sock, &msg, SendFlags::empty()).is_err() {
        panic!("send");
    }
    let n = match recv(sock, &mut *buf, RecvFlags::empty()) {
        Ok((n, _)) => n,
        Err(e) => panic!("recv: {e}"),
    };
    match serde_json::from_slice::<CommandResult>(&buf[..n]) {
        Ok(CommandResult::ReadResult(b)) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Err(e) => panic!("decode: {e}"),
    }
}

/// Forks a child that echoes 16-byte datagrams.
fn spawn_echo_child(jail: &Jail, cpu: usize) -> (OwnedFd, Child) {
    let (ours, theirs) = seqpacket_pair();
    let keep = [theirs.as_raw_fd()];
    let child = fork_process(jail, &keep, Some("bench-raw"), move || {
        pin_to(cpu);
        let mut buf = [0u8; 16];
        loop {
            match recv(&theirs, &mut buf, RecvFlags::empty()) {
                Ok((16, _)) => {}
                _ => return,
            }
            if send(&theirs, &buf, SendFlags::empty()).is_err() {
                return;
            }
        }
    });
    match child {
        Ok(c) => (ours, c),
        Err(e) => panic!("fork: {e}"),
    }
}

fn raw_ping(sock: &OwnedFd, buf: &mut [u8; 16]) -> u8 {
    if send(sock, &buf[..], SendFlags::empty()).is_err() {
        panic!("send");
    }
    match recv(sock, &mut buf[..], RecvFlags::empty()) {
        Ok((16, _)) => buf[0],
        other => panic!("recv: {other:?}"),
    }
}

fn jails() -> [(&'static str, Jail); 2] {
    [("no_jail", Jail::new()), ("jail", Jail::sandboxed())]
}

fn bench_group(c: &mut Criterion, group_name: &str, child_cpu: usize) {
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(1));
    for (jail_name, jail) in jails() {
        // (a) ProxyDevice.
        let proxy = match ProxyDevice::new(
            Reg {
                cpu: Some(child_cpu),
            },
            &jail,
            &[],
        ) {
            Ok(p) => p,
            Err(e) => panic!("ProxyDevice::new: {e}"),
        };
        group.bench_function(format!("a_proxy_device/{jail_name}"), |b| {
            let mut data = [0u8; 4];
            b.iter(|| {
                if let Err(e) = proxy.try_read(INFO, &mut data) {
                    panic!("read: {e}");
                }
                std::hint::black_box(data)
            })
        });
        drop(proxy);

        // (b) crosvm-style serde_json over SOCK_SEQPACKET.
        let (sock, child) = spawn_json_child(&jail, child_cpu);
        group.bench_function(format!("b_serde_json_seqpacket/{jail_name}"), |b| {
            let mut buf = [0u8; 4096];
            b.iter(|| std::hint::black_box(json_read(&sock, &mut buf)))
        });
        if let Ok(msg) = serde_json::to_vec(&Command::Shutdown) {
            let _ = send(&sock, &msg, SendFlags::empty());
        }
        drop(sock);
        drop(child);

        // (c) raw 16-byte SOCK_SEQPACKET ping-pong.
        let (sock, child) = spawn_echo_child(&jail, child_cpu);
        group.bench_function(format!("c_raw_seqpacket_16b/{jail_name}"), |b| {
            let mut buf = [7u8; 16];
            b.iter(|| std::hint::black_box(raw_ping(&sock, &mut buf)))
        });
        drop(sock);
        drop(child);
    }
    group.finish();
}

/// Throughput of 1, 2 and 4 threads reading from one proxy at once; the callers run on
/// `caller_cpu` and the device child on `child_cpu` (`None`: unpinned).
fn bench_contended(
    c: &mut Criterion,
    group_name: &str,
    caller_cpu: Option<usize>,
    child_cpu: Option<usize>,
) {
    let mut group = c.benchmark_group(group_name);
    let proxy = match ProxyDevice::new(Reg { cpu: child_cpu }, &Jail::new(), &[]) {
        Ok(p) => p,
        Err(e) => panic!("ProxyDevice::new: {e}"),
    };
    for threads in [1usize, 2, 4] {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(format!("{threads}_callers"), |b| {
            b.iter_custom(|iters| {
                let barrier = Barrier::new(threads + 1);
                let start = std::thread::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(|| {
                            place(caller_cpu);
                            let mut data = [0u8; 4];
                            barrier.wait();
                            for _ in 0..iters {
                                if let Err(e) = proxy.try_read(INFO, &mut data) {
                                    panic!("read: {e}");
                                }
                                std::hint::black_box(data);
                            }
                        });
                    }
                    barrier.wait();
                    Instant::now()
                });
                start.elapsed()
            })
        });
    }
    drop(proxy);
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    let cpus = cpus();
    pin_to(0);
    if cpus > 1 {
        println!("pinning: benchmark process on CPU 0, device children on CPU 1");
        bench_group(&mut c, "mmio_read_cross_cpu", 1);
    }
    println!("pinning: benchmark process and device children on CPU 0");
    bench_group(&mut c, "mmio_read_same_cpu", 0);
    if cpus > 1 {
        println!("pinning: caller threads on CPU 0, device child on CPU 1");
        bench_contended(
            &mut c,
            "contended_callers_cpu0_child_cpu1",
            Some(0),
            Some(1),
        );
    }
    println!("pinning: none (callers and device child anywhere)");
    bench_contended(&mut c, "contended_unpinned", None, None);
    c.final_summary();
}
