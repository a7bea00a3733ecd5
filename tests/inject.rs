//! `gofe inject`, as a user runs it: YAML through the real binary, the webhook over
//! real HTTPS with a real AdmissionReview, and the manifests in k8s/ checked against
//! the Kubernetes schemas with kubernetes-validate.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn gofe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gofe"))
}

fn inject_with(yaml: &str, args: &[&str]) -> Output {
    let mut child = gofe()
        .arg("inject")
        .args(args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn inject(yaml: &str) -> String {
    let out = inject_with(yaml, &[]);
    assert!(
        out.status.success(),
        "gofe inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

const TEMPLATE: &str = r#"
    metadata:
      labels: {app: web}
      annotations:
        gofe.io/inject: enabled
        config.gofe.io/retry-on: 5xx
        config.gofe.io/skip-inbound-ports: "22"
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: nginx:1.27
          ports: [{containerPort: 80}]
"#;

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| {
            if l.trim().is_empty() {
                String::new()
            } else {
                format!("{}{}", " ".repeat(by), l.strip_prefix("    ").unwrap_or(l))
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn workloads() -> String {
    workloads_from(TEMPLATE)
}

/// One of each workload kind (and a List) around the pod template `template`.
fn workloads_from(template: &str) -> String {
    let t = |by| indent(template, by);
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-deploy, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  template:
{d}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: web-sts}}
spec:
  serviceName: web
  selector: {{matchLabels: {{app: web}}}}
  template:
{d}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: web-ds}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  template:
{d}
---
apiVersion: batch/v1
kind: Job
metadata: {{name: web-job}}
spec:
  template:
{d}
---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: web-cron}}
spec:
  schedule: "*/5 * * * *"
  jobTemplate:
    spec:
      template:
{c}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-pod
{p}
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web-in-list}}
    spec:
      selector: {{matchLabels: {{app: web}}}}
      template:
{l}
"#,
        d = t(4),
        c = t(8),
        p = indent(template, 0)
            .lines()
            .filter(|l| !l.starts_with("metadata:"))
            .collect::<Vec<_>>()
            .join("\n"),
        l = t(8),
    )
}

