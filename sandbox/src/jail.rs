//! [`Jail`]: what a forked device process is confined with.
//!
//! A `Jail` is a plain description built in the parent. [`crate::fork_process`] turns it
//! into a prepared jail *before* forking — every path becomes a `CString`, the
//! seccomp policy is compiled to BPF, the Landlock ruleset is created and filled (it is an
//! fd), rlimits and the keep-list are sorted — so the child only issues system calls.
//!
//! # Order of operations in the child
//!
//! 1. `PR_SET_PDEATHSIG` (then check the parent did not already die) and `PR_SET_NAME`.
//! 2. User namespace: drop supplementary groups (when root), `unshare(CLONE_NEWUSER)`,
//!    tell the parent, which writes `setgroups` = `deny`, `uid_map` and `gid_map` (only
//!    a process in the parent namespace may map ids other than its own), then
//!    `setresgid`/`setresuid` to the ids inside.
//! 3. `unshare` of the mount, net, IPC, UTS, cgroup and pid namespaces (owned by the new
//!    user namespace, so this needs no privilege outside).
//! 4. Pid namespace: fork once more so the device is pid 1 of the new namespace. The
//!    first child stays behind as a relay: it closes every fd, waits for pid 1 and exits
//!    the same way (same exit code, or re-raises the same signal), so the parent's pid
//!    and pidfd describe the device. Pid 1 gets `SIGKILL` as its parent-death signal and
//!    checks, through a pipe only the relay holds, that the relay is still alive. The
//!    relay sets `no_new_privs` and drops its capabilities too.
//! 5. Mounts: make `/` recursively private, clone every bind source with
//!    `open_tree(OPEN_TREE_CLONE)` and set it read-only/nosuid/nodev with
//!    `mount_setattr`, mount an empty tmpfs (over `/tmp` of the now private mount
//!    namespace; the host's `/tmp` is not touched, and cloning the binds first means a
//!    bind source under `/tmp` is not hidden), `move_mount` each clone into it,
//!    `pivot_root(".", ".")`, detach the old root and remount the new root read-only.
//! 6. rlimits.
//! 7. `no_new_privs` (forced when seccomp or Landlock is used), then Landlock
//!    (`landlock_restrict_self` with the ruleset fd made before the fork).
//! 8. Close every fd except the keep-list (and stdio unless disabled), with `close_range`.
//! 9. Drop every capability: ambient set cleared, bounding set emptied, then `capset`
//!    with empty effective, permitted and inheritable sets.
//! 10. Report success to the parent, then install the seccomp filter (last, so the
//!     policy only needs what the device itself uses), then run the closure.
//!
//! # Forking a multi-threaded process
//!
//! After `fork` only the calling thread exists in the child; any lock another thread
//! held (the allocator's, stdio's, the logger's) stays locked forever. Between `fork` and
//! the device closure the child therefore only calls async-signal-safe functions (raw
//! system calls on preallocated data); it never allocates, locks or logs. The closure
//! itself runs single-threaded with glibc's allocator reset by `fork`, which is what
//! crosvm relies on too; fork devices early, before the VMM starts threads, where you can.
//! The parent-death signal is tied to the *thread* that forked: fork from a thread that
//! lives as long as the device.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// Errors while building or preparing a jail.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum JailError {
    /// A bind mount's source does not exist or cannot be inspected.
    #[error("bind source {path:?}: {source}")]
    BindSource {
        /// The source path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A bind mount's destination is not an absolute path without `..`.
    #[error("bind destination {path:?} must be absolute, without `..`, and not `/`")]
    BindTarget {
        /// The destination path.
        path: PathBuf,
    },
    /// Building the Landlock ruleset failed.
    #[error("landlock ruleset: {0}")]
    Landlock(String),
    /// A path contains a NUL byte.
    #[error("path {path:?} contains a NUL byte")]
    NulInPath {
        /// The path.
        path: PathBuf,
    },
    /// The seccomp policy could not be compiled.
    #[error("seccomp policy: {0}")]
    Seccomp(String),
    /// The JSON policy has no filter of the requested name.
    #[error("seccomp JSON policy has no filter named {name:?}")]
    SeccompFilterMissing {
        /// The requested name.
        name: String,
    },
}

/// A compiled seccomp-bpf policy.
#[derive(Clone, Debug)]
pub struct SeccompPolicy {
    program: BpfProgram,
}

fn target_arch() -> Result<TargetArch, JailError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| JailError::Seccomp(e.to_string()))
}

/// `action` as seccompiler's JSON frontend spells it.
fn action_json(action: &SeccompAction) -> serde_json::Value {
    match action {
        SeccompAction::Allow => "allow".into(),
        SeccompAction::Errno(n) => serde_json::json!({ "errno": n }),
        SeccompAction::KillThread => "kill_thread".into(),
        SeccompAction::KillProcess => "kill_process".into(),
        SeccompAction::Log => "log".into(),
        SeccompAction::Trace(n) => serde_json::json!({ "trace": n }),
        SeccompAction::Trap => "trap".into(),
    }
}

