//! A whole vhost-user device daemon: virtio-rng (virtio 1.3, 5.4 "Entropy Device") on
//! Outboard's crates, with the daemon's reconnection, `--fd`, systemd socket
//! activation, SIGTERM/SIGINT and, with the `jail` feature, `--jail`
//! (`outboard_vmm_glue::device_daemon::run`).
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
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;

use outboard_devices::virtio::{
    id, signal_used, ActivateError, ChainWriter, DescChain, Interrupt, QueueError, VirtQueue,
    VirtioDevice,
};
use outboard_vmm_glue::device_daemon;

/// The device: one queue of device-writable buffers, each filled from `/dev/urandom`.
/// No config space, no feature bit of its own: the trait's defaults cover the rest.
struct Rng {
    urandom: OwnedFd,
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

fn main() -> ExitCode {
    // Opened here and handed to the device (a jailed worker has no /dev to open it from).
    let urandom = match File::open("/dev/urandom") {
        Ok(file) => OwnedFd::from(file),
        Err(e) => return device_daemon::fail("rng", format!("/dev/urandom: {e}")),
    };
    // `--socket-path PATH`, `--fd N` or socket activation, `--jail`; until SIGTERM.
    device_daemon::run("rng", vec![urandom], |mut fds| {
        let urandom = fds.pop().ok_or("no /dev/urandom fd")?;
        let (queues, irq) = (Vec::new(), None);
        Ok(Rng {
            urandom,
            queues,
            irq,
        })
    })
}
