//! The host side of the tests: the Firecracker-style AF_UNIX vsock convention, the
//! guest agent's control protocol, and checksummed transfers (the same generator and
//! checksum as xtask/guest/vsock-agent.c).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::Result;

/// The guest agent's control port.
pub const CONTROL_PORT: u32 = 999;

/// The checksum of a transfer: 64-bit little-endian words, tail zero-padded, length last.
#[derive(Clone, Copy, Debug)]
pub struct Sum {
    h: u64,
    carry: u64,
    carry_len: u32,
    total: u64,
}

fn mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0x100000001b3).rotate_left(29)
}

impl Default for Sum {
    fn default() -> Self {
        Sum {
            h: 0xcbf29ce484222325,
            carry: 0,
            carry_len: 0,
            total: 0,
        }
    }
}

impl Sum {
    /// Adds bytes.
    pub fn update(&mut self, mut p: &[u8]) {
        self.total += p.len() as u64;
        while self.carry_len != 0 {
            let Some((&b, rest)) = p.split_first() else {
                return;
            };
            self.carry |= u64::from(b) << (8 * self.carry_len);
            p = rest;
            self.carry_len += 1;
            if self.carry_len == 8 {
                self.h = mix(self.h, self.carry);
                self.carry = 0;
                self.carry_len = 0;
            }
        }
        let mut words = p.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.h = mix(self.h, u64::from_le_bytes(b));
        }
        for &b in words.remainder() {
            self.carry |= u64::from(b) << (8 * self.carry_len);
            self.carry_len += 1;
        }
    }

    /// The checksum of everything added.
    pub fn finish(&self) -> u64 {
        let mut h = self.h;
        if self.carry_len != 0 {
            h = mix(h, self.carry);
        }
        mix(h, self.total)
    }
}

/// The data generator: xorshift64 words seeded from the port.
pub struct Gen(u64);

impl Gen {
    /// The generator the guest uses for `port`.
    pub fn for_port(port: u32) -> Gen {
        Gen(0x9e3779b97f4a7c15 ^ u64::from(port).wrapping_mul(0x2545f4914f6cdd1d) ^ 1)
    }

    /// Fills whole words of `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut x = self.0;
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        self.0 = x;
    }
}

/// Connects to guest `port` through the muxer's socket: `CONNECT <port>\n`, answered by
/// `OK <host port>\n`. Returns the stream and the answer's port.
pub fn connect_guest(uds: &Path, port: u32, timeout: Duration) -> Result<(UnixStream, String)> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| format!("set timeout: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("CONNECT {port}: {e}"))?;
    let line = read_line(&mut s).map_err(|e| format!("answer to CONNECT {port}: {e}"))?;
    let rest = line
        .strip_prefix("OK ")
        .ok_or_else(|| format!("answer to CONNECT {port} is {line:?}, not \"OK <port>\""))?;
    s.set_read_timeout(None)
        .map_err(|e| format!("set timeout: {e}"))?;
    Ok((s, rest.to_string()))
}

/// Reads one '\n'-terminated line (at most 512 bytes), byte by byte so nothing after it
/// is consumed.
pub fn read_line(s: &mut impl Read) -> io::Result<String> {
    read_line_max(s, 512)
}

/// Reads one '\n'-terminated line of at most `max` bytes, byte by byte.
pub fn read_line_max(s: &mut impl Read, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed after {:?}", String::from_utf8_lossy(&line)),
                ))
            }
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) if line.len() < max => line.push(b[0]),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A control connection to the guest agent.
pub struct Control {
    stream: UnixStream,
}

impl Control {
    /// Connects to the agent and checks that it answers.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<Control> {
        let (stream, _) = connect_guest(uds, CONTROL_PORT, timeout)?;
        let mut c = Control { stream };
        let hello = c.command("HELLO", timeout)?;
        if hello != "HELLO" {
            return Err(format!("agent answered HELLO with {hello:?}"));
        }
        Ok(c)
    }

    /// Sends one command line and returns the first answer line.
    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<String> {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("send {line:?} to the agent: {e}"))?;
        self.answer(timeout)
            .map_err(|e| format!("answer to {line:?}: {e}"))
    }

    /// Reads the next answer line.
    pub fn answer(&mut self, timeout: Duration) -> Result<String> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("set timeout: {e}"))?;
        let line = read_line(&mut self.stream).map_err(|e| format!("{e}"))?;
        if let Some(err) = line.strip_prefix("ERR ") {
            return Err(format!("the guest agent reports: {err}"));
        }
        Ok(line)
    }

    /// Sends a command that must answer READY.
    pub fn command_ready(&mut self, line: &str, timeout: Duration) -> Result<()> {
        let a = self.command(line, timeout)?;
        if a != "READY" {
            return Err(format!("answer to {line:?} is {a:?}, not READY"));
        }
        Ok(())
    }
}

