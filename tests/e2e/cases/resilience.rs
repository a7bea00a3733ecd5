//! Resilience policy end to end: a client pod's sidecar sends to real HTTP servers in
//! other pods that misbehave on command (fail with a status, answer slowly, are not
//! there at all), with endpoints from a discovery file or a real DNS server, and
//! policy from the environment, the discovery file and a policy file changed while
//! the proxy runs.

use super::HTTP_PORT;
use crate::dns::DnsServer;
use crate::grpc::{EchoClient, EchoMsg};
use crate::harness::{Pod, World, eventually};
use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

crate::cases::register![
    a_failing_endpoint_is_retried_around_ejected_and_returns,
    retries_stay_within_the_budget,
    only_safe_requests_are_replayed,
    timeouts_fire_on_time_for_http_and_grpc,
    ewma_sends_less_to_a_slow_endpoint_round_robin_does_not,
    ejection_never_exceeds_the_max_percent,
    dns_discovery_follows_a_changing_record_set,
    policy_file_changes_apply_at_run_time_and_a_broken_file_changes_nothing,
    a_destination_at_its_limit_answers_503_at_once,
    endpoints_come_and_go_under_load_without_failing_requests,
    discovery_names_the_identity_each_endpoint_must_present,
    a_streaming_upload_is_replayed_whole_after_an_early_503,
];

/// How long a test waits for a change to be seen (a file reloaded, an endpoint back).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Timeouts fire within this much of their time.
const TIMEOUT_SLACK: Duration = Duration::from_millis(100);

/// One request the load generator sends.
#[derive(Clone)]
pub(crate) struct Req {
    method: &'static str,
    path: String,
    host: String,
    body: Bytes,
    /// Send the body in 1 KiB chunks a millisecond apart, without a length (chunked).
    trickle: bool,
}

impl Req {
    pub(crate) fn get(host: &str) -> Req {
        Req {
            method: "GET",
            path: "/".into(),
            host: host.into(),
            body: Bytes::new(),
            trickle: false,
        }
    }

