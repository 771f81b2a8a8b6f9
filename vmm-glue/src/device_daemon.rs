//! A whole single-device vhost-user daemon in one call: [`run`] parses the command line
//! ([`Args`]: `--socket-path PATH`, `--fd N`, `--jail`), takes the listening socket
//! (a bound path, an inherited one, or systemd socket activation), blocks SIGTERM and
//! SIGINT for the supervisor, logs to stderr, and serves the device one front-end after
//! the other ([`crate::vhost_user::daemon::serve`]) on a thread, or with `--jail` (feature
//! `jail`) in a jailed child that is restarted when it dies, until a stop signal.
//!
//! The device is built by a function of the fds the daemon opened for it (`fds`,
//! in order): on the worker thread once, in each jailed child from its inherited
//! copies (the jail has no `/dev` and no file system to open them from).
//!
//! ```no_run
//! # fn rng(_: Vec<std::os::fd::OwnedFd>) -> outboard_devices::testing::EchoDevice {
//! #     outboard_devices::testing::EchoDevice::new(&[256])
//! # }
//! use std::process::ExitCode;
//! use outboard_vmm_glue::device_daemon;
//!
//! fn main() -> ExitCode {
//!     let urandom = match std::fs::File::open("/dev/urandom") {
//!         Ok(f) => f,
//!         Err(e) => return device_daemon::fail("rng", format!("/dev/urandom: {e}")),
//!     };
//!     device_daemon::run("rng", vec![urandom.into()], |fds| Ok(rng(fds)))
//! }
//! ```

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use outboard_devices::virtio::VirtioDevice;

use crate::supervisor::{listen_once, Service, StopSignals, Supervisor, ThreadService};
use crate::vhost_user::daemon;

/// The largest ring a front-end may set up (`SET_VRING_NUM`), as rust-vmm's
/// vhost-user daemons accept.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// The command line of a single-device daemon, by the vhost-user back-end conventions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    /// `--socket-path PATH`: bind the vhost-user socket there (a stale socket file is
    /// replaced, anything else refused).
    pub socket_path: Option<PathBuf>,
    /// `--fd N`: an inherited listening AF_UNIX socket, owned by the daemon.
    pub fd: Option<RawFd>,
    /// `--jail`: the worker in a jailed child (feature `jail`).
    pub jail: bool,
}

impl Args {
    /// Parses `args` (the program name left out); an unknown argument or a missing or
    /// bad value is an error naming it. Neither `--socket-path` nor `--fd` is fine:
    /// the socket may come from systemd socket activation.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--socket-path" => parsed.socket_path = Some(value()?.into()),
                "--fd" => {
                    let v = value()?;
                    parsed.fd = Some(v.parse().map_err(|_| format!("--fd {v}: not an fd"))?);
                }
                "--jail" => parsed.jail = true,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(parsed)
    }
}

/// The daemon's exit after an error: `name: error` on stderr, status 2.
pub fn fail(name: &str, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("{name}: {error}");
    ExitCode::from(2)
}

/// Runs the daemon named `name` with the process's arguments until SIGTERM or SIGINT
/// ([`run_with`]): exit status 0 after a clean stop, 1 when a worker failed, 2 for a
/// bad command line or a socket that cannot be had.
pub fn run<D, F>(name: &str, fds: Vec<OwnedFd>, device: F) -> ExitCode
where
    D: VirtioDevice + 'static,
    F: Fn(Vec<OwnedFd>) -> Result<D, String> + Send + 'static,
{
    match Args::parse(std::env::args().skip(1)).and_then(|a| run_with(name, &a, fds, device)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(name, e),
    }
}