impl SeccompPolicy {
    /// Compiles a seccompiler filter built from Rust values.
    pub fn from_filter(filter: SeccompFilter) -> Result<SeccompPolicy, JailError> {
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))?;
        Ok(SeccompPolicy { program })
    }

    /// Builds a policy from a list of syscall numbers: those run (`Allow`), every other
    /// syscall gets `mismatch` — `KillProcess`, `Errno(n)`, or `Log` to develop a policy
    /// (the kernel logs what would have been refused and lets it run).
    ///
    /// Every allow-list also lets the process abort itself: `tgkill` with `SIGABRT` and
    /// no other signal (unless the list allows `tgkill` outright). That is what glibc's
    /// `abort()` does, and so Rust's `process::abort`, where an allocation that
    /// `RLIMIT_DATA` refuses ends; without it an aborting process died of `SIGSYS` and was
    /// reported as a seccomp violation. A jailed process in its own pid namespace can
    /// reach no other process with it.
    pub fn allow_list(
        syscalls: &[i64],
        mismatch: SeccompAction,
    ) -> Result<SeccompPolicy, JailError> {
        let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = syscalls
            .iter()
            .map(|&nr| (nr, Vec::<SeccompRule>::new()))
            .collect();
        if let std::collections::btree_map::Entry::Vacant(tgkill) = rules.entry(libc::SYS_tgkill) {
            let sigabrt = SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::SIGABRT as u64,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| JailError::Seccomp(e.to_string()))?;
            tgkill.insert(vec![sigabrt]);
        }
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()?)
            .map_err(|e| JailError::Seccomp(e.to_string()))?;
        Self::from_filter(filter)
    }

    /// Builds an allow-list policy for `arch` from system call *names* (seccompiler's
    /// syscall table of `arch` gives the numbers): the names run, every other syscall
    /// gets `mismatch`. With
    /// [`SyscallNames::for_arch`](crate::syscalls::SyscallNames::for_arch) this compiles
    /// the policy of any architecture on any host; for the running one it is the same
    /// program as [`SeccompPolicy::allow_list`] with libc's numbers (the process may
    /// abort itself here too). A name `arch` does not have is an error.
    pub fn allow_names(
        names: &[&str],
        mismatch: SeccompAction,
        arch: TargetArch,
    ) -> Result<SeccompPolicy, JailError> {
        let mut filter: Vec<serde_json::Value> = names
            .iter()
            .map(|name| serde_json::json!({ "syscall": name }))
            .collect();
        // As in `allow_list`: the process may abort itself.
        if !names.contains(&"tgkill") {
            filter.push(serde_json::json!({
                "syscall": "tgkill",
                "args": [{ "index": 2, "type": "dword", "op": "eq", "val": libc::SIGABRT }],
            }));
        }
        let json = serde_json::json!({
            "policy": {
                "mismatch_action": action_json(&mismatch),
                "match_action": "allow",
                "filter": filter,
            }
        });
        let mut programs = seccompiler::compile_from_json(json.to_string().as_bytes(), arch)
            .map_err(|e| JailError::Seccomp(e.to_string()))?;
        let program = programs
            .remove("policy")
            .ok_or_else(|| JailError::SeccompFilterMissing {
                name: "policy".to_owned(),
            })?;
        Ok(SeccompPolicy { program })
    }

    /// Builds a policy where the listed syscalls get `action` and everything else runs.
    pub fn deny_list(syscalls: &[i64], action: SeccompAction) -> Result<SeccompPolicy, JailError> {
        let rules = syscalls
            .iter()
            .map(|&nr| (nr, Vec::<SeccompRule>::new()))
            .collect();
        let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, target_arch()?)
            .map_err(|e| JailError::Seccomp(e.to_string()))?;
        Self::from_filter(filter)
    }

    /// Compiles the filter called `name` from a seccompiler JSON policy, for example
    /// `{"device": {"mismatch_action": "kill_process", "match_action": "allow",
    /// "filter": [{"syscall": "read"}, ...]}}`. Actions: `allow`, `kill_process`,
    /// `kill_thread`, `log`, `trap`, `{"errno": N}`.
    pub fn from_json(json: impl std::io::Read, name: &str) -> Result<SeccompPolicy, JailError> {
        let mut programs = seccompiler::compile_from_json(json, target_arch()?)
            .map_err(|e| JailError::Seccomp(e.to_string()))?;
        let program = programs
            .remove(name)
            .ok_or_else(|| JailError::SeccompFilterMissing {
                name: name.to_owned(),
            })?;
        Ok(SeccompPolicy { program })
    }

    /// The number of BPF instructions.
    pub fn len(&self) -> usize {
        self.program.len()
    }

    /// True if the program is empty (it never is for a compiled filter).
    pub fn is_empty(&self) -> bool {
        self.program.is_empty()
    }
}

/// One id mapping of a user namespace: `inside` in the namespace is `outside` outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap {
    /// The id inside the namespace.
    pub inside: u32,
    /// The id it stands for in the parent namespace.
    pub outside: u32,
}

#[derive(Clone, Debug)]
struct Bind {
    src: PathBuf,
    dst: PathBuf,
    writable: bool,
    /// A device node that must stay openable (no `nodev`).
    device: bool,
}

/// An rlimit to set in the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    /// The resource, for example `libc::RLIMIT_NOFILE`.
    pub resource: libc::__rlimit_resource_t,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// What a jailed child is confined with. `Jail::new()` confines nothing (like