/// A transfer's result as the agent reports it: `DONE <ok> <bytes> <checksum> <usec>`.
#[derive(Debug)]
pub struct Done {
    /// Transfers that succeeded.
    pub ok: u32,
    /// Bytes moved.
    pub bytes: u64,
    /// XOR of the transfers' checksums.
    pub checksum: u64,
    /// Microseconds, in the guest.
    pub usec: u64,
}

impl Done {
    /// Parses a DONE line.
    pub fn parse(line: &str) -> Result<Done> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("malformed result {line:?}");
        if f.len() != 5 || f[0] != "DONE" {
            return Err(bad());
        }
        Ok(Done {
            ok: f[1].parse().map_err(|_| bad())?,
            bytes: f[2].parse().map_err(|_| bad())?,
            checksum: u64::from_str_radix(f[3], 16).map_err(|_| bad())?,
            usec: f[4].parse().map_err(|_| bad())?,
        })
    }
}

/// One verified transfer on the host side.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Bytes of payload.
    pub bytes: u64,
    /// Its checksum.
    pub checksum: u64,
}

/// Sends `[u64 len][data][u64 checksum]` from generator `gen` and waits for the
/// receiver's acknowledgement (its checksum).
pub fn send_transfer(s: &mut UnixStream, bytes: u64, mut gen: Gen) -> Result<Transfer> {
    s.set_read_timeout(Some(Duration::from_secs(900)))
        .map_err(|e| format!("set timeout: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut sum = Sum::default();
    s.write_all(&bytes.to_le_bytes())
        .map_err(|e| format!("send header: {e}"))?;
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).map_err(|e| e.to_string())?;
        gen.fill(&mut buf[..n]);
        sum.update(&buf[..n]);
        s.write_all(&buf[..n])
            .map_err(|e| format!("send after {} of {bytes} bytes: {e}", bytes - left))?;
        left -= n as u64;
    }
    let checksum = sum.finish();
    s.write_all(&checksum.to_le_bytes())
        .map_err(|e| format!("send trailer: {e}"))?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)
        .map_err(|e| format!("no acknowledgement from the receiver: {e}"))?;
    let ack = u64::from_le_bytes(ack);
    if ack != checksum {
        return Err(format!(
            "receiver's checksum {ack:016x} differs from the sent {checksum:016x}"
        ));
    }
    Ok(Transfer { bytes, checksum })
}

/// Receives one transfer, verifies the checksum against the trailer, acknowledges it.
pub fn receive_transfer(s: &mut UnixStream) -> Result<Transfer> {
    s.set_read_timeout(Some(Duration::from_secs(900)))
        .map_err(|e| format!("set timeout: {e}"))?;
    let mut head = [0u8; 8];
    s.read_exact(&mut head)
        .map_err(|e| format!("read header: {e}"))?;
    let bytes = u64::from_le_bytes(head);
    let mut buf = vec![0u8; 256 * 1024];
    let mut sum = Sum::default();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).map_err(|e| e.to_string())?;
        let got = match s.read(&mut buf[..n]) {
            Ok(0) => return Err(format!("EOF after {} of {bytes} bytes", bytes - left)),
            Ok(g) => g,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read after {} of {bytes} bytes: {e}", bytes - left)),
        };
        sum.update(&buf[..got]);
        left -= got as u64;
    }
    let mut trailer = [0u8; 8];
    s.read_exact(&mut trailer)
        .map_err(|e| format!("read trailer: {e}"))?;
    let trailer = u64::from_le_bytes(trailer);
    let checksum = sum.finish();
    if trailer != checksum {
        return Err(format!(
            "received {bytes} bytes with checksum {checksum:016x}, sender said {trailer:016x}"
        ));
    }
    s.write_all(&checksum.to_le_bytes())
        .map_err(|e| format!("send acknowledgement: {e}"))?;
    Ok(Transfer { bytes, checksum })
}

/// The host-side listening socket for guest connections to `port`: `<uds>_<port>`.
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Listens on `<uds>_<port>`.
pub fn listen(uds: &Path, port: u32) -> Result<UnixListener> {
    let path = host_port_path(uds, port);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    open_to_jailed_backend(&path)?;
    Ok(l)
}

