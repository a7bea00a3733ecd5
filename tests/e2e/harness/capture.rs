//! Frames captured on one of the bridge's ports, as a packet sniffer would see them.

use super::pod::Pod;
use super::setup::*;
use anyhow::{anyhow, bail};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

/// Frames captured on one of the bridge's ports, as a packet sniffer would see them.
pub struct Capture {
    pub(super) stop: Arc<std::sync::atomic::AtomicBool>,
    pub(super) thread: Option<std::thread::JoinHandle<anyhow::Result<Vec<u8>>>>,
}

impl Capture {
    /// Starts capturing every frame on the bridge port of `pod`.
    pub fn start(pod: &Pod<'_>) -> anyhow::Result<Capture> {
        let netns = File::open(format!("/run/netns/{}", pod.world.bridge))?;
        // The bridge-side veth of a pod is v<host>, host being the last octet.
        let port = format!("v{}", pod.ip4.octets()[3]);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<u8>> {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let fd = packet_socket(&port)?;
            let _ = ready_tx.send(());
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: reading into a buffer we own, within its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.extend_from_slice(&buf[..n as usize]);
                }
            }
            // SAFETY: closing the descriptor this thread opened.
            unsafe { libc::close(fd) };
            Ok(frames)
        });
        ready_rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| anyhow!("capture did not start"))?;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns every byte captured.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .map_err(|_| anyhow!("capture thread panicked"))?
    }
}

/// A raw packet socket bound to `ifname`, with a short receive timeout so the capture
/// loop notices when to stop.
pub(super) fn packet_socket(ifname: &str) -> anyhow::Result<i32> {
    let index = nix::net::if_::if_nametoindex(ifname)?;
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain system calls with arguments built here; errors checked.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol as i32);
        if fd < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        if libc::bind(fd, (&addr as *const libc::sockaddr_ll).cast(), len) < 0 {
            bail!("bind to {ifname}: {}", std::io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        let tlen = std::mem::size_of::<libc::timeval>() as u32;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            tlen,
        );
        Ok(fd)
    }
}
