//! ProxyDevice end to end: the seed's EchoDevice tests, every command, posted-write
//! ordering, snapshot/restore/sleep/wake, fd passing of a `ChildProcIntf`, and failures
//! (a child killed mid-call, a hung child, a seccomp kill, shutdown on drop), and
//! several caller threads on one proxy (per-caller order, cross-caller hand-over, slot
//! reuse, all slots taken, the child killed under waiting callers).
//!
//! Runs with `harness = false`: every case runs in sequence on the main thread, so
//! forking is safe.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{as_nobody, e, gone, Case};
use outboard_devices::bus::{
    BusAccessInfo, BusDevice, BusRange, BusType, ConfigWriteResult, DeviceId, PciAddress,
    SuspendError, Suspendable,
};
use outboard_sandbox::{ChildProcIntf, ExitStatus, Jail, ProxyDevice, ProxyError, SeccompPolicy};
use outboard_transport::Tube;
use seccompiler::SeccompAction;
use serde_json::json;

/// The seed's echo device: outputs the byte last written to it.
struct EchoDevice {
    data: u8,
    config: u8,
}

impl EchoDevice {
    fn new() -> EchoDevice {
        EchoDevice { data: 0, config: 0 }
    }
}

impl BusDevice for EchoDevice {
    fn device_id(&self) -> DeviceId {
        DeviceId::Pci {
            vendor: 0,
            device: 0,
        }
    }

    fn debug_label(&self) -> String {
        "EchoDevice".to_owned()
    }

    fn write(&mut self, _info: BusAccessInfo, data: &[u8]) {
        assert!(data.len() == 1);
        self.data = data[0];
    }

    fn read(&mut self, _info: BusAccessInfo, data: &mut [u8]) {
        assert!(data.len() == 1);
        data[0] = self.data;
    }

    fn config_register_write(
        &mut self,
        _reg_idx: usize,
        _offset: u64,
        data: &[u8],
    ) -> ConfigWriteResult {
        assert!(data.len() == 1);
        self.config = data[0];
        ConfigWriteResult::default()
    }

    fn config_register_read(&self, _reg_idx: usize) -> u32 {
        self.config as u32
    }
}

impl Suspendable for EchoDevice {}

fn new_proxied_echo_device() -> Result<ProxyDevice, String> {
    ProxyDevice::new(EchoDevice::new(), &Jail::new(), &[]).map_err(e("ProxyDevice::new"))
}

const ADDRESS: BusAccessInfo = BusAccessInfo {
    offset: 0,
    address: 0,
    id: 0,
};

fn test_debug_label() -> Result<(), String> {
    let proxy_device = new_proxied_echo_device()?;
    ensure!(
        proxy_device.debug_label() == "EchoDevice",
        "{}",
        proxy_device.debug_label()
    );
    ensure!(proxy_device.device_id() == DeviceId::Proxy, "device id");
    Ok(())
}

fn test_proxied_read_write() -> Result<(), String> {
    let mut proxy_device = new_proxied_echo_device()?;
    proxy_device.write(ADDRESS, &[42]);
    let mut read_buffer = [0];
    proxy_device.read(ADDRESS, &mut read_buffer);
    ensure!(read_buffer == [42], "read {read_buffer:?}");
    Ok(())
}

fn test_proxied_config() -> Result<(), String> {
    let mut proxy_device = new_proxied_echo_device()?;
    proxy_device.config_register_write(0, 0, &[42]);
    ensure!(proxy_device.config_register_read(0) == 42, "config read");
    Ok(())
}

/// A device that exercises every command and keeps state worth snapshotting.
struct FullDevice {
    regs: [u64; 16],
    virt: [u32; 4],
    sum: u64,
    asleep: bool,
    destroyed: bool,
    pci_map: Option<(OwnedFd, usize, usize)>,
    /// Written to when the device is dropped in the child (not in the parent, where the
    /// closure's copy is dropped after the fork).
    drop_signal: Option<OwnedFd>,
    owner: u32,
}

impl FullDevice {
    fn new(drop_signal: Option<OwnedFd>) -> FullDevice {
        FullDevice {
            regs: [0; 16],
            virt: [0; 4],
            sum: 0,
            asleep: false,
            destroyed: false,
            pci_map: None,
            drop_signal,
            owner: std::process::id(),
        }
    }
}

impl Drop for FullDevice {
    fn drop(&mut self) {
        if let Some(fd) = self
            .drop_signal
            .as_ref()
            .filter(|_| std::process::id() != self.owner)
        {
            // SAFETY: writes one byte from a static buffer to our pipe.
            unsafe { libc::write(fd.as_raw_fd(), b"D".as_ptr().cast(), 1) };
        }
    }
}

impl BusDevice for FullDevice {
    fn debug_label(&self) -> String {
        "full".to_owned()
    }

    fn read(&mut self, info: BusAccessInfo, data: &mut [u8]) {
        let v = match info.offset {
            0x100 => self.sum,
            0x108 => self.destroyed as u64,
            0x110 => info.address ^ info.id as u64,
            // Misbehaviours on demand.
            0x200 => {
                // SAFETY: kills this (child) process on purpose.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                0
            }
            0x208 => {
                std::thread::sleep(Duration::from_secs(30));
                0
            }
            0x210 => {
                // SAFETY: a harmless syscall the test's seccomp policy forbids.
                unsafe { libc::getppid() as u64 }
            }
            o => self.regs[(o / 8 % 16) as usize],
        };
        let n = data.len();
        data.copy_from_slice(&v.to_le_bytes()[..n]);
    }

