//! `cargo xtask bench-e2e`: Outboard against vhost-device-vsock 0.3.0 under the e2e
//! harness's guest, per direction, interleaved, with the ratio per direction.
//!
//! Each round boots one guest per back-end, in turn (the order alternates from round to
//! round, so a drift of the machine falls on both), and runs four bulk phases through
//! it — guest->host and host->guest, one stream and 32 streams, each moving
//! `OUTBOARD_BENCH_MIB` MiB (default 256), every byte checked at the other end — then
//! 64-byte round trips both ways. For each phase it records what the back-end process
//! spent per GiB moved:
//!
//! - CPU: seconds the process's threads ran (perf's `task-clock`, in nanoseconds;
//!   `/proc/<pid>/stat`'s user + system ticks where perf cannot count);
//! - wake-ups: voluntary context switches of all its threads (each is a sleep the
//!   process was woken from; `/proc/<pid>/task/*/status`);
//! - system calls: `raw_syscalls:sys_enter` events of the process, counted by
//!   `perf stat -p` attached for the phase (Debian's `linux-perf`).
//!
//! The table shows each figure's median over `OUTBOARD_BENCH_ROUNDS` rounds (default
//! 3) and Outboard's ratio to the peer per phase, and the 64-byte round trips' median
//! and 99th percentile.
//!
//! Before each back-end's run the bench measures the copy floor of each direction on
//! this machine ([`copy_floor`]): the same bytes through an AF_UNIX socket with the
//! back-end's own system calls and nothing else. A back-end that copies once through a
//! host socket cannot spend less per GiB; the table gives the median over rounds of
//! each CPU figure's ratio to the floor measured just before it (the machine's speed
//! drifts from minute to minute; the ratio of the same minute drifts less).
//!
//! `OUTBOARD_BENCH_BACKENDS` (default `outboard,vhost-device-vsock`) picks the
//! back-ends. `OUTBOARD_BENCH_PROFILE=DIR` also records each phase with `perf record -g`
//! into `DIR/<back-end>-r<round>-<phase>.data` (for `perf report`); the figures of such
//! a run include perf's own overhead.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::e2e::{guest_to_host, host_to_guest, run_dir};
use crate::host::{self, Control};
use crate::util::{cpu_seconds, Result};
use crate::vm::{Backend, Vm};

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
const PINGS: u32 = 2000;
/// Streams of the many-stream phases.
const STREAMS: u32 = 32;

/// A bulk phase: direction and stream count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phase {
    to_host: bool,
    streams: u32,
}

const PHASES: [Phase; 4] = [
    Phase {
        to_host: true,
        streams: 1,
    },
    Phase {
        to_host: false,
        streams: 1,
    },
    Phase {
        to_host: true,
        streams: STREAMS,
    },
    Phase {
        to_host: false,
        streams: STREAMS,
    },
];

impl Phase {
    fn name(self) -> String {
        let dir = if self.to_host {
            "guest->host"
        } else {
            "host->guest"
        };
        let s = if self.streams == 1 { "" } else { "s" };
        format!("{dir}, {} stream{s}", self.streams)
    }
}

/// What one phase cost the back-end, per GiB moved.
#[derive(Debug, Default, Clone, Copy)]
struct Cost {
    mib_s: f64,
    cpu_s: f64,
    wakeups: f64,
    /// `None` when perf could not count.
    syscalls: Option<f64>,
}

/// One back-end's figures of one round.
#[derive(Debug, Default, Clone)]
struct Figures {
    /// [`copy_floor`] just before the run: guest->host, host->guest.
    floor: (f64, f64),
    phases: Vec<Cost>,
    /// 64-byte round trips, median and 99th percentile, microseconds.
    g2h_rtt_us: (f64, f64),
    h2g_rtt_us: (f64, f64),
}

/// Voluntary context switches of every thread of `pid` so far.
fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// `perf stat` counting the system calls and CPU time of `pid` until
/// [`stop_syscall_count`].
fn start_syscall_count(pid: u32, out: &std::path::Path) -> Option<Child> {
    perf_attach(
        &["stat", "-x,", "-e", "raw_syscalls:sys_enter,task-clock"],
        pid,
        out,
    )
}

