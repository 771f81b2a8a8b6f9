//! One test per jail feature: a child is forked into a jail with that feature and
//! reports what it observes through a pipe; the parent checks the report (and how the
//! child ended). Every case also runs unprivileged: in a process that first dropped to
//! uid/gid 65534, then builds the same jail.
//!
//! Runs with `harness = false`: cases run in sequence on the main thread, so forking is
//! safe.

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{e, in_fork, with_unprivileged, Case, NOBODY};
use outboard_sandbox::jail::Step;
use outboard_sandbox::{
    fork_process, landlock_abi, ExitStatus, ForkError, IdMap, Jail, SeccompPolicy,
};
use seccompiler::SeccompAction;

/// Forks a child into `jail` that runs `probe` and writes its report to a kept pipe.
/// Returns the report and how the child ended.
fn observe(
    jail: &Jail,
    extra_keep: &[RawFd],
    probe: fn() -> String,
) -> Result<(String, ExitStatus), String> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(e("pipe"))?;
    let raw = w.as_raw_fd();
    let mut keep = extra_keep.to_vec();
    keep.push(raw);
    let mut child = fork_process(jail, &keep, Some("probe"), move || {
        let report = probe();
        write_all(raw, report.as_bytes());
    })
    .map_err(e("fork_process"))?;
    drop(w);
    let mut report = String::new();
    std::fs::File::from(r)
        .read_to_string(&mut report)
        .map_err(e("read report"))?;
    let status = child
        .wait_timeout(Duration::from_secs(5))
        .map_err(e("wait"))?
        .ok_or("child did not exit")?;
    Ok((report, status))
}

fn write_all(fd: RawFd, bytes: &[u8]) {
    // SAFETY: writes from a live buffer to an fd this process holds.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn expect_report(jail: &Jail, probe: fn() -> String, want: &str) -> Result<(), String> {
    let (report, status) = observe(jail, &[], probe)?;
    ensure!(
        status == ExitStatus::Exited(0),
        "child {status}, report {report:?}"
    );
    ensure!(report == want, "report {report:?}, want {want:?}");
    Ok(())
}

// ---- user namespace

fn probe_ids() -> String {
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let gmap = std::fs::read_to_string("/proc/self/gid_map").unwrap_or_default();
    let setgroups = std::fs::read_to_string("/proc/self/setgroups").unwrap_or_default();
    // SAFETY: id getters cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    format!(
        "uid={uid} gid={gid} uid_map={:?} gid_map={:?} setgroups={}",
        map.split_whitespace().collect::<Vec<_>>(),
        gmap.split_whitespace().collect::<Vec<_>>(),
        setgroups.trim()
    )
}

/// Root is mapped to 65534 outside; an unprivileged caller maps its own ids.
fn user_namespace() -> Result<(), String> {
    let outside = |own: u32| if euid() == 0 { NOBODY } else { own };
    // SAFETY: getegid cannot fail.
    let egid = unsafe { libc::getegid() };
    let want = format!(
        r#"uid=0 gid=0 uid_map=["0", "{}", "1"] gid_map=["0", "{}", "1"] setgroups=deny"#,
        outside(euid()),
        outside(egid)
    );
    expect_report(&Jail::new().user_namespace(), probe_ids, &want)
}

// ---- pid namespace

fn probe_pid() -> String {
    format!("pid={}", std::process::id())
}

fn pid_namespace() -> Result<(), String> {
    expect_report(
        &Jail::new().user_namespace().pid_namespace(),
        probe_pid,
        "pid=1",
    )
}