    fn write(&mut self, info: BusAccessInfo, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        if info.offset == 0x100 {
            self.sum = self.sum.wrapping_add(v);
        } else {
            self.regs[(info.offset / 8 % 16) as usize] = v;
        }
    }

    fn config_register_write(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteResult {
        let mut b = [0u8; 4];
        b[..data.len()].copy_from_slice(data);
        self.virt[reg_idx % 4] = u32::from_le_bytes(b) << (offset * 8);
        if reg_idx == 4 {
            // Pretend a BAR moved.
            return ConfigWriteResult {
                mmio_remove: vec![BusRange {
                    base: 0x1000,
                    len: 0x100,
                }],
                mmio_add: vec![BusRange {
                    base: u32::from_le_bytes(b) as u64,
                    len: 0x100,
                }],
                removed_pci_devices: vec![PciAddress {
                    bus: 0,
                    dev: 2,
                    func: 0,
                }],
                ..Default::default()
            };
        }
        ConfigWriteResult::default()
    }

    fn config_register_read(&self, reg_idx: usize) -> u32 {
        self.virt[reg_idx % 4]
    }

    fn virtual_config_register_write(&mut self, reg_idx: usize, value: u32) {
        self.virt[reg_idx % 4] = value.rotate_left(8);
    }

    fn virtual_config_register_read(&self, reg_idx: usize) -> u32 {
        self.virt[reg_idx % 4]
    }

    fn init_pci_config_mapping(&mut self, shmem: BorrowedFd<'_>, base: usize, len: usize) -> bool {
        let Ok(fd) = shmem.try_clone_to_owned() else {
            return false;
        };
        // Mirror "config space" into the memfd: write a marker at `base`.
        let marker = 0xC0F1_6000u32 | len as u32;
        // SAFETY: pwrite from a local buffer to the memfd we were given.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                marker.to_le_bytes().as_ptr().cast(),
                4,
                base as libc::off_t,
            )
        };
        self.pci_map = Some((fd, base, len));
        n == 4
    }

    fn get_ranges(&self) -> Vec<(BusRange, BusType)> {
        vec![
            (
                BusRange {
                    base: 0xd000_0000,
                    len: 0x1000,
                },
                BusType::Mmio,
            ),
            (
                BusRange {
                    base: 0x3f8,
                    len: 8,
                },
                BusType::Io,
            ),
        ]
    }

    fn destroy_device(&mut self) {
        self.destroyed = true;
    }
}

impl Suspendable for FullDevice {
    fn snapshot(&mut self) -> Result<serde_json::Value, SuspendError> {
        if !self.asleep {
            return Err(SuspendError::Failed {
                device: "full".into(),
                operation: "snapshot".into(),
                reason: "not asleep".into(),
            });
        }
        // Register 15 sets the size of a filler, to exercise large snapshots.
        let blob = "b".repeat(self.regs[15].min(8 << 20) as usize);
        Ok(json!({ "regs": self.regs.to_vec(), "sum": self.sum, "blob": blob }))
    }

    fn restore(&mut self, data: serde_json::Value) -> Result<(), SuspendError> {
        let fail = |reason: &str| SuspendError::Failed {
            device: "full".into(),
            operation: "restore".into(),
            reason: reason.into(),
        };
        let regs: Vec<u64> =
            serde_json::from_value(data["regs"].clone()).map_err(|e| fail(&e.to_string()))?;
        if regs.len() != 16 {
            return Err(fail("need 16 registers"));
        }
        self.regs.copy_from_slice(&regs);
        self.sum = data["sum"].as_u64().ok_or_else(|| fail("no sum"))?;
        Ok(())
    }

    fn sleep(&mut self) -> Result<(), SuspendError> {
        self.asleep = true;
        Ok(())
    }

    fn wake(&mut self) -> Result<(), SuspendError> {
        self.asleep = false;
        Ok(())
    }
}

fn at(offset: u64) -> BusAccessInfo {
    BusAccessInfo {
        offset,
        address: 0xd000_0000 + offset,
        id: 3,
    }
}

fn read_u64(p: &ProxyDevice, offset: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    p.try_read(at(offset), &mut b).map_err(e("read"))?;
    Ok(u64::from_le_bytes(b))
}

