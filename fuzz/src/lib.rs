//! What gofe's fuzz targets share: how an input is cut into the pieces a client's bytes
//! arrive in, the checks more than one target makes (a request's round trip over the
//! mesh hop), the fixtures of the issuer's targets (a service-account signing key and
//! its JWKS, a bootstrapped CA), and a way to keep a library's warnings off the
//! fuzzer's output.

use base64::Engine;
use http::header::{self, HeaderMap};
use http::{Method, Request, Version};
use std::sync::{Arc, Mutex, OnceLock};

pub use gofe_proxy::proto::{headers, mesh};

/// An input for a target that reads a stream: its bytes and the pieces they arrive in.
///
/// Layout: a first byte whose low four bits say how many piece lengths follow (each a
/// byte: 1 to 256 bytes) and whose top bit sends whatever is left after them one byte at
/// a time (else in one piece); then the lengths; then the bytes. A seed written as
/// `\0` followed by the bytes arrives whole.
pub struct Pieces<'a> {
    pub bytes: &'a [u8],
    lengths: &'a [u8],
    trickle: bool,
}

impl<'a> Pieces<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Pieces<'a>> {
        let (&head, rest) = data.split_first()?;
        let n = usize::from(head & 0x0f);
        if rest.len() < n {
            return None;
        }
        let (lengths, bytes) = rest.split_at(n);
        Some(Pieces {
            bytes,
            lengths,
            trickle: head & 0x80 != 0,
        })
    }

    /// The lengths of the pieces, in order, adding up to the length of `bytes`.
    pub fn lengths(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut left = self.bytes.len();
        for &l in self.lengths {
            if left == 0 {
                break;
            }
            let l = (usize::from(l) + 1).min(left);
            out.push(l);
            left -= l;
        }
        if self.trickle {
            out.extend(std::iter::repeat_n(1, left));
        } else if left > 0 {
            out.push(left);
        }
        out
    }
}

/// `der` as one PEM block labelled `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Runs `f` with standard error sent to /dev/null: a library that warns on stderr
/// (`gofe inject` skipping a host-network pod) would otherwise fill the fuzzer's log at
/// thousands of runs a second. A panic inside puts standard error back first, so its
/// message is seen.
pub fn quietly<T>(f: impl FnOnce() -> T) -> T {
    struct Quiet {
        saved: std::os::fd::OwnedFd,
        null: std::fs::File,
    }
    static QUIET: OnceLock<Arc<Mutex<Quiet>>> = OnceLock::new();
    let quiet = QUIET.get_or_init(|| {
        let quiet = Arc::new(Mutex::new(Quiet {
            saved: nix::unistd::dup(std::io::stderr()).expect("dup stderr"),
            null: std::fs::File::options()
                .write(true)
                .open("/dev/null")
                .expect("/dev/null"),
        }));
        let in_hook = quiet.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(q) = in_hook.try_lock() {
                let _ = nix::unistd::dup2_stderr(&q.saved);
            }
            previous(info)
        }));
        quiet
    });
    {
        let q = quiet.lock().expect("not poisoned");
        nix::unistd::dup2_stderr(&q.null).expect("stderr to /dev/null");
    }
    let out = f();
    let q = quiet.lock().expect("not poisoned");
    nix::unistd::dup2_stderr(&q.saved).expect("stderr back");
    out
}

