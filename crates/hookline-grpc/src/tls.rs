//! TLS on every listener of a process (gRPC, REST, admin HTTP): one rustls (ring)
//! server configuration per protocol, sharing one certificate that is re-read from its
//! files when they change (cert-manager rotation needs no restart) and, with a client
//! CA, a verifier that refuses in the handshake any client without a certificate from
//! that CA. Handshakes run concurrently and under a deadline, so a slow or silent client
//! never holds up the others.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The files of the `tls_*` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first (`tls_cert`).
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 or SEC1 (`tls_key`).
    pub key: PathBuf,
    /// PEM CA certificates; set, every client must present a certificate they issued
    /// (`tls_client_ca`).
    pub client_ca: Option<PathBuf>,
}

/// Why TLS cannot be set up; each says which file and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {setting} file {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the {setting} file {path} holds no usable PEM {expected}: {reason}")]
    Pem {
        setting: &'static str,
        path: PathBuf,
        expected: &'static str,
        reason: String,
    },
    #[error("tls_cert {cert} and tls_key {key} do not go together: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// How often, at most, the certificate files are read again to see if they changed.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress at once on one listener; more wait to be accepted.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// The ring provider every TLS configuration of Hookline uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side of TLS for one process; cheap to clone.
#[derive(Clone)]
pub struct TlsServer {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
    http_no_client_auth: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer").finish_non_exhaustive()
    }
}

/// Which listener an acceptor is for: the protocol it negotiates (ALPN), and whether
/// the client CA applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// HTTP/2 only; client certificates required when a client CA is set.
    Grpc,
    /// HTTP/1.1; client certificates required when a client CA is set.
    Rest,
    /// HTTP/1.1; never asks for a client certificate (probes and scrapers have none).
    Admin,
}

impl TlsServer {
    /// Reads the files now; a missing, unreadable or mismatched file fails here, at
    /// start, rather than at the first handshake.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = provider();
        let resolver = Arc::new(ReloadingCert::load(files, provider.clone())?);
        let verifier = match &files.client_ca {
            Some(path) => {
                let roots = root_store(path, "tls_client_ca")?;
                Some(
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::Setup(format!("tls_client_ca: {e}")))?,
                )
            }
            None => None,
        };
        let build = |alpn: &[&[u8]], client_auth: bool| -> Result<Arc<ServerConfig>, TlsError> {
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Setup(e.to_string()))?;
            let builder = match (&verifier, client_auth) {
                (Some(v), true) => builder.with_client_cert_verifier(v.clone()),
                _ => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(resolver.clone());
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(Self {
            grpc: build(&[b"h2"], true)?,
            http: build(&[b"http/1.1"], true)?,
            http_no_client_auth: build(&[b"http/1.1"], false)?,
        })
    }

    /// The acceptor of one listener.
    pub fn acceptor(&self, listener: Listener) -> TlsAcceptor {
        TlsAcceptor::from(match listener {
            Listener::Grpc => self.grpc.clone(),
            Listener::Rest => self.http.clone(),
            Listener::Admin => self.http_no_client_auth.clone(),
        })
    }

    /// The TLS connections of `incoming` (an accepted-connection stream, as tonic
    /// serves), handshaking up to [`MAX_PENDING_HANDSHAKES`] at once. Connections whose
    /// handshake fails are closed and left out.
    pub fn incoming<S, IO, E>(
        &self,
        incoming: S,
    ) -> impl Stream<Item = Result<TlsStream<IO>, E>> + Send + 'static
    where
        S: Stream<Item = Result<IO, E>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: Send + 'static,
    {
        let acceptor = self.acceptor(Listener::Grpc);
        incoming
            .map(move |accepted| {
                let acceptor = acceptor.clone();
                async move {
                    match accepted {
                        Ok(io) => handshake(&acceptor, io, "gRPC").await.map(Ok),
                        Err(e) => Some(Err(e)),
                    }
                }
            })
            .buffer_unordered(MAX_PENDING_HANDSHAKES)
            .filter_map(futures::future::ready)
    }
}

/// One handshake under [`HANDSHAKE_TIMEOUT`]; `None` (logged) when it fails.
async fn handshake<IO>(acceptor: &TlsAcceptor, io: IO, listener: &str) -> Option<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no complete handshake within {HANDSHAKE_TIMEOUT:?}"),
    };
    metrics::counter!("hookline_tls_handshake_failures_total", "listener" => listener.to_owned())
        .increment(1);
    tracing::debug!(listener, error = %why, "TLS handshake failed; connection closed");
    None
}