fn test_every_command() -> Result<(), String> {
    let mut p = ProxyDevice::new(FullDevice::new(None), &Jail::new(), &[]).map_err(e("new"))?;
    // Access info travels intact.
    ensure!(read_u64(&p, 0x110)? == (0xd000_0110 ^ 3), "access info");
    // Sizes 1, 2, 4, 8.
    p.write(at(8), &0x1122_3344_5566_7788u64.to_le_bytes());
    let mut b1 = [0u8; 1];
    let mut b2 = [0u8; 2];
    let mut b4 = [0u8; 4];
    p.read(at(8), &mut b1);
    p.read(at(8), &mut b2);
    p.read(at(8), &mut b4);
    ensure!(
        b1 == [0x88] && b2 == [0x88, 0x77] && b4 == [0x88, 0x77, 0x66, 0x55],
        "{b1:?} {b2:?} {b4:?}"
    );
    ensure!(
        matches!(
            p.try_read(at(0), &mut [0u8; 9]),
            Err(ProxyError::DataLength { len: 9, max: 8 })
        ),
        "9-byte read accepted"
    );
    // Config registers, including a write whose result is not empty.
    let r = p.config_register_write(1, 1, &[0xab]);
    ensure!(r == ConfigWriteResult::default(), "{r:?}");
    ensure!(p.config_register_read(1) == 0xab00, "config read");
    let r = p.config_register_write(4, 0, &0x8000u32.to_le_bytes());
    ensure!(
        r.mmio_add
            == vec![BusRange {
                base: 0x8000,
                len: 0x100
            }],
        "{r:?}"
    );
    ensure!(
        r.removed_pci_devices
            == vec![PciAddress {
                bus: 0,
                dev: 2,
                func: 0
            }],
        "{r:?}"
    );
    // Virtual config.
    p.virtual_config_register_write(2, 0x11);
    ensure!(
        p.virtual_config_register_read(2) == 0x1100,
        "virtual config"
    );
    // Ranges.
    let ranges = p.get_ranges();
    ensure!(
        ranges.len() == 2
            && ranges[1]
                == (
                    BusRange {
                        base: 0x3f8,
                        len: 8
                    },
                    BusType::Io
                ),
        "{ranges:?}"
    );
    // PCI config mapping through a memfd.
    let memfd = rustix::fs::memfd_create(c"pci-cfg", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(e("memfd"))?;
    rustix::fs::ftruncate(&memfd, 4096).map_err(e("ftruncate"))?;
    ensure!(
        p.init_pci_config_mapping(memfd.as_fd(), 64, 256),
        "pci config mapping refused"
    );
    let mut marker = [0u8; 4];
    rustix::io::pread(&memfd, &mut marker, 64).map_err(e("pread"))?;
    ensure!(
        u32::from_le_bytes(marker) == 0xC0F1_6100,
        "marker {marker:x?}"
    );
    // Destroy (posted, ordered before the read).
    p.destroy_device();
    ensure!(read_u64(&p, 0x108)? == 1, "destroy not seen");
    ensure!(!p.is_broken(), "broken");
    Ok(())
}

fn test_posted_writes_stay_ordered() -> Result<(), String> {
    let p = ProxyDevice::new(FullDevice::new(None), &Jail::new(), &[]).map_err(e("new"))?;
    let mut expect = 0u64;
    for i in 0..10_000u64 {
        p.try_write(at(0x100), &i.to_le_bytes())
            .map_err(e("write"))?;
        expect += i;
        if i % 997 == 0 {
            ensure!(read_u64(&p, 0x100)? == expect, "sum at {i}");
        }
    }
    ensure!(read_u64(&p, 0x100)? == expect, "final sum");
    Ok(())
}

fn test_snapshot_restore_sleep_wake() -> Result<(), String> {
    let mut p = ProxyDevice::new(FullDevice::new(None), &Jail::new(), &[]).map_err(e("new"))?;
    for i in 0..16u64 {
        p.write(at(i * 8), &(i * 3).to_le_bytes());
    }
    // A 300 kB snapshot: too large for one datagram, it travels in a memfd.
    p.write(at(15 * 8), &300_000u64.to_le_bytes());
    p.write(at(0x100), &77u64.to_le_bytes());
    // The device refuses to snapshot while awake: the error comes back intact.
    match p.snapshot() {
        Err(SuspendError::Failed { reason, .. }) => ensure!(reason == "not asleep", "{reason}"),
        other => return Err(format!("snapshot while awake: {other:?}")),
    }
    p.sleep().map_err(e("sleep"))?;
    let snap = p.snapshot().map_err(e("snapshot"))?;
    ensure!(snap["sum"] == 77, "sum {}", snap["sum"]);
    ensure!(snap["blob"].as_str().map(str::len) == Some(300_000), "blob");
    p.wake().map_err(e("wake"))?;
    // Restore into a fresh device.
    let mut q = ProxyDevice::new(FullDevice::new(None), &Jail::new(), &[]).map_err(e("new"))?;
    q.restore(snap.clone()).map_err(e("restore"))?;
    for i in 0..15u64 {
        ensure!(read_u64(&q, i * 8)? == i * 3, "register {i}");
    }
    ensure!(read_u64(&q, 15 * 8)? == 300_000, "register 15");
    ensure!(read_u64(&q, 0x100)? == 77, "sum");
    let bad = q.restore(json!({"regs": [1, 2]}));
    ensure!(matches!(bad, Err(SuspendError::Failed { .. })), "{bad:?}");
    // A device without Suspendable support says so.
    let mut echo = new_proxied_echo_device()?;
    ensure!(
        matches!(echo.sleep(), Err(SuspendError::Unsupported { .. })),
        "echo sleep"
    );
    Ok(())
}

/// A device whose answers are as large as a compromised child could make them: ten
/// thousands of ranges (a megabyte of JSON, sent in a memfd), a suspend error with a
/// megabyte reason (`sleep`, in a memfd) and one with two 30 kB strings (`wake`,
/// inline).
struct OversizedDevice;

impl BusDevice for OversizedDevice {
    fn device_id(&self) -> DeviceId {
        DeviceId::Pci {
            vendor: 0,
            device: 0,
        }
    }

    fn debug_label(&self) -> String {
        "oversized".to_owned()
    }

    fn read(&mut self, _info: BusAccessInfo, data: &mut [u8]) {
        data.fill(0x5a);
    }

    fn write(&mut self, _info: BusAccessInfo, _data: &[u8]) {}

    fn get_ranges(&self) -> Vec<(BusRange, BusType)> {
        (0..40_000u64)
            .map(|i| {
                (
                    BusRange {
                        base: 0x1000_0000 + i * 0x1000,
                        len: 0x1000,
                    },
                    BusType::Mmio,
                )
            })
            .collect()
    }
}

impl Suspendable for OversizedDevice {
    fn sleep(&mut self) -> Result<(), SuspendError> {
        Err(SuspendError::Failed {
            device: "oversized".into(),
            operation: "sleep".into(),
            reason: "s".repeat(1 << 20),
        })
    }

    fn wake(&mut self) -> Result<(), SuspendError> {
        Err(SuspendError::Failed {
            device: "w".repeat(30_000),
            operation: "wake".into(),
            reason: "é".repeat(15_000),
        })
    }
}

/// What a compromised child sends the VMM is bounded: an answer that may only be small
/// (everything but a snapshot) is refused past a datagram's worth of JSON before the
/// VMM allocates or parses it, and the child's text in errors (which the VMM logs) is
/// cut to `MAX_CHILD_TEXT` bytes. Before, the VMM took up to 256 MiB of JSON for any
/// answer and kept (and logged) the child's strings whole.
fn test_oversized_answers_are_bounded() -> Result<(), String> {
    use outboard_sandbox::proxy::MAX_CHILD_TEXT;
    let mut p = ProxyDevice::new(OversizedDevice, &Jail::new(), &[]).map_err(e("new"))?;
    // Inline, but long: cut, with the length it had, at a character boundary.
    match p.wake() {
        Err(SuspendError::Failed {
            device,
            operation,
            reason,
        }) => {
            ensure!(operation == "wake", "{operation}");
            for (what, text, total) in [("device", &device, 30_000), ("reason", &reason, 30_000)] {
                ensure!(
                    text.len() <= MAX_CHILD_TEXT + 64,
                    "{what}: {} bytes kept",
                    text.len()
                );
                ensure!(
                    text.ends_with(&format!("... ({total} bytes from the child)")),
                    "{what}: {}",
                    &text[text.len() - 40..]
                );
            }
        }
        other => return Err(format!("wake: {other:?}")),
    }
    // Still usable: a bounded answer is not a protocol error.
    ensure!(read_u64(&p, 0)? == 0x5a5a_5a5a_5a5a_5a5a, "read after wake");
    // A megabyte refusal reason needs a memfd: refused as too large.
    match p.sleep() {
        Err(SuspendError::Failed { reason, .. }) => {
            ensure!(reason.len() < 512, "{} bytes of reason", reason.len());
            ensure!(reason.contains("exceeds 65536"), "{reason}");
        }
        other => return Err(format!("sleep: {other:?}")),
    }
    // The proxy stopped trusting the child: the next call fails at once.
    let q = ProxyDevice::new(OversizedDevice, &Jail::new(), &[]).map_err(e("new"))?;
    match q.try_get_ranges() {
        Err(err @ ProxyError::Cold { .. }) => {
            let text = err.to_string();
            ensure!(text.contains("exceeds 65536"), "{text}");
        }
        other => return Err(format!("get_ranges: {other:?}")),
    }
    ensure!(q.is_broken(), "the proxy still trusts the child");
    Ok(())
}

fn test_child_killed_mid_call() -> Result<(), String> {
    let p = ProxyDevice::new(FullDevice::new(None), &Jail::new(), &[]).map_err(e("new"))?;
    let pid = p.pid();
    let start = Instant::now();
    let res = read_u64(&p, 0x200);
    let took = start.elapsed();
    ensure!(res.is_err(), "read from a dead child succeeded");
    ensure!(took < Duration::from_secs(1), "took {took:?}");
    ensure!(
        p.exit_status() == Some(ExitStatus::Signaled(libc::SIGKILL)),
        "{:?}",
        p.exit_status()
    );
    ensure!(gone(pid), "zombie {pid}");
    // Every later call fails fast with a defined value.
    let mut b = [0u8; 4];
    let mut p = p;
    p.read(at(0), &mut b);
    ensure!(b == [0xff; 4], "{b:?}");
    ensure!(
        matches!(p.try_read(at(0), &mut b), Err(ProxyError::Broken { .. })),
        "not broken"
    );
    ensure!(
        p.snapshot().is_err() && p.sleep().is_err() && p.wake().is_err(),
        "suspend ops"
    );
    Ok(())
}

fn test_hung_child_times_out() -> Result<(), String> {
    let mut p = ProxyDevice::new(FullDevice::new(None), &Jail::new(), &[]).map_err(e("new"))?;
    p.set_timeouts(Duration::from_millis(200), Duration::from_millis(500));
    let pid = p.pid();
    let start = Instant::now();
    let res = read_u64(&p, 0x208);
    let took = start.elapsed();
    ensure!(
        res.as_ref().is_err_and(|m| m.contains("no answer")),
        "{res:?}"
    );
    ensure!(took < Duration::from_secs(1), "took {took:?}");
    ensure!(gone(pid), "zombie {pid}");
    Ok(())
}

fn seccomp_kill(jail: Jail) -> Result<(), String> {
    let policy = SeccompPolicy::deny_list(&[libc::SYS_getppid], SeccompAction::KillProcess)
        .map_err(e("policy"))?;
    let p =
        ProxyDevice::new(FullDevice::new(None), &jail.seccomp(policy), &[]).map_err(e("new"))?;
    ensure!(read_u64(&p, 0)? == 0, "allowed read");
    let pid = p.pid();
    let start = Instant::now();
    ensure!(
        read_u64(&p, 0x210).is_err(),
        "forbidden syscall went through"
    );
    ensure!(start.elapsed() < Duration::from_secs(1), "slow");
    ensure!(
        p.exit_status() == Some(ExitStatus::Signaled(libc::SIGSYS)),
        "{:?}",
        p.exit_status()
    );
    ensure!(gone(pid), "zombie");
    Ok(())
}

fn test_seccomp_kill_is_reported() -> Result<(), String> {
    seccomp_kill(Jail::new())
}

fn test_seccomp_kill_in_pid_namespace_is_relayed() -> Result<(), String> {
    seccomp_kill(Jail::sandboxed())
}

fn test_drop_shuts_down_and_reaps() -> Result<(), String> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(e("pipe"))?;
    let keep = [w.as_raw_fd()];
    let p =
        ProxyDevice::new(FullDevice::new(Some(w)), &Jail::sandboxed(), &keep).map_err(e("new"))?;
    let pid = p.pid();
    let start = Instant::now();
    drop(p);
    ensure!(
        start.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        start.elapsed()
    );
    ensure!(gone(pid), "zombie after drop");
    let mut buf = Vec::new();
    std::fs::File::from(r)
        .read_to_end(&mut buf)
        .map_err(e("read"))?;
    ensure!(
        buf == b"D",
        "device Drop did not run before shutdown: {buf:?}"
    );
    Ok(())
}