/// `Minijail::new()`); [`Jail::sandboxed`] is the strict preset for device processes.
#[derive(Clone, Debug, Default)]
pub struct Jail {
    user_ns: bool,
    uid_map: Option<IdMap>,
    gid_map: Option<IdMap>,
    pid_ns: bool,
    mount_ns: bool,
    net_ns: bool,
    ipc_ns: bool,
    uts_ns: bool,
    cgroup_ns: bool,
    new_root: bool,
    binds: Vec<Bind>,
    no_new_privs: bool,
    seccomp: Option<SeccompPolicy>,
    rlimits: Vec<Rlimit>,
    drop_caps: bool,
    landlock: Option<(Vec<PathBuf>, Vec<PathBuf>)>,
    pdeath_signal: Option<i32>,
    close_stdio: bool,
}

impl Jail {
    /// A jail that confines nothing; only the fd keep-list applies.
    pub fn new() -> Jail {
        Jail::default()
    }

    /// The preset for device processes: every namespace (user namespace with the
    /// default mapping), an empty read-only root, `no_new_privs`, no capabilities, and
    /// `SIGKILL` when the parent dies.
    pub fn sandboxed() -> Jail {
        Jail::new()
            .user_namespace()
            .pid_namespace()
            .net_namespace()
            .ipc_namespace()
            .uts_namespace()
            .cgroup_namespace()
            .pivot_root_tmpfs()
            .no_new_privs()
            .drop_capabilities()
            .parent_death_signal(libc::SIGKILL)
    }

    /// New user namespace. Unless [`Jail::uid_map`]/[`Jail::gid_map`] say otherwise,
    /// the child is uid/gid 0 inside, standing for the caller's ids outside — or for
    /// 65534 (`nobody`) when the caller is root, so an escape lands unprivileged.
    pub fn user_namespace(mut self) -> Jail {
        self.user_ns = true;
        self
    }

    /// Sets the uid mapping (implies a user namespace). An unprivileged caller can only
    /// map its own effective uid.
    pub fn uid_map(mut self, map: IdMap) -> Jail {
        self.user_ns = true;
        self.uid_map = Some(map);
        self
    }

    /// Sets the gid mapping (implies a user namespace). An unprivileged caller can only
    /// map its own effective gid.
    pub fn gid_map(mut self, map: IdMap) -> Jail {
        self.user_ns = true;
        self.gid_map = Some(map);
        self
    }

    /// New pid namespace; the device runs as pid 1.
    pub fn pid_namespace(mut self) -> Jail {
        self.pid_ns = true;
        self
    }

    /// New mount namespace.
    pub fn mount_namespace(mut self) -> Jail {
        self.mount_ns = true;
        self
    }

    /// New network namespace (only a loopback interface, down).
    pub fn net_namespace(mut self) -> Jail {
        self.net_ns = true;
        self
    }

    /// New System V IPC / POSIX message queue namespace.
    pub fn ipc_namespace(mut self) -> Jail {
        self.ipc_ns = true;
        self
    }

    /// New UTS (hostname) namespace.
    pub fn uts_namespace(mut self) -> Jail {
        self.uts_ns = true;
        self
    }

    /// New cgroup namespace.
    pub fn cgroup_namespace(mut self) -> Jail {
        self.cgroup_ns = true;
        self
    }

    /// `pivot_root` into an empty tmpfs (implies a mount namespace); only the
    /// [`Jail::bind`] mounts are visible. The new root is read-only.
    pub fn pivot_root_tmpfs(mut self) -> Jail {
        self.new_root = true;
        self.mount_ns = true;
        self
    }

    /// Bind-mounts host path `src` at `dst` in the new root, read-only unless
    /// `writable`; always nosuid and nodev. Implies [`Jail::pivot_root_tmpfs`].
    pub fn bind(
        mut self,
        src: impl Into<PathBuf>,
        dst: impl Into<PathBuf>,
        writable: bool,
    ) -> Jail {
        self.binds.push(Bind {
            src: src.into(),
            dst: dst.into(),
            writable,
            device: false,
        });
        self.pivot_root_tmpfs()
    }

    /// Bind-mounts the device node `path` read-write at the same path in the new root,
    /// nosuid but *not* nodev, so that the jailed process can open it (a V4L2 node for
    /// the media proxy). Opening still needs the node's permissions for the jail's uid
    /// outside the user namespace. Implies [`Jail::pivot_root_tmpfs`].
    pub fn bind_device(mut self, path: impl Into<PathBuf>) -> Jail {
        let path = path.into();
        self.binds.push(Bind {
            src: path.clone(),
            dst: path,
            writable: true,
            device: true,
        });
        self.pivot_root_tmpfs()
    }

    /// Sets `no_new_privs` (always set when seccomp or Landlock is used).
    pub fn no_new_privs(mut self) -> Jail {
        self.no_new_privs = true;
        self
    }

    /// Installs a seccomp-bpf policy, last, just before the closure runs.
    pub fn seccomp(mut self, policy: SeccompPolicy) -> Jail {
        self.seccomp = Some(policy);
        self.no_new_privs = true;
        self
    }