/// What the proxy does to an application's HTTP/1 request on the mesh hop, and back
/// (`client::send` turns a request that did not go back into the application's form
/// for plaintext or another endpoint; the far proxy does the same): the method, the
/// request target, the Host (when it is a usable authority; else the endpoint's
/// address, `fallback`, stands in) and every end-to-end header come out as they went
/// in.
///
/// `req` is a request as `http::request` hands it to the client: HTTP/1.x, not
/// CONNECT, not an upgrade, hop-by-hop headers and `gofe-orig-proto` gone.
pub fn check_mesh_round_trip(req: &Request<()>, fallback: &str) {
    let mut r = clone(req);
    mesh::to_mesh(&mut r, fallback);
    assert_eq!(r.version(), Version::HTTP_2, "on the mesh hop: HTTP/2");
    let absolute = req.uri().scheme().is_some() && req.uri().authority().is_some();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok());
    let authority = if absolute {
        req.uri().authority().cloned()
    } else {
        host.clone()
            .or_else(|| http::uri::Authority::try_from(fallback).ok())
    };
    if authority.is_some() {
        // What HTTP/2 needs of a request: a scheme, an authority and a path.
        assert!(
            r.uri().scheme().is_some() && r.uri().authority() == authority.as_ref(),
            "mesh form of {:?}: {:?}",
            req.uri(),
            r.uri()
        );
        assert!(!r.uri().path().is_empty());
    }
    if !absolute {
        assert!(
            !r.headers().contains_key(header::HOST),
            "Host travels as :authority"
        );
    }
    assert!(!r.headers().contains_key(header::TRANSFER_ENCODING));

    assert!(
        mesh::from_mesh(&mut r),
        "a request made for the mesh comes back"
    );
    assert_eq!(r.version(), Version::HTTP_11);
    assert_eq!(r.method(), req.method());
    if absolute || authority.is_none() {
        assert_eq!(r.uri(), req.uri(), "the request target comes back");
    } else {
        let pq = |u: &http::Uri| u.path_and_query().map(|p| p.as_str().to_string());
        assert_eq!(
            pq(r.uri()).unwrap_or_else(|| "/".into()),
            pq(req.uri()).unwrap_or_else(|| "/".into()),
            "the path and query come back ({:?} became {:?})",
            req.uri(),
            r.uri()
        );
        assert!(
            r.uri().scheme().is_none() && r.uri().authority().is_none(),
            "origin-form again: {:?}",
            r.uri()
        );
    }
    let expected_host = if absolute {
        req.headers().get(header::HOST).cloned()
    } else {
        authority
            .as_ref()
            .map(|a| http::HeaderValue::from_str(a.as_str()).expect("an authority is a value"))
    };
    assert_eq!(
        r.headers().get(header::HOST),
        expected_host.as_ref(),
        "Host of {:?} (was {:?})",
        req.uri(),
        req.headers().get(header::HOST)
    );
    // Each header's values in order; `HeaderMap` keeps no order between names.
    let others = |h: &HeaderMap| -> Vec<(String, Vec<Vec<u8>>)> {
        let mut all: Vec<_> = h
            .keys()
            .filter(|n| {
                **n != header::HOST
                    && **n != header::TRANSFER_ENCODING
                    && **n != mesh::ORIG_PROTO
            })
            .map(|n| {
                let values = h.get_all(n).iter().map(|v| v.as_bytes().to_vec());
                (n.to_string(), values.collect())
            })
            .collect();
        all.sort();
        all
    };
    assert_eq!(
        others(r.headers()),
        others(req.headers()),
        "end-to-end headers pass unchanged"
    );
}

/// Whether `req` is one the client would carry over the mesh as HTTP/2 (CONNECT and
/// upgrades take a connection of their own).
pub fn goes_over_mesh(req: &Request<()>) -> bool {
    req.method() != Method::CONNECT
        && !headers::is_upgrade(req)
        && matches!(req.version(), Version::HTTP_10 | Version::HTTP_11)
}

pub fn clone(req: &Request<()>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// A fixture, not a secret: the P-256 key that signs the service-account tokens of the
/// `jwt` target and its seeds (`examples/seeds.rs`); its public half is the JWKS the
/// target's verifier holds.
pub const TOKEN_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBstkH17QLkwbLdYw
pODCuU7mjzAB4piGcPTPNxueG8ahRANCAAQsMZq3zqhEw6QkV7cr1gFVP9Ry0pP2
sFtR7kt7bhrNcvWAAiVc8jK6zwllKTbiqqvrAk1m9pxxViKHlTDMk9mQ
-----END PRIVATE KEY-----
";
/// The key id the JWKS gives it.
pub const TOKEN_KID: &str = "k1";
pub const TRUST_DOMAIN: &str = "cluster.local";
pub const AUDIENCE: &str = "identity.gofe.io";

/// The JWKS publishing `TOKEN_KEY_PEM`, plus an RSA key and an EC key under other ids
/// (verifiers try every key of a token without `kid`).
pub fn jwks() -> serde_json::Value {
    let key = rcgen::KeyPair::from_pem(TOKEN_KEY_PEM).expect("fixture key");
    let raw = rcgen::PublicKeyData::der_bytes(&key);
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    serde_json::json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": TOKEN_KID, "alg": "ES256", "use": "sig",
         "x": b64(&raw[1..33]), "y": b64(&raw[33..65])},
        {"kty": "RSA", "kid": "rsa", "alg": "RS256", "use": "sig",
         "n": "xIdGTmXOkQ26Yhd34TzfRGoh-1HjPXL-aXtcTc4p0Bd6pEoYKelsNIJCAAJ0ox5kuCqw8DPfjWcosP-DjmZropp5VLw77bsAhBxJ1zb5AMw3huVAbKWv47rWHK-INLrBDDIbu4hsTW_Uzq3UAFNYEVkjyeKU6szkdvc3TjPI4VlKKQapj8oqSec7kwWsrlIHTx7V_JTmcTZ2Ifm8X0G8uwFGN9cG7nE_7YFqDFUshLSQpwLMtV1ewZQ0_vJ8hTQZ0EF6NYouGRsQjJ0qiVJVQCsenCKzpER9mqWqh1aBbcM1mfqv8zYJNkmJftUlK4lLBos77NpW1cI7PvXYnhTskQ",
         "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "kid": "other", "alg": "ES256",
         "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
         "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
    ]})
}

/// A bootstrapped CA: `gofe identity --bootstrap`'s files, loaded as the issuer loads
/// them. The directory lives as long as the process.
pub fn issuer_material() -> &'static (tempfile::TempDir, std::path::PathBuf) {
    static MATERIAL: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    MATERIAL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let issuer = dir.path().join("issuer");
        gofe_identity::issuer::material::bootstrap(&issuer, TRUST_DOMAIN).expect("bootstrap");
        (dir, issuer)
    })
}