/// A device whose Drop hangs in the child: dropping the proxy still returns in bounded
/// time (Shutdown, a bounded wait, then SIGKILL) and reaps the child.
struct StuckOnDrop {
    owner: u32,
}

impl Drop for StuckOnDrop {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            std::thread::sleep(Duration::from_secs(30));
        }
    }
}

impl BusDevice for StuckOnDrop {
    fn debug_label(&self) -> String {
        "stuck".to_owned()
    }
}

impl Suspendable for StuckOnDrop {}

fn test_drop_kills_a_child_stuck_in_shutdown() -> Result<(), String> {
    let device = StuckOnDrop {
        owner: std::process::id(),
    };
    let p = ProxyDevice::new(device, &Jail::new(), &[]).map_err(e("new"))?;
    let pid = p.pid();
    let start = Instant::now();
    drop(p);
    let took = start.elapsed();
    ensure!(took < Duration::from_millis(2500), "drop took {took:?}");
    ensure!(gone(pid), "zombie after drop");
    Ok(())
}

/// A `ChildProcIntf` made here is sent to another process, which activates it and uses
/// it; a duplicate is refused; this process, the device's parent, reaps it.
fn test_intf_crosses_processes_and_activates_once() -> Result<(), String> {
    let intf = ChildProcIntf::new(EchoDevice::new(), &Jail::new(), &[]).map_err(e("intf"))?;
    let spare = intf.try_clone().map_err(e("clone"))?;
    let (a, b) = Tube::pair().map_err(e("tube"))?;
    let mut owner = intf.send(&a).map_err(e("send"))?;
    let device_pid = owner.pid();
    // The "VMM" process: receives, activates, uses, refuses a duplicate, drops.
    common::in_fork(move || {
        let received = ChildProcIntf::recv(&b).map_err(e("recv"))?;
        ensure!(received.pid() == device_pid, "pid {}", received.pid());
        let mut p = ProxyDevice::try_from(received).map_err(e("activate"))?;
        p.write(ADDRESS, &[7]);
        let second = ProxyDevice::try_from(spare);
        ensure!(
            matches!(&second, Err(ProxyError::ActivationRefused { reason, .. })
                if reason == "already activated"),
            "{second:?}"
        );
        // The first proxy is unaffected.
        let mut r = [0u8];
        p.read(ADDRESS, &mut r);
        ensure!(r == [7] && !p.is_broken(), "{r:?}");
        // Dropping it shuts the device down, although this process cannot reap it.
        drop(p);
        Ok(())
    })?;
    let status = owner
        .wait_timeout(Duration::from_secs(2))
        .map_err(e("wait"))?;
    ensure!(status == Some(ExitStatus::Exited(0)), "{status:?}");
    ensure!(gone(device_pid), "zombie");
    // An interface message without its fds is refused.
    let (a, b) = Tube::pair().map_err(e("tube"))?;
    a.send(&serde_json::json!({"pid": 1, "debug_label": "x"}))
        .map_err(e("send"))?;
    ensure!(
        ChildProcIntf::recv(&b).is_err(),
        "intf without fds accepted"
    );
    Ok(())
}

