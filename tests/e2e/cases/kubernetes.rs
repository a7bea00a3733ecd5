//! Kubernetes, end to end: workloads go through the real `gofe inject` (CLI and
//! webhook) and the pods it writes are booted by the test kubelet (`kubelet.rs`, which
//! says what it does not reproduce) with the real `gofe init`, `gofe proxy` and
//! `gofe identity`. Mocked, because they cannot run here: the API server (the
//! ConfigMap and ClusterTrustBundle are handed to the kubelet) and the kubelet itself.

crate::cases::register![
    injected_pods_boot_talk_over_mtls_and_pass_rewritten_probes,
    injected_job_completes_and_its_sidecar_exits_after_the_app,
    ordinary_sidecar_pod_starts_its_app_once_gofe_await_returns,
    termination_runs_prestop_then_kills_an_app_that_outlives_its_grace,
    webhook_refuses_a_pod_whose_annotation_is_invalid,
];

use crate::harness::{Issuer, World, eventually, gofe_bin, sh};
use crate::kubelet::{Cluster, Image, KubePod, Kubelet, ProbeKind, TrustBundle};
use anyhow::{Context, anyhow, ensure};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const GOFE_IMAGE: &str = "gofe-e2e/gofe:test";
const INIT_IMAGE: &str = "gofe-e2e/gofe-init:test";
const APP_IMAGE: &str = "gofe-e2e/app:http";
const CURL_IMAGE: &str = "curlimages/curl:8";
const SHELL_IMAGE: &str = "busybox:1.37";

/// The server: strict inbound mTLS; HTTP, TCP and gRPC probes on a named port; trust
/// anchors from the namespace's ConfigMap.
const SERVER: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  template:
    metadata:
      labels: {app: server}
      annotations:
        gofe.io/inject: enabled
        config.gofe.io/inbound-mtls: strict
    spec:
      serviceAccountName: server
      terminationGracePeriodSeconds: 10
      containers:
        - name: app
          image: gofe-e2e/app:http
          ports: [{name: http, containerPort: 8080}]
          startupProbe: {grpc: {port: 8080, service: gofe.test.Echo}, periodSeconds: 1, failureThreshold: 30}
          readinessProbe: {tcpSocket: {port: http}, periodSeconds: 2}
          livenessProbe: {httpGet: {path: /, port: http}, periodSeconds: 5, timeoutSeconds: 2}
"#;

/// The client, as the API server would send it to the webhook: a Deployment's pod, its
/// trust anchors from the mesh signer's ClusterTrustBundle.
const CLIENT: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  generateName: client-6c9f8d7b5-
  namespace: default
  labels: {app: client, pod-template-hash: 6c9f8d7b5}
  annotations:
    config.gofe.io/trust-anchors-source: clustertrustbundle
  ownerReferences:
    - {apiVersion: apps/v1, kind: ReplicaSet, name: client-6c9f8d7b5, uid: 0d6e, controller: true}
spec:
  serviceAccountName: client
  terminationGracePeriodSeconds: 10
  containers:
    - name: app
      image: gofe-e2e/app:http
      ports: [{containerPort: 8080}]
      livenessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
      readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
"#;

/// A Job whose one container calls the server through the mesh and exits; `$(SERVER)`
/// is expanded by the kubelet from the container's env.
const JOB: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: report, namespace: default}
spec:
  template:
    metadata:
      annotations: {gofe.io/inject: enabled}
    spec:
      serviceAccountName: report
      restartPolicy: Never
      terminationGracePeriodSeconds: 10
      containers:
        - name: report
          image: curlimages/curl:8
          env: [{name: SERVER, value: "{SERVER_IP}:8080"}]
          args: [-sS, --fail, --max-time, "10", "http://$(SERVER)/"]
"#;

/// What the API server holds for these pods, and what the images run.
fn cluster(w: &World) -> anyhow::Result<Cluster> {
    let anchors = fs::read_to_string(w.anchors_file())?;
    let curl = sh(Command::new("sh").args(["-c", "command -v curl"]))?;
    Ok(Cluster {
        config_maps: BTreeMap::from([(
            "gofe-trust-anchors".to_string(),
            BTreeMap::from([("ca.crt".to_string(), anchors.clone())]),
        )]),
        trust_bundles: vec![
            TrustBundle {
                name: "gofe.io:mesh:anchors".into(),
                signer: "gofe.io/mesh".into(),
                labels: BTreeMap::from([("gofe.io/trust-anchors".into(), "mesh".into())]),
                pem: anchors,
            },
            // Another signer's bundle is not the mesh's.
            TrustBundle {
                name: "example.com:other:x".into(),
                signer: "example.com/other".into(),
                labels: BTreeMap::from([("gofe.io/trust-anchors".into(), "mesh".into())]),
                pem: "not a certificate\n".into(),
            },
        ],
        images: BTreeMap::from([
            (GOFE_IMAGE.to_string(), Image::Gofe),
            (INIT_IMAGE.to_string(), Image::Gofe),
            (APP_IMAGE.to_string(), Image::TestApp("http")),
            (CURL_IMAGE.to_string(), Image::Host(curl.trim().to_string())),
            (SHELL_IMAGE.to_string(), Image::Host("/bin/sh".into())),
        ]),
    })
}

