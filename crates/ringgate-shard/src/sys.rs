//! The few system calls the shard makes outside io_uring: the listening socket,
//! the doorbell eventfd, CPU pinning and reading kernel facts.
//!
//! Owns every raw `libc` call of the crate except the buffer ring's mmap.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

/// Listen backlog; the kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: i32 = 4096;

/// Probes TCP keepalive sends to a silent peer before giving up on it.
const KEEPALIVE_PROBES: u32 = 3;

/// Binds a listening TCP socket with SO_REUSEPORT, so every shard can bind the
/// same address and the kernel spreads connections over them.
///
/// With `keepalive`, accepted sockets inherit TCP keepalive from the listener
/// (no per-connection system call, which direct descriptors could not make
/// anyway): the kernel probes a peer silent for `keepalive`, every third of
/// that after, and TCP_USER_TIMEOUT drops a peer that has acknowledged nothing
/// for twice `keepalive` (probes and unacknowledged data alike). This finds
/// dead peers and refreshes NAT state without waking the shard or the client.
pub fn bind_listener(addr: SocketAddr, keepalive: Option<Duration>) -> io::Result<OwnedFd> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY: events are small and latency matters.
    socket.set_tcp_nodelay(true)?;
    if let Some(idle) = keepalive {
        let interval = (idle / 3).max(Duration::from_secs(1));
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(KEEPALIVE_PROBES),
        )?;
        socket.set_tcp_user_timeout(Some(idle * 2))?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The address a listener is bound to (the real port when 0 was asked for).
pub fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    let socket = Socket::from(fd.try_clone()?);
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener has no IP address"))
}

/// The doorbell another thread rings to wake a shard. Blocking on purpose:
/// io_uring answers a read of an O_NONBLOCK file with EAGAIN instead of waiting,
/// and a write blocks only if the counter nears 2^64, which never happens.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter.
pub fn ring_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an fd; errors are reported, not UB.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes a bit inside `set`; the index is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set) };
    // SAFETY: passes a valid pointer to a cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs this process may run on (its affinity mask), in order; all of
/// `0..cpu_count()` if the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: passes a valid pointer to a cpu_set_t of the size given.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return (0..cpu_count()).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads a bit inside `set`; cpu < CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// The soft RLIMIT_NOFILE: the most fixed-file slots one ring may register.
pub fn nofile_soft_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    rl.rlim_cur
}

/// The running kernel's release string and (major, minor) version.
pub fn kernel_version() -> (String, (u32, u32)) {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: passes a valid pointer to a utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return ("unknown".into(), (0, 0));
    }
    let release: String = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (release, (major, minor))
}

/// The number of CPUs this process may run on.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The raw fd of anything that has one (for io_uring's `types::Fd`).
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_listeners_share_a_port_with_reuseport() {
        let a = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = local_addr(&a).unwrap();
        assert_ne!(addr.port(), 0);
        let b = bind_listener(addr, None).unwrap();
        assert_eq!(local_addr(&b).unwrap(), addr);
    }

    #[test]
    fn accepted_sockets_inherit_keepalive_from_the_listener() {
        let listener = Socket::from(
            bind_listener(
                "127.0.0.1:0".parse().unwrap(),
                Some(Duration::from_secs(30)),
            )
            .unwrap(),
        );
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr.as_socket().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.keepalive().unwrap());
        assert_eq!(
            accepted.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            accepted.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(accepted.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(
            accepted.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(60))
        );
        let plain = Socket::from(bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap());
        assert!(!plain.keepalive().unwrap());
    }

    #[test]
    fn kernel_version_parses() {
        let (release, (major, _)) = kernel_version();
        assert!(!release.is_empty());
        assert!(major >= 3, "{release}");
    }
}