/// With `OUTBOARD_E2E_JAIL` the back-end's worker runs as uid 65534 outside its user
/// namespace when the harness is root: it needs write permission to connect.
pub fn open_to_jailed_backend(path: &Path) -> Result<()> {
    if !crate::vm::jailed() {
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// Accepts `n` connections on `l` within `timeout`, each handled by `f` on its own
/// thread; returns every result.
pub fn accept_each<T: Send + 'static>(
    l: &UnixListener,
    n: usize,
    timeout: Duration,
    f: fn(&mut UnixStream) -> Result<T>,
) -> Result<Vec<Result<T>>> {
    l.set_nonblocking(true)
        .map_err(|e| format!("set_nonblocking: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut threads = Vec::new();
    while threads.len() < n {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| format!("set_nonblocking: {e}"))?;
                threads.push(std::thread::spawn(move || f(&mut s)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "only {} of {n} guest connections arrived within {timeout:?}",
                        threads.len()
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("handler panicked".into())))
        .collect())
}

/// An AF_UNIX SOCK_SEQPACKET listener on `<uds>_<port>` (std has no seqpacket sockets).
pub struct SeqListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl SeqListener {
    /// Binds and listens.
    pub fn bind(uds: &Path, port: u32) -> Result<SeqListener> {
        let path = host_port_path(uds, port);
        let _ = std::fs::remove_file(&path);
        let bytes = path.as_os_str().as_encoded_bytes();
        // SAFETY: socket(2) with constant arguments; no memory is passed.
        let raw =
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(format!("socket: {}", io::Error::last_os_error()));
        }
        // SAFETY: raw is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        if bytes.len() >= addr.sun_path.len() {
            return Err(format!("socket path {} is too long", path.display()));
        }
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_un of `len` bytes that lives across the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc != 0 {
            return Err(format!(
                "bind {}: {}",
                path.display(),
                io::Error::last_os_error()
            ));
        }
        open_to_jailed_backend(&path)?;
        // SAFETY: listen(2) on a socket we own; no memory is passed.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
            return Err(format!("listen: {}", io::Error::last_os_error()));
        }
        Ok(SeqListener { fd, path })
    }

    /// Accepts one connection (polling until `timeout`) and echoes every message back
    /// as one message until the peer closes; returns (messages, bytes).
    pub fn echo_one(&self, timeout: Duration) -> Result<(u64, u64)> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: pfd is one valid pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc <= 0 {
            return Err(format!(
                "no SEQPACKET connection on {} within {timeout:?}",
                self.path.display()
            ));
        }
        // SAFETY: accept4 on our listening socket; we pass no address buffer.
        let raw = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(format!("accept: {}", io::Error::last_os_error()));
        }
        // SAFETY: raw is a new descriptor that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut buf = vec![0u8; 128 * 1024];
        let (mut messages, mut bytes) = (0u64, 0u64);
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes for the call.
            let n = unsafe { libc::recv(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n == 0 {
                return Ok((messages, bytes));
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("recv: {e}"));
            }
            let n = n.unsigned_abs();
            // SAFETY: buf[..n] is initialized and valid for reads for the call.
            let w =
                unsafe { libc::send(conn.as_raw_fd(), buf.as_ptr().cast(), n, libc::MSG_NOSIGNAL) };
            if w < 0 || w.unsigned_abs() != n {
                return Err(format!(
                    "echo of a {n}-byte message: {}",
                    io::Error::last_os_error()
                ));
            }
            messages += 1;
            bytes += n as u64;
        }
    }
}

impl Drop for SeqListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_independent_of_chunking() {
        let mut data = vec![0u8; 1000];
        Gen::for_port(5).fill(&mut data[..1000]);
        let mut whole = Sum::default();
        whole.update(&data[..997]);
        let mut parts = Sum::default();
        for chunk in data[..997].chunks(13) {
            parts.update(chunk);
        }
        assert_eq!(whole.finish(), parts.finish());
        let mut other = Sum::default();
        other.update(&data[..996]);
        assert_ne!(whole.finish(), other.finish());
    }

    #[test]
    fn checksum_catches_a_flipped_bit() {
        let mut data = vec![0u8; 4096];
        Gen::for_port(7).fill(&mut data);
        let mut a = Sum::default();
        a.update(&data);
        data[1234] ^= 4;
        let mut b = Sum::default();
        b.update(&data);
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn done_lines_parse_and_reject_garbage() {
        let d = Done::parse("DONE 32 134217728 00000000deadbeef 1234").unwrap();
        assert_eq!(
            (d.ok, d.bytes, d.checksum, d.usec),
            (32, 134217728, 0xdeadbeef, 1234)
        );
        assert!(Done::parse("DONE 1 2").is_err());
        assert!(Done::parse("READY").is_err());
        assert!(Done::parse("DONE x 2 3 4").is_err());
    }
}