/// The injector's flags for this world: its images and its issuer.
fn injector_args(issuer: &Issuer) -> Vec<String> {
    vec![
        "--image".into(),
        GOFE_IMAGE.into(),
        "--init-image".into(),
        INIT_IMAGE.into(),
        "--identity-addr".into(),
        format!("{}:{}", issuer.ip, crate::harness::ISSUER_PORT),
    ]
}

/// `gofe inject` on `yaml`: the pod template of its first document.
fn inject(yaml: &str, issuer: &Issuer) -> anyhow::Result<Value> {
    let mut child = Command::new(gofe_bin())
        .arg("inject")
        .args(injector_args(issuer))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "gofe inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_yaml::from_slice(&out.stdout)?;
    Ok(doc["spec"]["template"].clone())
}

/// `gofe inject --webhook`, in the node's namespace.
struct Webhook<'k> {
    kubelet: &'k Kubelet<'k>,
    dir: std::path::PathBuf,
}

const WEBHOOK_PORT: u16 = 9443;

impl<'k> Webhook<'k> {
    fn start(w: &World, kubelet: &'k Kubelet<'k>, issuer: &Issuer) -> anyhow::Result<Self> {
        let dir = w.dir().join("webhook");
        fs::create_dir_all(&dir)?;
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(vec!["localhost".into()])?;
        let cert = params.self_signed(&key)?;
        fs::write(dir.join("tls.crt"), cert.pem())?;
        fs::write(dir.join("tls.key"), key.serialize_pem())?;
        let mut cmd = kubelet.node().command(gofe_bin(), None)?;
        cmd.args(["inject", "--webhook", "--listen"])
            .arg(format!("127.0.0.1:{WEBHOOK_PORT}"))
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .args(injector_args(issuer));
        w.spawn("webhook", cmd)?;
        let hook = Webhook { kubelet, dir };
        eventually("the webhook answers", Duration::from_secs(10), || {
            Ok(hook.curl(&["https://localhost:9443/healthz"]).ok())
        })?;
        Ok(hook)
    }

    fn curl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.kubelet.node().command("curl", None)?;
        cmd.args(["-sS", "--fail-with-body", "--max-time", "10", "--cacert"])
            .arg(self.dir.join("tls.crt"))
            .args(["--resolve", "localhost:9443:127.0.0.1"])
            .args(args);
        sh(&mut cmd)
    }

    /// The AdmissionReview's response for `pod`, as the API server would send it.
    fn review(&self, pod: &Value) -> anyhow::Result<Value> {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "e2e-review",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "default",
                "operation": "CREATE",
                "object": pod,
            }
        });
        let file = self.dir.join("review.json");
        fs::write(&file, body.to_string())?;
        let out = self.curl(&[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", file.display()),
            "https://localhost:9443/mutate?timeout=10s",
        ])?;
        let answer: Value = serde_json::from_str(&out)?;
        Ok(answer["response"].clone())
    }

    /// The pod as admitted: the review's JSON patch applied.
    fn admit(&self, pod: &Value) -> anyhow::Result<Value> {
        use base64::Engine;
        let rsp = self.review(pod)?;
        ensure!(rsp["allowed"] == true, "the webhook refused the pod: {rsp}");
        let patch = base64::engine::general_purpose::STANDARD.decode(
            rsp["patch"]
                .as_str()
                .ok_or_else(|| anyhow!("no patch: {rsp}"))?,
        )?;
        let patch: json_patch::Patch = serde_json::from_slice(&patch)?;
        let mut admitted = pod.clone();
        json_patch::patch(&mut admitted, &patch)?;
        Ok(admitted)
    }
}

/// Each rewritten probe of `container` points at the admin port and passes from the
/// node.
fn rewritten_probes_pass(pod: &KubePod<'_, '_>, container: &str) -> anyhow::Result<usize> {
    let mut n = 0;
    for kind in [
        ProbeKind::Startup,
        ProbeKind::Readiness,
        ProbeKind::Liveness,
    ] {
        let Ok(spec) = pod.probe_spec(container, kind) else {
            continue;
        };
        let path = spec["httpGet"]["path"].as_str().unwrap_or_default();
        ensure!(
            path.starts_with(&format!("/app-health/{container}/"))
                && spec["httpGet"]["port"] == 4191,
            "{kind:?} probe of {container} in {} not rewritten: {spec}",
            pod.name
        );
        let answer = pod.probe(container, kind)?;
        println!("{} {container} {kind:?}: {answer}", pod.name);
        n += 1;
    }
    Ok(n)
}