/// The documented child syscall list is enough for a proxied device under a
/// kill-by-default allow-list.
fn test_tight_seccomp_allow_list() -> Result<(), String> {
    let policy = SeccompPolicy::allow_list(
        outboard_sandbox::proxy::CHILD_SYSCALLS,
        SeccompAction::KillProcess,
    )
    .map_err(e("policy"))?;
    let mut p = ProxyDevice::new(
        FullDevice::new(None),
        &Jail::sandboxed().seccomp(policy),
        &[],
    )
    .map_err(e("new"))?;
    for i in 0..100u64 {
        p.write(at(8), &i.to_le_bytes());
        ensure!(read_u64(&p, 8)? == i, "register");
    }
    ensure!(
        p.config_register_write(4, 0, &[1, 0, 0, 0]).mmio_add.len() == 1,
        "config write result"
    );
    p.write(at(15 * 8), &100_000u64.to_le_bytes());
    p.sleep().map_err(e("sleep"))?;
    let snap = p.snapshot().map_err(e("snapshot"))?;
    p.restore(snap).map_err(e("restore"))?;
    p.wake().map_err(e("wake"))?;
    ensure!(p.get_ranges().len() == 2, "ranges");
    let pid = p.pid();
    p.shutdown(Duration::from_secs(1)).map_err(e("shutdown"))?;
    ensure!(
        p.exit_status() == Some(ExitStatus::Exited(0)),
        "{:?}",
        p.exit_status()
    );
    ensure!(gone(pid), "zombie");
    Ok(())
}