/// `perf <args> -o <out> -p <pid>`, quiet (`None` when perf cannot start).
fn perf_attach(args: &[&str], pid: u32, out: &std::path::Path) -> Option<Child> {
    Command::new("perf")
        .args(args)
        .arg("-o")
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// Ends a [`perf_attach`] the way perf finishes its output: SIGINT, then waits.
fn perf_stop(mut child: Child) {
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
}

/// Stops a [`start_syscall_count`]; returns the system calls and the CPU seconds it
/// counted (each `None` when perf did not count it).
fn stop_syscall_count(child: Option<Child>, out: &std::path::Path) -> (Option<u64>, Option<f64>) {
    let Some(child) = child else {
        return (None, None);
    };
    perf_stop(child);
    let text = std::fs::read_to_string(out).unwrap_or_default();
    // CSV lines: value,unit,event,...
    let value = |event: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.split(',').nth(2).is_some_and(|e| e.starts_with(event)))
            .and_then(|l| l.split(',').next())
            .and_then(|n| n.trim().parse().ok())
    };
    let syscalls = value("raw_syscalls:sys_enter").map(|n| n as u64);
    // task-clock is in milliseconds.
    let cpu = value("task-clock").map(|ms| ms / 1000.0);
    (syscalls, cpu)
}

/// `perf record -g` of `pid` into `out` until [`perf_stop`] (`None` when perf cannot
/// start).
fn start_profile(pid: u32, out: &std::path::Path) -> Option<Child> {
    perf_attach(&["record", "-g", "-F", "4000"], pid, out)
}

fn phase(
    vm: &mut Vm,
    ctl: &mut Control,
    p: Phase,
    port: u32,
    bytes: u64,
    profile: Option<&std::path::Path>,
) -> Result<Cost> {
    let pid = vm.backend.as_ref().ok_or("no back-end")?.pid();
    let per_stream = bytes / u64::from(p.streams);
    let perf_out = vm.dir.join(format!("perf-{port}.csv"));
    let perf = start_syscall_count(pid, &perf_out);
    let record = profile.and_then(|out| start_profile(pid, out));
    // perf needs a moment to attach to every thread.
    thread::sleep(Duration::from_millis(300));
    let (cpu0, wake0) = (cpu_seconds(pid)?, wakeups(pid));
    let took = if p.to_host {
        guest_to_host(ctl, &vm.uds, port, p.streams, per_stream)?.2
    } else {
        host_to_guest(ctl, &vm.uds, port, p.streams, per_stream)?.2
    };
    let (cpu1, wake1) = (cpu_seconds(pid)?, wakeups(pid));
    let (syscalls, perf_cpu) = stop_syscall_count(perf, &perf_out);
    if let Some(r) = record {
        perf_stop(r);
    }
    let moved = (per_stream * u64::from(p.streams)) as f64;
    let gib = moved / GIB;
    Ok(Cost {
        mib_s: moved / MIB as f64 / took.as_secs_f64().max(1e-9),
        cpu_s: perf_cpu.unwrap_or(cpu1 - cpu0) / gib,
        wakeups: (wake1 - wake0) as f64 / gib,
        syscalls: syscalls.map(|n| n as f64 / gib),
    })
}

/// Runs the phases and round trips; `floor` is the [`copy_floor`] measured just before,
/// `profile` where `OUTBOARD_BENCH_PROFILE`'s recordings go and their name's start
/// (`DIR/<back-end>-r<round>`).
fn measure(
    vm: &mut Vm,
    bytes: u64,
    floor: (f64, f64),
    profile: Option<(&std::path::Path, String)>,
) -> Result<Figures> {
    let mut ctl = vm.control(Duration::from_secs(180))?;
    let uds = vm.uds.clone();
    let mut phases = Vec::new();
    for (i, p) in PHASES.iter().enumerate() {
        let out = profile.as_ref().map(|(dir, prefix)| {
            let dir_ = if p.to_host { "g2h" } else { "h2g" };
            dir.join(format!("{prefix}-{dir_}-{}.data", p.streams))
        });
        let cost = phase(
            vm,
            &mut ctl,
            *p,
            5101 + 10 * i as u32,
            bytes,
            out.as_deref(),
        )?;
        println!("bench-e2e:   {}: {cost:?}", p.name());
        phases.push(cost);
    }
    let g2h_rtt_us = ping_from_guest(&mut ctl, &uds)?;
    let h2g_rtt_us = ping_from_host(&mut ctl, &uds)?;
    Ok(Figures {
        floor,
        phases,
        g2h_rtt_us,
        h2g_rtt_us,
    })
}

/// The median of `v` (0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median and 99th percentile of `sorted` (ascending), in microseconds.
fn percentiles(sorted: &[Duration]) -> (f64, f64) {
    let at = |q: usize| {
        let i = (sorted.len() * q / 100).min(sorted.len().saturating_sub(1));
        sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    (at(50), at(99))
}

fn ping_from_guest(ctl: &mut Control, uds: &std::path::Path) -> Result<(f64, f64)> {
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
    // The median and p99, not the average, which one descheduled round trip on a
    // shared machine skews.
    let ns = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("malformed PING result {answer:?}"))
    };
    Ok((ns(3)? / 1000.0, ns(4)? / 1000.0))
}

