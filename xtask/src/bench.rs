//! `cargo xtask bench-e2e`: the e2e harness run once per back-end (Outboard and
//! vhost-device-vsock 0.3.0), measuring throughput, 64-byte round trips and the
//! back-end's CPU time per GiB moved.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use crate::e2e::{guest_to_host, host_to_guest, run_dir};
use crate::host::{self, Control};
use crate::util::{cpu_seconds, Result};
use crate::vm::{Backend, Vm};

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
const PINGS: u32 = 2000;

/// One back-end's figures.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    /// Guest -> host MiB/s.
    pub g2h_mib_s: f64,
    /// Host -> guest MiB/s.
    pub h2g_mib_s: f64,
    /// Guest-initiated 64-byte round trip, microseconds (median).
    pub g2h_rtt_us: f64,
    /// Host-initiated 64-byte round trip, microseconds (median).
    pub h2g_rtt_us: f64,
    /// Back-end CPU seconds per GiB moved over the bulk transfers.
    pub cpu_s_per_gib: f64,
}

fn measure(vm: &mut Vm, bytes: u64) -> Result<Figures> {
    let pid = vm.backend.as_ref().ok_or("no back-end")?.pid();
    let mut ctl = vm.control(Duration::from_secs(180))?;
    let uds = vm.uds.clone();
    let cpu0 = cpu_seconds(pid)?;
    let (_, _, g2h) = guest_to_host(&mut ctl, &uds, 5101, 1, bytes)?;
    let (_, _, h2g) = host_to_guest(&mut ctl, &uds, 5102, 1, bytes)?;
    let cpu = cpu_seconds(pid)? - cpu0;
    if let Backend::Outboard(_) = vm.kind {
        // The daemon rewrites its metrics every second: show the packet counts.
        thread::sleep(Duration::from_millis(1500));
        let m = crate::util::read_log(&vm.dir.join("metrics.json"));
        let counters: Vec<&str> = m
            .lines()
            .map(str::trim)
            .filter(|l| ["\"rx_", "\"tx_"].iter().any(|p| l.starts_with(p)))
            .collect();
        println!(
            "bench-e2e: outboard counters after the bulk transfers: {}",
            counters.join(" ")
        );
    }
    let g2h_rtt_us = ping_from_guest(&mut ctl, &uds)?;
    let h2g_rtt_us = ping_from_host(&mut ctl, &uds)?;
    let mib = bytes as f64 / MIB as f64;
    Ok(Figures {
        g2h_mib_s: mib / g2h.as_secs_f64(),
        h2g_mib_s: mib / h2g.as_secs_f64(),
        g2h_rtt_us,
        h2g_rtt_us,
        cpu_s_per_gib: cpu / (2.0 * bytes as f64 / GIB),
    })
}

fn ping_from_guest(ctl: &mut Control, uds: &std::path::Path) -> Result<f64> {
    let l = host::listen(uds, 5103)?;
    let echo = thread::spawn(move || -> Result<()> {
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => s.write_all(&buf[..n]).map_err(|e| format!("echo: {e}"))?,
                Err(e) => return Err(format!("echo read: {e}")),
            }
        }
    });
    let answer = ctl.command(&format!("PING 5103 {PINGS} 64"), Duration::from_secs(600))?;
    echo.join().map_err(|_| "echo panicked".to_string())??;
    let f: Vec<&str> = answer.split_whitespace().collect();
    // The median: one descheduled round trip on a shared machine skews an average.
    let ns: f64 = f
        .get(3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("malformed PING result {answer:?}"))?;
    Ok(ns / 1000.0)
}

fn ping_from_host(ctl: &mut Control, uds: &std::path::Path) -> Result<f64> {
    ctl.command_ready("ECHO 5104", Duration::from_secs(30))?;
    let (mut s, _) = host::connect_guest(uds, 5104, Duration::from_secs(30))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| format!("set timeout: {e}"))?;
    let out = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut rtt = Vec::with_capacity(PINGS as usize);
    for i in 0..PINGS {
        let start = Instant::now();
        s.write_all(&out).map_err(|e| format!("ping {i}: {e}"))?;
        s.read_exact(&mut back)
            .map_err(|e| format!("pong {i}: {e}"))?;
        rtt.push(start.elapsed());
    }
    drop(s);
    ctl.answer(Duration::from_secs(30))?;
    rtt.sort();
    let median = rtt.get(rtt.len() / 2).copied().unwrap_or_default();
    Ok(median.as_secs_f64() * 1e6)
}

/// Runs the benchmark against each back-end and prints the table.
pub fn run(backends: Vec<Backend>, bytes: u64) -> Result<()> {
    let assets = crate::setup::prepare(&crate::setup::cache_dir())?;
    let mut rows = Vec::new();
    for b in backends {
        let name = b.name();
        println!("bench-e2e: {name}: booting");
        let mut vm = Vm::boot(&assets, b, &run_dir("bench"))?;
        match measure(&mut vm, bytes) {
            Ok(f) => {
                println!("bench-e2e: {name}: {f:?}");
                rows.push((name, f));
                let dir = vm.dir.clone();
                drop(vm);
                let _ = std::fs::remove_dir_all(dir);
            }
            Err(e) => {
                vm.dump_logs();
                return Err(format!("{name}: {e}"));
            }
        }
    }
    println!(
        "\n{:<20} {:>12} {:>12} {:>14} {:>14} {:>12}",
        "back-end", "g2h MiB/s", "h2g MiB/s", "g2h RTT50 us", "h2g RTT50 us", "CPU s/GiB"
    );
    for (name, f) in &rows {
        println!(
            "{:<20} {:>12.1} {:>12.1} {:>14.1} {:>14.1} {:>12.3}",
            name, f.g2h_mib_s, f.h2g_mib_s, f.g2h_rtt_us, f.h2g_rtt_us, f.cpu_s_per_gib
        );
    }
    if let [(a, x), (b, y)] = rows.as_slice() {
        println!(
            "{:<20} {:>11.2}x {:>11.2}x {:>13.2}x {:>13.2}x {:>11.2}x",
            format!("{a}/{b}"),
            x.g2h_mib_s / y.g2h_mib_s,
            x.h2g_mib_s / y.h2g_mib_s,
            x.g2h_rtt_us / y.g2h_rtt_us,
            x.h2g_rtt_us / y.h2g_rtt_us,
            x.cpu_s_per_gib / y.cpu_s_per_gib
        );
    }
    Ok(())
}
