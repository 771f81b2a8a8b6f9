//! `cargo xtask demo`: boots a guest and gives the host a shell inside it, over vsock.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use crate::e2e::run_dir;
use crate::host;
use crate::util::Result;
use crate::vm::{Backend, Vm};

const SHELL_PORT: u32 = 7000;

/// What the demo types when nobody is at a terminal.
const SCRIPT: &[&str] = &[
    "echo \"hello from $(uname -n) in the guest: this shell talks to you over virtio-vsock\"",
    "uname -sr",
    "grep -c processor /proc/cpuinfo",
    "ls /sys/bus/virtio/drivers",
    "exit",
];

/// Boots, opens the shell, and bridges it to the terminal (or plays `SCRIPT`).
pub fn run(backend: Backend) -> Result<()> {
    let assets = crate::setup::prepare(&crate::setup::cache_dir())?;
    let dir = run_dir("demo");
    println!(
        "demo: starting {} as the vhost-user vsock back-end",
        backend.name()
    );
    println!(
        "demo: booting a Debian kernel + busybox guest under QEMU ({}, a few seconds)",
        assets.accel
    );
    let mut vm = Vm::boot(&assets, backend, &dir)?;
    let r = session(&mut vm);
    if r.is_err() {
        vm.dump_logs();
    }
    println!("demo: stopping QEMU and the back-end");
    drop(vm);
    if r.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

fn session(vm: &mut Vm) -> Result<()> {
    let mut ctl = vm.control(Duration::from_secs(180))?;
    println!(
        "demo: the guest is up ({:.1}s); its agent answered on vsock port {}",
        vm.started.elapsed().as_secs_f64(),
        host::CONTROL_PORT
    );
    ctl.command_ready(&format!("SHELL {SHELL_PORT}"), Duration::from_secs(30))?;
    println!(
        "demo: host connects to {} and writes \"CONNECT {SHELL_PORT}\" (Firecracker's convention)",
        vm.uds.display()
    );
    let (s, port) = host::connect_guest(&vm.uds, SHELL_PORT, Duration::from_secs(30))?;
    println!("demo: back-end answered \"OK {port}\"; a shell in the guest is on the other end\n");
    let mut reader = s.try_clone().map_err(|e| format!("dup socket: {e}"))?;
    let printer = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
        }
    });
    let mut writer = s;
    if std::io::stdin().is_terminal() {
        println!("demo: type commands for the guest's shell; `exit` or Ctrl-D ends the demo");
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if writer.write_all(format!("{line}\n").as_bytes()).is_err() {
                break;
            }
        }
    } else {
        for cmd in SCRIPT {
            thread::sleep(Duration::from_millis(700));
            println!("\ndemo: host types: {cmd}");
            writer
                .write_all(format!("{cmd}\n").as_bytes())
                .map_err(|e| format!("send to the guest shell: {e}"))?;
        }
    }
    let _ = writer.shutdown(Shutdown::Write);
    let _ = printer.join();
    let done = ctl.answer(Duration::from_secs(30))?;
    println!("\ndemo: the guest shell ended ({done}); everything above crossed virtio-vsock");
    Ok(())
}
