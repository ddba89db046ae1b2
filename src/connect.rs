//! The connect step every outbound TCP connection of postern shares: the
//! agent's to its station or proxy and to its local services, the
//! station's to its targets and to the other stations of a cluster. Each
//! has a deadline, so an address that drops SYNs (a firewall, a host
//! gone) costs a stream or a lane a bounded wait, never a hang.

use std::time::Duration;

use smol::net::{AsyncToSocketAddrs, TcpStream};

/// How long a target, a service, the station or a proxy has to accept
/// a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Failed(std::io::Error),
    #[error("no answer within {} s", .0.as_secs_f32())]
    NoAnswer(Duration),
}

/// A TCP connection to `addr` within `limit`, with Nagle's delay off: the
/// tunnel's records and the local ends' small writes go out at once.
pub async fn connect(
    addr: impl AsyncToSocketAddrs,
    limit: Duration,
) -> Result<TcpStream, ConnectError> {
    let connecting = async { TcpStream::connect(addr).await.map_err(ConnectError::Failed) };
    let socket = crate::task::within(limit, || ConnectError::NoAnswer(limit), connecting).await?;
    let _ = socket.set_nodelay(true);
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accept queue is full drops further SYNs: a connect
    /// to it hangs as one to a firewalled address does.
    #[test]
    fn a_connect_nobody_answers_ends_at_its_deadline() {
        use rustix::net::{self as net, AddressFamily, SocketType};
        let listener = net::socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
        let any = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0);
        net::bind(&listener, &any).expect("bind");
        net::listen(&listener, 0).expect("listen");
        let addr: std::net::SocketAddrV4 =
            net::getsockname(&listener).expect("address").try_into().expect("IPv4");
        let limit = Duration::from_millis(300);
        let result = smol::block_on(async {
            // Fill the queue (its length is the backlog, plus one on Linux).
            let mut held = Vec::new();
            loop {
                match connect(addr, limit).await {
                    Ok(socket) => held.push(socket),
                    Err(e) => return (held.len(), e),
                }
            }
        });
        assert!(matches!(result, (1..=4, ConnectError::NoAnswer(l)) if l == limit), "{result:?}");
        assert_eq!(result.1.to_string(), "no answer within 0.3 s");
    }

    #[test]
    fn a_refused_connect_says_why() {
        let addr = {
            let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            free.local_addr().expect("address")
        };
        let result = smol::block_on(connect(addr, CONNECT_TIMEOUT));
        match result {
            Err(ConnectError::Failed(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("{other:?}"),
        }
    }
}