/// The pod templates of the injected documents, with their workload's name.
fn templates(docs: &[Value]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for d in docs {
        let name = d["metadata"]["name"].as_str().unwrap_or("").to_string();
        match d["kind"].as_str().unwrap() {
            "List" => out.extend(templates(d["items"].as_array().unwrap())),
            "CronJob" => out.push((name, d["spec"]["jobTemplate"]["spec"]["template"].clone())),
            "Pod" => out.push((name, d.clone())),
            _ => out.push((name, d["spec"]["template"].clone())),
        }
    }
    out
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn injects_every_workload_kind() {
    let yaml = workloads();
    let out = docs(&inject(&yaml));
    let pods = templates(&out);
    assert_eq!(pods.len(), 7, "{pods:?}");
    for (name, pod) in pods {
        let spec = &pod["spec"];
        let init = spec["initContainers"].as_array().unwrap();
        assert_eq!(init[0]["name"], "gofe-init", "{name}");
        assert_eq!(init[0]["args"], json!(["init"]));
        let caps = &init[0]["securityContext"]["capabilities"]["add"];
        assert_eq!(caps, &json!(["NET_ADMIN", "NET_RAW"]), "{name}");
        assert_eq!(
            env(&init[0], "GOFE_SKIP_INBOUND_PORTS").unwrap()["value"],
            "22"
        );

        let proxy = &init[1];
        assert_eq!(proxy["name"], "gofe-proxy", "{name}: a native sidecar");
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
        assert_eq!(
            proxy["readinessProbe"]["httpGet"],
            json!({"path": "/ready", "port": 4191})
        );
        assert_eq!(
            proxy["livenessProbe"]["httpGet"],
            json!({"path": "/live", "port": 4191})
        );
        assert_eq!(env(proxy, "GOFE_RETRY_ON").unwrap()["value"], "5xx");
        assert_eq!(
            env(proxy, "GOFE_SERVICE_NAME").unwrap()["value"],
            name.as_str()
        );
        assert_eq!(
            env(proxy, "GOFE_POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        assert_eq!(
            env(proxy, "GOFE_POD_SERVICE_ACCOUNT").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.serviceAccountName"
        );
        assert_eq!(
            env(proxy, "GOFE_IDENTITY_NAME").unwrap()["value"],
            "spiffe://cluster.local/ns/$(GOFE_POD_NAMESPACE)/sa/$(GOFE_POD_SERVICE_ACCOUNT)"
        );
        let volumes = spec["volumes"].as_array().unwrap();
        let token = volumes
            .iter()
            .find(|v| v["name"] == "gofe-identity-token")
            .unwrap();
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "identity.gofe.io"
        );
        let containers = spec["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{name}: the app alone in containers");
        assert_eq!(containers[0]["name"], "web");
        assert_eq!(containers[0]["image"], "nginx:1.27");
    }
    // The Deployment keeps its other fields.
    assert_eq!(out[0]["metadata"]["namespace"], "shop");
    assert_eq!(out[0]["spec"]["selector"]["matchLabels"]["app"], "web");
}

#[test]
fn injecting_twice_gives_what_injecting_once_gives() {
    let once = inject(&workloads());
    let twice = inject(&once);
    assert_eq!(once, twice);
}

#[test]
fn ordinary_sidecar_container_waits_for_the_proxy_in_post_start() {
    let yaml = workloads_from(&TEMPLATE.replace(
        "gofe.io/inject: enabled",
        "gofe.io/inject: enabled\n        config.gofe.io/native-sidecar: \"false\"",
    ));
    let out = docs(&inject(&yaml));
    let (_, pod) = &templates(&out)[0];
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers[0]["name"], "gofe-proxy", "the proxy comes first");
    assert_eq!(
        containers[0]["lifecycle"]["postStart"]["exec"]["command"],
        json!(["/gofe", "await", "--timeout", "120s"])
    );
    assert!(containers[0].get("restartPolicy").is_none());
    assert_eq!(containers[1]["name"], "web");
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0]["name"], "gofe-init");

    // The app's own init containers run before any proxy: before the rules too.
    let with_init = TEMPLATE
        .replace(
            "gofe.io/inject: enabled",
            "gofe.io/inject: enabled\n        config.gofe.io/native-sidecar: \"false\"",
        )
        .replace(
            "      containers:",
            "      initContainers: [{name: migrate, image: busybox}]\n      containers:",
        );
    let out = docs(&inject(&workloads_from(&with_init)));
    let init = templates(&out)[0].1["spec"]["initContainers"].clone();
    assert_eq!(init[0]["name"], "migrate");
    assert_eq!(init[1]["name"], "gofe-init");
    // Natively, the proxy runs first and the app's init containers use the mesh.
    let native = TEMPLATE.replace(
        "      containers:",
        "      initContainers: [{name: migrate, image: busybox}]\n      containers:",
    );
    let out = docs(&inject(&workloads_from(&native)));
    let names: Vec<_> = templates(&out)[0].1["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["gofe-init", "gofe-proxy", "migrate"]);
}

const PLAIN_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: plain
  annotations: {ANNOTATIONS}
spec:
  containers: [{name: app, image: busybox}]
"#;

fn pod(annotations: &str) -> String {
    PLAIN_POD.replace("{ANNOTATIONS}", annotations)
}

fn injected(out: &Output) -> bool {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).contains("gofe-proxy")
}

#[test]
fn settings_that_change_what_is_injected() {
    // Another trust domain names the identity in it.
    let out = docs(&inject(&pod(
        "{gofe.io/inject: enabled, config.gofe.io/trust-domain: example.org}",
    )));
    let proxy = &out[0]["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "GOFE_IDENTITY_NAME").unwrap()["value"],
        "spiffe://example.org/ns/$(GOFE_POD_NAMESPACE)/sa/$(GOFE_POD_SERVICE_ACCOUNT)"
    );
    assert_eq!(
        env(proxy, "GOFE_TRUST_DOMAIN").unwrap()["value"],
        "example.org"
    );
    // Without identity: no identity variables, token or anchors.
    let out = docs(&inject(&pod(
        "{gofe.io/inject: enabled, config.gofe.io/identity-disabled: \"true\"}",
    )));
    let spec = &out[0]["spec"];
    assert!(env(&spec["initContainers"][1], "GOFE_IDENTITY_NAME").is_none());
    let volumes: Vec<_> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, vec!["gofe-init-run"]);
    // A value is taken literally, not expanded by the kubelet.
    let out = docs(&inject(&pod(
        "{gofe.io/inject: enabled, config.gofe.io/service-name: \"a$(B)\"}",
    )));
    let proxy = &out[0]["spec"]["initContainers"][1];
    assert_eq!(env(proxy, "GOFE_SERVICE_NAME").unwrap()["value"], "a$$(B)");
    // A pod on the host's network is left alone: its rules would be the node's.
    let host = pod("{gofe.io/inject: enabled}").replace("spec:\n", "spec:\n  hostNetwork: true\n");
    assert!(!injected(&inject_with(&host, &[])));
}