    fn post(host: &str, path: &str, body: Vec<u8>) -> Req {
        Req {
            method: "POST",
            path: path.into(),
            host: host.into(),
            body: body.into(),
            trickle: false,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) served_by: String,
    pub(crate) proxy_error: String,
    overloaded: String,
    body: Bytes,
    elapsed: Duration,
}

/// Sends `n` copies of `req`, `concurrency` at a time on kept-alive HTTP/1.1
/// connections, from inside `client` to `target` (iptables hands them to the sidecar,
/// which routes by the Host header).
pub(crate) fn send(
    client: &Pod,
    target: SocketAddr,
    req: &Req,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Reply>> {
    let req = req.clone();
    client.block_on(move || async move {
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1) {
            workers.spawn(worker(target, req.clone(), n, next.clone()));
        }
        let mut replies = Vec::with_capacity(n);
        let all = async {
            while let Some(r) = workers.join_next().await {
                replies.extend(r??);
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .context("requests did not finish within 120 s")??;
        anyhow::Ok(replies)
    })?
}

async fn worker(
    target: SocketAddr,
    req: Req,
    n: usize,
    next: Arc<AtomicUsize>,
) -> anyhow::Result<Vec<Reply>> {
    let mut out = Vec::new();
    let mut conn: Option<hyper::client::conn::http1::SendRequest<ReqBody>> = None;
    while next.fetch_add(1, Ordering::SeqCst) < n {
        let tx = match conn.as_mut().filter(|c| !c.is_closed()) {
            Some(tx) => tx,
            None => {
                let stream = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(target),
                )
                .await
                .context("connect timed out")??;
                let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(c);
                conn.insert(tx)
            }
        };
        let request = http::Request::builder()
            .method(req.method)
            .uri(&req.path)
            .header("host", &req.host)
            .body(req_body(&req))?;
        let started = Instant::now();
        let sent = async {
            tx.ready().await?;
            let rsp = tx.send_request(request).await?;
            let (parts, body) = rsp.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok((parts, body))
        };
        let reply = match sent.await {
            Ok((parts, body)) => {
                let header = |name: &str| {
                    parts
                        .headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                Reply {
                    status: parts.status.as_u16(),
                    served_by: header("x-served-by"),
                    proxy_error: header("gofe-proxy-error"),
                    overloaded: header("gofe-overloaded"),
                    body,
                    elapsed: started.elapsed(),
                }
            }
            // A reset or a response cut short is a failure of its own (status 0), not
            // something to paper over by sending again.
            Err(e) => {
                conn = None;
                Reply {
                    status: 0,
                    served_by: String::new(),
                    proxy_error: format!("transport error: {e:#}"),
                    overloaded: String::new(),
                    body: Bytes::new(),
                    elapsed: started.elapsed(),
                }
            }
        };
        out.push(reply);
    }
    Ok(out)
}

type ReqBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

fn req_body(req: &Req) -> ReqBody {
    if !req.trickle {
        return Full::new(req.body.clone()).boxed_unsync();
    }
    let chunks: Vec<Bytes> = req.body.chunks(1024).map(Bytes::copy_from_slice).collect();
    let stream = futures_util::stream::unfold(chunks.into_iter(), |mut rest| async move {
        let chunk = rest.next()?;
        tokio::time::sleep(Duration::from_millis(1)).await;
        Some((Ok(hyper::body::Frame::data(chunk)), rest))
    });
    http_body_util::StreamBody::new(stream).boxed_unsync()
}

pub(crate) fn count_status(replies: &[Reply], status: u16) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

pub(crate) fn by_server(replies: &[Reply]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in replies {
        *m.entry(r.served_by.clone()).or_insert(0) += 1;
    }
    m
}

/// Servers without sidecars running the HTTP test app, each with its variables
/// (GOFE_TESTAPP_STATUS, GOFE_TESTAPP_DELAY_MS).
pub(crate) fn servers<'w>(
    w: &'w World,
    specs: &[(&str, &[(&str, &str)])],
) -> anyhow::Result<Vec<Pod<'w>>> {
    let mut pods = Vec::new();
    for (name, env) in specs {
        let pod = w.pod(name).start()?;
        pod.app_with("http", HTTP_PORT, env)?;
        pods.push(pod);
    }
    Ok(pods)
}

pub(crate) fn addr(pod: &Pod) -> SocketAddr {
    SocketAddr::from((pod.ip4, HTTP_PORT))
}

/// A destination in a file: its name, endpoint addresses and policy.
pub(crate) type DestSpec<'a> = (&'a str, Vec<String>, &'a [(&'a str, &'a str)]);

/// A destinations file.
pub(crate) fn destinations(dests: &[DestSpec<'_>]) -> String {
    let mut y = String::from("destinations:\n");
    for (name, endpoints, policy) in dests {
        y += &format!("  - name: {name}\n");
        if !endpoints.is_empty() {
            y += "    endpoints:\n";
            for e in endpoints {
                y += &format!("      - address: \"{e}\"\n");
            }
        }
        if !policy.is_empty() {
            y += "    policy:\n";
            for (k, v) in *policy {
                y += &format!("      {k}: \"{v}\"\n");
            }
        }
    }
    y
}

pub(crate) fn endpoints_of(pods: &[&Pod]) -> Vec<String> {
    pods.iter().map(|p| addr(p).to_string()).collect()
}

/// Writes `text` to `path` whole (a reader never sees half of it).
pub(crate) fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A client pod whose sidecar reads `file` as its discovery source.
pub(crate) fn client_with_file<'w>(
    w: &'w World,
    file: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Pod<'w>> {
    let mut b = w
        .pod("client")
        .sidecar()
        .no_identity()
        .env("GOFE_DISCOVERY", &format!("file:{}", file.display()));
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start()
}

pub(crate) fn served(pod: &Pod) -> anyhow::Result<u64> {
    Ok(pod.app_get(HTTP_PORT, "/control/served")?.trim().parse()?)
}

/// The client's view of `destination`'s endpoints, from `/endpoints`.
pub(crate) fn endpoint_states(
    client: &Pod,
    destination: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let (status, body) = client.admin("GET", "/endpoints")?;
    ensure!(status == 200, "/endpoints: {status}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let d = v["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["name"] == destination)
        .with_context(|| format!("{destination} not in /endpoints: {body}"))?;
    Ok(d["endpoints"].as_array().cloned().unwrap_or_default())
}

fn endpoint_state(
    client: &Pod,
    destination: &str,
    endpoint: SocketAddr,
) -> anyhow::Result<serde_json::Value> {
    endpoint_states(client, destination)?
        .into_iter()
        .find(|e| e["address"] == endpoint.to_string())
        .with_context(|| format!("{endpoint} is not an endpoint of {destination}"))
}

pub(crate) fn world_file(w: &World, name: &str) -> PathBuf {
    w.dir().join(name)
}

pub fn a_failing_endpoint_is_retried_around_ejected_and_returns(w: &World) -> anyhow::Result<()> {
    let pods = servers(
        w,
        &[
            ("a", &[]),
            ("b", &[]),
            ("c", &[("GOFE_TESTAPP_STATUS", "503")]),
        ],
    )?;
    let (a, c) = (&pods[0], &pods[2]);
    let file = world_file(w, "destinations.yaml");
    let dest = format!("api.test:{HTTP_PORT}");
    write_file(
        &file,
        &destinations(&[(&dest, endpoints_of(&pods.iter().collect::<Vec<_>>()), &[])]),
    )?;
    let client = client_with_file(
        w,
        &file,
        &[
            ("GOFE_RETRY_ON", "5xx"),
            ("GOFE_LB", "round-robin"),
            ("GOFE_OUTLIER_BASE_EJECTION", "2s"),
        ],
    )?;
    let get = Req::get(&dest);

    // One at a time: c fails five times in a row (each retried elsewhere), then is out.
    let replies = send(&client, addr(a), &get, 24, 1)?;
    ensure!(
        count_status(&replies, 200) == 24,
        "every request succeeds: {:?}",
        by_server(&replies)
    );
    ensure!(
        served(c)? == 5,
        "c is ejected after GOFE_OUTLIER_CONSECUTIVE_5XX=5 failures, served {}",
        served(c)?
    );
    let state = endpoint_state(&client, &dest, addr(c))?;
    ensure!(
        state["state"] == "ejected" && state["times_ejected"] == 1,
        "{state}"
    );
    let ejected_for = state["ejected_for_ms"].as_u64().unwrap_or(0);
    ensure!(
        (1..=2000).contains(&ejected_for),
        "ejected for the base time: {state}"
    );
    let back_at = Instant::now() + Duration::from_millis(ejected_for);
    let m = client.metrics()?;
    let c_label = addr(c).to_string();
    ensure!(
        m.sum(
            "gofe_outlier_ejections_total",
            &[("authority", &dest), ("endpoint", &c_label)]
        ) == 1.0,
        "{}",
        m.0
    );
    ensure!(
        m.sum(
            "gofe_endpoints",
            &[("authority", &dest), ("state", "ejected")]
        ) == 1.0
    );
    ensure!(
        m.sum(
            "gofe_retries_total",
            &[("authority", &dest), ("reason", "503")]
        ) == 5.0
    );

    // It comes back after its time, fails again, and is out twice as long.
    eventually("c back in", CHANGE_TIMEOUT, || {
        Ok((endpoint_state(&client, &dest, addr(c))?["state"] == "ready").then_some(()))
    })?;
    ensure!(
        Instant::now() + Duration::from_millis(50) >= back_at,
        "c came back early"
    );
    let replies = send(&client, addr(a), &get, 30, 1)?;
    ensure!(count_status(&replies, 200) == 30);
    ensure!(
        served(c)? == 10,
        "c got traffic again until five more failures: {}",
        served(c)?
    );
    let state = endpoint_state(&client, &dest, addr(c))?;
    ensure!(
        state["state"] == "ejected" && state["times_ejected"] == 2,
        "{state}"
    );
    ensure!(
        state["ejected_for_ms"].as_u64().unwrap_or(0) > 2000,
        "the second ejection is longer: {state}"
    );

    // Under load: 10,000 requests, 8 at a time.
    let replies = send(&client, addr(a), &get, 10_000, 8)?;
    let ok = count_status(&replies, 200);
    ensure!(
        ok * 1000 >= 10_000 * 999,
        "{ok} of 10000 succeeded: {:?}",
        by_server(&replies)
    );
    Ok(())
}

pub fn retries_stay_within_the_budget(w: &World) -> anyhow::Result<()> {
    let bad: &[(&str, &str)] = &[("GOFE_TESTAPP_STATUS", "503")];
    let pods = servers(w, &[("a", bad), ("b", bad)])?;
    let file = world_file(w, "destinations.yaml");
    let dest = format!("api.test:{HTTP_PORT}");
    write_file(
        &file,
        &destinations(&[(&dest, endpoints_of(&pods.iter().collect::<Vec<_>>()), &[])]),
    )?;
    let client = client_with_file(
        w,
        &file,
        &[
            ("GOFE_RETRY_ON", "5xx"),
            ("GOFE_RETRY_LIMIT", "3"),
            ("GOFE_RETRY_BUDGET_RATIO", "0.2"),
            ("GOFE_RETRY_BUDGET_MIN_PER_SEC", "1"),
            ("GOFE_RETRY_BACKOFF", "1ms..2ms"),
            ("GOFE_OUTLIER_CONSECUTIVE_5XX", "0"),
            ("GOFE_OUTLIER_CONSECUTIVE_GATEWAY", "0"),
        ],
    )?;
    const N: usize = 500;
    let started = Instant::now();
    let replies = send(&client, addr(&pods[0]), &Req::get(&dest), N, 4)?;
    let took = started.elapsed();
    ensure!(count_status(&replies, 503) == N, "every request fails");
    let attempts = served(&pods[0])? + served(&pods[1])?;
    let retries = attempts - N as u64;
    let m = client.metrics()?;
    ensure!(
        m.sum("gofe_retries_total", &[("authority", &dest)]) == retries as f64,
        "the metric counts every retry the servers saw ({retries}): {}",
        m.0
    );
    // Within the budget's 10 s window: 20% of the requests, plus 1 a second's reserve
    // of 10. Without a budget, 3 retries each would be 1500.
    ensure!(
        took < Duration::from_secs(10),
        "the run fits one budget window ({took:?})"
    );
    let allowed = N as u64 / 5 + 10;
    ensure!(
        retries <= allowed,
        "{retries} retries, budget allows {allowed}"
    );
    ensure!(
        retries >= allowed - 10,
        "the budget is used: {retries} retries"
    );
    ensure!(
        m.sum("gofe_retry_budget_exhausted_total", &[("authority", &dest)])
            >= (N as u64 - retries) as f64
    );
    Ok(())
}

pub fn only_safe_requests_are_replayed(w: &World) -> anyhow::Result<()> {
    let pods = servers(w, &[("a", &[("GOFE_TESTAPP_STATUS", "503")]), ("b", &[])])?;
    let (a, b) = (&pods[0], &pods[1]);
    // A pod with nothing listening: connections to it are refused.
    let gone = w.pod("gone").start()?;
    let file = world_file(w, "destinations.yaml");
    let no_ejection: &[(&str, &str)] = &[
        ("retry_on", "5xx"),
        ("lb", "round-robin"),
        ("outlier_consecutive_5xx", "0"),
        ("outlier_consecutive_gateway", "0"),
    ];
    let retryable: &[(&str, &str)] = &[
        ("retry_on", "5xx"),
        ("lb", "round-robin"),
        ("outlier_consecutive_5xx", "0"),
        ("outlier_consecutive_gateway", "0"),
        ("retryable", "true"),
        ("retry_max_body", "1KiB"),
    ];
    let post = format!("post.test:{HTTP_PORT}");
    let retry = format!("retryable.test:{HTTP_PORT}");
    let refused = format!("refused.test:{HTTP_PORT}");
    write_file(
        &file,
        &destinations(&[
            (&post, endpoints_of(&[a, b]), no_ejection),
            (&retry, endpoints_of(&[a, b]), retryable),
            (
                &refused,
                endpoints_of(&[&gone, b]),
                &[("lb", "round-robin")],
            ),
        ]),
    )?;
    let client = client_with_file(w, &file, &[])?;
    let sink = |host: &str, len: usize| {
        let body: Vec<u8> = (0..len as u64).map(crate::apps::pattern_byte).collect();
        (
            Req::post(host, "/sink", body),
            format!("{len} {}\n", crate::apps::pattern_sha256(len as u64)),
        )
    };

    // A POST is not idempotent: a 503 goes back to the client as it is.
    let before = served(a)?;
    let (req, _) = sink(&post, 100);
    let replies = send(&client, addr(b), &req, 10, 1)?;
    let failed = count_status(&replies, 503) as u64;
    ensure!(failed > 0, "round-robin sent some to a");
    ensure!(served(a)? - before == failed, "no POST was sent twice");

    // Marked retryable, it is replayed with the same body.
    let before = served(a)?;
    let (req, sha) = sink(&retry, 512);
    let replies = send(&client, addr(b), &req, 10, 1)?;
    ensure!(count_status(&replies, 200) == 10, "{replies:?}");
    ensure!(
        replies.iter().all(|r| r.body == sha.as_bytes()),
        "b got every body whole"
    );
    ensure!(served(a)? > before, "a was tried");

    // Larger than GOFE_RETRY_MAX_BODY: never replayed.
    let before = served(a)?;
    let (req, _) = sink(&retry, 4096);
    let replies = send(&client, addr(b), &req, 10, 1)?;
    let failed = count_status(&replies, 503) as u64;
    ensure!(
        failed > 0 && served(a)? - before == failed,
        "4 KiB bodies are not retried"
    );

    // A connect failure: nothing was sent, so even a POST goes to another endpoint.
    let (req, sha) = sink(&refused, 2000);
    let replies = send(&client, addr(b), &req, 10, 1)?;
    ensure!(count_status(&replies, 200) == 10, "{replies:?}");
    ensure!(replies.iter().all(|r| r.body == sha.as_bytes()));
    let m = client.metrics()?;
    ensure!(
        m.sum(
            "gofe_retries_total",
            &[("authority", &refused), ("reason", "connect-failure")]
        ) >= 1.0,
        "{}",
        m.0
    );
    ensure!(m.sum("gofe_retries_total", &[("authority", &post)]) == 0.0);
    Ok(())
}

pub fn timeouts_fire_on_time_for_http_and_grpc(w: &World) -> anyhow::Result<()> {
    let pods = servers(
        w,
        &[
            ("slow", &[("GOFE_TESTAPP_DELAY_MS", "3000")]),
            ("stall", &[]),
        ],
    )?;
    let (slow, stall) = (&pods[0], &pods[1]);
    let file = world_file(w, "destinations.yaml");
    let try_dest = format!("try.test:{HTTP_PORT}");
    let whole = format!("whole.test:{HTTP_PORT}");
    let deadline = format!("deadline.test:{HTTP_PORT}");
    let stall_dest = format!("stall.test:{HTTP_PORT}");
    write_file(
        &file,
        &destinations(&[
            (
                &try_dest,
                endpoints_of(&[slow]),
                &[("per_try_timeout", "200ms"), ("retry_limit", "0")],
            ),
            (
                &whole,
                endpoints_of(&[slow]),
                &[
                    ("request_timeout", "500ms"),
                    ("per_try_timeout", "200ms"),
                    ("retry_on", "5xx"),
                    ("retry_limit", "5"),
                    ("retry_backoff", "1ms..2ms"),
                ],
            ),
            (
                &deadline,
                endpoints_of(&[slow]),
                &[("request_timeout", "300ms")],
            ),
            (
                &stall_dest,
                endpoints_of(&[stall]),
                &[("request_timeout", "300ms")],
            ),
        ]),
    )?;
    let client = client_with_file(w, &file, &[])?;
    let on_time = |what: &str, elapsed: Duration, timeout: Duration| {
        ensure!(
            elapsed >= timeout && elapsed < timeout + TIMEOUT_SLACK,
            "{what}: answered after {elapsed:?}, timeout {timeout:?}"
        );
        Ok(())
    };

    for (dest, timeout, var) in [
        (
            &try_dest,
            Duration::from_millis(200),
            "GOFE_PER_TRY_TIMEOUT",
        ),
        (&whole, Duration::from_millis(500), "GOFE_REQUEST_TIMEOUT"),
        (
            &deadline,
            Duration::from_millis(300),
            "GOFE_REQUEST_TIMEOUT",
        ),
    ] {
        let r = send(&client, addr(slow), &Req::get(dest), 1, 1)?.remove(0);
        ensure!(r.status == 504, "{dest}: {r:?}");
        ensure!(r.proxy_error.contains(var), "{dest}: {r:?}");
        on_time(dest, r.elapsed, timeout)?;
    }
    let m = client.metrics()?;
    ensure!(
        m.sum(
            "gofe_retries_total",
            &[("authority", &whole), ("reason", "per-try-timeout")]
        ) >= 1.0,
        "timed-out tries of a GET are retried until the request timeout: {}",
        m.0
    );

    // A response that has begun but stalls is cut off when the request timeout fires.
    let out = client.curl_output(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
        "-H",
        &format!("host: {stall_dest}"),
        &format!("http://{}/stall", addr(stall)),
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        !out.status.success(),
        "the body does not end normally: {text}"
    );
    let fields: Vec<&str> = text.split(' ').collect();
    ensure!(
        fields.len() == 3 && fields[0] == "200" && fields[1] == "7",
        "headers and the first chunk: {text}"
    );
    let took = Duration::from_secs_f64(fields[2].parse()?);
    on_time("stalled body", took, Duration::from_millis(300))?;

    // gRPC: the same timeouts end the call with DEADLINE_EXCEEDED.
    for (dest, timeout) in [
        (&try_dest, Duration::from_millis(200)),
        (&deadline, Duration::from_millis(300)),
    ] {
        let uri = format!("http://{}", addr(slow));
        let origin = format!("http://{dest}");
        let (code, elapsed) = client.block_on(move || async move {
            let mut echo = EchoClient::connect_as(uri, &origin).await?;
            let started = Instant::now();
            let result = echo
                .unary(EchoMsg {
                    text: "slow".into(),
                    seq: 1,
                })
                .await;
            anyhow::Ok((result.err().map(|s| s.code()), started.elapsed()))
        })??;
        ensure!(
            code == Some(tonic::Code::DeadlineExceeded),
            "{dest}: gRPC status {code:?}"
        );
        on_time(dest, elapsed, timeout)?;
    }
    Ok(())
}

pub fn ewma_sends_less_to_a_slow_endpoint_round_robin_does_not(w: &World) -> anyhow::Result<()> {
    let pods = servers(
        w,
        &[
            ("a", &[]),
            ("b", &[]),
            ("c", &[("GOFE_TESTAPP_DELAY_MS", "50")]),
        ],
    )?;
    let file = world_file(w, "destinations.yaml");
    let all = endpoints_of(&pods.iter().collect::<Vec<_>>());
    let ewma = format!("ewma.test:{HTTP_PORT}");
    let rr = format!("rr.test:{HTTP_PORT}");
    write_file(
        &file,
        &destinations(&[
            (&ewma, all.clone(), &[("lb", "ewma")]),
            (&rr, all, &[("lb", "round-robin")]),
        ]),
    )?;
    let client = client_with_file(w, &file, &[])?;

    let replies = send(&client, addr(&pods[0]), &Req::get(&rr), 300, 3)?;
    ensure!(count_status(&replies, 200) == 300);
    let shares = by_server(&replies);
    for name in ["a", "b", "c"] {
        let n = shares.get(name).copied().unwrap_or(0);
        ensure!(
            (95..=105).contains(&n),
            "round-robin: an equal share each: {shares:?}"
        );
    }

    let replies = send(&client, addr(&pods[0]), &Req::get(&ewma), 600, 3)?;
    ensure!(count_status(&replies, 200) == 600);
    let shares = by_server(&replies);
    let slow = shares.get("c").copied().unwrap_or(0);
    ensure!(
        slow < 60,
        "ewma: the slow endpoint gets clearly less than a third: {shares:?}"
    );
    let state = endpoint_state(&client, &ewma, addr(&pods[2]))?;
    ensure!(
        state["ewma_ms"].as_f64().unwrap_or(0.0) >= 20.0,
        "its latency estimate shows it: {state}"
    );
    Ok(())
}

pub fn ejection_never_exceeds_the_max_percent(w: &World) -> anyhow::Result<()> {
    let bad: &[(&str, &str)] = &[("GOFE_TESTAPP_STATUS", "503")];
    let pods = servers(w, &[("a", bad), ("b", bad), ("c", bad), ("d", bad)])?;
    let file = world_file(w, "destinations.yaml");
    let dest = format!("api.test:{HTTP_PORT}");
    write_file(
        &file,
        &destinations(&[(
            &dest,
            endpoints_of(&pods.iter().collect::<Vec<_>>()),
            &[
                ("outlier_consecutive_5xx", "2"),
                ("outlier_max_ejection_percent", "50"),
                ("lb", "round-robin"),
            ],
        )]),
    )?;
    let client = client_with_file(w, &file, &[])?;
    let replies = send(&client, addr(&pods[0]), &Req::get(&dest), 40, 1)?;
    ensure!(count_status(&replies, 503) == 40);
    let states = endpoint_states(&client, &dest)?;
    let ejected: Vec<String> = states
        .iter()
        .filter(|e| e["state"] == "ejected")
        .map(|e| e["address"].as_str().unwrap_or_default().to_string())
        .collect();
    ensure!(ejected.len() == 2, "half of four, no more: {states:?}");
    let m = client.metrics()?;
    ensure!(
        m.sum(
            "gofe_endpoints",
            &[("authority", &dest), ("state", "ejected")]
        ) == 2.0
    );
    ensure!(
        m.sum(
            "gofe_endpoints",
            &[("authority", &dest), ("state", "ready")]
        ) == 2.0
    );
    // The ejected two get nothing while they are out.
    let before: Vec<u64> = pods.iter().map(served).collect::<anyhow::Result<_>>()?;
    send(&client, addr(&pods[0]), &Req::get(&dest), 20, 1)?;
    for (pod, before) in pods.iter().zip(before) {
        if ejected.contains(&addr(pod).to_string()) {
            ensure!(
                served(pod)? == before,
                "{} is ejected yet got traffic",
                pod.name
            );
        }
    }
    Ok(())
}

pub fn dns_discovery_follows_a_changing_record_set(w: &World) -> anyhow::Result<()> {
    let pods = servers(w, &[("a", &[]), ("b", &[]), ("c", &[])])?;
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    let client = w
        .pod("client")
        .sidecar()
        .no_identity()
        .env("GOFE_DISCOVERY", "dns")
        .env("GOFE_LB", "round-robin")
        .start()?;
    // The DNS server listens in the client pod, where its resolv.conf points.
    let mut dns = DnsServer::start(&client.ns, "dns.test.")?;
    dns.set_a("api", &[a.ip4, b.ip4])?;
    let dest = format!("api.dns.test:{HTTP_PORT}");
    let get = Req::get(&dest);
    let served_by = |n: usize| -> anyhow::Result<HashMap<String, usize>> {
        // The connection goes to a's address; the authority decides (so that c
        // answering shows DNS at work, not the original destination).
        let replies = send(&client, addr(a), &get, n, 1)?;
        ensure!(count_status(&replies, 200) == n, "{replies:?}");
        Ok(by_server(&replies))
    };
    eventually("both A records in use", CHANGE_TIMEOUT, || {
        let s = served_by(10)?;
        Ok((s.len() == 2 && s.contains_key("a") && s.contains_key("b")).then_some(()))
    })?;
    let states = endpoint_states(&client, &dest)?;
    ensure!(states.len() == 2, "{states:?}");

    // The record set changes: the proxy follows as the records' TTL (1 s) says, not
    // GOFE_DNS_REFRESH's ceiling (60 s by default).
    dns.set_a("api", &[c.ip4])?;
    eventually("the new record set in use", CHANGE_TIMEOUT, || {
        let s = served_by(6)?;
        Ok((s.len() == 1 && s.contains_key("c")).then_some(()))
    })?;
    let dns_view = |what: &str| -> anyhow::Result<()> {
        let (_, body) = client.admin("GET", "/endpoints")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let d = v["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["name"] == dest.as_str())
            .with_context(|| format!("{dest} in /endpoints"))?;
        let eps: Vec<&str> = d["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["address"].as_str())
            .collect();
        ensure!(
            d["source"] == "dns" && eps == [addr(c).to_string()],
            "{what}: {d}"
        );
        Ok(())
    };
    dns_view("after the change")?;

    // A name without records: the original destination.
    let replies = send(
        &client,
        addr(b),
        &Req::get(&format!("nothing.dns.test:{HTTP_PORT}")),
        3,
        1,
    )?;
    ensure!(
        by_server(&replies).get("b") == Some(&3),
        "{:?}",
        by_server(&replies)
    );

    // The server goes away: the last good set stays.
    dns.stop();
    eventually("a failed lookup of api.dns.test", CHANGE_TIMEOUT, || {
        let log = client.proxy_log()?;
        let failed = log
            .lines()
            .any(|l| l.contains("DNS resolution failed") && l.contains(&dest));
        Ok(failed.then_some(()))
    })?;
    let s = served_by(6)?;
    ensure!(s.get("c") == Some(&6), "still c: {s:?}");
    dns_view("with the DNS server gone")?;
    Ok(())
}

pub fn policy_file_changes_apply_at_run_time_and_a_broken_file_changes_nothing(
    w: &World,
) -> anyhow::Result<()> {
    let pods = servers(w, &[("a", &[("GOFE_TESTAPP_STATUS", "503")]), ("b", &[])])?;
    let discovery = world_file(w, "destinations.yaml");
    let policy = world_file(w, "policy.yaml");
    let dest = format!("api.test:{HTTP_PORT}");
    write_file(
        &discovery,
        &destinations(&[(&dest, endpoints_of(&[&pods[0], &pods[1]]), &[])]),
    )?;
    let base: &[(&str, &str)] = &[
        ("lb", "round-robin"),
        ("outlier_consecutive_5xx", "0"),
        ("outlier_consecutive_gateway", "0"),
    ];
    let with = |retry_on: &str| {
        let mut p = base.to_vec();
        p.push(("retry_on", retry_on));
        destinations(&[(&dest, Vec::new(), &p)])
    };
    write_file(&policy, &with("connect-failure"))?;
    let client = client_with_file(
        w,
        &discovery,
        &[("GOFE_POLICY_FILE", &policy.display().to_string())],
    )?;
    let get = Req::get(&dest);
    let failures = |n: usize| -> anyhow::Result<usize> {
        Ok(count_status(
            &send(&client, addr(&pods[1]), &get, n, 1)?,
            503,
        ))
    };
    ensure!(
        failures(20)? > 0,
        "without 5xx retries, a's 503s reach the client"
    );

    write_file(&policy, &with("5xx"))?;
    eventually("the new policy applied", CHANGE_TIMEOUT, || {
        Ok((failures(10)? == 0).then_some(()))
    })?;

    // A broken file is logged and changes nothing.
    write_file(&policy, &with("5xx,sometimes"))?;
    eventually("the broken file noticed", CHANGE_TIMEOUT, || {
        Ok(client
            .proxy_log()?
            .contains("keeping the last good version of the file")
            .then_some(()))
    })?;
    ensure!(failures(20)? == 0, "the last good policy still applies");
    let (status, config) = client.admin("GET", "/config")?;
    if status != 200 {
        bail!("/config: {status}");
    }
    ensure!(config.contains("GOFE_POLICY_FILE"));
    Ok(())
}

pub fn a_destination_at_its_limit_answers_503_at_once(w: &World) -> anyhow::Result<()> {
    let pods = servers(w, &[("a", &[])])?;
    let a = &pods[0];
    let file = world_file(w, "destinations.yaml");
    let dest = format!("api.test:{HTTP_PORT}");
    write_file(
        &file,
        &destinations(&[(
            &dest,
            endpoints_of(&[a]),
            &[("max_concurrent_requests", "2")],
        )]),
    )?;
    let client = client_with_file(w, &file, &[])?;
    let hold = Req {
        path: "/hold".into(),
        ..Req::get(&dest)
    };
    std::thread::scope(|s| -> anyhow::Result<()> {
        let held = s.spawn(|| send(&client, addr(a), &hold, 2, 2));
        eventually("two requests held", CHANGE_TIMEOUT, || {
            Ok((a.app_get(HTTP_PORT, "/held")?.trim() == "2").then_some(()))
        })?;
        let r = send(&client, addr(a), &Req::get(&dest), 1, 1)?.remove(0);
        ensure!(r.status == 503 && r.overloaded == "true", "{r:?}");
        ensure!(
            r.proxy_error.contains("GOFE_MAX_CONCURRENT_REQUESTS"),
            "{r:?}"
        );
        ensure!(
            r.elapsed < Duration::from_secs(1),
            "at once, not queued: {r:?}"
        );
        a.app_get(HTTP_PORT, "/release")?;
        let held = held
            .join()
            .map_err(|_| anyhow::anyhow!("holding thread panicked"))??;
        ensure!(count_status(&held, 200) == 2, "{held:?}");
        Ok(())
    })?;
    // The slots came back with the responses.
    let replies = send(&client, addr(a), &Req::get(&dest), 4, 2)?;
    ensure!(count_status(&replies, 200) == 4, "{replies:?}");
    Ok(())
}

pub fn endpoints_come_and_go_under_load_without_failing_requests(w: &World) -> anyhow::Result<()> {
    let slowish: &[(&str, &str)] = &[("GOFE_TESTAPP_DELAY_MS", "10")];
    let pods = servers(w, &[("a", slowish), ("b", slowish), ("c", slowish)])?;
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    let file = world_file(w, "destinations.yaml");
    let dest = format!("api.test:{HTTP_PORT}");
    let set = |eps: &[&Pod]| {
        write_file(
            &file,
            &destinations(&[(&dest, endpoints_of(eps), &[("lb", "round-robin")])]),
        )
    };
    set(&[a, b])?;
    let client = client_with_file(w, &file, &[])?;
    let replies = std::thread::scope(|s| -> anyhow::Result<Vec<Reply>> {
        let load = s.spawn(|| send(&client, addr(a), &Req::get(&dest), 2000, 8));
        let grows = |pod: &Pod, by: u64| -> anyhow::Result<()> {
            let from = served(pod)?;
            eventually(&format!("{} serving", pod.name), CHANGE_TIMEOUT, || {
                Ok((served(pod)? >= from + by).then_some(()))
            })
        };
        grows(a, 50)?;
        // c comes, a goes (it keeps running: its requests in flight finish).
        set(&[b, c])?;
        grows(c, 50)?;
        let a_after_removal = served(a)?;
        // a comes back, b goes.
        set(&[c, a])?;
        grows(a, 50)?;
        ensure!(served(a)? > a_after_removal);
        load.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    })?;
    ensure!(
        count_status(&replies, 200) == 2000,
        "every request succeeds: {:?}",
        by_server(&replies)
    );
    let states = endpoint_states(&client, &dest)?;
    let now: Vec<&str> = states
        .iter()
        .filter_map(|e| e["address"].as_str())
        .collect();
    ensure!(now == [addr(c).to_string(), addr(a).to_string()], "{now:?}");
    Ok(())
}

pub fn discovery_names_the_identity_each_endpoint_must_present(w: &World) -> anyhow::Result<()> {
    let a = w.pod("a").sidecar().start()?;
    a.app("http", HTTP_PORT)?;
    let b = w.pod("b").sidecar().start()?;
    b.app("http", HTTP_PORT)?;
    let file = world_file(w, "destinations.yaml");
    let dest = format!("api.test:{HTTP_PORT}");
    // a is who it should be; at b's address, discovery expects someone else.
    let yaml = format!(
        "destinations:\n  - name: {dest}\n    endpoints:\n      - address: \"{}\"\n        identity: {}\n      - address: \"{}\"\n        identity: {}\n    policy:\n      lb: round-robin\n",
        addr(&a),
        crate::harness::Issuer::identity("a"),
        addr(&b),
        crate::harness::Issuer::identity("somebody-else"),
    );
    write_file(&file, &yaml)?;
    let client = w
        .pod("client")
        .sidecar()
        .env("GOFE_DISCOVERY", &format!("file:{}", file.display()))
        .start()?;
    let replies = send(&client, addr(&a), &Req::get(&dest), 20, 1)?;
    ensure!(count_status(&replies, 200) == 20, "{replies:?}");
    ensure!(
        by_server(&replies).get("a") == Some(&20),
        "only a answers: {:?}",
        by_server(&replies)
    );
    ensure!(served(&b)? == 0, "nothing reached b");
    let m = client.metrics()?;
    ensure!(
        m.sum("gofe_tcp_connect_errors_total", &[("reason", "identity")]) >= 1.0,
        "{}",
        m.0
    );
    ensure!(
        m.sum(
            "gofe_requests_total",
            &[
                ("authority", &dest),
                ("tls", "true"),
                ("peer_identity", &crate::harness::Issuer::identity("a"))
            ]
        ) == 20.0,
        "{}",
        m.0
    );
    Ok(())
}

pub fn a_streaming_upload_is_replayed_whole_after_an_early_503(w: &World) -> anyhow::Result<()> {
    let early: &[(&str, &str)] = &[("GOFE_TESTAPP_STATUS", "503"), ("GOFE_TESTAPP_EARLY", "1")];
    let pods = servers(w, &[("a", early), ("b", &[])])?;
    let (a, b) = (&pods[0], &pods[1]);
    let file = world_file(w, "destinations.yaml");
    let dest = format!("api.test:{HTTP_PORT}");
    write_file(
        &file,
        &destinations(&[(
            &dest,
            endpoints_of(&[a, b]),
            &[
                ("retry_on", "5xx"),
                ("lb", "round-robin"),
                ("outlier_consecutive_5xx", "0"),
                ("outlier_consecutive_gateway", "0"),
            ],
        )]),
    )?;
    let client = client_with_file(w, &file, &[])?;
    let upload = |len: usize| {
        let body: Vec<u8> = (0..len as u64).map(crate::apps::pattern_byte).collect();
        let mut req = Req::post(&dest, "/sink", body);
        req.method = "PUT";
        req.trickle = true;
        (
            req,
            format!("{len} {}\n", crate::apps::pattern_sha256(len as u64)),
        )
    };

    // 32 KiB, sent as it comes: a answers 503 before reading it; the retry sends b
    // what was kept and then the rest as it arrives. b must get every byte, in order.
    let (req, sha) = upload(32 * 1024);
    let before = served(a)?;
    let replies = send(&client, addr(b), &req, 6, 1)?;
    ensure!(count_status(&replies, 200) == 6, "{replies:?}");
    ensure!(
        replies.iter().all(|r| r.body == sha.as_bytes()),
        "b got every body whole: {replies:?}"
    );
    ensure!(
        served(a)? > before,
        "a was tried (and refused) first for some"
    );

    // 200 KiB outgrows the 64 KiB retry buffer: a request a refused is either refused
    // to the client (too late to replay) or replayed whole, never cut short.
    let (req, sha) = upload(200 * 1024);
    let before = served(a)?;
    let replies = send(&client, addr(b), &req, 6, 1)?;
    for r in &replies {
        ensure!(
            r.status == 503 || (r.status == 200 && r.body == sha.as_bytes()),
            "neither refused nor whole: {r:?}"
        );
    }
    ensure!(served(a)? > before);
    Ok(())
}