    /// Sets an rlimit.
    pub fn rlimit(mut self, resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> Jail {
        self.rlimits.push(Rlimit {
            resource,
            soft,
            hard,
        });
        self
    }

    /// Drops every capability (effective, permitted, inheritable, ambient, bounding).
    pub fn drop_capabilities(mut self) -> Jail {
        self.drop_caps = true;
        self
    }

    /// Restricts file system access with Landlock, where the kernel has it: only the
    /// `read_only` trees can be read and only the `read_write` trees written; everything
    /// else the kernel's Landlock ABI can refuse is refused. On a kernel without Landlock
    /// this is a no-op (see [`landlock_abi`]).
    pub fn landlock(mut self, read_only: Vec<PathBuf>, read_write: Vec<PathBuf>) -> Jail {
        self.landlock = Some((read_only, read_write));
        self.no_new_privs = true;
        self
    }

    /// Signal the child gets when the parent thread that forked it dies.
    pub fn parent_death_signal(mut self, signal: i32) -> Jail {
        self.pdeath_signal = Some(signal);
        self
    }

    /// Closes stdin, stdout and stderr too unless they are in the keep-list (by default
    /// they are kept, for logging).
    pub fn close_stdio(mut self) -> Jail {
        self.close_stdio = true;
        self
    }

    /// True if the jail uses a pid namespace (the device then runs as pid 1 under a
    /// relay process).
    pub fn has_pid_namespace(&self) -> bool {
        self.pid_ns
    }

    pub(crate) fn prepare(&self, keep_fds: &[RawFd]) -> Result<Prepared, JailError> {
        // SAFETY: geteuid/getegid cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let default_outside = |own: u32| if euid == 0 { 65534 } else { own };
        let uid_map = self.uid_map.unwrap_or(IdMap {
            inside: 0,
            outside: default_outside(euid),
        });
        let gid_map = self.gid_map.unwrap_or(IdMap {
            inside: 0,
            outside: default_outside(egid),
        });
        let mut binds = Vec::with_capacity(self.binds.len());
        for b in &self.binds {
            binds.push(prepare_bind(b)?);
        }
        let landlock = match &self.landlock {
            Some((ro, rw)) => Some(build_landlock(ro, rw)?),
            None => None,
        };
        let mut flags = 0;
        for (on, flag) in [
            (self.mount_ns, libc::CLONE_NEWNS),
            (self.net_ns, libc::CLONE_NEWNET),
            (self.ipc_ns, libc::CLONE_NEWIPC),
            (self.uts_ns, libc::CLONE_NEWUTS),
            (self.cgroup_ns, libc::CLONE_NEWCGROUP),
            (self.pid_ns, libc::CLONE_NEWPID),
        ] {
            if on {
                flags |= flag;
            }
        }
        let mut keep: Vec<RawFd> = keep_fds.to_vec();
        if !self.close_stdio {
            keep.extend([0, 1, 2]);
        }
        // A negative number is not an fd; keeping it would mean nothing.
        keep.retain(|&fd| fd >= 0);
        keep.sort_unstable();
        keep.dedup();
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(63);
        Ok(Prepared {
            user_ns: self.user_ns,
            uid_map,
            gid_map,
            caller_is_root: euid == 0,
            unshare_flags: flags,
            pid_ns: self.pid_ns,
            new_root: self.new_root,
            binds,
            tmpfs_target: c"/tmp".into(),
            tmpfs_options: c"mode=0755,size=65536".into(),
            no_new_privs: self.no_new_privs,
            seccomp: self.seccomp.as_ref().map(|s| s.program.clone()),
            relay_seccomp: if self.pid_ns && self.seccomp.is_some() {
                Some(SeccompPolicy::allow_list(RELAY_SYSCALLS, SeccompAction::KillProcess)?.program)
            } else {
                None
            },
            rlimits: self.rlimits.clone(),
            drop_caps: self.drop_caps,
            landlock,
            pdeath_signal: self.pdeath_signal,
            keep,
            last_cap,
            saved_dumpable: -1,
        })
    }
}

/// The Landlock ABI version of the running kernel, or `None` without Landlock.
pub fn landlock_abi() -> Option<u32> {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with a null attribute and size 0 only
    // returns the ABI version; it creates nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, /* LANDLOCK_CREATE_RULESET_VERSION */
        )
    };
    (r > 0).then_some(r as u32)
}

fn build_landlock(ro: &[PathBuf], rw: &[PathBuf]) -> Result<Option<OwnedFd>, JailError> {
    if landlock_abi().is_none() {
        return Ok(None);
    }
    // Best effort: access rights the kernel's ABI lacks are dropped from the request.
    let abi = ABI::V6;
    let err = |e: landlock::RulesetError| JailError::Landlock(e.to_string());
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(ro, AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(rw, AccessFs::from_all(abi)))
        .map_err(err)?;
    // The ruleset is applied in the child with landlock_restrict_self on this fd.
    Ok(created.into())
}

/// A bind prepared before the fork.
#[derive(Debug)]
pub(crate) struct PreparedBind {
    src: CString,
    /// Every directory to create, parents first, relative to the new root.
    dirs: Vec<CString>,
    target: CString,
    is_file: bool,
    writable: bool,
    device: bool,
}

fn cstring(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::NulInPath { path: p.to_owned() })
}

fn prepare_bind(b: &Bind) -> Result<PreparedBind, JailError> {
    let meta = std::fs::metadata(&b.src).map_err(|source| JailError::BindSource {
        path: b.src.clone(),
        source,
    })?;
    if !b.dst.is_absolute() {
        return Err(JailError::BindTarget {
            path: b.dst.clone(),
        });
    }
    let mut rel = PathBuf::new();
    let mut dirs = Vec::new();
    for c in b.dst.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => {
                if !rel.as_os_str().is_empty() {
                    dirs.push(cstring(&rel)?);
                }
                rel.push(n);
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(JailError::BindTarget {
                    path: b.dst.clone(),
                })
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(JailError::BindTarget {
            path: b.dst.clone(),
        });
    }
    Ok(PreparedBind {
        src: cstring(&b.src)?,
        dirs,
        target: cstring(&rel)?,
        is_file: !meta.is_dir(),
        writable: b.writable,
        device: b.device,
    })
}