fn ping_from_host(ctl: &mut Control, uds: &std::path::Path) -> Result<(f64, f64)> {
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
    Ok(percentiles(&rtt))
}

/// Bytes each [`copy_floor`] direction moves.
const FLOOR_BYTES: u64 = 1 << 30;
/// Guest packet size: what one guest->host packet carries (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`), one `sendmsg` of the back-end's.
const FLOOR_SEND: usize = 64 * 1024;
/// A Linux guest's RX buffer (`VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE`) and how many of them
/// one host read fills at most (the device's `MAX_RX_CHAINS`).
const FLOOR_RX_BUF: usize = 4096;
const FLOOR_RX_BUFS: usize = 64;

/// CPU seconds the calling thread ran so far.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the
    // kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The copy floor of each direction, in CPU seconds per GiB: what moving
/// [`FLOOR_BYTES`] through an AF_UNIX stream socket costs the thread on the back-end's
/// side with the back-end's own pattern and nothing else (no rings, no eventfds, no
/// epoll): guest->host, `write`s of one guest packet ([`FLOOR_SEND`]) from a 256 MiB
/// buffer (guest memory); host->guest, `readv` into [`FLOOR_RX_BUFS`] buffers of
/// [`FLOOR_RX_BUF`] spread over it. A thread on the other end reads or writes 1 MiB at a
/// time, as the bench's host side does.
fn copy_floor() -> Result<(f64, f64)> {
    use std::io::IoSliceMut;
    use std::os::unix::net::UnixStream;
    const MEM: usize = 256 << 20;
    let mut mem = vec![0x5au8; MEM];
    let io = |e: std::io::Error| format!("copy floor: {e}");
    // guest->host
    let (mut ours, mut peer) = UnixStream::pair().map_err(io)?;
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while matches!(peer.read(&mut buf), Ok(n) if n > 0) {}
    });
    let t0 = thread_cpu();
    let (mut moved, mut at) = (0u64, 0usize);
    while moved < FLOOR_BYTES {
        ours.write_all(&mem[at..at + FLOOR_SEND]).map_err(io)?;
        moved += FLOOR_SEND as u64;
        at = (at + FLOOR_SEND) % MEM;
    }
    let g2h = (thread_cpu() - t0) * GIB / moved as f64;
    drop(ours);
    let _ = reader.join();
    // host->guest
    let (mut ours, mut peer) = UnixStream::pair().map_err(io)?;
    let writer = thread::spawn(move || {
        let buf = vec![0xa5u8; 1 << 20];
        let mut left = FLOOR_BYTES;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            if peer.write_all(&buf[..n]).is_err() {
                return;
            }
            left -= n as u64;
        }
    });
    let t0 = thread_cpu();
    let (mut moved, mut at) = (0u64, 0usize);
    // Guest RX buffers sit apart, each after its 44-byte packet header.
    let stride = FLOOR_RX_BUF + 44;
    while moved < FLOOR_BYTES {
        if at + FLOOR_RX_BUFS * stride > MEM {
            at = 0;
        }
        let mut bufs: Vec<IoSliceMut<'_>> = mem[at..at + FLOOR_RX_BUFS * stride]
            .chunks_mut(stride)
            .map(|c| IoSliceMut::new(&mut c[..FLOOR_RX_BUF]))
            .collect();
        let n = ours.read_vectored(&mut bufs).map_err(io)?;
        if n == 0 {
            break;
        }
        moved += n as u64;
        at += FLOOR_RX_BUFS * stride;
    }
    let h2g = (thread_cpu() - t0) * GIB / moved.max(1) as f64;
    let _ = writer.join();
    Ok((g2h, h2g))
}

