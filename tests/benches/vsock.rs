//! vsock throughput through the device with the simulated guest driver: MB/s for one
//! stream and for 16 streams, each direction, with 4 KiB and 64 KiB packets (guest TX
//! packet size, guest RX buffer size). Every byte is still pattern-checked on arrival,
//! so the figures include the simulated guest's and the host peers' work. After each
//! case the device's own CPU time and system calls per GiB moved are printed (the
//! calls counted with the kernel's `raw_syscalls:sys_enter` tracepoint, where perf
//! events are allowed).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use outboard_tests::{run_streams, temp_dir, Direction, Guest, GuestOptions};

/// Bytes moved per iteration, split over the streams.
const PER_ITER: u64 = 32 << 20;

fn vsock(c: &mut Criterion) {
    for (dir, name) in [
        (Direction::GuestToHost, "guest_to_host"),
        (Direction::HostToGuest, "host_to_guest"),
    ] {
        let mut group = c.benchmark_group(format!("vsock_{name}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::BytesDecimal(PER_ITER));
        for pkt in [4096u32, 65536] {
            let tmp = temp_dir("bench");
            let opts = GuestOptions {
                rx_buf_payload: pkt,
                ..GuestOptions::default()
            };
            let mut g = Guest::new(&tmp.join("v.sock"), opts);
            let counting = g.count_syscalls();
            if let Err(e) = &counting {
                eprintln!("vsock: device system calls not counted: {e}");
            }
            for streams in [1usize, 16] {
                let id = BenchmarkId::new(format!("{}KiB", pkt / 1024), format!("{streams}x"));
                let (mut cpu, mut moved, mut calls) = (Duration::ZERO, 0u64, 0u64);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let before = g.device_cpu;
                        let calls_before = g.device_syscalls;
                        let took = (0..iters)
                            .map(|_| {
                                run_streams(&mut g, streams, PER_ITER / streams as u64, pkt, dir)
                            })
                            .sum();
                        cpu += g.device_cpu - before;
                        calls += g.device_syscalls - calls_before;
                        moved += iters * PER_ITER;
                        took
                    })
                });
                let per_gib = (1u64 << 30) as f64 / moved.max(1) as f64;
                let calls = if counting.is_ok() {
                    format!("{:.0}", calls as f64 * per_gib)
                } else {
                    "n/a".to_string()
                };
                eprintln!(
                    "vsock_{name}/{}KiB/{streams}x: device CPU {:.1} ms and {calls} system \
                     calls per GiB moved",
                    pkt / 1024,
                    cpu.as_secs_f64() * 1000.0 * per_gib
                );
            }
        }
        group.finish();
    }
}

criterion_group!(benches, vsock);
criterion_main!(benches);