/// A jail turned into data the child can apply with system calls only.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) user_ns: bool,
    pub(crate) uid_map: IdMap,
    pub(crate) gid_map: IdMap,
    caller_is_root: bool,
    unshare_flags: libc::c_int,
    pub(crate) pid_ns: bool,
    new_root: bool,
    binds: Vec<PreparedBind>,
    tmpfs_target: CString,
    tmpfs_options: CString,
    no_new_privs: bool,
    seccomp: Option<BpfProgram>,
    /// The pid-namespace relay's own filter (see [`RELAY_SYSCALLS`]), compiled before
    /// the fork so the relay only has to install it.
    relay_seccomp: Option<BpfProgram>,
    rlimits: Vec<Rlimit>,
    drop_caps: bool,
    landlock: Option<Option<OwnedFd>>,
    pdeath_signal: Option<i32>,
    pub(crate) keep: Vec<RawFd>,
    last_cap: u32,
    saved_dumpable: libc::c_int,
}

/// Defines [`Step`] and its decode table from one list of variants, numbered from 1.
macro_rules! steps {
    ($(#[$fdoc:meta])* $first:ident, $($(#[$doc:meta])* $name:ident,)*) => {
        /// The step of the child's setup that failed (reported to the parent with the errno).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Step {
            $(#[$fdoc])* $first = 1,
            $($(#[$doc])* $name,)*
        }

        impl Step {
            const ALL: &'static [Step] = &[Step::$first, $(Step::$name,)*];
        }
    };
}

steps! {
    /// `PR_SET_PDEATHSIG` or the parent died before it was set.
    ParentDeathSignal,
    /// Dropping supplementary groups before entering the user namespace.
    DropGroups,
    /// `unshare(CLONE_NEWUSER)`.
    UnshareUser,
    /// The uid/gid map handshake with the parent.
    IdMapHandshake,
    /// `setresgid`/`setresuid` inside the user namespace.
    SetIds,
    /// `unshare` of the other namespaces.
    UnshareNamespaces,
    /// The fork into the pid namespace.
    ForkPidNamespace,
    /// Making the mount tree private.
    MountPrivate,
    /// Cloning a bind source (`open_tree`/`mount_setattr`).
    BindClone,
    /// Mounting the tmpfs root.
    MountTmpfs,
    /// Attaching a bind mount (`mkdir`/`move_mount`).
    BindAttach,
    /// `pivot_root` and detaching the old root.
    PivotRoot,
    /// Remounting the new root read-only.
    RemountRoot,
    /// `setrlimit`.
    Rlimit,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// `landlock_restrict_self`.
    Landlock,
    /// `close_range`.
    CloseFds,
    /// Dropping capabilities.
    DropCapabilities,
    /// Installing the seccomp filter.
    Seccomp,
}

impl Step {
    /// Decodes a step number from the child.
    pub fn from_u32(v: u32) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| *s as u32 == v)
    }
}

/// Child-side failure: the step and the errno.
pub(crate) type StepResult = Result<(), (Step, i32)>;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(step: Step, r: libc::c_long) -> StepResult {
    if r < 0 {
        Err((step, errno()))
    } else {
        Ok(())
    }
}

// Everything below runs in the forked child: system calls on prepared data only.

impl Prepared {
    /// Step 1: parent-death signal, for a child whose parent is `parent`.
    pub(crate) fn set_parent_death_signal(
        &self,
        signal: Option<i32>,
        parent: libc::pid_t,
    ) -> StepResult {
        let Some(sig) = signal.or(self.pdeath_signal) else {
            return Ok(());
        };
        // SAFETY: prctl(PR_SET_PDEATHSIG) with a signal number; no memory is passed.
        check(Step::ParentDeathSignal, unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0)
        } as libc::c_long)?;
        // SAFETY: getppid cannot fail.
        if unsafe { libc::getppid() } != parent {
            return Err((Step::ParentDeathSignal, libc::ESRCH));
        }
        Ok(())
    }

    /// Step 2a: enter the user namespace (the parent then writes the maps).
    pub(crate) fn unshare_user(&mut self) -> StepResult {
        if self.caller_is_root {
            // SAFETY: setgroups with an empty list reads no memory.
            let r = unsafe { libc::setgroups(0, std::ptr::null()) };
            check(Step::DropGroups, r as libc::c_long)?;
        }
        // SAFETY: PR_GET/SET_DUMPABLE with constants. Dumpable for the handshake, so that
        // an unprivileged parent (whose setuid cleared the flag) can open our /proc id map
        // files; `set_ids` restores the previous value.
        unsafe {
            self.saved_dumpable = libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0);
            libc::prctl(libc::PR_SET_DUMPABLE, 1 as libc::c_ulong, 0, 0, 0);
        }
        // SAFETY: unshare with a flag constant.
        check(
            Step::UnshareUser,
            unsafe { libc::unshare(libc::CLONE_NEWUSER) } as libc::c_long,
        )
    }

    /// Step 2b: take the mapped ids.
    pub(crate) fn set_ids(&self) -> StepResult {
        let (u, g) = (self.uid_map.inside, self.gid_map.inside);
        // SAFETY: plain id-setting system calls.
        check(Step::SetIds, unsafe { libc::setresgid(g, g, g) }
            as libc::c_long)?;
        // SAFETY: as above.
        check(Step::SetIds, unsafe { libc::setresuid(u, u, u) }
            as libc::c_long)?;
        if self.saved_dumpable >= 0 {
            // SAFETY: PR_SET_DUMPABLE with the value read before the handshake.
            unsafe {
                libc::prctl(
                    libc::PR_SET_DUMPABLE,
                    self.saved_dumpable as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
        }
        Ok(())
    }

    /// Confines the pid-namespace relay, which only waits: `no_new_privs` and, if the
    /// jail drops capabilities, no capabilities. Failures are ignored (the relay holds
    /// no fds and runs no foreign code).
    pub(crate) fn harden_relay(&self) {
        // SAFETY: prctl with constants.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
        if self.drop_caps {
            let _ = drop_all_caps(self.last_cap);
        }
        if let Some(prog) = &self.relay_seccomp {
            // Best effort like the rest of the relay's hardening: a relay that could not
            // install it still only waits for pid 1.
            let _ = install_filter(prog);
        }
    }

    /// Step 3: the other namespaces.
    pub(crate) fn unshare_rest(&self) -> StepResult {
        if self.unshare_flags == 0 {
            return Ok(());
        }
        // SAFETY: unshare with flag constants.
        check(
            Step::UnshareNamespaces,
            unsafe { libc::unshare(self.unshare_flags) } as libc::c_long,
        )
    }

    /// Steps 5 to 10 (after any pid namespace fork), up to but excluding seccomp.
    pub(crate) fn confine(&mut self, extra_keep: RawFd) -> StepResult {
        // While the host's /proc is still in reach and every system call allowed.
        warm_up_runtime();
        if self.seccomp.is_some() {
            no_backtraces();
        }
        if self.new_root {
            self.pivot_root()?;
        }
        for r in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            };
            // SAFETY: `lim` is a valid rlimit that outlives the call.
            check(Step::Rlimit, unsafe { libc::setrlimit(r.resource, &lim) }
                as libc::c_long)?;
        }
        if self.no_new_privs || self.seccomp.is_some() || self.landlock.is_some() {
            // SAFETY: prctl with constants.
            check(Step::NoNewPrivs, unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0)
            } as libc::c_long)?;
        }
        if let Some(Some(fd)) = self.landlock.take() {
            // SAFETY: landlock_restrict_self with a ruleset fd we own and no flags.
            let r =
                unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32) };
            check(Step::Landlock, r)?;
            drop(fd);
        }
        self.close_fds(extra_keep)?;
        if self.drop_caps {
            drop_all_caps(self.last_cap)?;
        }
        Ok(())
    }

    fn close_fds(&self, extra_keep: RawFd) -> StepResult {
        let mut next: u32 = 0;
        let close_below = |fd: RawFd, next: &mut u32| -> StepResult {
            let fd = fd as u32;
            if fd > *next {
                // SAFETY: close_range on a numeric range; closing fds this process owns
                // is what we want, nothing in the child refers to them any more.
                check(Step::CloseFds, unsafe {
                    libc::syscall(libc::SYS_close_range, *next, fd - 1, 0u32)
                })?;
            }
            if fd >= *next {
                *next = fd.saturating_add(1);
            }
            Ok(())
        };
        // `keep` is sorted; merge in the extra fd.
        let mut extra_done = extra_keep < 0;
        for &fd in &self.keep {
            if !extra_done && extra_keep < fd {
                close_below(extra_keep, &mut next)?;
                extra_done = true;
            }
            close_below(fd, &mut next)?;
        }
        if !extra_done {
            close_below(extra_keep, &mut next)?;
        }
        // SAFETY: as above, closes everything from `next` up.
        check(Step::CloseFds, unsafe {
            libc::syscall(libc::SYS_close_range, next, u32::MAX, 0u32)
        })
    }

    fn pivot_root(&mut self) -> StepResult {
        // SAFETY: every pointer is either null or a NUL-terminated
        // string from `self`, alive for the call; the calls change only this process's
        // private mount namespace.
        check(Step::MountPrivate, unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        } as libc::c_long)?;
        // Clone every bind source before the tmpfs goes anywhere, so that a source under
        // the tmpfs mount point is not hidden by it.
        let mut clones: [RawFd; 64] = [-1; 64];
        if self.binds.len() > clones.len() {
            return Err((Step::BindClone, libc::E2BIG));
        }
        for (i, b) in self.binds.iter().enumerate() {
            // SAFETY: see above; open_tree returns a new fd or -1.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    b.src.as_ptr(),
                    (1 /* OPEN_TREE_CLONE */ | libc::O_CLOEXEC | 0x8000/* AT_RECURSIVE */)
                        as libc::c_uint,
                )
            };
            check(Step::BindClone, fd)?;
            clones[i] = fd as RawFd;
            let mut attr_set: u64 = 0x2; // MOUNT_ATTR_NOSUID
            if !b.device {
                attr_set |= 0x4; // MOUNT_ATTR_NODEV
            }
            if !b.writable {
                attr_set |= 0x1; // MOUNT_ATTR_RDONLY
            }
            // struct mount_attr: attr_set, attr_clr, propagation, userns_fd.
            let attr: [u64; 4] = [attr_set, 0, 0, 0];
            // SAFETY: `attr` is a valid struct mount_attr of the size passed.
            check(Step::BindClone, unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    fd as RawFd,
                    c"".as_ptr(),
                    (libc::AT_EMPTY_PATH | 0x8000) as libc::c_uint,
                    attr.as_ptr(),
                    std::mem::size_of_val(&attr),
                )
            })?;
        }
        // SAFETY: see above.
        check(Step::MountTmpfs, unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                self.tmpfs_target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                self.tmpfs_options.as_ptr().cast(),
            )
        } as libc::c_long)?;
        // SAFETY: chdir to a NUL-terminated path.
        let r = unsafe { libc::chdir(self.tmpfs_target.as_ptr()) };
        check(Step::MountTmpfs, r as libc::c_long)?;
        for (i, b) in self.binds.iter().enumerate() {
            for d in &b.dirs {
                // SAFETY: mkdir of a NUL-terminated relative path.
                let r = unsafe { libc::mkdir(d.as_ptr(), 0o755) };
                if r < 0 && errno() != libc::EEXIST {
                    return Err((Step::BindAttach, errno()));
                }
            }
            if b.is_file {
                // SAFETY: creates an empty mount point file; the fd is closed at once.
                let fd = unsafe {
                    libc::open(
                        b.target.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    )
                };
                check(Step::BindAttach, fd as libc::c_long)?;
                // SAFETY: closing the fd just opened.
                unsafe { libc::close(fd) };
            } else {
                // SAFETY: mkdir of a NUL-terminated relative path.
                let r = unsafe { libc::mkdir(b.target.as_ptr(), 0o755) };
                if r < 0 && errno() != libc::EEXIST {
                    return Err((Step::BindAttach, errno()));
                }
            }
            // SAFETY: moves the detached clone (our fd) onto the new mount point.
            check(Step::BindAttach, unsafe {
                libc::syscall(
                    libc::SYS_move_mount,
                    clones[i],
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    b.target.as_ptr(),
                    0x4u32, /* MOVE_MOUNT_F_EMPTY_PATH */
                )
            })?;
            // SAFETY: closing our clone fd; the mount stays attached.
            unsafe { libc::close(clones[i]) };
        }
        // SAFETY: pivot_root(".", ".") stacks the old root on the new one; the detach
        // below removes it. Both paths are static C strings.
        check(Step::PivotRoot, unsafe {
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr())
        })?;
        // SAFETY: see above.
        let r = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
        check(Step::PivotRoot, r as libc::c_long)?;
        // SAFETY: chdir to a static path.
        check(Step::PivotRoot, unsafe { libc::chdir(c"/".as_ptr()) }
            as libc::c_long)?;
        // SAFETY: see above.
        check(Step::RemountRoot, unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                std::ptr::null(),
            )
        } as libc::c_long)
    }

    /// Step 10b: install seccomp. Nothing may fail after this but the device itself.
    pub(crate) fn apply_seccomp(&self) -> StepResult {
        let Some(prog) = &self.seccomp else {
            return Ok(());
        };
        install_filter(prog)
    }
}

