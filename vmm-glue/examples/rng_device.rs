//! A whole vhost-user device daemon: virtio-rng (virtio 1.3, 5.4 "Entropy Device") on
//! Outboard's crates, with the daemon's reconnection, `--fd`, systemd socket
//! activation, SIGTERM/SIGINT and, with the `jail` feature, `--jail`.
//!
//! ```text
//! cargo run -p outboard-vmm-glue --example rng_device --features jail -- --socket-path /tmp/rng.sock [--jail]
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \
//!     -machine q35,memory-backend=mem -chardev socket,id=rng,path=/tmp/rng.sock,reconnect-ms=1000 \
//!     -device vhost-user-rng-pci,chardev=rng
//! ```
//!
//! The guest's `virtio_rng` driver binds to it and `/dev/hwrng` reads random bytes from
//! the host's `/dev/urandom`. `cargo xtask rng-guest` runs exactly this against a real
//! Linux guest under QEMU, plain and jailed.

use std::fs::File;
use std::os::fd::{AsFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use outboard_devices::virtio::{
    id, signal_used, ActivateError, ChainWriter, DescChain, Interrupt, QueueError, VirtQueue,
    VirtioDevice,
};
use outboard_vmm_glue::supervisor::{listen_once, Service, StopSignals, Supervisor, ThreadService};
use outboard_vmm_glue::vhost_user::daemon;

/// The device: one queue of device-writable buffers, each filled from `/dev/urandom`.
/// No config space, no feature bit of its own: the trait's defaults cover the rest.
struct Rng {
    urandom: File,
    queues: Vec<Box<dyn VirtQueue>>,
    irq: Option<Arc<dyn Interrupt>>,
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        id::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn activate(
        &mut self,
        queues: Vec<Box<dyn VirtQueue>>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        (self.queues, self.irq) = (queues, Some(irq));
        Ok(())
    }
    fn reset(&mut self) {
        (self.queues, self.irq) = (Vec::new(), None);
    }
    fn handle_queue(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        let mut chain = DescChain::default();
        loop {
            match queue.pop(&mut chain) {
                Ok(true) => {}
                // Nothing left: re-enable kicks, and go on if buffers came meanwhile.
                Ok(false) if queue.enable_notification() == Ok(true) => continue,
                Ok(false) => break,
                Err(QueueError::BadChain { head, .. }) => {
                    let _ = queue.add_used(head, 0);
                    continue;
                }
                Err(_) => break, // a broken ring: stopped until reset, never retried
            }
            // Straight from /dev/urandom into the guest's buffer (one readv, no copy).
            let mut w = ChainWriter::new(&chain.writable);
            let _ = w.write_from_fd(self.urandom.as_fd(), 1 << 16);
            if queue.add_used(chain.head, w.written() as u32).is_err() {
                break;
            }
        }
        signal_used(&mut self.queues, index, self.irq.as_deref());
    }
}

/// `--socket-path PATH`, `--fd N` (an inherited listening socket), `--jail`.
#[derive(Default)]
struct Args {
    socket_path: Option<PathBuf>,
    fd: Option<RawFd>,
    jail: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket-path" => args.socket_path = Some(value()?.into()),
            "--fd" => {
                let v = value()?;
                args.fd = Some(v.parse().map_err(|_| format!("--fd {v}: not an fd"))?);
            }
            "--jail" => args.jail = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn run(args: Args) -> Result<bool, String> {
    outboard_vmm_glue::logging::init_stderr(log::LevelFilter::Info);
    // Before any thread starts, so that only the supervisor sees SIGTERM and SIGINT.
    let signals = StopSignals::block().map_err(|e| format!("blocking signals: {e}"))?;
    let (listener, created, shown) = listen_once(args.socket_path.as_deref(), args.fd)?;
    let urandom = File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
    eprintln!("rng: serving virtio-rng on vhost-user socket {shown}");
    let service: Box<dyn Service> = if args.jail {
        jailed(listener, urandom, created)?
    } else {
        let service = ThreadService::new("rng", "rng", created, move |stop| {
            let rng = Rng {
                urandom,
                queues: Vec::new(),
                irq: None,
            };
            // Serves one front-end after the other until `stop`.
            daemon::serve(rng, listener, 1024, &stop, "rng").map_err(|e| e.to_string())?;
            Ok(())
        });
        Box::new(service.map_err(|e| format!("eventfd: {e}"))?)
    };
    Ok(Supervisor::new(None).run(&mut [service], &signals))
}

/// The worker in a jailed child (empty root, namespaces, seccomp), restarted when it
/// dies; `/dev/urandom` is opened here and inherited, as the jail has no `/dev`.
#[cfg(feature = "jail")]
fn jailed(
    listener: std::os::unix::net::UnixListener,
    urandom: File,
    created: Vec<PathBuf>,
) -> Result<Box<dyn Service>, String> {
    use outboard_vmm_glue::jail::{worker_jail, SeccompMode, WorkerLimits};
    use outboard_vmm_glue::supervisor::JailedService;
    use std::os::fd::OwnedFd;
    let jail =
        worker_jail(&[], SeccompMode::Kill, WorkerLimits::default()).map_err(|e| e.to_string())?;
    let serve = Box::new(|listener, fds: Vec<OwnedFd>, stop: &_| {
        let urandom = fds.into_iter().next().ok_or("no /dev/urandom fd")?;
        let rng = Rng {
            urandom: File::from(urandom),
            queues: Vec::new(),
            irq: None,
        };
        daemon::serve(rng, listener, 1024, stop, "rng").map_err(|e| e.to_string())?;
        Ok(())
    });
    let service = JailedService::new("rng", jail, listener, serve)
        .inherit([OwnedFd::from(urandom)])
        .created(created);
    Ok(Box::new(service))
}

#[cfg(not(feature = "jail"))]
fn jailed(
    _: std::os::unix::net::UnixListener,
    _: File,
    _: Vec<PathBuf>,
) -> Result<Box<dyn Service>, String> {
    Err("--jail needs the jail feature (--features jail)".into())
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rng: {e}");
            ExitCode::from(2)
        }
    }
}
