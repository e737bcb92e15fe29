//! Multi-node rendezvous over TCP: node 0 listens on `--master-addr:--master-port`, every other
//! node connects and says who it is, and node 0 hands all of them the same bytes (the NCCL unique
//! id that node 0 created). It doubles as a start-up barrier: it returns once all nodes are in.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"MOESRV01";
/// Largest payload accepted (an NCCL id is 128 bytes).
const MAX_PAYLOAD: u32 = 1 << 16;

#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// How long node 0 waits for the others, and the others keep retrying to reach it.
    pub timeout: Duration,
}

fn net_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Input(format!("rendezvous: {what}: {e}"))
}

impl Rendezvous {
    fn addr(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// Node 0 passes the payload; every node gets it back once all `nnodes` have joined.
    pub fn share(&self, payload: Option<&[u8]>) -> Result<Vec<u8>> {
        if self.node_rank >= self.nnodes {
            return Err(Error::Input(format!("--node-rank {} with --nnodes {}", self.node_rank, self.nnodes)));
        }
        match (self.node_rank, payload) {
            (0, Some(p)) => self.serve(p).map(|_| p.to_vec()),
            (0, None) => Err(Error::Input("rendezvous: node 0 must provide the payload".into())),
            _ => self.join(),
        }
    }

    fn serve(&self, payload: &[u8]) -> Result<()> {
        let listener = TcpListener::bind(self.addr()).map_err(net_err(format!("listening on {}", self.addr())))?;
        listener.set_nonblocking(true).map_err(net_err("listener".into()))?;
        let deadline = Instant::now() + self.timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..self.nnodes).map(|_| None).collect();
        let mut joined = 1;
        while joined < self.nnodes {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(net_err(format!("connection from {from}")))?;
                    s.set_read_timeout(Some(self.timeout)).map_err(net_err(format!("connection from {from}")))?;
                    let mut hello = [0u8; 16];
                    s.read_exact(&mut hello).map_err(net_err(format!("hello from {from}")))?;
                    let n = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
                    let rank = u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
                    if &hello[..8] != MAGIC {
                        return Err(Error::Input(format!("rendezvous: {from} is not a moeserve node")));
                    }
                    if n != self.nnodes || rank == 0 || rank >= n {
                        return Err(Error::Input(format!(
                            "rendezvous: {from} says --nnodes {n} --node-rank {rank}; this node has --nnodes {}",
                            self.nnodes
                        )));
                    }
                    if peers[rank].is_some() {
                        return Err(Error::Input(format!("rendezvous: two nodes with --node-rank {rank}")));
                    }
                    peers[rank] = Some(s);
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> = (1..self.nnodes).filter(|&r| peers[r].is_none()).collect();
                        return Err(Error::Input(format!(
                            "rendezvous: nodes {missing:?} did not join {} within {:?}",
                            self.addr(),
                            self.timeout
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(net_err("accept".into())(e)),
            }
        }
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or_else(|| Error::Input(format!("rendezvous: payload of {} bytes is too large", payload.len())))?;
        for (rank, s) in peers.iter_mut().enumerate().skip(1) {
            let s = s.as_mut().ok_or_else(|| Error::Input(format!("rendezvous: node {rank} missing")))?;
            s.write_all(&len.to_le_bytes())
                .and_then(|_| s.write_all(payload))
                .map_err(net_err(format!("sending to node {rank}")))?;
        }
        Ok(())
    }

    fn join(&self) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        let mut s = loop {
            match TcpStream::connect(self.addr()) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(net_err(format!("node 0 at {} unreachable for {:?}", self.addr(), self.timeout))(e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(self.timeout)).map_err(net_err("socket".into()))?;
        let mut hello = Vec::with_capacity(16);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&(self.nnodes as u32).to_le_bytes());
        hello.extend_from_slice(&(self.node_rank as u32).to_le_bytes());
        s.write_all(&hello).map_err(net_err(format!("hello to {}", self.addr())))?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).map_err(net_err(format!("waiting for node 0 at {}", self.addr())))?;
        let len = u32::from_le_bytes(len);
        if len > MAX_PAYLOAD {
            return Err(Error::Input(format!("rendezvous: node 0 announced {len} bytes")));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).map_err(net_err("payload from node 0".into()))?;
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn node(nnodes: usize, node_rank: usize, port: u16, timeout_ms: u64) -> Rendezvous {
        Rendezvous {
            nnodes,
            node_rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn every_node_gets_node_zeros_payload() {
        let port = free_port();
        let id: Vec<u8> = (0..128u8).collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            // the other nodes may start first: they retry until node 0 listens
            let hs: Vec<_> = (1..4).map(|r| s.spawn(move || node(4, r, port, 5000).share(None).unwrap())).collect();
            std::thread::sleep(Duration::from_millis(100));
            let id = &id;
            let zero = s.spawn(move || node(4, 0, port, 5000).share(Some(id)).unwrap());
            std::iter::once(zero).chain(hs).map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|p| *p == id));
    }

    #[test]
    fn mismatched_or_missing_nodes_are_errors() {
        let port = free_port();
        let err = std::thread::scope(|s| {
            let other = s.spawn(move || node(3, 1, port, 2000).share(None));
            let e = node(2, 0, port, 2000).share(Some(b"id")).unwrap_err().to_string();
            let _ = other.join();
            e
        });
        assert!(err.contains("--nnodes 3 --node-rank 1"), "{err}");
        let err = node(2, 0, free_port(), 100).share(Some(b"id")).unwrap_err().to_string();
        assert!(err.contains("nodes [1] did not join"), "{err}");
        let err = node(2, 1, free_port(), 100).share(None).unwrap_err().to_string();
        assert!(err.contains("unreachable"), "{err}");
    }
}
