//! The virtio-rng device of Outboard's `rng_device` example, written on rust-vmm's
//! `vhost-user-backend`, for `cargo xtask device-cost`: one queue of device-writable
//! buffers filled from the host's `/dev/urandom`, served on `--socket-path PATH` or an
//! inherited listening socket `--fd N`, one front-end after the other. (No clean stop
//! on SIGTERM, no socket activation, no jail: the process just dies.)

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

struct Rng {
    urandom: File,
    mem: Option<Mem>,
}

impl VhostUserBackendMut for Rng {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        1024
    }
    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn update_memory(&mut self, mem: Mem) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let (Some(vring), Some(mem)) = (vrings.get(usize::from(device_event)), &self.mem) else {
            return Ok(());
        };
        let mem = mem.memory();
        loop {
            let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
                Ok(iter) => iter.collect(),
                Err(_) => break,
            };
            for chain in chains {
                let head = chain.head_index();
                let mut len = 0u32;
                for desc in chain.clone().filter(|d| d.is_write_only()) {
                    match mem.read_volatile_from(
                        desc.addr(),
                        &mut self.urandom,
                        desc.len() as usize,
                    ) {
                        Ok(n) => len += n as u32,
                        Err(_) => break,
                    }
                }
                if vring.add_used(head, len).is_err() {
                    break;
                }
            }
            if !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        vring.signal_used_queue()
    }
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (flag, value) = (args.next(), args.next());
    let (path, mut listener) = match (flag.as_deref(), value) {
        (Some("--socket-path"), Some(path)) => (Some(path), None),
        (Some("--fd"), Some(fd)) => {
            let fd: RawFd = fd.parse().map_err(|_| format!("--fd {fd}: not an fd"))?;
            // SAFETY: the --fd contract hands this process the listening socket to own.
            (None, Some(unsafe { Listener::from_raw_fd(fd) }))
        }
        _ => return Err("usage: rng-rust-vmm --socket-path PATH | --fd N".into()),
    };
    let urandom = File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
    let backend = Arc::new(RwLock::new(Rng { urandom, mem: None }));
    loop {
        // A daemon serves one front-end: a new one for each (the owner stays claimed).
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new("rng".into(), backend.clone(), mem).map_err(|e| e.to_string())?;
        let result = match (&path, listener.as_mut()) {
            (Some(path), _) => daemon.serve(path),
            (None, Some(listener)) => daemon.start(listener).and_then(|()| daemon.wait()),
            (None, None) => unreachable!("one of the two is set above"),
        };
        if let Err(e) = result {
            eprintln!("rng: the front-end connection ended: {e}");
        }
    }
}