/// The child notices that the VMM died (its Tube end closed, no Shutdown) and exits.
fn test_child_exits_when_vmm_dies() -> Result<(), String> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(e("pipe"))?;
    let wraw = w.as_raw_fd();
    common::in_fork(move || {
        let p = ProxyDevice::new(EchoDevice::new(), &Jail::new(), &[]).map_err(e("new"))?;
        let pid = p.pid().to_le_bytes();
        // SAFETY: writes a local buffer to the pipe.
        unsafe { libc::write(wraw, pid.as_ptr().cast(), pid.len()) };
        // The "VMM" dies without dropping anything: no Shutdown, no kill.
        std::mem::forget(p);
        Ok(())
    })?;
    drop(w);
    let mut pid = [0u8; 4];
    std::fs::File::from(r)
        .read_exact(&mut pid)
        .map_err(e("read pid"))?;
    let pid = rustix::process::Pid::from_raw(i32::from_le_bytes(pid)).ok_or("pid 0")?;
    let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(err) => return Err(format!("pidfd_open: {err}")),
    };
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::event::Timespec {
        tv_sec: 2,
        tv_nsec: 0,
    };
    let exited = matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0);
    if !exited {
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
    }
    ensure!(exited, "orphaned device process still runs");
    Ok(())
}

/// Forking from a multi-threaded process, while another thread allocates and holds the
/// allocator's locks, still gives working, jailed device processes (the child only makes
/// system calls until the jail is up; glibc's fork resets the allocator for the device).
/// Runs in its own forked process so the busy thread does not outlive the case.
fn test_fork_from_multithreaded_process() -> Result<(), String> {
    common::in_fork(|| {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut keep: Vec<Vec<u8>> = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    keep.push(vec![1u8; 4096]);
                    if keep.len() > 64 {
                        keep.clear();
                    }
                }
            })
        };
        let mut result = Ok(());
        for i in 0..20u8 {
            let run = || -> Result<(), String> {
                let mut p = ProxyDevice::new(EchoDevice::new(), &Jail::sandboxed(), &[])
                    .map_err(e("new"))?;
                p.write(ADDRESS, &[i]);
                let mut r = [0u8];
                p.read(ADDRESS, &mut r);
                ensure!(r == [i], "round {i}: {r:?}");
                Ok(())
            };
            if let Err(err) = run() {
                result = Err(err);
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = busy.join();
        result
    })
}

fn test_jailed_proxy_works() -> Result<(), String> {
    let mut p = ProxyDevice::new(EchoDevice::new(), &Jail::sandboxed(), &[]).map_err(e("new"))?;
    for v in [1u8, 200, 42] {
        p.write(ADDRESS, &[v]);
        let mut r = [0u8];
        p.read(ADDRESS, &mut r);
        ensure!(r == [v], "{r:?}");
    }
    Ok(())
}

fn test_jailed_proxy_works_unprivileged() -> Result<(), String> {
    as_nobody(test_jailed_proxy_works)
}

fn test_unprivileged_seccomp_kill() -> Result<(), String> {
    as_nobody(test_seccomp_kill_in_pid_namespace_is_relayed)
}

// ---------------------------------------------------------------------------------------
// Several caller threads on one proxy (a request slot per caller).

/// Registers that check each caller's program order: caller `c` writes 1, 2, 3, ... to
/// `c * 8`; a write that is not the last value plus one (lost or reordered) is counted.
/// Reading `c * 8` gives the last value; reading `ORDER_ERRORS` the count; reading
/// `ORDER_HANG` never answers (for the kill test).
struct OrderDevice {
    last: [u64; 64],
    errors: u64,
    writes: u64,
}