/// The relay left behind by the pid-namespace fork (it waits for pid 1) runs under a
/// seccomp filter of its own when the jail has one.
fn relay_has_its_own_seccomp_filter() -> Result<(), String> {
    let policy = SeccompPolicy::deny_list(&[libc::SYS_getppid], SeccompAction::KillProcess)
        .map_err(e("policy"))?;
    let jail = Jail::new().user_namespace().pid_namespace().seccomp(policy);
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(e("pipe"))?;
    let raw = r.as_raw_fd();
    let mut child = fork_process(&jail, &[raw], Some("relay"), move || {
        let mut b = [0u8; 1];
        // SAFETY: reads one byte into a local buffer; returns at EOF.
        unsafe { libc::read(raw, b.as_mut_ptr().cast(), 1) };
    })
    .map_err(e("fork_process"))?;
    drop(r);
    let status_path = format!("/proc/{}/status", child.pid());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mode = loop {
        let status = std::fs::read_to_string(&status_path).map_err(e("read status"))?;
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        if mode == "2" || std::time::Instant::now() > deadline {
            break mode;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(w);
    let end = child
        .wait_timeout(Duration::from_secs(5))
        .map_err(e("wait"))?
        .ok_or("child did not exit")?;
    ensure!(mode == "2", "relay seccomp mode {mode:?} (2 = filter)");
    ensure!(end == ExitStatus::Exited(0), "{end}");
    Ok(())
}

// ---- net namespace

fn probe_net() -> String {
    // SAFETY: socket/connect on a local sockaddr_in; the fd is closed at once.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return format!("socket errno={}", errno());
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 9u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([192, 0, 2, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            s,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let res = if r == 0 {
            "connected".to_owned()
        } else {
            format!("errno={}", errno())
        };
        libc::close(s);
        res
    }
}

fn net_namespace() -> Result<(), String> {
    expect_report(
        &Jail::new().user_namespace().net_namespace(),
        probe_net,
        &format!("errno={}", libc::ENETUNREACH),
    )
}

// ---- uts, ipc and cgroup namespaces

const IPC_KEY: libc::key_t = 0x0b0a_7e57;

fn probe_uts_ipc_cgroup() -> String {
    let name = b"outboard-jail";
    // SAFETY: sethostname reads `name`; shmget/shmctl take plain integers.
    let (host, shm) = unsafe {
        let host = libc::sethostname(name.as_ptr().cast(), name.len());
        let id = libc::shmget(IPC_KEY, 4096, libc::IPC_CREAT | 0o600);
        (host, id)
    };
    let got = hostname();
    format!(
        "sethostname={host} hostname={got} shm={} ns={}",
        shm >= 0,
        ns_links()
    )
}

/// This process's uts, ipc and cgroup namespace identities.
fn ns_links() -> String {
    ["uts", "ipc", "cgroup"]
        .iter()
        .map(|n| {
            std::fs::read_link(format!("/proc/self/ns/{n}"))
                .map(|l| l.display().to_string())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .to_owned()
}

fn uts_ipc_cgroup_namespaces() -> Result<(), String> {
    let before = hostname();
    let jail = Jail::new()
        .user_namespace()
        .uts_namespace()
        .ipc_namespace()
        .cgroup_namespace();
    let (report, status) = observe(&jail, &[], probe_uts_ipc_cgroup)?;
    ensure!(status == ExitStatus::Exited(0), "{status}");
    let (head, ns) = report
        .split_once(" ns=")
        .ok_or(format!("report {report}"))?;
    ensure!(
        head == "sethostname=0 hostname=outboard-jail shm=true",
        "{head}"
    );
    let ours = ns_links();
    for (theirs, ours) in ns.split(',').zip(ours.split(',')) {
        ensure!(
            !theirs.is_empty() && theirs != ours,
            "namespace {theirs} not new (ours {ours})"
        );
    }
    let after = hostname();
    ensure!(before == after, "host name changed: {before} -> {after}");
    // SAFETY: shmget with a key and no flags only looks the segment up.
    let id = unsafe { libc::shmget(IPC_KEY, 0, 0) };
    ensure!(id < 0, "the jail's SysV segment is visible on the host");
    Ok(())
}

// ---- pivot_root into an empty tmpfs with binds

fn probe_fs() -> String {
    let host_file = std::fs::File::open("/etc/passwd")
        .map(|_| ())
        .map_err(|e| e.raw_os_error());
    let ro = std::fs::read_to_string("/data/hello").unwrap_or_else(|e| format!("err {e}"));
    let ro_write = std::fs::write("/data/new", b"x").map_err(|e| e.raw_os_error());
    let rw_write = std::fs::write("/rw/out", b"written").map_err(|e| e.raw_os_error());
    let root_write = std::fs::create_dir("/newdir").map_err(|e| e.raw_os_error());
    let mut root: Vec<String> = std::fs::read_dir("/")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    root.sort();
    format!(
        "host={host_file:?} ro={ro} ro_write={ro_write:?} rw_write={rw_write:?} \
         root_write={root_write:?} root={root:?}"
    )
}

struct TempDirs {
    ro: PathBuf,
    rw: PathBuf,
}

impl TempDirs {
    fn new(tag: &str) -> Result<TempDirs, String> {
        let base = std::env::temp_dir().join(format!("outboard-jail-{tag}-{}", std::process::id()));
        let (ro, rw) = (base.join("ro"), base.join("rw"));
        for d in [&ro, &rw] {
            std::fs::create_dir_all(d).map_err(e("mkdir"))?;
        }
        std::fs::write(ro.join("hello"), "hi").map_err(e("write"))?;
        use std::os::unix::fs::PermissionsExt;
        for (p, mode) in [(&base, 0o755), (&ro, 0o755), (&rw, 0o777)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(e("chmod"))?;
        }
        std::fs::set_permissions(ro.join("hello"), std::fs::Permissions::from_mode(0o644))
            .map_err(e("chmod"))?;
        Ok(TempDirs { ro, rw })
    }
}

impl Drop for TempDirs {
    fn drop(&mut self) {
        if let Some(base) = self.ro.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

fn pivot_root_with_binds() -> Result<(), String> {
    let dirs = TempDirs::new(&euid().to_string())?;
    let jail = Jail::new()
        .user_namespace()
        .bind(&dirs.ro, "/data", false)
        .bind(&dirs.rw, "/rw", true);
    let want = format!(
        "host=Err(Some({})) ro=hi ro_write=Err(Some({})) rw_write=Ok(()) \
         root_write=Err(Some({})) root=[\"data\", \"rw\"]",
        libc::ENOENT,
        libc::EROFS,
        libc::EROFS
    );
    expect_report(&jail, probe_fs, &want)?;
    let out = std::fs::read_to_string(dirs.rw.join("out")).map_err(e("read rw/out"))?;
    ensure!(out == "written", "{out}");
    Ok(())
}

// ---- device nodes

fn probe_dev_null() -> String {
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map(drop)
        .map_err(|e| e.raw_os_error());
    format!("open={r:?}")
}

/// `bind_device` keeps a device node openable; an ordinary bind of the same node is
/// `nodev` (EACCES on open).
fn bind_device_node() -> Result<(), String> {
    let dev = Jail::new().user_namespace().bind_device("/dev/null");
    expect_report(&dev, probe_dev_null, "open=Ok(())")?;
    let plain = Jail::new()
        .user_namespace()
        .bind("/dev/null", "/dev/null", true);
    expect_report(
        &plain,
        probe_dev_null,
        &format!("open=Err(Some({}))", libc::EACCES),
    )
}

// ---- no_new_privs

fn probe_nnp() -> String {
    // SAFETY: prctl query with constants.
    format!("nnp={}", unsafe {
        libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
    })
}

fn no_new_privs() -> Result<(), String> {
    // Control: the flag is not inherited from the test process.
    expect_report(&Jail::new(), probe_nnp, "nnp=0")?;
    expect_report(&Jail::new().no_new_privs(), probe_nnp, "nnp=1")
}

// ---- seccomp

fn probe_getppid() -> String {
    // SAFETY: getppid cannot fail, unless seccomp says otherwise.
    let r = unsafe { libc::syscall(libc::SYS_getppid) };
    format!("r={} errno={}", r.signum(), if r < 0 { errno() } else { 0 })
}

fn seccomp_kill() -> Result<(), String> {
    let policy = SeccompPolicy::deny_list(&[libc::SYS_getppid], SeccompAction::KillProcess)
        .map_err(e("policy"))?;
    let (report, status) = observe(&Jail::new().seccomp(policy), &[], probe_getppid)?;
    ensure!(
        status == ExitStatus::Signaled(libc::SIGSYS),
        "{status}, report {report:?}"
    );
    ensure!(
        report.is_empty(),
        "the child went on after the forbidden call: {report}"
    );
    Ok(())
}

fn seccomp_errno_and_log() -> Result<(), String> {
    let policy = SeccompPolicy::deny_list(
        &[libc::SYS_getppid],
        SeccompAction::Errno(libc::EPERM as u32),
    )
    .map_err(e("policy"))?;
    expect_report(
        &Jail::new().seccomp(policy),
        probe_getppid,
        &format!("r=-1 errno={}", libc::EPERM),
    )?;
    // Log mode lets the call through (and logs it), for developing a policy.
    let policy =
        SeccompPolicy::deny_list(&[libc::SYS_getppid], SeccompAction::Log).map_err(e("policy"))?;
    expect_report(&Jail::new().seccomp(policy), probe_getppid, "r=1 errno=0")
}

fn seccomp_json_policy() -> Result<(), String> {
    let json = r#"{"device": {"mismatch_action": "allow", "match_action": {"errno": 13},
                   "filter": [{"syscall": "getppid"}]}}"#;
    let policy = SeccompPolicy::from_json(json.as_bytes(), "device").map_err(e("policy"))?;
    expect_report(&Jail::new().seccomp(policy), probe_getppid, "r=-1 errno=13")
}

fn probe_abort() -> String {
    std::process::abort()
}

fn probe_tgkill_usr1() -> String {
    // SAFETY: signals this very thread with SIGUSR1, whose default action ends the
    // process, unless seccomp refuses the call first.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGUSR1,
        )
    };
    "signalled".into()
}

/// An allow-list lets a child abort itself (`tgkill` with `SIGABRT` only), so a failed
/// allocation is an abort and not a seccomp kill; and pid 1 of a pid namespace, which
/// its own `SIGABRT` cannot end, exits with `EXIT_ABORTED` instead of faulting.
fn an_allow_list_lets_the_child_abort_itself_and_nothing_more() -> Result<(), String> {
    let mut allowed = outboard_sandbox::proxy::CHILD_SYSCALLS.to_vec();
    allowed.extend([libc::SYS_getpid, libc::SYS_gettid, libc::SYS_rt_sigaction]);
    let policy = || SeccompPolicy::allow_list(&allowed, SeccompAction::KillProcess);
    let jail = Jail::new().seccomp(policy().map_err(e("policy"))?);
    let (report, status) = observe(&jail, &[], probe_abort)?;
    ensure!(
        status == ExitStatus::Signaled(libc::SIGABRT),
        "{status}, report {report:?}"
    );
    let (report, status) = observe(&jail, &[], probe_tgkill_usr1)?;
    ensure!(
        status == ExitStatus::Signaled(libc::SIGSYS),
        "tgkill with SIGUSR1: {status}, report {report:?}"
    );
    let jail = Jail::new()
        .user_namespace()
        .pid_namespace()
        .seccomp(policy().map_err(e("policy"))?);
    let (report, status) = observe(&jail, &[], probe_abort)?;
    ensure!(
        status == ExitStatus::Exited(outboard_sandbox::fork::EXIT_ABORTED),
        "pid 1: {status}, report {report:?}"
    );
    Ok(())
}

// ---- rlimits

fn probe_nofile() -> String {
    let mut highest = -1;
    let mut last_errno = 0;
    for _ in 0..64 {
        // SAFETY: dup of stdin's slot (or of /dev/null) returns a new fd or -1.
        let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            last_errno = errno();
            break;
        }
        highest = highest.max(fd);
    }
    format!("highest={highest} errno={last_errno}")
}

fn rlimit() -> Result<(), String> {
    let jail = Jail::new().rlimit(libc::RLIMIT_NOFILE, 10, 10);
    expect_report(
        &jail,
        probe_nofile,
        &format!("highest=9 errno={}", libc::EMFILE),
    )
}

fn probe_greedy() -> String {
    // 256 MiB, touched: more private memory than the jail allows.
    let v = vec![1u8; 256 << 20];
    format!("allocated {}", v.len())
}

/// A child that needs more private memory than its RLIMIT_DATA dies (the allocation
/// fails and the Rust runtime aborts) and the parent is told how; it never gets the
/// memory.
fn data_rlimit_ends_a_greedy_child() -> Result<(), String> {
    let jail = Jail::new().rlimit(libc::RLIMIT_DATA, 64 << 20, 64 << 20);
    let (report, status) = observe(&jail, &[], probe_greedy)?;
    ensure!(report.is_empty(), "the child got the memory: {report}");
    ensure!(
        status == ExitStatus::Signaled(libc::SIGABRT),
        "{status}, report {report:?}"
    );
    Ok(())
}

// ---- fd keep-list

fn probe_fds() -> String {
    let open: Vec<i32> = (0..4096)
        // SAFETY: F_GETFD on any number only reports whether it is open.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect();
    format!("{open:?}")
}

fn keep_list_only() -> Result<(), String> {
    let kept = std::fs::File::open("/dev/null").map_err(e("open"))?;
    let not_kept = std::fs::File::open("/dev/null").map_err(e("open"))?;
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(e("pipe"))?;
    let raw = w.as_raw_fd();
    let mut child = fork_process(
        &Jail::new().close_stdio(),
        &[kept.as_raw_fd(), raw],
        None,
        move || write_all(raw, probe_fds().as_bytes()),
    )
    .map_err(e("fork"))?;
    drop(w);
    let mut report = String::new();
    std::fs::File::from(r)
        .read_to_string(&mut report)
        .map_err(e("read"))?;
    let status = child
        .wait_timeout(Duration::from_secs(5))
        .map_err(e("wait"))?;
    let mut want = vec![kept.as_raw_fd(), raw];
    want.sort();
    ensure!(status == Some(ExitStatus::Exited(0)), "{status:?}");
    ensure!(
        report == format!("{want:?}"),
        "open fds {report}, want {want:?} (not kept: {})",
        not_kept.as_raw_fd()
    );
    Ok(())
}

// ---- capabilities

fn probe_caps() -> String {
    use caps::CapSet;
    let sets = [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Bounding,
        CapSet::Ambient,
    ];
    let counts: Vec<usize> = sets
        .iter()
        .map(|&s| caps::read(None, s).map(|c| c.len()).unwrap_or(999))
        .collect();
    format!("{counts:?}")
}

fn capabilities_dropped() -> Result<(), String> {
    // Control: ns root (or real root) has capabilities before the drop.
    let jail = Jail::new().user_namespace();
    let (before, _) = observe(&jail, &[], probe_caps)?;
    ensure!(
        before.starts_with("[4") || before.starts_with("[3"),
        "no capabilities to drop: {before}"
    );
    expect_report(&jail.drop_capabilities(), probe_caps, "[0, 0, 0, 0, 0]")
}

// ---- Landlock

fn probe_landlock() -> String {
    let allowed = std::fs::read_to_string(LANDLOCK_DIR.with(|d| d.borrow().join("hello"))).is_ok();
    let denied = std::fs::File::open("/etc/passwd")
        .map(|_| ())
        .map_err(|e| e.raw_os_error());
    let write = std::fs::write(LANDLOCK_DIR.with(|d| d.borrow().join("new")), b"x")
        .map_err(|e| e.raw_os_error());
    format!("allowed={allowed} denied={denied:?} write={write:?}")
}

thread_local! {
    static LANDLOCK_DIR: std::cell::RefCell<PathBuf> = std::cell::RefCell::new(PathBuf::new());
}

fn landlock() -> Result<(), String> {
    let dirs = TempDirs::new(&format!("ll{}", euid()))?;
    LANDLOCK_DIR.with(|d| *d.borrow_mut() = dirs.ro.clone());
    let jail = Jail::new().landlock(vec![dirs.ro.clone()], vec![]);
    match landlock_abi() {
        Some(_) => expect_report(
            &jail,
            probe_landlock,
            &format!(
                "allowed=true denied=Err(Some({})) write=Err(Some({}))",
                libc::EACCES,
                libc::EACCES
            ),
        ),
        None => {
            // Degrades to a no-op on kernels without Landlock.
            let (report, _) = observe(&jail, &[], probe_landlock)?;
            ensure!(report.starts_with("allowed=true denied=Ok"), "{report}");
            println!("    (kernel without Landlock: checked the no-op fallback)");
            Ok(())
        }
    }
}

// ---- parent-death signal

fn parent_death_signal_case(with_signal: bool) -> Result<(), String> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(e("pipe"))?;
    let wraw = w.as_raw_fd();
    // An intermediate process forks the jailed child, reports its pid and exits.
    in_fork(move || {
        let jail = if with_signal {
            Jail::new().parent_death_signal(libc::SIGKILL)
        } else {
            Jail::new()
        };
        let child = fork_process(&jail, &[], None, || {
            std::thread::sleep(Duration::from_secs(20))
        })
        .map_err(e("fork"))?;
        write_all(wraw, &child.pid().to_le_bytes());
        // Leave without killing it: only the parent-death signal may end it.
        std::mem::forget(child);
        Ok(())
    })?;
    drop(w);
    let mut pid = [0u8; 4];
    std::fs::File::from(r)
        .read_exact(&mut pid)
        .map_err(e("read pid"))?;
    let pid = i32::from_le_bytes(pid);
    let pidfd = match rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid).ok_or("pid 0")?,
        rustix::process::PidfdFlags::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) if with_signal => return Ok(()),
        Err(err) => return Err(format!("pidfd_open: {err}")),
    };
    let died = wait_fd(
        &pidfd,
        Duration::from_millis(if with_signal { 2000 } else { 300 }),
    );
    if !with_signal {
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
    }
    ensure!(
        died == with_signal,
        "orphan died={died}, expected {with_signal}"
    );
    Ok(())
}