#[test]
fn registering_pods_get_their_address_and_the_registry_secret() {
    let out = docs(&inject(&pod(
        "{gofe.io/inject: enabled, config.gofe.io/registry: \"https://etcd.gofe-system.svc:2379\", config.gofe.io/register: \"api.shop:80=8080\", config.gofe.io/registry-ca: /var/run/gofe/registry/ca.crt}",
    )));
    let spec = &out[0]["spec"];
    let proxy = &spec["initContainers"][1];
    assert_eq!(
        env(proxy, "GOFE_REGISTER").unwrap()["value"],
        "api.shop:80=8080"
    );
    assert_eq!(
        env(proxy, "GOFE_REGISTER_ADDRESS").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert!(
        proxy["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == "/var/run/gofe/registry"),
        "{proxy}"
    );
    assert!(
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |v| v["secret"]["secretName"] == "gofe-registry" && v["secret"]["optional"] == true
            )
    );
    // Injected twice: one of each.
    let again = inject(&inject(&pod(
        "{gofe.io/inject: enabled, config.gofe.io/registry: \"http://etcd:2379\", config.gofe.io/register: \"api.shop:80=8080\"}",
    )));
    assert_eq!(again.matches("gofe-registry").count(), inject(&pod(
        "{gofe.io/inject: enabled, config.gofe.io/registry: \"http://etcd:2379\", config.gofe.io/register: \"api.shop:80=8080\"}",
    )).matches("gofe-registry").count());
    // Files elsewhere than the Secret, a registration without a registry: refused.
    for (annotations, why) in [
        (
            "{gofe.io/inject: enabled, config.gofe.io/registry: \"https://etcd:2379\", config.gofe.io/registry-ca: /etc/ca.pem}",
            "config.gofe.io/registry-ca",
        ),
        (
            "{gofe.io/inject: enabled, config.gofe.io/register: \"api.shop:80=8080\"}",
            "config.gofe.io/register",
        ),
    ] {
        let out = inject_with(&pod(annotations), &[]);
        assert!(!out.status.success(), "{annotations}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn namespace_and_pod_annotations_decide() {
    let ns = ["--namespace-annotations", "gofe.io/inject=enabled"];
    assert!(!injected(&inject_with(&pod("{}"), &[])), "nothing asks");
    assert!(
        injected(&inject_with(&pod("{}"), &ns)),
        "the namespace asks"
    );
    assert!(
        !injected(&inject_with(&pod("{gofe.io/inject: disabled}"), &ns)),
        "the pod refuses"
    );
    assert!(injected(&inject_with(
        &pod("{gofe.io/inject: enabled}"),
        &[]
    )));
    // Other documents pass through untouched.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: b\n";
    assert_eq!(docs(&inject(cm)), docs(cm));
    // Disabling an injected pod takes the sidecar out again.
    let on = inject(&pod("{gofe.io/inject: enabled}"));
    let off = on.replace("gofe.io/inject: enabled", "gofe.io/inject: disabled");
    assert!(!injected(&inject_with(&off, &[])));
}

#[test]
fn bad_annotations_are_refused_naming_annotation_value_and_workload() {
    for (annotation, value, expected) in [
        (
            "config.gofe.io/retry-on",
            "sometimes",
            "config.gofe.io/retry-on",
        ),
        (
            "config.gofe.io/request-timeout",
            "soon",
            "config.gofe.io/request-timeout",
        ),
        (
            "config.gofe.io/skip-outbound-cidrs",
            "10.0.0.0/99",
            "config.gofe.io/skip-outbound-cidrs",
        ),
        ("config.gofe.io/retyr-on", "5xx", "no such setting"),
        (
            "config.gofe.io/native-sidecar",
            "maybe",
            "expected true or false",
        ),
        (
            "config.gofe.io/admin-listen",
            "127.0.0.1:4191",
            "beyond loopback",
        ),
        ("config.gofe.io/proxy-uid", "0", "does not run as root"),
        (
            "config.gofe.io/rewrite-probes",
            "sometimes",
            "expected true or false",
        ),
        (
            "config.gofe.io/trust-anchors-source",
            "secret",
            "expected configmap or clustertrustbundle",
        ),
        (
            "config.gofe.io/app-probes",
            "{}",
            "makes it from the containers' probes",
        ),
        (
            "config.gofe.io/policy-file",
            "/etc/policy.yaml",
            "cannot read the pod's files",
        ),
    ] {
        let yaml = pod(&format!(
            "{{gofe.io/inject: enabled, {annotation}: \"{value}\"}}"
        ));
        let out = inject_with(&yaml, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{annotation}: {value} was accepted");
        for needle in [expected, value, "Pod/plain"] {
            assert!(
                err.contains(needle),
                "{annotation}: {needle:?} not in {err}"
            );
        }
        assert!(out.stdout.is_empty(), "nothing printed on refusal");
    }
}

const PROBED_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  annotations: {ANNOTATIONS}
spec:
  serviceAccountName: web
  initContainers:
    - name: log-shipper
      image: fluent-bit
      restartPolicy: Always
      ports: [{name: metrics, containerPort: 2020}]
      readinessProbe: {httpGet: {path: /api/v1/health, port: metrics}}
  containers:
    - name: web
      image: nginx:1.27
      ports: [{name: http, containerPort: 8080}, {name: grpc, containerPort: 9090}]
      livenessProbe: {httpGet: {path: /healthz, port: http, httpHeaders: [{name: x-probe, value: "$(not-a-var)"}]}, periodSeconds: 7, timeoutSeconds: 2}
      readinessProbe: {tcpSocket: {port: 8080}}
      startupProbe: {grpc: {port: 9090, service: web}, failureThreshold: 30}
    - name: db
      image: postgres
      livenessProbe: {exec: {command: [pg_isready]}}
      readinessProbe: {tcpSocket: {port: 5432}}
"#;

fn probed_pod(annotations: &str) -> String {
    PROBED_POD.replace("{ANNOTATIONS}", annotations)
}

#[test]
fn probes_are_rewritten_to_the_admin_port_with_the_originals_for_the_proxy() {
    let yaml = probed_pod("{gofe.io/inject: enabled, config.gofe.io/skip-inbound-ports: \"5432\"}");
    let out = docs(&inject(&yaml)).remove(0);
    let spec = &out["spec"];
    let web = &spec["containers"][0];
    assert_eq!(
        web["livenessProbe"],
        json!({"httpGet": {"path": "/app-health/web/livez", "port": 4191, "scheme": "HTTP"},
               "periodSeconds": 7, "timeoutSeconds": 2})
    );
    assert_eq!(
        web["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );
    assert_eq!(
        web["startupProbe"]["httpGet"]["path"],
        "/app-health/web/startupz"
    );
    assert_eq!(web["startupProbe"]["failureThreshold"], 30);
    // exec, and a port the kubelet reaches directly, are left alone.
    let db = &spec["containers"][1];
    assert_eq!(
        db["livenessProbe"],
        json!({"exec": {"command": ["pg_isready"]}})
    );
    assert_eq!(db["readinessProbe"], json!({"tcpSocket": {"port": 5432}}));
    // The app's native sidecar starts after the proxy: its probe is rewritten too.
    let shipper = &spec["initContainers"][2];
    assert_eq!(shipper["name"], "log-shipper");
    assert_eq!(
        shipper["readinessProbe"]["httpGet"]["path"],
        "/app-health/log-shipper/readyz"
    );
    let proxy = &spec["initContainers"][1];
    let probes = env(proxy, "GOFE_APP_PROBES").unwrap()["value"]
        .as_str()
        .unwrap();
    // $ is escaped from the kubelet's $(VAR) expansion.
    assert!(probes.contains("$$(not-a-var)"), "{probes}");
    let probes: Value = serde_json::from_str(&probes.replace("$$", "$")).unwrap();
    assert_eq!(
        probes["web"]["livez"],
        json!({"httpGet": {"path": "/healthz", "port": 8080,
                "httpHeaders": [{"name": "x-probe", "value": "$(not-a-var)"}]}, "timeoutSeconds": 2})
    );
    assert_eq!(
        probes["web"]["startupz"],
        json!({"grpc": {"port": 9090, "service": "web"}})
    );
    assert_eq!(probes["log-shipper"]["readyz"]["httpGet"]["port"], 2020);
    assert!(probes.get("db").is_none(), "{probes}");

    // Injecting again gives the same pod; disabling gives the probes back (named
    // ports as the numbers they named).
    let once = inject(&yaml);
    assert_eq!(inject(&once), once);
    let disabled = once.replace("gofe.io/inject: enabled", "gofe.io/inject: disabled");
    let back = docs(&inject(&disabled)).remove(0);
    assert_eq!(
        back["spec"]["containers"][0]["readinessProbe"],
        json!({"tcpSocket": {"port": 8080}})
    );
    assert_eq!(
        back["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"],
        "/healthz"
    );

    // Opting out leaves every probe alone.
    let kept = docs(&inject(&probed_pod(
        "{gofe.io/inject: enabled, config.gofe.io/rewrite-probes: \"false\"}",
    )))
    .remove(0);
    assert_eq!(
        kept["spec"]["containers"][0]["readinessProbe"],
        json!({"tcpSocket": {"port": 8080}})
    );
    assert!(env(&kept["spec"]["initContainers"][1], "GOFE_APP_PROBES").is_none());

    // A probe naming a port the container does not declare is refused.
    let bad = probed_pod("{gofe.io/inject: enabled}").replace("port: metrics", "port: metric");
    let out = inject_with(&bad, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("log-shipper") && err.contains("\"metric\""),
        "{err}"
    );
}

#[test]
fn trust_anchors_come_from_the_mesh_signers_cluster_trust_bundles_when_annotated() {
    let volume = |annotations: &str| {
        let out = docs(&inject(&pod(annotations))).remove(0);
        out["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "gofe-trust-anchors")
            .cloned()
            .unwrap()
    };
    assert_eq!(
        volume("{gofe.io/inject: enabled}")["configMap"],
        json!({"name": "gofe-trust-anchors"})
    );
    let ctb = volume(
        "{gofe.io/inject: enabled, config.gofe.io/trust-anchors-source: clustertrustbundle}",
    );
    assert_eq!(
        ctb["projected"]["sources"][0]["clusterTrustBundle"],
        json!({"signerName": "gofe.io/mesh",
               "labelSelector": {"matchLabels": {"gofe.io/trust-anchors": "mesh"}},
               "path": "ca.crt"})
    );
    assert!(ctb.get("configMap").is_none());
}

/// A serving certificate for 127.0.0.1, self-signed.
fn serving_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

struct Webhook(std::process::Child, String);

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_webhook(dir: &std::path::Path) -> Webhook {
    let (cert, key) = serving_cert(dir);
    let mut child = gofe()
        .args([
            "inject",
            "--webhook",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
        ])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook did not start");
    Webhook(child, addr)
}

fn review(webhook: &Webhook, dir: &std::path::Path, pod: &Value) -> Value {
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": false,
        }
    });
    let file = dir.join("review.json");
    std::fs::write(&file, body.to_string()).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "10", "--cacert"])
        .arg(dir.join("tls.crt"))
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(format!("https://{}/mutate?timeout=10s", webhook.1))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `pod` with the JSON patch of an admission response applied.
fn apply_patch(pod: &Value, response: &Value) -> Value {
    use base64::Engine;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

#[test]
fn webhook_answers_an_admission_review_whose_patch_gives_the_cli_pod() {
    let dir = tempdir("webhook");
    let webhook = start_webhook(&dir);
    let yaml = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
  annotations: {config.gofe.io/retry-on: 5xx}
spec:
  serviceAccountName: web
  containers: [{name: web, image: nginx:1.27}]
"#;
    let pod: Value = docs(yaml).remove(0);
    let answer = review(&webhook, &dir, &pod);
    assert_eq!(answer["kind"], "AdmissionReview");
    let rsp = &answer["response"];
    assert_eq!(rsp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(rsp["allowed"], true);
    assert_eq!(rsp["patchType"], "JSONPatch");
    let patched = apply_patch(&pod, rsp);
    let cli = docs(
        &inject_with(yaml, &["--namespace-annotations", "gofe.io/inject=enabled"])
            .stdout
            .iter()
            .map(|b| *b as char)
            .collect::<String>(),
    )
    .remove(0);
    assert_eq!(patched, cli, "the patched pod is the CLI's pod");

    // A Deployment's pod is named for the Deployment, as the CLI names it.
    let mut from_rs = pod.clone();
    from_rs["metadata"] = json!({
        "generateName": "shop-web-7d4b9c8f6d-",
        "namespace": "shop",
        "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6d"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "shop-web-7d4b9c8f6d", "uid": "u", "controller": true}],
    });
    let from_rs = apply_patch(&from_rs, &review(&webhook, &dir, &from_rs)["response"]);
    let proxy = &from_rs["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "GOFE_SERVICE_NAME").unwrap()["value"],
        "shop-web"
    );

    // Probes are rewritten by the webhook as by the CLI.
    let probed: Value = docs(&probed_pod("{}")).remove(0);
    let patched = apply_patch(&probed, &review(&webhook, &dir, &probed)["response"]);
    let cli = docs(
        &String::from_utf8(
            inject_with(
                &probed_pod("{}"),
                &["--namespace-annotations", "gofe.io/inject=enabled"],
            )
            .stdout,
        )
        .unwrap(),
    )
    .remove(0);
    assert_eq!(patched, cli, "the webhook's probes are the CLI's");
    assert_eq!(
        patched["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );

    // A pod that opts out is allowed unchanged; a bad annotation is refused.
    let mut disabled = pod.clone();
    disabled["metadata"]["annotations"]["gofe.io/inject"] = json!("disabled");
    let rsp = &review(&webhook, &dir, &disabled)["response"];
    assert!(
        rsp["allowed"] == true && rsp.get("patch").is_none(),
        "{rsp}"
    );
    let mut bad = pod.clone();
    bad["metadata"]["annotations"]["config.gofe.io/retry-on"] = json!("sometimes");
    let rsp = &review(&webhook, &dir, &bad)["response"];
    assert_eq!(rsp["allowed"], false, "{rsp}");
    let msg = rsp["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("config.gofe.io/retry-on") && msg.contains("sometimes"),
        "{msg}"
    );
}

fn healthz(webhook: &Webhook, ca: &std::path::Path) -> bool {
    Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg(format!("https://{}/healthz", webhook.1))
        .output()
        .expect("curl")
        .status
        .success()
}

/// A rotated serving certificate (cert-manager rewriting the Secret) is served without
/// a restart.
#[test]
fn webhook_serves_a_rotated_certificate() {
    let dir = tempdir("rotate");
    let webhook = start_webhook(&dir);
    let next = tempdir("rotate-next");
    let old = next.join("old.crt");
    std::fs::copy(dir.join("tls.crt"), &old).unwrap();
    let (cert, key) = serving_cert(&next);
    assert!(healthz(&webhook, &old));
    assert!(
        !healthz(&webhook, &cert),
        "the new certificate is not served yet"
    );
    // The key first, then the certificate, as a non-atomic writer might.
    std::fs::copy(&key, dir.join("tls.key")).unwrap();
    std::fs::copy(&cert, dir.join("tls.crt")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !healthz(&webhook, &cert) {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated certificate was not served within 30s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !healthz(&webhook, &old),
        "the old certificate is no longer served"
    );
}

/// A directory of the test's own, removed when dropped (pass or fail).
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("gofe-inject-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// The image is built with the profile in the tree (`benches/pgo.sh --use`) on the
/// toolchain that profile was trained with (`benches/pgo/rustc.txt`, which `pgo.sh`
/// writes when it trains): with any other rustc every symbol name, which keys the
/// profile, differs, and the image would silently be built without it.
#[test]
fn the_image_is_built_with_the_profile_on_the_toolchain_it_was_trained_with() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dockerfile = std::fs::read_to_string(format!("{root}/k8s/Dockerfile")).unwrap();
    let trained = std::fs::read_to_string(format!("{root}/benches/pgo/rustc.txt")).unwrap();
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = trained.split_whitespace().nth(1).expect("rustc's version");
    let from = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a rust build stage");
    assert!(
        from.starts_with(&format!("{version}-")),
        "k8s/Dockerfile builds on rust:{from}, the profile was trained with {version}"
    );
    assert!(
        dockerfile.contains("bash benches/pgo.sh --use"),
        "{dockerfile}"
    );
}

/// Every manifest in k8s/ against the schemas of a current Kubernetes.
#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let tool = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    if tool.map(|o| !o.status.success()).unwrap_or(true) {
        let why = "kubernetes-validate is not installed (pip install kubernetes-validate)";
        if std::env::var("GOFE_E2E").as_deref() == Ok("require") {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s");
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The demo application, injected, validates too; so does a pod whose probes were
    // rewritten and whose anchors are a projected ClusterTrustBundle.
    let demo = std::fs::read_to_string(format!("{dir}/demo.yaml")).unwrap();
    let probed = probed_pod(
        "{gofe.io/inject: enabled, config.gofe.io/trust-anchors-source: clustertrustbundle}",
    );
    let injected = format!("{}---\n{}", inject(&demo), inject(&probed));
    assert!(injected.contains("clusterTrustBundle") && injected.contains("/app-health/"));
    let dir = tempdir("validate");
    let file = dir.join("demo-injected.yaml");
    std::fs::write(&file, injected).unwrap();
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