const ORDER_ERRORS: u64 = 0x1000;
const ORDER_WRITES: u64 = 0x1008;
const ORDER_HANG: u64 = 0x2000;
/// A plain register, no order check (for the cross-caller test).
const ORDER_PLAIN: u64 = 0x3000;

impl BusDevice for OrderDevice {
    fn debug_label(&self) -> String {
        "order".to_owned()
    }

    fn read(&mut self, info: BusAccessInfo, data: &mut [u8]) {
        let v = match info.offset {
            ORDER_ERRORS => self.errors,
            ORDER_WRITES => self.writes,
            ORDER_HANG => {
                std::thread::sleep(Duration::from_secs(30));
                0
            }
            ORDER_PLAIN => self.last[63],
            o => self.last[(o / 8 % 63) as usize],
        };
        let n = data.len();
        data.copy_from_slice(&v.to_le_bytes()[..n]);
    }

    fn write(&mut self, info: BusAccessInfo, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        self.writes += 1;
        if info.offset == ORDER_PLAIN {
            self.last[63] = v;
            return;
        }
        let reg = &mut self.last[(info.offset / 8 % 63) as usize];
        if v != *reg + 1 {
            self.errors += 1;
        }
        *reg = v;
    }
}

impl Suspendable for OrderDevice {}

fn order_device() -> Result<ProxyDevice, String> {
    let dev = OrderDevice {
        last: [0; 64],
        errors: 0,
        writes: 0,
    };
    ProxyDevice::new(dev, &Jail::new(), &[]).map_err(e("new"))
}

/// `threads` callers each post `writes` sequential writes to their own register and
/// read it back every 16 writes (the read must see the latest posted write). While all
/// run, each owns a slot if there are enough (7), the rest share the last one; after
/// they exit every slot is released. The device saw every write, none out of order.
fn hammer(threads: u64, writes: u64) -> Result<(), String> {
    let p = order_device()?;
    let barrier = std::sync::Barrier::new(threads as usize + 1);
    let in_use = std::thread::scope(|s| -> Result<usize, String> {
        let handles: Vec<_> = (0..threads)
            .map(|c| {
                let (p, barrier) = (&p, &barrier);
                s.spawn(move || -> Result<(), String> {
                    // One access first so the slot is claimed before the count is read.
                    ensure!(read_u64(p, c * 8)? == 0, "caller {c}: fresh register");
                    barrier.wait();
                    barrier.wait();
                    for v in 1..=writes {
                        p.try_write(at(c * 8), &v.to_le_bytes())
                            .map_err(e("write"))?;
                        if v % 16 == 0 {
                            let got = read_u64(p, c * 8)?;
                            ensure!(got == v, "caller {c}: read {got} after writing {v}");
                        }
                    }
                    ensure!(read_u64(p, c * 8)? == writes, "caller {c}: last value");
                    Ok(())
                })
            })
            .collect();
        barrier.wait();
        let in_use = p.slots_in_use();
        barrier.wait();
        for h in handles {
            h.join().map_err(|_| "caller panicked".to_owned())??;
        }
        Ok(in_use)
    })?;
    let owned = (threads as usize).min(outboard_sandbox::ring::SLOTS - 1);
    ensure!(
        in_use == owned,
        "{in_use} slots in use by {threads} callers"
    );
    ensure!(
        p.slots_in_use() == 0,
        "{} slots still claimed",
        p.slots_in_use()
    );
    ensure!(read_u64(&p, ORDER_ERRORS)? == 0, "lost or reordered writes");
    let seen = read_u64(&p, ORDER_WRITES)?;
    ensure!(seen == threads * writes, "device saw {seen} writes");
    ensure!(!p.is_broken(), "broken");
    Ok(())
}

fn test_callers_keep_program_order() -> Result<(), String> {
    hammer(4, 20_000)
}

fn test_all_slots_taken_still_ordered() -> Result<(), String> {
    hammer(12, 5_000)
}

/// A write posted by one thread and handed over (through a channel, i.e. a
/// happens-before edge, like a guest lock) is seen by another thread's read.
fn test_cross_caller_handoff_is_ordered() -> Result<(), String> {
    let p = order_device()?;
    let (to_b, from_a) = std::sync::mpsc::sync_channel::<u64>(0);
    let (to_a, from_b) = std::sync::mpsc::sync_channel::<u64>(0);
    let p = &p;
    std::thread::scope(|s| -> Result<(), String> {
        let a = s.spawn(move || -> Result<(), String> {
            for v in 1..=5_000u64 {
                p.try_write(at(ORDER_PLAIN), &v.to_le_bytes())
                    .map_err(e("write"))?;
                to_b.send(v).map_err(e("send"))?;
                let seen = from_b.recv().map_err(e("recv"))?;
                ensure!(seen == v, "B saw {seen} after A wrote {v}");
            }
            Ok(())
        });
        let b = s.spawn(move || -> Result<(), String> {
            while let Ok(v) = from_a.recv() {
                let seen = read_u64(p, ORDER_PLAIN)?;
                let _ = to_a.send(seen);
                ensure!(seen == v, "B read {seen}, A had posted {v}");
            }
            Ok(())
        });
        let ra = a.join().map_err(|_| "A panicked".to_owned())?;
        let rb = b.join().map_err(|_| "B panicked".to_owned())?;
        ra.and(rb)
    })?;
    ensure!(p.slots_in_use() == 0, "slots still claimed");
    Ok(())
}