/// Serves the device `device(fds)` builds as `args` say until SIGTERM or SIGINT;
/// `Ok(false)` when a worker failed. Call it before starting any thread (the stop
/// signals are blocked here, for every thread started after). Logs to stderr at info
/// level unless a logger is set already.
pub fn run_with<D, F>(name: &str, args: &Args, fds: Vec<OwnedFd>, device: F) -> Result<bool, String>
where
    D: VirtioDevice + 'static,
    F: Fn(Vec<OwnedFd>) -> Result<D, String> + Send + 'static,
{
    crate::logging::init_stderr(log::LevelFilter::Info);
    let signals = StopSignals::block().map_err(|e| format!("blocking signals: {e}"))?;
    let (listener, created, shown) = listen_once(args.socket_path.as_deref(), args.fd)?;
    log::info!("{name}: serving on vhost-user socket {shown}");
    let service: Box<dyn Service> = if args.jail {
        jailed(name, listener, created, fds, device)?
    } else {
        let label = name.to_string();
        let service = ThreadService::new(name, name, created, move |stop| {
            let dev = device(fds)?;
            daemon::serve(dev, listener, MAX_QUEUE_SIZE, &stop, &label)
                .map_err(|e| e.to_string())?;
            Ok(())
        });
        Box::new(service.map_err(|e| format!("eventfd: {e}"))?)
    };
    Ok(Supervisor::new(None).run(&mut [service], &signals))
}

/// The worker in a jailed child (empty root, namespaces, seccomp), restarted when it
/// dies; it inherits `fds`.
#[cfg(feature = "jail")]
fn jailed<D, F>(
    name: &str,
    listener: UnixListener,
    created: Vec<PathBuf>,
    fds: Vec<OwnedFd>,
    device: F,
) -> Result<Box<dyn Service>, String>
where
    D: VirtioDevice + 'static,
    F: Fn(Vec<OwnedFd>) -> Result<D, String> + Send + 'static,
{
    use crate::jail::{worker_jail, SeccompMode, WorkerLimits};
    use crate::supervisor::JailedService;
    let jail =
        worker_jail(&[], SeccompMode::Kill, WorkerLimits::default()).map_err(|e| e.to_string())?;
    let label = name.to_string();
    let serve = Box::new(move |listener, fds: Vec<OwnedFd>, stop: &_| {
        let dev = device(fds)?;
        daemon::serve(dev, listener, MAX_QUEUE_SIZE, stop, &label).map_err(|e| e.to_string())?;
        Ok(())
    });
    let service = JailedService::new(name, jail, listener, serve)
        .inherit(fds)
        .created(created);
    Ok(Box::new(service))
}

#[cfg(not(feature = "jail"))]
fn jailed<D, F>(
    _: &str,
    _: UnixListener,
    _: Vec<PathBuf>,
    _: Vec<OwnedFd>,
    _: F,
) -> Result<Box<dyn Service>, String>
where
    F: Fn(Vec<OwnedFd>) -> Result<D, String>,
{
    Err("--jail needs outboard-vmm-glue's jail feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn args_take_the_vhost_user_back_end_flags() {
        assert_eq!(parse(&[]), Ok(Args::default()));
        assert_eq!(
            parse(&["--socket-path", "/tmp/a.sock", "--jail"]),
            Ok(Args {
                socket_path: Some("/tmp/a.sock".into()),
                fd: None,
                jail: true,
            })
        );
        assert_eq!(parse(&["--fd", "3"]).map(|a| a.fd), Ok(Some(3)));
    }

    #[test]
    fn bad_args_are_named() {
        assert_eq!(parse(&["--fd"]), Err("--fd needs a value".into()));
        assert_eq!(parse(&["--fd", "x"]), Err("--fd x: not an fd".into()));
        assert_eq!(
            parse(&["--sock", "/a"]),
            Err("unknown argument \"--sock\"".into())
        );
    }

    #[cfg(not(feature = "jail"))]
    #[test]
    fn jail_without_the_feature_is_refused_before_serving() {
        let dir = std::env::temp_dir().join(format!("device-daemon-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let args = Args {
            socket_path: Some(dir.join("s")),
            fd: None,
            jail: true,
        };
        let r = run_with("t", &args, Vec::new(), |_| {
            Ok(outboard_devices::testing::EchoDevice::new(&[8]))
        });
        assert_eq!(
            r,
            Err("--jail needs outboard-vmm-glue's jail feature".into())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