fn wait_fd(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    let ts = rustix::event::Timespec::try_from(timeout).unwrap_or(rustix::event::Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    });
    matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
}

fn parent_death_signal() -> Result<(), String> {
    parent_death_signal_case(false)?;
    parent_death_signal_case(true)
}

// ---- the device preset, everything at once

fn probe_sandboxed() -> String {
    format!(
        "{} {} {} {} {}",
        probe_pid(),
        probe_ids().split(' ').next().unwrap_or(""),
        probe_nnp(),
        probe_caps(),
        probe_net()
    )
}

fn sandboxed_preset() -> Result<(), String> {
    let (report, status) = observe(&Jail::sandboxed(), &[], probe_sandboxed)?;
    ensure!(status == ExitStatus::Exited(0), "{status}");
    let want = format!(
        "pid=1 uid=0 nnp=1 [0, 0, 0, 0, 0] errno={}",
        libc::ENETUNREACH
    );
    ensure!(report == want, "{report} != {want}");
    Ok(())
}

// ---- setup errors are reported, and the child is reaped

fn setup_errors_are_reported() -> Result<(), String> {
    // A soft limit above the hard one fails in the child's setrlimit.
    let jail = Jail::new().rlimit(libc::RLIMIT_NOFILE, 100, 10);
    match fork_process(&jail, &[], None, || {}) {
        Err(ForkError::Setup {
            step: Step::Rlimit,
            errno,
        }) => ensure!(errno == libc::EINVAL, "errno {errno}"),
        other => return Err(format!("{other:?}")),
    }
    // An id map the caller may not write is refused by the kernel.
    let outside = if euid() == 0 { 4242 } else { 0 };
    let jail = Jail::new().uid_map(IdMap { inside: 0, outside });
    match fork_process(&jail, &[], None, || {}) {
        Err(ForkError::IdMap {
            file: "uid_map", ..
        }) if euid() != 0 => {}
        Ok(mut child) if euid() == 0 => {
            ensure!(
                child
                    .wait_timeout(Duration::from_secs(5))
                    .map_err(e("wait"))?
                    == Some(ExitStatus::Exited(0)),
                "exit"
            );
        }
        other => return Err(format!("{other:?}")),
    }
    // A bind source that does not exist is refused before forking.
    let jail = Jail::new().bind(Path::new("/does/not/exist"), "/x", false);
    ensure!(
        matches!(
            fork_process(&jail, &[], None, || {}),
            Err(ForkError::Jail(_))
        ),
        "bind"
    );
    Ok(())
}

