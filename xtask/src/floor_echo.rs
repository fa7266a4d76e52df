//! `cargo xtask floor --echo`: what one echo costs the plainest epoll server, with no WebSocket work.
//!
//! A client process pinned to CPU 1 keeps one `--size` byte message in flight
//! on each of `--conns` loopback sockets; the measuring side, pinned to CPU 0, is
//! the plainest possible echo server: epoll, `recv`, `send` the same bytes, no
//! WebSocket framing, masking or UTF-8 work. Its CPU time per echo is, nearly
//! all of it, what the kernel charges an epoll server for receiving and
//! answering one small message on this machine: the yardstick for issue 6's
//! echo figure.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::floor::{accept_all, connect_all, pin, thread_cpu, Epoll, KillOnDrop};

/// Server CPU per echo (microseconds) and echoes per second.
pub struct EchoFloor {
    pub us_per_echo: f64,
    pub per_second: f64,
}

pub fn measure(conns: usize, size: usize, seconds: f64) -> Result<EchoFloor, String> {
    if conns == 0 || conns > 18_000 || size == 0 || seconds <= 0.0 {
        return Err("--conns must be from 1 to 18000; --size and --seconds above 0".into());
    }
    let listener = crate::floor::listener()?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut client = KillOnDrop(
        Command::new(exe)
            .args([
                "floor-echo-client",
                &addr.to_string(),
                &conns.to_string(),
                &size.to_string(),
                &seconds.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the client: {e}"))?,
    );
    let sockets = accept_all(&listener, conns, true)?;
    pin(0);
    let epoll = Epoll::new(&sockets)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = conns;
    let mut echoed = 0u64;
    let start = thread_cpu();
    let began = Instant::now();
    let mut ready = Vec::new();
    while open > 0 {
        epoll.wait(&mut ready, false)?;
        for &i in &ready {
            // One read per readiness, as uWebSockets does (level-triggered epoll
            // reports the socket again if more is waiting): the fewest system
            // calls an epoll server can make per echo.
            let mut s = &sockets[i];
            match s.read(&mut buf) {
                Ok(0) => {
                    open -= 1;
                    epoll.remove(s)?;
                }
                Ok(n) => {
                    // A short write would need a queue; the client keeps one
                    // message in flight, so the socket buffer always has room.
                    s.write_all(&buf[..n]).map_err(|e| format!("send: {e}"))?;
                    echoed += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    open -= 1;
                    epoll.remove(s)?;
                }
                Err(e) => return Err(format!("recv: {e}")),
            }
        }
    }
    let spent = thread_cpu() - start;
    let elapsed = began.elapsed();
    let mut out = String::new();
    client
        .0
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .map_err(|e| e.to_string())?;
    if !client.0.wait().map_err(|e| e.to_string())?.success() {
        return Err(format!("the echo client failed: {out}"));
    }
    let messages = echoed / size as u64;
    if messages == 0 || out.trim() != messages.to_string() {
        return Err(format!(
            "the client counted {} echoes, the server {messages}",
            out.trim()
        ));
    }
    Ok(EchoFloor {
        us_per_echo: spent.as_secs_f64() * 1e6 / messages as f64,
        per_second: messages as f64 / elapsed.as_secs_f64(),
    })
}

/// The client process: one message in flight per socket for `seconds`, then
/// close; print the number of complete echoes.
pub fn client(addr: &str, conns: usize, size: usize, seconds: f64) -> Result<(), String> {
    pin(1);
    let sockets = connect_all(addr, conns)?;
    let epoll = Epoll::new(&sockets)?;
    let message = vec![b'x'; size];
    let mut pending = vec![0usize; conns];
    for mut s in &sockets {
        s.write_all(&message).map_err(|e| format!("send: {e}"))?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoes = 0u64;
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let mut ready = Vec::new();
    while Instant::now() < stop {
        epoll.wait(&mut ready, false)?;
        for &i in &ready {
            let mut s = &sockets[i];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Err("the server closed early".into()),
                    Ok(n) => pending[i] += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("recv: {e}")),
                }
            }
            while pending[i] >= size {
                pending[i] -= size;
                echoes += 1;
                s.write_all(&message).map_err(|e| format!("send: {e}"))?;
            }
        }
    }
    // Count what is still on its way back, then close.
    for (i, s) in sockets.iter().enumerate() {
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        let mut s = s;
        while pending[i] < size {
            let n = s
                .read(&mut buf[..size - pending[i]])
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed early".into());
            }
            pending[i] += n;
        }
        echoes += 1;
        // SAFETY: shuts down a live fd owned by `s`.
        unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) };
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{echoes}");
    Ok(())
}
