//! `gofe await`: blocks until the local proxy's admin server says it is ready, so that
//! a postStart hook holds the application back until its traffic can flow.

use anyhow::bail;
use gofe_proxy::config::{self, Env};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct AwaitArgs {
    /// Give up after this long (e.g. 2m, 30s).
    #[arg(long, default_value = "120s", value_parser = config::parse_nonzero_duration)]
    pub timeout: Duration,
    /// The admin server to ask; default 127.0.0.1 on the port of GOFE_ADMIN_LISTEN.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
}

/// How often to ask: fast enough not to delay the application noticeably.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

pub fn run(args: &AwaitArgs) -> anyhow::Result<()> {
    let admin = match args.admin {
        Some(a) => a,
        None => {
            let mut env = Env::from_process();
            let listen = env.get(&config::ADMIN_LISTEN, config::parse_socket_addr);
            env.finish().map_err(crate::BadConfig)?;
            SocketAddr::from(([127, 0, 0, 1], listen.port()))
        }
    };
    let deadline = Instant::now() + args.timeout;
    loop {
        if ready(admin) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the proxy at {admin} was not ready within {:?}",
                args.timeout
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// One `GET /ready`; true on 200.
pub fn ready(admin: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(&head[9..12] == b"200")
    };
    attempt().unwrap_or(false)
}