pub fn injected_pods_boot_talk_over_mtls_and_pass_rewritten_probes(
    w: &World,
) -> anyhow::Result<()> {
    let issuer = w.issuer()?;
    let kubelet = Kubelet::new(w, cluster(w)?)?;

    // The server, from the CLI's Deployment.
    let template = inject(SERVER, &issuer)?;
    let mut server = kubelet.run_pod("server-5f7c9d-x2k4q", &template)?;
    server.wait_ready()?;
    ensure!(
        rewritten_probes_pass(&server, "app")? == 3,
        "HTTP, TCP and gRPC probes"
    );
    // The same probe sent straight to the application, as the kubelet would without
    // the rewrite, meets strict mTLS.
    let direct = kubelet.probe(
        server.netns.ip4,
        &json!({"httpGet": {"path": "/", "port": 8080}}),
    );
    ensure!(
        direct.is_err(),
        "a plaintext probe reached the app under strict mTLS: {direct:?}"
    );

    // The client, from the webhook's patch, anchors from the ClusterTrustBundle.
    let webhook = Webhook::start(w, &kubelet, &issuer)?;
    let client_pod: Value = serde_yaml::from_str(CLIENT)?;
    let admitted = webhook.admit(&client_pod)?;
    let mut client = kubelet.run_pod("client-6c9f8d7b5-q8w2n", &admitted)?;
    client.wait_ready()?;
    ensure!(rewritten_probes_pass(&client, "app")? == 2);
    let identity = client.netns.admin("GET", "/identity")?;
    ensure!(
        identity.0 == 200
            && identity
                .1
                .contains("spiffe://cluster.local/ns/default/sa/client"),
        "{identity:?}"
    );

    // Client to server over mTLS.
    let url = format!("http://{}:8080/", server.netns.ip4);
    let body = client.netns.curl(&[&url])?;
    ensure!(body.contains("hello from server"), "{body}");
    eventually(
        "the server saw the client's identity",
        Duration::from_secs(10),
        || {
            let m = server.netns.metrics()?;
            Ok((m.sum(
                "gofe_requests_total",
                &[
                    ("direction", "inbound"),
                    (
                        "peer_identity",
                        "spiffe://cluster.local/ns/default/sa/client",
                    ),
                ],
            ) >= 1.0)
                .then_some(()))
        },
    )?;

    // A broken app fails its probes, and passes again once mended.
    server.netns.app_get(8080, "/control/status/500")?;
    let live = server.probe("app", ProbeKind::Liveness).unwrap_err();
    ensure!(format!("{live:#}").contains("500"), "{live:#}");
    let startup = server.probe("app", ProbeKind::Startup).unwrap_err();
    ensure!(
        format!("{startup:#}").contains("NOT_SERVING"),
        "{startup:#}"
    );
    server.netns.app_get(8080, "/control/ok")?;
    server.probe("app", ProbeKind::Liveness)?;
    // A crashed app fails its TCP probe (the proxy's own listener would have passed it).
    client.crash("app")?;
    let tcp = client.probe("app", ProbeKind::Liveness).unwrap_err();
    ensure!(format!("{tcp:#}").contains("cannot connect"), "{tcp:#}");

    // Termination: the app first, the sidecar last, both cleanly.
    server.terminate()?;
    ensure!(server.exited_before("app", "gofe-proxy")?);
    let proxy = server
        .exit_status("gofe-proxy")?
        .context("proxy still running")?;
    ensure!(proxy.success(), "the proxy exited with {proxy}");
    client.terminate()?;
    Ok(())
}

pub fn injected_job_completes_and_its_sidecar_exits_after_the_app(w: &World) -> anyhow::Result<()> {
    let issuer = w.issuer()?;
    let server = w
        .pod("server")
        .sidecar()
        .env("GOFE_INBOUND_MTLS", "strict")
        .start()?;
    server.app("http", 8080)?;
    let kubelet = Kubelet::new(w, cluster(w)?)?;
    let template = inject(
        &JOB.replace("{SERVER_IP}", &server.ip4.to_string()),
        &issuer,
    )?;
    let mut job = kubelet.run_pod("report-8x7kq", &template)?;
    job.wait_completed(Duration::from_secs(60))?;
    let app = job.exit_status("report")?.context("report did not exit")?;
    ensure!(app.success(), "the Job's container failed: {app}");
    let proxy = job
        .exit_status("gofe-proxy")?
        .context("proxy still running")?;
    ensure!(proxy.success(), "the proxy exited with {proxy}");
    ensure!(
        job.exited_before("report", "gofe-proxy")?,
        "the sidecar exited before the app"
    );
    let m = server.metrics()?;
    let seen = m.sum(
        "gofe_requests_total",
        &[
            ("direction", "inbound"),
            (
                "peer_identity",
                "spiffe://cluster.local/ns/default/sa/report",
            ),
        ],
    );
    ensure!(seen >= 1.0, "the Job's call did not arrive over mTLS");
    Ok(())
}

