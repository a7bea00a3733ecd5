//! `gofe inject --webhook`: the injector as a mutating admission webhook. It answers
//! AdmissionReview v1 requests for Pods over HTTPS with a JSON patch that turns the pod
//! into what `gofe inject` prints for it. Which pods reach it is the
//! MutatingWebhookConfiguration's business (k8s/injector.yaml selects namespaces and
//! pods labelled `gofe.io/inject: enabled`); a pod annotated `gofe.io/inject: disabled`
//! is left alone. A bad `config.gofe.io/*` annotation is refused with its reason.

use crate::inject::{INJECT_ANNOTATION, InjectArgs, Injector};
use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::{info, warn};

/// A client gets this long for its TLS handshake, and again for its request head.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// AdmissionReviews are small; a pod spec of megabytes is not one.
const MAX_REVIEW: usize = 4 * 1024 * 1024;

pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    gofe_telemetry::logs::init("info", gofe_telemetry::logs::LogFormat::Plain)?;
    let cert = ReloadingCert::load(args.tls_cert.clone(), args.tls_key.clone())?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(cert));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let injector = Arc::new(Injector::new(args));
    let listen = args.listen;
    let rt = crate::runtime(0)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        info!(addr = %listener.local_addr()?, "injector webhook listening");
        println!("listening on {}", listener.local_addr()?);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(error) => {
                    warn!(%error, "accept failed");
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let injector = injector.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(TIMEOUT, acceptor.accept(tcp));
                let Ok(Ok(tls)) = handshake.await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let injector = injector.clone();
                    async move { Ok::<_, std::convert::Infallible>(serve(&injector, req).await) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(TIMEOUT)
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(%peer, %error, "webhook connection ended with an error");
                }
            });
        }
    })
}

/// How often the serving certificate's files are looked at again.
const CERT_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// The serving certificate, read again when its files change (a rotated Secret, as
/// cert-manager writes it), so that the webhook never serves an expired one; a bad new
/// version is logged and the current one kept.
#[derive(Debug)]
struct ReloadingCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: parking_lot::Mutex<Loaded>,
}

type Stamp = Option<(std::time::SystemTime, std::time::SystemTime)>;

#[derive(Debug)]
struct Loaded {
    key: Arc<rustls::sign::CertifiedKey>,
    /// The files' modification times when read.
    stamp: Stamp,
    checked: std::time::Instant,
}

impl ReloadingCert {
    fn load(cert: std::path::PathBuf, key: std::path::PathBuf) -> anyhow::Result<Self> {
        let stamp = Self::stamp(&cert, &key);
        let certified = Self::read(&cert, &key)?;
        Ok(ReloadingCert {
            cert,
            key,
            current: parking_lot::Mutex::new(Loaded {
                key: certified,
                stamp,
                checked: std::time::Instant::now(),
            }),
        })
    }

    fn stamp(cert: &std::path::Path, key: &std::path::Path) -> Stamp {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(cert)?, m(key)?))
    }

    fn read(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
        use gofe_identity::cert::{certs_from_pem, key_from_pem};
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let certs = certs_from_pem(&read(cert)?)
            .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
        let key = key_from_pem(&read(key)?)
            .with_context(|| format!("{} holds no PEM private key", key.display()))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .context("the serving key is of no supported type")?;
        let certified = rustls::sign::CertifiedKey::new(certs, signer);
        certified
            .keys_match()
            .context("the serving certificate and key do not match")?;
        Ok(Arc::new(certified))
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let mut current = self.current.lock();
        if current.checked.elapsed() >= CERT_RECHECK {
            current.checked = std::time::Instant::now();
            let stamp = Self::stamp(&self.cert, &self.key);
            if stamp.is_some() && stamp != current.stamp {
                match Self::read(&self.cert, &self.key) {
                    Ok(k) => {
                        info!(cert = %self.cert.display(), "serving certificate reloaded");
                        current.key = k;
                        current.stamp = stamp;
                    }
                    Err(error) => warn!(
                        error = %format!("{error:#}"),
                        "the new serving certificate is unusable; keeping the current one"
                    ),
                }
            }
        }
        Some(current.key.clone())
    }
}

async fn serve(injector: &Injector, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/healthz" {
        return reply(StatusCode::OK, "ok\n".into());
    }
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview\n".into(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request: {e}\n"),
            );
        }
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("not JSON: {e}\n")),
    };
    match review_response(injector, &review) {
        Ok(v) => {
            let mut rsp = reply(StatusCode::OK, v.to_string());
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        Err(e) => reply(StatusCode::BAD_REQUEST, format!("{e:#}\n")),
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp
}

/// The AdmissionReview answering `review`: the pod allowed with a JSON patch that
/// injects it, allowed unchanged, or refused with the reason (a bad annotation).
pub fn review_response(injector: &Injector, review: &Value) -> anyhow::Result<Value> {
    let request = review
        .get("request")
        .context("the AdmissionReview has no request")?;
    let uid = request["uid"]
        .as_str()
        .context("the AdmissionReview request has no uid")?;
    let pod = &request["object"];
    let mut response = json!({"uid": uid, "allowed": true});
    if pod["kind"].as_str().is_some_and(|k| k == "Pod") {
        let namespace = request["namespace"]
            .as_str()
            .or(pod["metadata"]["namespace"].as_str())
            .unwrap_or("default");
        let service = service_name(pod);
        let workload = format!("Pod/{service} in {namespace}");
        // The webhook configuration selected this pod: its namespace (or its label)
        // asks for injection.
        let ns = BTreeMap::from([(INJECT_ANNOTATION.to_string(), "enabled".to_string())]);
        let mut injected = pod.clone();
        match injector.inject_pod(&mut injected, &service, &workload, &ns) {
            Ok(()) => {
                let patch = json_patch::diff(pod, &injected);
                if !patch.0.is_empty() {
                    let bytes = serde_json::to_vec(&patch)?;
                    response["patchType"] = json!("JSONPatch");
                    response["patch"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes));
                }
            }
            Err(e) => {
                response["allowed"] = json!(false);
                response["status"] = json!({"code": 400, "message": format!("gofe: {e:#}")});
            }
        }
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// A pod's workload name, as `gofe inject` names it from the workload: the owner a
/// controller made it for (a ReplicaSet's Deployment, with the template hash taken off;
/// a Job's CronJob, with the schedule's timestamp taken off; a StatefulSet, DaemonSet
/// or Job itself), else the pod's own name.
pub fn service_name(pod: &Value) -> String {
    let meta = &pod["metadata"];
    let owner = meta["ownerReferences"]
        .as_array()
        .and_then(|o| o.iter().find(|r| r["controller"] == true).or(o.first()));
    if let Some(owner) = owner {
        let name = owner["name"].as_str().unwrap_or("");
        let kind = owner["kind"].as_str().unwrap_or("");
        let strip = |suffix: Option<&str>| match (name.rsplit_once('-'), suffix) {
            (Some((stem, tail)), Some(s)) if tail == s => stem.to_string(),
            _ => name.to_string(),
        };
        return match kind {
            "ReplicaSet" => strip(meta["labels"]["pod-template-hash"].as_str()),
            // A CronJob's Jobs are named <cronjob>-<minutes since the epoch>.
            "Job" => match name.rsplit_once('-') {
                Some((stem, tail))
                    if tail.len() >= 8 && tail.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    stem.to_string()
                }
                _ => name.to_string(),
            },
            _ => name.to_string(),
        };
    }
    meta["name"]
        .as_str()
        .or(meta["generateName"].as_str())
        .unwrap_or("pod")
        .trim_end_matches('-')
        .to_string()
}
