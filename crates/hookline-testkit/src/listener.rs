//! A TCP listener that only counts: proof that nothing connected to an address the egress
//! policy refuses (a receiver would count requests; this counts connections).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Accepts connections on its address, counts them and closes them unanswered.
pub struct CountingListener {
    pub addr: SocketAddr,
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingListener {
    /// Binds `addr` (`127.0.0.2:0` for a loopback address other than 127.0.0.1).
    pub async fn bind(addr: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind a counting listener on {addr}: {e}"));
        let addr = listener.local_addr().expect("a bound address");
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Self { addr, count, task }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