crate::syscall_list! {
    /// What the pid-namespace relay (the process that waits for the device's pid 1 and
    /// ends the way it ended, see `fork.rs`) may do once it is hardened: close fds,
    /// wait, and re-raise pid 1's signal (`setrlimit` of the core size, `signal`,
    /// `sigprocmask`, `getpid`, `kill`) or exit. Anything else kills it, and pid 1 with
    /// it (parent-death signal), so a compromise of the device that reaches the relay
    /// gains nothing the device did not have.
    pub const RELAY_SYSCALLS, RELAY_SYSCALL_NAMES = {
        common: [
            SYS_close_range,
            SYS_exit,
            SYS_exit_group,
            SYS_getpid,
            SYS_kill,
            SYS_prlimit64,
            SYS_restart_syscall,
            SYS_rt_sigaction,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_setrlimit,
            SYS_wait4,
        ],
        x86_64_legacy: [],
    };
}

/// Runs, at the start of [`Jail::confine`] (before the new root and the seccomp filter),
/// what the Rust runtime and our dependencies do lazily on first use with system calls
/// no allow-list names or files the jail does not have.
///
/// # The rule
///
/// A seccomp allow-list names what the device does at steady state. A system call
/// that a library makes once, to set itself up, the first time some function is used,
/// is not added to the list: it is made here, before the filter, by using that function
/// once. Only when a set-up cannot be triggered in advance is the call allowed, and then
/// narrowly (by argument). Known lazy set-ups:
///
/// - rustix reads the auxiliary vector (`prctl(PR_GET_AUXV)`, or `/proc/self/auxv`) the
///   first time it needs the page size or the vDSO (which it locates through that
///   vector on the first `clock_gettime`). The jailed camera worker died of `SIGSYS` on its
///   first frame timestamp because of this: the daemon had never asked for the time
///   before it forked, so the child did the set-up under the filter. Both clocks are
///   read here, before the root changes: on kernels before 6.4 (no `PR_GET_AUXV`) rustix
///   reads `/proc/self/auxv`, which the jail's root does not have. The page size is not
///   asked for: rustix panics when it cannot read the vector (a worker on Linux 6.1 died
///   so when this ran after the root changed), and no worker needs it.
/// - std's clocks (`Instant`, `SystemTime`) go through glibc's vDSO, which the dynamic
///   loader set up at start: nothing lazy, read here anyway (cheap).
/// - std's `HashMap` seed (`RandomState`) draws from `getrandom` once per thread;
///   drawn here (the lists allow `getrandom` too, for crates that draw more).
///
/// - std prints a backtrace when a panic or a failed allocation ends the process and
///   `RUST_BACKTRACE` is set; resolving it needs `getcwd` and the executable's file,
///   which neither a jail's root nor an allow-list has, so the process died of
///   `SIGSYS` before it could abort and was reported as a seccomp violation. A process
///   under a seccomp filter gets `RUST_BACKTRACE=0` ([`no_backtraces`]): its panic
///   message still reaches the log, then it aborts.
///
/// A fork inherits all of it, so a worker forked from a set-up process is warm too;
/// this makes the jail independent of what its parent happened to do first.
fn warm_up_runtime() {
    let _ = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let _ = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    let _ = std::time::Instant::now();
    let _ = std::time::SystemTime::now();
    let _ = std::collections::hash_map::RandomState::new();
}