fn main() {
    let cases: &[Case] = &[
        ("user_namespace", user_namespace),
        ("pid_namespace", pid_namespace),
        (
            "relay_has_its_own_seccomp_filter",
            relay_has_its_own_seccomp_filter,
        ),
        ("net_namespace", net_namespace),
        ("uts_ipc_cgroup_namespaces", uts_ipc_cgroup_namespaces),
        ("pivot_root_with_binds", pivot_root_with_binds),
        ("bind_device_node", bind_device_node),
        ("no_new_privs", no_new_privs),
        ("seccomp_kill", seccomp_kill),
        ("seccomp_errno_and_log", seccomp_errno_and_log),
        ("seccomp_json_policy", seccomp_json_policy),
        (
            "an_allow_list_lets_the_child_abort_itself_and_nothing_more",
            an_allow_list_lets_the_child_abort_itself_and_nothing_more,
        ),
        ("rlimit", rlimit),
        (
            "data_rlimit_ends_a_greedy_child",
            data_rlimit_ends_a_greedy_child,
        ),
        ("keep_list_only", keep_list_only),
        ("capabilities_dropped", capabilities_dropped),
        ("landlock", landlock),
        ("parent_death_signal", parent_death_signal),
        ("sandboxed_preset", sandboxed_preset),
        ("setup_errors_are_reported", setup_errors_are_reported),
    ];
    common::run(with_unprivileged(cases));
}