/// Serves `app` on `listener` (an axum listener: admin HTTP, REST) until `stop`, in TLS
/// as the given kind of listener when `tls` is set.
pub async fn serve_http<L>(
    listener: L,
    tls: Option<(&TlsServer, Listener)>,
    app: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()>
where
    L: axum::serve::Listener,
    L::Io: Unpin,
    L::Addr: std::fmt::Debug,
{
    match tls {
        Some((server, kind)) => {
            axum::serve(TlsListener::new(listener, server, kind), app)
                .with_graceful_shutdown(stop)
                .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    }
}

type Handshake<IO, A> = Pin<Box<dyn Future<Output = Option<(TlsStream<IO>, A)>> + Send>>;

/// An axum listener (admin HTTP, REST) that serves TLS over `L`'s connections.
pub struct TlsListener<L: axum::serve::Listener> {
    inner: L,
    acceptor: TlsAcceptor,
    name: &'static str,
    pending: FuturesUnordered<Handshake<L::Io, L::Addr>>,
}

impl<L: axum::serve::Listener> TlsListener<L> {
    pub fn new(inner: L, server: &TlsServer, listener: Listener) -> Self {
        Self {
            inner,
            acceptor: server.acceptor(listener),
            name: match listener {
                Listener::Grpc => "gRPC",
                Listener::Rest => "REST",
                Listener::Admin => "admin",
            },
            pending: FuturesUnordered::new(),
        }
    }
}

impl<L> axum::serve::Listener for TlsListener<L>
where
    L: axum::serve::Listener,
    L::Io: Unpin,
{
    type Io = TlsStream<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let Self {
            inner,
            acceptor,
            name,
            pending,
        } = self;
        loop {
            tokio::select! {
                (io, addr) = inner.accept(), if pending.len() < MAX_PENDING_HANDSHAKES => {
                    let (acceptor, name) = (acceptor.clone(), *name);
                    pending.push(Box::pin(async move {
                        handshake(&acceptor, io, name).await.map(|s| (s, addr))
                    }));
                }
                Some(done) = pending.next(), if !pending.is_empty() => {
                    if let Some(ready) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The served certificate, read again from `tls_cert` / `tls_key` when their contents
/// change (checked at most every [`RELOAD_CHECK_INTERVAL`], on a handshake). A pair that
/// does not load (a rotation half written) keeps the previous certificate in service.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<Served>,
}

#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    /// The files' bytes when `key` was made from them.
    source: (Vec<u8>, Vec<u8>),
    checked: Instant,
}

impl ReloadingCert {
    fn load(files: &TlsFiles, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let source = (read(&files.cert, "tls_cert")?, read(&files.key, "tls_key")?);
        let key = certified_key(files, &source, &provider)?;
        Ok(Self {
            cert: files.cert.clone(),
            key: files.key.clone(),
            provider,
            state: Mutex::new(Served {
                key: Arc::new(key),
                source,
                checked: Instant::now(),
            }),
        })
    }

    /// Reads the files again; a new certificate when they changed and load.
    fn refresh(&self, served: &mut Served) {
        served.checked = Instant::now();
        let (Ok(cert), Ok(key)) = (read(&self.cert, "tls_cert"), read(&self.key, "tls_key")) else {
            tracing::warn!(cert = %self.cert.display(), "cannot read the TLS files; serving the previous certificate");
            return;
        };
        if (&cert, &key) == (&served.source.0, &served.source.1) {
            return;
        }
        let files = TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: None,
        };
        let source = (cert, key);
        match certified_key(&files, &source, &self.provider) {
            Ok(key) => {
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                metrics::counter!("hookline_tls_certificate_reloads_total").increment(1);
                served.key = Arc::new(key);
                served.source = source;
            }
            Err(e) => {
                tracing::warn!(error = %e, "new TLS files do not load; serving the previous certificate")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut served = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if served.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            self.refresh(&mut served);
        }
        Some(served.key.clone())
    }
}

fn read(path: &Path, setting: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

/// The certificate chain and key of `source` (the bytes of `files`), checked to match.
fn certified_key(
    files: &TlsFiles,
    source: &(Vec<u8>, Vec<u8>),
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(&source.0, &files.cert, "tls_cert")?;
    let key = PrivateKeyDer::from_pem_slice(&source.1).map_err(|e| TlsError::Pem {
        setting: "tls_key",
        path: files.key.clone(),
        expected: "private key (PKCS#8, PKCS#1 or SEC1)",
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })
}

/// Every certificate of a PEM file; at least one.
pub fn certificates(
    pem: &[u8],
    path: &Path,
    setting: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        setting,
        path: path.to_owned(),
        expected: "certificate",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no BEGIN CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// A root store of the CA certificates in the PEM file at `path`.
pub fn root_store(path: &Path, setting: &'static str) -> Result<RootCertStore, TlsError> {
    let pem = read(path, setting)?;
    let mut roots = RootCertStore::empty();
    for cert in certificates(&pem, path, setting)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            setting,
            path: path.to_owned(),
            expected: "CA certificate",
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}