/// Turns std's backtraces off (see [`warm_up_runtime`]'s rule).
fn no_backtraces() {
    // Called in the jailed child, a fresh fork with one thread: nothing reads the
    // environment meanwhile.
    std::env::set_var("RUST_BACKTRACE", "0");
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
}

/// Installs a compiled seccomp program on the calling thread.
fn install_filter(prog: &BpfProgram) -> StepResult {
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at the compiled program, alive for the call; the kernel
    // copies it. seccompiler's sock_filter has the kernel's layout.
    check(Step::Seccomp, unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            1u32, /* SECCOMP_SET_MODE_FILTER */
            0u32,
            &fprog as *const libc::sock_fprog,
        )
    })
}

fn drop_all_caps(last_cap: u32) -> StepResult {
    // SAFETY: prctl and capset with constants and a local, correctly
    // sized header/data pair that outlives the call.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    for cap in 0..=last_cap {
        // SAFETY: see above.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 && errno() != libc::EINVAL {
            return Err((Step::DropCapabilities, errno()));
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: see above.
    check(Step::DropCapabilities, unsafe {
        libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_targets_are_validated_and_split() {
        let b = prepare_bind(&Bind {
            src: "/etc".into(),
            dst: "/a/b/etc".into(),
            writable: false,
            device: false,
        })
        .unwrap();
        assert_eq!(b.dirs, vec![c"a".to_owned(), c"a/b".to_owned()]);
        assert_eq!(b.target, c"a/b/etc".to_owned());
        assert!(!b.is_file);
        for bad in ["relative", "/", "/a/../b"] {
            let err = prepare_bind(&Bind {
                src: "/etc".into(),
                dst: bad.into(),
                writable: false,
                device: false,
            })
            .unwrap_err();
            assert!(matches!(err, JailError::BindTarget { .. }), "{bad}: {err}");
        }
        let err = prepare_bind(&Bind {
            src: "/does/not/exist".into(),
            dst: "/x".into(),
            writable: false,
            device: false,
        })
        .unwrap_err();
        assert!(matches!(err, JailError::BindSource { .. }));
    }

    #[test]
    fn seccomp_policies_compile() {
        let p =
            SeccompPolicy::allow_list(&[libc::SYS_read, libc::SYS_write], SeccompAction::Errno(1))
                .unwrap();
        assert!(!p.is_empty());
        let json = r#"{"dev": {"mismatch_action": "allow", "match_action": "log",
                               "filter": [{"syscall": "getppid"}]}}"#;
        let p = SeccompPolicy::from_json(json.as_bytes(), "dev").unwrap();
        assert!(p.len() > 2);
        let err = SeccompPolicy::from_json(json.as_bytes(), "other").unwrap_err();
        assert!(matches!(err, JailError::SeccompFilterMissing { .. }));
        assert!(matches!(
            SeccompPolicy::from_json(&b"{"[..], "dev"),
            Err(JailError::Seccomp(_))
        ));
    }

    #[test]
    fn names_and_numbers_compile_to_the_same_program() {
        let arch = target_arch().unwrap();
        // Allowing everything is refused both ways (match and mismatch actions equal).
        assert!(SeccompPolicy::allow_list(&[libc::SYS_read], SeccompAction::Allow).is_err());
        assert!(SeccompPolicy::allow_names(&["read"], SeccompAction::Allow, arch).is_err());
        for action in [
            SeccompAction::Errno(13),
            SeccompAction::KillThread,
            SeccompAction::KillProcess,
            SeccompAction::Log,
            SeccompAction::Trace(7),
            SeccompAction::Trap,
        ] {
            let by_nr =
                SeccompPolicy::allow_list(&[libc::SYS_write, libc::SYS_read], action.clone())
                    .unwrap();
            let by_name =
                SeccompPolicy::allow_names(&["read", "write"], action.clone(), arch).unwrap();
            assert_eq!(by_nr.program, by_name.program, "{action:?}");
        }
        // Another architecture's policy compiles on any host; a name it lacks does not.
        assert!(SeccompPolicy::allow_names(
            &["ppoll"],
            SeccompAction::KillProcess,
            TargetArch::aarch64
        )
        .is_ok());
        assert!(matches!(
            SeccompPolicy::allow_names(&["poll"], SeccompAction::KillProcess, TargetArch::aarch64),
            Err(JailError::Seccomp(_))
        ));
    }

    #[test]
    fn step_numbers_round_trip() {
        for v in 0..40 {
            if let Some(s) = Step::from_u32(v) {
                assert_eq!(s as u32, v);
            }
        }
        assert_eq!(Step::from_u32(Step::Seccomp as u32), Some(Step::Seccomp));
        assert_eq!(Step::from_u32(0), None);
    }
}
