//! A `BusDevice` running in a jailed child process behind a `ProxyDevice`.
//!
//! The device is a scratch register (offset 0) that also reports the user id (offset 4)
//! and process id (offset 8) it sees. `ProxyDevice::new` forks a child, confines it with
//! `Jail::sandboxed()` (user, pid, mount, net, IPC, UTS and cgroup namespaces, an empty
//! read-only root, `no_new_privs`, no capabilities) and runs the device there; the
//! example then writes and reads the register through the proxy, as a vCPU thread of a
//! VMM would on an MMIO exit.
//!
//! The jail needs user namespaces. Root can always create them; an unprivileged user
//! only where the kernel allows it (`kernel.unprivileged_userns_clone`,
//! `user.max_user_namespaces`, AppArmor's `apparmor_restrict_unprivileged_userns`). If
//! the jail cannot be set up the example says why and exits with status 1.
//!
//! Run it with `cargo run -p outboard-sandbox --example jailed_device`.

use std::process::ExitCode;

use outboard_devices::bus::{BusAccessInfo, BusDevice, Suspendable};
use outboard_sandbox::{Jail, ProxyDevice};

/// A 32-bit scratch register, plus what the device process sees of itself.
struct Scratch {
    value: u32,
}

impl Suspendable for Scratch {}

impl BusDevice for Scratch {
    fn debug_label(&self) -> String {
        "scratch".into()
    }

    fn read(&mut self, info: BusAccessInfo, data: &mut [u8]) {
        let v = match info.offset {
            0 => self.value,
            4 => rustix::process::getuid().as_raw(),
            8 => rustix::process::getpid().as_raw_nonzero().get() as u32,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, info: BusAccessInfo, data: &[u8]) {
        if info.offset == 0 {
            let mut bytes = [0u8; 4];
            let n = data.len().min(4);
            bytes[..n].copy_from_slice(&data[..n]);
            self.value = u32::from_le_bytes(bytes);
        }
    }
}

fn at(offset: u64) -> BusAccessInfo {
    BusAccessInfo {
        offset,
        address: 0xd000_0000 + offset,
        id: 0,
    }
}

fn read_u32(dev: &mut ProxyDevice, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    dev.read(at(offset), &mut data);
    u32::from_le_bytes(data)
}

fn main() -> ExitCode {
    // Fork before starting any thread (see outboard_sandbox::jail).
    let mut dev = match ProxyDevice::new(Scratch { value: 0 }, &Jail::sandboxed(), &[]) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("cannot run the device in a jail: {e}");
            if !rustix::process::geteuid().is_root() {
                eprintln!(
                    "the jail needs a user namespace, which unprivileged users get only where \
                     the kernel allows it: run as root, or allow them (sysctl \
                     kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0, \
                     kernel.apparmor_restrict_unprivileged_userns=0)"
                );
            }
            return ExitCode::FAILURE;
        }
    };
    println!(
        "vmm: device {:?} runs jailed in process {}",
        dev.debug_label(),
        dev.pid()
    );
    dev.write(at(0), &0xdead_beefu32.to_le_bytes());
    let value = read_u32(&mut dev, 0);
    let uid = read_u32(&mut dev, 4);
    let pid = read_u32(&mut dev, 8);
    println!("vmm: wrote 0xdeadbeef, read back {value:#x}; inside the jail the device is uid {uid}, pid {pid}");
    if value != 0xdead_beef || dev.is_broken() {
        eprintln!("the proxy did not carry the write and the read");
        return ExitCode::FAILURE;
    }
    drop(dev);
    println!("jailed ProxyDevice: one write and one read through the proxy, child shut down");
    ExitCode::SUCCESS
}