/// `config.gofe.io/native-sidecar: "false"`: the proxy is the first ordinary container,
/// and the kubelet starts the app only once its `gofe await` postStart hook returns.
pub fn ordinary_sidecar_pod_starts_its_app_once_gofe_await_returns(
    w: &World,
) -> anyhow::Result<()> {
    let issuer = w.issuer()?;
    let kubelet = Kubelet::new(w, cluster(w)?)?;
    let yaml = SERVER.replace(
        "config.gofe.io/inbound-mtls: strict",
        "config.gofe.io/inbound-mtls: strict\n        config.gofe.io/native-sidecar: \"false\"",
    );
    let template = inject(&yaml, &issuer)?;
    ensure!(
        template["spec"]["containers"][0]["name"] == "gofe-proxy",
        "{template}"
    );
    let mut pod = kubelet.run_pod("server-ordinary-x9", &template)?;
    // The hook returned, so the proxy held its certificate before the app started.
    let (status, _) = pod.netns.admin("GET", "/ready")?;
    ensure!(status == 200, "the app started before the proxy was ready");
    pod.wait_ready()?;
    ensure!(rewritten_probes_pass(&pod, "app")? == 3);
    pod.terminate()?;
    let proxy = pod
        .exit_status("gofe-proxy")?
        .context("proxy still running")?;
    ensure!(proxy.success(), "the proxy exited with {proxy}");
    Ok(())
}

/// An app that ignores SIGTERM: its preStop hook runs first (writing into an emptyDir),
/// SIGKILL comes when the grace period is over, and only then is the sidecar stopped.
const STUBBORN: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: stubborn, namespace: default}
spec:
  selector: {matchLabels: {app: stubborn}}
  template:
    metadata:
      annotations: {gofe.io/inject: enabled}
    spec:
      serviceAccountName: stubborn
      terminationGracePeriodSeconds: 2
      containers:
        - name: app
          image: busybox:1.37
          command: [/bin/sh, -c, 'trap "" TERM; while :; do sleep 1; done']
          lifecycle:
            preStop: {exec: {command: [/bin/sh, -c, 'echo stopping > /var/run/stop/prestop']}}
          volumeMounts: [{name: stop, mountPath: /var/run/stop}]
      volumes:
        - {name: stop, emptyDir: {}}
"#;

pub fn termination_runs_prestop_then_kills_an_app_that_outlives_its_grace(
    w: &World,
) -> anyhow::Result<()> {
    let issuer = w.issuer()?;
    let kubelet = Kubelet::new(w, cluster(w)?)?;
    let template = inject(STUBBORN, &issuer)?;
    let mut pod = kubelet.run_pod("stubborn-7f9c-p2x", &template)?;
    let started = std::time::Instant::now();
    pod.terminate()?;
    let took = started.elapsed();
    let marker = pod.volume_file("stop", "prestop")?;
    ensure!(marker.trim() == "stopping", "preStop wrote {marker:?}");
    use std::os::unix::process::ExitStatusExt;
    let app = pod.exit_status("app")?.context("app still running")?;
    ensure!(
        app.signal() == Some(9),
        "the app ended with {app}, not SIGKILL"
    );
    ensure!(
        took >= Duration::from_secs(2),
        "killed after {took:?}, within the grace"
    );
    ensure!(pod.exited_before("app", "gofe-proxy")?);
    let proxy = pod
        .exit_status("gofe-proxy")?
        .context("proxy still running")?;
    ensure!(proxy.success(), "the proxy exited with {proxy}");
    Ok(())
}

pub fn webhook_refuses_a_pod_whose_annotation_is_invalid(w: &World) -> anyhow::Result<()> {
    let issuer = w.issuer()?;
    let kubelet = Kubelet::new(w, cluster(w)?)?;
    let webhook = Webhook::start(w, &kubelet, &issuer)?;
    let mut pod: Value = serde_yaml::from_str(CLIENT)?;
    pod["metadata"]["annotations"]["config.gofe.io/inbound-mtls"] = json!("sometimes");
    let rsp = webhook.review(&pod)?;
    ensure!(rsp["allowed"] == false, "{rsp}");
    let message = rsp["status"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("config.gofe.io/inbound-mtls") && message.contains("sometimes"),
        "{message}"
    );
    ensure!(rsp.get("patch").is_none(), "{rsp}");
    Ok(())
}
