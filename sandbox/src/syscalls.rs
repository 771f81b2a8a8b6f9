//! Seccomp allow-lists written once for every architecture:
//! [`syscall_list!`](crate::syscall_list).
//!
//! # The rule
//!
//! An allow-list names each system call once, in one
//! [`syscall_list!`](crate::syscall_list) invocation, as libc spells it (`SYS_` + the
//! kernel's name). The invocation has two parts:
//!
//! - `common`: calls that every supported architecture (x86_64 and aarch64) has under
//!   that name. aarch64 (like riscv64 and every other architecture on the kernel's
//!   generic system call table) only has the `*at` / `p*` forms, so these are the
//!   calls to list for anything glibc, std, rustix or the device itself issues:
//!   `ppoll`, `epoll_pwait`, `unlinkat`, `openat`, `newfstatat`, `faccessat`, `pipe2`,
//!   `dup3`, `pselect6`, `eventfd2`, `epoll_create1`, `clock_nanosleep`, ...
//! - `x86_64_legacy`: calls that only x86_64 has, the older forms that glibc and the
//!   Rust runtime still issue there for the same library function (glibc's `poll()` is
//!   the `poll` system call on x86_64 and `ppoll` on aarch64; `epoll_wait()` is
//!   `epoll_wait` / `epoll_pwait`; `unlink()` is `unlink` / `unlinkat`; likewise
//!   `open`, `stat`, `access`, `pipe`, `dup2`, `select`, ...). Each legacy entry's
//!   generic equivalent must be in `common` too, or the list is incomplete on aarch64.
//!
//! The macro turns the one description into two constants:
//!
//! - `&[i64]` of the compile target's numbers (libc's `SYS_*` constants), where the
//!   legacy part exists only under `#[cfg(target_arch = "x86_64")]` — written in this
//!   macro and nowhere else, so no allow-list carries its own `cfg`;
//! - a [`SyscallNames`] with the names, from which [`SyscallNames::for_arch`] and
//!   [`SeccompPolicy::allow_names`](crate::SeccompPolicy::allow_names) build the policy
//!   for any seccompiler [`TargetArch`] with seccompiler's own syscall tables. That is
//!   how an x86_64 host checks the aarch64 policy (every `common` name must exist on
//!   aarch64, every legacy name must not) without an aarch64 machine, and how a test
//!   checks that the names and libc's numbers describe the same filter.
//!
//! A name in `common` that aarch64 lacks fails the aarch64 build (libc has no such
//! constant there); a name in `x86_64_legacy` that aarch64 has would leave aarch64
//! without it, which the tests of the lists in this crate and in `outboard-vmm-glue` catch
//! with [`SyscallNames::check`].

use seccompiler::TargetArch;

#[doc(hidden)]
pub use libc as __libc;

/// The names of an allow-list made by [`syscall_list!`](crate::syscall_list), without
/// the `SYS_` prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallNames {
    /// Calls every supported architecture has under this name.
    pub common: &'static [&'static str],
    /// Calls only x86_64 has (legacy forms of calls in `common`).
    pub x86_64_legacy: &'static [&'static str],
}

impl SyscallNames {
    /// The names that make up the list on `arch`: `common`, plus `x86_64_legacy` on
    /// x86_64.
    pub fn for_arch(&self, arch: TargetArch) -> Vec<&'static str> {
        let legacy: &[&str] = match arch {
            TargetArch::x86_64 => self.x86_64_legacy,
            _ => &[],
        };
        self.common.iter().chain(legacy).copied().collect()
    }

    /// Checks the rule of the module docs with seccompiler's syscall tables: every
    /// `common` name exists on x86_64 and on aarch64, every `x86_64_legacy` name exists
    /// on x86_64 and not on aarch64. Returns the offending names, or an empty list.
    pub fn check(&self) -> Vec<String> {
        let mut bad = Vec::new();
        for name in self.common {
            for arch in [TargetArch::x86_64, TargetArch::aarch64] {
                if !name_exists(name, arch) {
                    bad.push(format!("{name}: in common but not on {arch:?}"));
                }
            }
        }
        for name in self.x86_64_legacy {
            if !name_exists(name, TargetArch::x86_64) {
                bad.push(format!("{name}: in x86_64_legacy but not on x86_64"));
            }
            if name_exists(name, TargetArch::aarch64) {
                bad.push(format!(
                    "{name}: in x86_64_legacy but aarch64 has it (move it to common)"
                ));
            }
        }
        bad
    }
}

/// Whether seccompiler's syscall table of `arch` knows `name`.
fn name_exists(name: &str, arch: TargetArch) -> bool {
    let json = serde_json::json!({
        "probe": {
            "mismatch_action": "kill_process",
            "match_action": "allow",
            "filter": [{"syscall": name}],
        }
    });
    seccompiler::compile_from_json(json.to_string().as_bytes(), arch).is_ok()
}

/// `SYS_read` -> `read`, at compile time (used by `syscall_list!`).
#[doc(hidden)]
pub const fn __sys_name(ident: &'static str) -> &'static str {
    match ident.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match core::str::from_utf8(rest) {
            Ok(name) => name,
            Err(_) => panic!("syscall_list!: entry is not UTF-8"),
        },
        _ => panic!("syscall_list!: entries are libc's SYS_* names"),
    }
}