/// Callers that exit hand their slot back: 40 threads one after another each own one
/// while they run, and none is left claimed.
fn test_exited_callers_slots_are_reused() -> Result<(), String> {
    let p = order_device()?;
    for c in 0..40u64 {
        let reg = c % 8;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<(), String> {
                let start = read_u64(&p, reg * 8)?;
                p.try_write(at(reg * 8), &(start + 1).to_le_bytes())
                    .map_err(e("write"))?;
                ensure!(read_u64(&p, reg * 8)? == start + 1, "thread {c}");
                ensure!(p.slots_in_use() == 1, "thread {c}: {}", p.slots_in_use());
                Ok(())
            })
            .join()
            .map_err(|_| "caller panicked".to_owned())?
        })?;
        ensure!(
            p.slots_in_use() == 0,
            "after thread {c}: {}",
            p.slots_in_use()
        );
    }
    ensure!(read_u64(&p, ORDER_ERRORS)? == 0, "order errors");
    Ok(())
}

/// The child is killed while 5 callers wait on it (one inside the device, four queued
/// behind it in their slots): all get errors within a second of the kill, well inside
/// their 10 s bound, and the child is reaped.
fn test_child_killed_while_callers_wait() -> Result<(), String> {
    let mut p = order_device()?;
    p.set_timeouts(Duration::from_secs(10), Duration::from_secs(10));
    let pid = p.pid();
    let p = &p;
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5u64)
            .map(|c| {
                s.spawn(move || {
                    let offset = if c == 0 { ORDER_HANG } else { c * 8 };
                    if c > 0 {
                        // Queue behind the hanging read.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let mut b = [0u8; 8];
                    let res = p.try_read(at(offset), &mut b);
                    (res, Instant::now())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let killed = Instant::now();
        // SAFETY: kills the device child this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        (killed, results)
    });
    let (killed, results) = results;
    for (c, r) in results.into_iter().enumerate() {
        let (res, at) = r.map_err(|_| format!("caller {c} panicked"))?;
        ensure!(res.is_err(), "caller {c} got an answer from a dead child");
        let after = at.saturating_duration_since(killed);
        ensure!(after < Duration::from_secs(1), "caller {c} took {after:?}");
    }
    ensure!(p.is_broken(), "not broken");
    ensure!(gone(pid), "zombie {pid}");
    let mut b = [0u8; 4];
    ensure!(
        matches!(p.try_read(at(0), &mut b), Err(ProxyError::Broken { .. })),
        "later call not refused"
    );
    Ok(())
}

fn main() {
    let cases: &[Case] = &[
        ("test_debug_label", test_debug_label),
        ("test_proxied_read_write", test_proxied_read_write),
        ("test_proxied_config", test_proxied_config),
        ("every_command", test_every_command),
        (
            "posted_writes_stay_ordered",
            test_posted_writes_stay_ordered,
        ),
        (
            "snapshot_restore_sleep_wake",
            test_snapshot_restore_sleep_wake,
        ),
        (
            "oversized_answers_are_bounded",
            test_oversized_answers_are_bounded,
        ),
        ("child_killed_mid_call", test_child_killed_mid_call),
        ("hung_child_times_out", test_hung_child_times_out),
        ("seccomp_kill_is_reported", test_seccomp_kill_is_reported),
        (
            "seccomp_kill_in_pid_namespace_is_relayed",
            test_seccomp_kill_in_pid_namespace_is_relayed,
        ),
        ("drop_shuts_down_and_reaps", test_drop_shuts_down_and_reaps),
        (
            "drop_kills_a_child_stuck_in_shutdown",
            test_drop_kills_a_child_stuck_in_shutdown,
        ),
        (
            "intf_crosses_processes_and_activates_once",
            test_intf_crosses_processes_and_activates_once,
        ),
        ("tight_seccomp_allow_list", test_tight_seccomp_allow_list),
        ("child_exits_when_vmm_dies", test_child_exits_when_vmm_dies),
        (
            "fork_from_multithreaded_process",
            test_fork_from_multithreaded_process,
        ),
        ("jailed_proxy_works", test_jailed_proxy_works),
        (
            "jailed_proxy_works_unprivileged",
            test_jailed_proxy_works_unprivileged,
        ),
        ("unprivileged_seccomp_kill", test_unprivileged_seccomp_kill),
        (
            "callers_keep_program_order",
            test_callers_keep_program_order,
        ),
        (
            "all_slots_taken_still_ordered",
            test_all_slots_taken_still_ordered,
        ),
        (
            "cross_caller_handoff_is_ordered",
            test_cross_caller_handoff_is_ordered,
        ),
        (
            "exited_callers_slots_are_reused",
            test_exited_callers_slots_are_reused,
        ),
        (
            "child_killed_while_callers_wait",
            test_child_killed_while_callers_wait,
        ),
    ];
    common::run(common::plain(cases));
}