/// Runs `rounds` interleaved rounds against each back-end and prints the table.
pub fn run(backends: Vec<Backend>, bytes: u64, rounds: usize) -> Result<()> {
    let assets = crate::setup::prepare(&crate::setup::cache_dir())?;
    let names: Vec<&'static str> = backends.iter().map(|b| b.name()).collect();
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); backends.len()];
    let profile = std::env::var_os("OUTBOARD_BENCH_PROFILE").map(std::path::PathBuf::from);
    if let Some(dir) = &profile {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        println!(
            "bench-e2e: recording profiles into {} (the figures include perf's overhead)",
            dir.display()
        );
    }
    for round in 0..rounds.max(1) {
        let mut order: Vec<usize> = (0..backends.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let name = names[i];
            let floor = copy_floor()?;
            println!(
                "bench-e2e: round {}, {name}: copy floor guest->host {:.3}, host->guest {:.3} \
                 CPU s/GiB; booting",
                round + 1,
                floor.0,
                floor.1
            );
            let mut vm = Vm::boot(&assets, backends[i].clone(), &run_dir("bench"))?;
            let prefix = format!("{name}-r{}", round + 1);
            match measure(
                &mut vm,
                bytes,
                floor,
                profile.as_deref().map(|d| (d, prefix)),
            ) {
                Ok(f) => {
                    results[i].push(f);
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
    }
    print_table(&names, &results, bytes, rounds);
    Ok(())
}

fn print_table(names: &[&str], results: &[Vec<Figures>], bytes: u64, rounds: usize) {
    println!(
        "\nbench-e2e: {} MiB per phase, median of {rounds} round(s); per GiB moved, \
         the back-end process's CPU seconds, wake-ups and system calls",
        bytes / MIB
    );
    let med = |b: usize, f: &dyn Fn(&Figures) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = results[b].iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let fmt = |v: Option<f64>, prec: usize| {
        v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.prec$}"))
    };
    print!("{:<24}", "phase");
    for n in names {
        print!(
            " | {:>20} {:>9} {:>9} {:>11} {:>9}",
            n, "CPU s", "wake-ups", "syscalls", "MiB/s"
        );
    }
    if names.len() == 2 {
        print!(" | {:>9} {:>9} {:>9}", "CPU x", "wake x", "sysc x");
    }
    print!(" | {:>7}", "floor s");
    for n in names {
        print!(" {:>20}", format!("{n} x floor"));
    }
    println!();
    let floors: Vec<(f64, f64)> = results.iter().flatten().map(|f| f.floor).collect();
    let floor_g2h = (!floors.is_empty()).then(|| median(floors.iter().map(|f| f.0).collect()));
    let floor_h2g = (!floors.is_empty()).then(|| median(floors.iter().map(|f| f.1).collect()));
    for (i, p) in PHASES.iter().enumerate() {
        print!("{:<24}", p.name());
        let mut cols = Vec::new();
        for b in 0..names.len() {
            let cpu = med(b, &|f| f.phases.get(i).map(|c| c.cpu_s));
            let wake = med(b, &|f| f.phases.get(i).map(|c| c.wakeups));
            let sys = med(b, &|f| f.phases.get(i).and_then(|c| c.syscalls));
            let mib = med(b, &|f| f.phases.get(i).map(|c| c.mib_s));
            print!(
                " | {:>20} {:>9} {:>9} {:>11} {:>9}",
                "",
                fmt(cpu, 3),
                fmt(wake, 0),
                fmt(sys, 0),
                fmt(mib, 1)
            );
            cols.push((cpu, wake, sys));
        }
        let floor = if p.to_host { floor_g2h } else { floor_h2g };
        if let [(Some(c0), Some(w0), s0), (Some(c1), Some(w1), s1)] = cols.as_slice() {
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}", a / b)
                } else {
                    "n/a".into()
                }
            };
            let sys = match (s0, s1) {
                (Some(a), Some(b)) => ratio(*a, *b),
                _ => "n/a".into(),
            };
            print!(
                " | {:>9} {:>9} {:>9}",
                ratio(*c0, *c1),
                ratio(*w0, *w1),
                sys
            );
        }
        print!(" | {:>7}", fmt(floor, 3));
        for b in 0..names.len() {
            let x = med(b, &|f| {
                let floor = if p.to_host { f.floor.0 } else { f.floor.1 };
                let cpu = f.phases.get(i)?.cpu_s;
                (floor > 0.0).then(|| cpu / floor)
            });
            print!(" {:>20}", fmt(x, 2));
        }
        println!();
    }
    for (label, f) in [
        (
            "64 B RTT g->h p50 us",
            &(|x: &Figures| Some(x.g2h_rtt_us.0)) as &dyn Fn(&Figures) -> Option<f64>,
        ),
        ("64 B RTT g->h p99 us", &|x: &Figures| Some(x.g2h_rtt_us.1)),
        ("64 B RTT h->g p50 us", &|x: &Figures| Some(x.h2g_rtt_us.0)),
        ("64 B RTT h->g p99 us", &|x: &Figures| Some(x.h2g_rtt_us.1)),
    ] {
        print!("{label:<24}");
        for b in 0..names.len() {
            print!(" | {:>20} {:>9}", "", fmt(med(b, f), 1));
        }
        println!();
    }
}
