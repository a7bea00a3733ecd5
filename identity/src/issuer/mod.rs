//! `gofe identity`: the mesh's certificate issuer. It serves `POST /v1/certify` over
//! TLS (its own serving certificate chained to the mesh's anchors), checks the caller's
//! service-account token, and signs the caller's CSR for the identity the token proves.
//! An admin listener serves `/live`, `/ready` and `/metrics`.

pub mod material;
pub mod sign;
pub mod tokens;

use crate::api::{CERTIFY_PATH, CertifyRequest, CertifyResponse, ErrorResponse};
use bytes::Bytes;
use gofe_telemetry::metrics::{Counter, Family};
use gofe_telemetry::prom::{Exposition, Kind};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sign::{Allowed, SignError, Signer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokens::{TokenError, TokenVerifier};
use tracing::{info, warn};

/// The DNS name the issuer's serving certificate carries (its Kubernetes Service).
pub const SERVER_NAME: &str = "gofe-identity.gofe-system.svc";

/// The serving certificate is re-issued this often, valid for twice as long.
const SERVING_REFRESH: Duration = Duration::from_secs(12 * 3600);
/// A certify request is a CSR (under a kilobyte) and a service-account token (a few):
/// 16 KiB is generous, and what a client can make the issuer hold per request.
const MAX_REQUEST: usize = 16 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client has this long to send its request headers: slow clients cannot hold
/// connections open at no cost.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and this long for its body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at accept. Sized with the HTTP/2 limits
/// below to the issuer's memory limit (64 MiB in k8s/): a connection holds at most its
/// TLS buffers (~34 KiB) and one connection window of request bodies (64 KiB), so 256
/// of them ~25 MiB.
const MAX_CONNECTIONS: usize = 256;
/// HTTP/2: a proxy asks for one certificate at a time; a few streams per connection are
/// plenty, each with a window of one request.
const H2_MAX_STREAMS: u32 = 8;
const H2_STREAM_WINDOW: u32 = MAX_REQUEST as u32;
const H2_CONNECTION_WINDOW: u32 = 64 * 1024;
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
/// Refusals logged per `REFUSAL_LOG_WINDOW` at most; the rest are counted, and the
/// count logged, so a flood of bad requests cannot flood the log.
const REFUSAL_LOGS: u32 = 10;
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
/// After an accept error (out of file descriptors, say), wait before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct IssuerConfig {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub cert_lifetime: Duration,
    /// None only with `insecure_dev`.
    pub jwks: Option<tokens::JwksSource>,
    pub insecure_dev: bool,
    pub trust_domain: String,
    pub audience: String,
    pub token_issuer: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error(transparent)]
    Material(#[from] material::MaterialError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cannot issue the issuer's own serving certificate: {0}")]
    Serving(String),
    #[error("the issuer certificate and trust anchors do not fit together: {0}")]
    SelfCheck(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

struct Issuer {
    signer: Signer,
    tokens: Option<TokenVerifier>,
    results: Family<&'static str, Counter>,
    refusal_log: parking_lot::Mutex<SampledLog>,
    connections_refused: Counter,
}

/// Which refusals are logged: the first few of each window.
struct SampledLog {
    window_started: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl SampledLog {
    /// Whether to log this one; with how many went unlogged before it.
    fn admit(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if now.duration_since(self.window_started) >= REFUSAL_LOG_WINDOW {
            self.window_started = now;
            self.logged = 0;
        }
        if self.logged < REFUSAL_LOGS {
            self.logged += 1;
            return Some(std::mem::take(&mut self.suppressed));
        }
        self.suppressed += 1;
        None
    }
}

/// The issuer, bound and checked, ready to serve.
pub struct Bound {
    issuer: Arc<Issuer>,
    serving: Arc<ServingCert>,
    listener: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
}

fn certified(
    signer: &Signer,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, IssuerError> {
    let (chain, key) = signer
        .serving_cert(SERVER_NAME, SERVING_REFRESH * 2)
        .map_err(|e| IssuerError::Serving(e.to_string()))?;
    let key = crate::store::signing_key(provider, &key)
        .map_err(|e| IssuerError::Serving(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

impl Bound {
    /// Loads the material, checks that what it issues verifies against its own
    /// anchors, and binds the listeners.
    pub async fn bind(config: IssuerConfig) -> Result<Bound, IssuerError> {
        let material = material::load(&config.dir)?;
        let signer = Signer::new(
            material.issuer,
            material.chain_pem,
            material.not_after,
            config.cert_lifetime,
            config.trust_domain.clone(),
        );
        let provider = crate::trust::provider();
        let serving = certified(&signer, &provider)?;
        let anchors = crate::trust::TrustAnchors::from_pem(&material.anchors_pem)
            .map_err(|e| IssuerError::SelfCheck(e.to_string()))?;
        let leaf = rustls::server::ParsedCertificate::try_from(&serving.cert[0])
            .map_err(|e| IssuerError::SelfCheck(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &anchors.roots(),
            &serving.cert[1..],
            rustls::pki_types::UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| {
            IssuerError::SelfCheck(format!(
                "a certificate it issues does not chain to ca.crt: {e}"
            ))
        })?;

        let tokens = match (&config.jwks, config.insecure_dev) {
            (_, true) => {
                warn!("INSECURE: --insecure-dev accepts any token; for demos only");
                None
            }
            (Some(source), false) => Some(
                TokenVerifier::new(
                    source.clone(),
                    config.audience.clone(),
                    config.token_issuer.clone(),
                    config.trust_domain.clone(),
                )
                .await?,
            ),
            (None, false) => {
                return Err(IssuerError::Token(TokenError::Jwks {
                    source_name: "GOFE_ISSUER_JWKS".into(),
                    reason: "not set (and --insecure-dev not given)".into(),
                }));
            }
        };
        let serving = Arc::new(ServingCert(RwLock::new(serving)));
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| IssuerError::Serving(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(serving.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| IssuerError::Bind { addr, source })
        };
        Ok(Bound {
            issuer: Arc::new(Issuer {
                signer,
                tokens,
                results: Family::new(64, |_| "other"),
                refusal_log: parking_lot::Mutex::new(SampledLog {
                    window_started: std::time::Instant::now(),
                    logged: 0,
                    suppressed: 0,
                }),
                connections_refused: Counter::default(),
            }),
            serving,
            listener: bind(config.listen).await?,
            admin: bind(config.admin_listen).await?,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let Bound {
            issuer,
            serving,
            listener,
            admin,
            tls,
        } = self;
        info!(addr = ?listener.local_addr().ok(), lifetime = ?issuer.signer.lifetime(), "issuer listening");
        let refresh = {
            let issuer = issuer.clone();
            tokio::spawn(async move {
                let provider = crate::trust::provider();
                loop {
                    tokio::time::sleep(SERVING_REFRESH).await;
                    match certified(&issuer.signer, &provider) {
                        Ok(c) => *serving.0.write() = c,
                        Err(error) => warn!(%error, "keeping the current serving certificate"),
                    }
                }
            })
        };
        let admin_task = tokio::spawn(serve_admin(admin, issuer.clone()));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let accept = async {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(a) => a,
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    issuer.connections_refused.inc();
                    tracing::debug!(%peer, "too many connections; closing this one");
                    continue;
                };
                let (issuer, tls) = (issuer.clone(), tls.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
                    else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let issuer = issuer.clone();
                        async move { Ok::<_, Infallible>(issuer.handle(req, peer).await) }
                    });
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .max_buf_size(2 * MAX_REQUEST);
                    builder
                        .http2()
                        .timer(TokioTimer::new())
                        .keep_alive_interval(HEADER_READ_TIMEOUT)
                        .max_concurrent_streams(H2_MAX_STREAMS)
                        .initial_stream_window_size(H2_STREAM_WINDOW)
                        .initial_connection_window_size(H2_CONNECTION_WINDOW)
                        .max_header_list_size(H2_MAX_HEADER_LIST)
                        .max_send_buf_size(H2_CONNECTION_WINDOW as usize)
                        .max_pending_accept_reset_streams(H2_MAX_STREAMS as usize)
                        .max_local_error_reset_streams(Some(H2_MAX_STREAMS as usize));
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = shutdown => info!("issuer stopping"),
        }
        refresh.abort();
        admin_task.abort();
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

impl Issuer {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if req.uri().path() != CERTIFY_PATH {
            return json(
                StatusCode::NOT_FOUND,
                &ErrorResponse {
                    error: "not found".into(),
                },
            );
        }
        if req.method() != Method::POST {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                &ErrorResponse {
                    error: "POST only".into(),
                },
            );
        }
        let collected = tokio::time::timeout(
            BODY_READ_TIMEOUT,
            Limited::new(req.into_body(), MAX_REQUEST).collect(),
        )
        .await
        .map_err(|_| format!("the body did not arrive within {BODY_READ_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        let body = match collected {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return self.refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    peer,
                    format!("unreadable body: {e}"),
                );
            }
        };
        let request: CertifyRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return self.refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    peer,
                    format!("invalid JSON: {e}"),
                );
            }
        };
        let allowed = match &self.tokens {
            None => Allowed::AnyInTrustDomain,
            Some(tokens) => match tokens.identity(&request.token).await {
                Ok(id) => Allowed::Exactly(id),
                Err(e) => {
                    return self.refuse(
                        StatusCode::UNAUTHORIZED,
                        "invalid_token",
                        peer,
                        e.to_string(),
                    );
                }
            },
        };
        match self.signer.sign(&request.csr, &allowed) {
            Ok(signed) => {
                self.results.get(&"issued").inc();
                info!(identity = %signed.identity, serial = %signed.serial, %peer, "certificate issued");
                json(
                    StatusCode::OK,
                    &CertifyResponse {
                        certificate_chain: signed.chain_pem,
                        not_after: crate::cert::rfc3339(signed.not_after),
                    },
                )
            }
            Err(e @ SignError::Expiring { .. }) => self.refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "issuer_expiring",
                peer,
                e.to_string(),
            ),
            Err(e @ SignError::BadCsr(_)) => {
                self.refuse(StatusCode::BAD_REQUEST, "invalid_csr", peer, e.to_string())
            }
            Err(e @ SignError::Internal(_)) => self.refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "error",
                peer,
                e.to_string(),
            ),
            Err(e) => self.refuse(StatusCode::FORBIDDEN, "name_refused", peer, e.to_string()),
        }
    }

    fn refuse(
        &self,
        status: StatusCode,
        result: &'static str,
        peer: SocketAddr,
        error: String,
    ) -> Response<Full<Bytes>> {
        self.results.get(&result).inc();
        if let Some(unlogged) = self.refusal_log.lock().admit() {
            warn!(%peer, result, %error, unlogged, "certificate refused");
        }
        json(status, &ErrorResponse { error })
    }

    /// Ready while a certificate issued now would be covered by the issuer's own.
    fn ready(&self) -> Result<(), SignError> {
        self.signer.can_issue(self.signer.lifetime())
    }

    fn metrics(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "gofe_issuer_requests_total",
            "Certify requests, by result: issued, invalid_token, invalid_csr, name_refused, bad_request, issuer_expiring, error.",
            Kind::Counter,
        );
        let mut results = self.results.snapshot();
        results.sort_by_key(|(r, _)| *r);
        for (result, c) in results {
            e.sample("gofe_issuer_requests_total", &[("result", result)], c.get());
        }
        e.family(
            "gofe_issuer_connections_refused_total",
            "Connections closed at accept because the issuer served its maximum.",
            Kind::Counter,
        );
        e.sample(
            "gofe_issuer_connections_refused_total",
            &[],
            self.connections_refused.get(),
        );
        e.family(
            "gofe_issuer_certificate_expiry_timestamp_seconds",
            "When the issuer's own certificate expires; it stops issuing a lifetime before.",
            Kind::Gauge,
        );
        let expiry = self
            .signer
            .issuer_not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        e.sample(
            "gofe_issuer_certificate_expiry_timestamp_seconds",
            &[],
            expiry,
        );
        e.family(
            "gofe_issuer_ready",
            "1 while the issuer can issue a whole-lifetime certificate, else 0.",
            Kind::Gauge,
        );
        let ready = u64::from(self.ready().is_ok());
        e.sample("gofe_issuer_ready", &[], ready);
        gofe_telemetry::process::render(&mut e);
        e.finish()
    }
}

async fn serve_admin(listener: tokio::net::TcpListener, issuer: Arc<Issuer>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let issuer = issuer.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let issuer = issuer.clone();
                async move {
                    let rsp = match req.uri().path() {
                        "/live" => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
                        "/ready" => match issuer.ready() {
                            Ok(()) => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
                            Err(e) => {
                                let mut r = Response::new(Full::new(Bytes::from(format!(
                                    "not ready: {e}\n"
                                ))));
                                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                r
                            }
                        },
                        "/metrics" => Response::new(Full::new(Bytes::from(issuer.metrics()))),
                        _ => {
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"not found\n")));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        }
                    };
                    Ok::<_, Infallible>(rsp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