/// Declares a seccomp allow-list once for every architecture (the rule is in the
/// [module docs](crate::syscalls)):
///
/// ```
/// outboard_sandbox::syscall_list! {
///     /// What my device calls.
///     pub const MY_SYSCALLS, MY_SYSCALL_NAMES = {
///         common: [SYS_read, SYS_ppoll, SYS_unlinkat],
///         x86_64_legacy: [SYS_poll, SYS_unlink],
///     };
/// }
/// # use outboard_sandbox::SeccompPolicy;
/// # use seccompiler::SeccompAction;
/// // This target's numbers:
/// let policy = SeccompPolicy::allow_list(MY_SYSCALLS, SeccompAction::KillProcess)?;
/// // Any architecture's, by name:
/// let arm = SeccompPolicy::allow_names(
///     &MY_SYSCALL_NAMES.for_arch(seccompiler::TargetArch::aarch64),
///     SeccompAction::KillProcess,
///     seccompiler::TargetArch::aarch64,
/// )?;
/// assert!(MY_SYSCALL_NAMES.check().is_empty());
/// # Ok::<(), outboard_sandbox::JailError>(())
/// ```
///
/// This defines `MY_SYSCALLS: &[i64]` (this target's numbers, the legacy part only on
/// x86_64) with the given docs, and `MY_SYSCALL_NAMES: SyscallNames`.
#[macro_export]
macro_rules! syscall_list {
    (
        $(#[$meta:meta])*
        $vis:vis const $numbers:ident, $names:ident = {
            common: [$($common:ident),* $(,)?],
            x86_64_legacy: [$($legacy:ident),* $(,)?] $(,)?
        };
    ) => {
        $(#[$meta])*
        $vis const $numbers: &[i64] = &[
            $($crate::syscalls::__libc::$common,)*
            $(#[cfg(target_arch = "x86_64")] $crate::syscalls::__libc::$legacy,)*
        ];

        #[doc = concat!(
            "The names of [`", stringify!($numbers), "`], to build its policy for any ",
            "architecture (see `outboard_sandbox::syscalls`)."
        )]
        $vis const $names: $crate::syscalls::SyscallNames = $crate::syscalls::SyscallNames {
            common: &[$($crate::syscalls::__sys_name(stringify!($common)),)*],
            x86_64_legacy: &[$($crate::syscalls::__sys_name(stringify!($legacy)),)*],
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::syscall_list! {
        /// A test list.
        const TEST_SYSCALLS, TEST_NAMES = {
            common: [SYS_read, SYS_ppoll],
            x86_64_legacy: [SYS_poll],
        };
    }

    #[test]
    fn names_are_stripped_and_split_by_arch() {
        assert_eq!(TEST_NAMES.common, &["read", "ppoll"]);
        assert_eq!(TEST_NAMES.x86_64_legacy, &["poll"]);
        assert_eq!(
            TEST_NAMES.for_arch(TargetArch::x86_64),
            ["read", "ppoll", "poll"]
        );
        assert_eq!(TEST_NAMES.for_arch(TargetArch::aarch64), ["read", "ppoll"]);
        assert!(TEST_NAMES.check().is_empty());
        assert_eq!(TEST_SYSCALLS[..2], [libc::SYS_read, libc::SYS_ppoll]);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(TEST_SYSCALLS.len(), 3);
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(TEST_SYSCALLS.len(), 2);
    }

    #[test]
    fn the_proxy_child_list_holds_on_every_arch() {
        use crate::proxy::{CHILD_SYSCALLS, CHILD_SYSCALL_NAMES};
        use crate::SeccompPolicy;
        use seccompiler::SeccompAction;

        assert_eq!(CHILD_SYSCALL_NAMES.check(), Vec::<String>::new());
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let names = CHILD_SYSCALL_NAMES.for_arch(arch);
            assert!(SeccompPolicy::allow_names(&names, SeccompAction::KillProcess, arch).is_ok());
        }
        // The numbers are this target's view of the same names.
        let native = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        assert_eq!(
            CHILD_SYSCALLS.len(),
            CHILD_SYSCALL_NAMES.for_arch(native).len()
        );
        let by_nr = SeccompPolicy::allow_list(CHILD_SYSCALLS, SeccompAction::KillProcess);
        let by_name = SeccompPolicy::allow_names(
            &CHILD_SYSCALL_NAMES.for_arch(native),
            SeccompAction::KillProcess,
            native,
        );
        assert_eq!(
            format!("{:?}", by_nr.unwrap()),
            format!("{:?}", by_name.unwrap())
        );
        // The x86_64-only call has its generic form in the list.
        assert_eq!(CHILD_SYSCALL_NAMES.x86_64_legacy, ["poll"]);
        assert!(CHILD_SYSCALL_NAMES.common.contains(&"ppoll"));
    }

    #[test]
    fn check_names_misplaced_entries() {
        let bad = SyscallNames {
            common: &["poll", "read"],
            x86_64_legacy: &["ppoll", "no_such_call"],
        };
        let found = bad.check();
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("poll: in common but not on aarch64"));
        assert!(found[1].starts_with("ppoll: in x86_64_legacy but aarch64 has it"));
        assert!(found[2].starts_with("no_such_call: in x86_64_legacy but not on x86_64"));
    }
}
