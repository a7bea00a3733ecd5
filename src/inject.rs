//! `gofe inject`: adds the sidecar to Kubernetes workloads. The CLI reads YAML documents
//! (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod, and Lists of
//! them) and prints them with the sidecar added where `gofe.io/inject: enabled` is on
//! the pod template or the namespace; `--webhook` does the same as a mutating admission
//! webhook. Each `config.gofe.io/<name>` annotation becomes `GOFE_<NAME>`, checked by
//! the proxy's (and `gofe init`'s) own parsers: a bad one is an error naming the
//! annotation, the value and the workload. Injecting twice gives what injecting once
//! gives.

use crate::app_probes;
use crate::init::{InitArgs, InitConfig};
use anyhow::{Context, bail};
use gofe_proxy::config::{self, Config, INIT_VARS, POLICY_VARS, PROXY_VARS, Var};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::PathBuf;

pub const INJECT_ANNOTATION: &str = "gofe.io/inject";
pub const CONFIG_PREFIX: &str = "config.gofe.io/";
/// `config.gofe.io/native-sidecar: "false"`: an ordinary container instead.
const NATIVE_SIDECAR: &str = "native-sidecar";
/// `config.gofe.io/rewrite-probes: "false"`: the application's probes left as they are.
const REWRITE_PROBES: &str = "rewrite-probes";
/// `config.gofe.io/trust-anchors-source`: `configmap` (default) or `clustertrustbundle`.
const TRUST_ANCHORS_SOURCE: &str = "trust-anchors-source";
/// The ConfigMap, in each namespace, that holds the trust anchors as `ca.crt`.
pub const ANCHORS_CONFIGMAP: &str = "gofe-trust-anchors";
/// The signer whose ClusterTrustBundles hold the mesh's trust anchors (k8s/trust-bundle.yaml).
pub const ANCHORS_SIGNER: &str = "gofe.io/mesh";
/// The label that picks the signer's bundles for projection.
pub const ANCHORS_BUNDLE_LABEL: (&str, &str) = ("gofe.io/trust-anchors", "mesh");
pub const INIT_CONTAINER: &str = "gofe-init";
pub const PROXY_CONTAINER: &str = "gofe-proxy";
const TOKEN_VOLUME: &str = "gofe-identity-token";
const ANCHORS_VOLUME: &str = "gofe-trust-anchors";
/// A writable /run for the init container's iptables lock.
const RUN_VOLUME: &str = "gofe-init-run";
/// With a registry: the optional Secret `gofe-registry` (etcd's CA, a client
/// certificate and key, a password), for GOFE_REGISTRY_CA and friends to name.
const REGISTRY_VOLUME: &str = "gofe-registry";
pub const REGISTRY_DIR: &str = "/var/run/gofe/registry";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const ANCHORS_DIR: &str = "/var/run/gofe/anchors";
/// The binary's path in the image (k8s/Dockerfile).
const BINARY: &str = "/gofe";

#[derive(clap::Args, Debug, Clone)]
pub struct InjectArgs {
    /// YAML file to inject, or - for standard input.
    #[arg(default_value = "-")]
    pub file: String,
    /// The namespace's annotations, key=value (repeatable): `gofe.io/inject=enabled`
    /// there injects every pod not disabled itself.
    #[arg(long = "namespace-annotations", value_delimiter = ',')]
    pub namespace_annotations: Vec<String>,
    /// The gofe image for the proxy container (k8s/Dockerfile: distroless).
    #[arg(long, default_value = "ghcr.io/gofe/gofe:0.1.0")]
    pub image: String,
    /// The image for the `gofe init` container: gofe with iptables (k8s/Dockerfile's
    /// `init` target).
    #[arg(long, default_value = "ghcr.io/gofe/gofe-init:0.1.0")]
    pub init_image: String,
    /// The issuer's address (GOFE_IDENTITY_ADDR).
    #[arg(long, default_value = "gofe-identity.gofe-system.svc:8443")]
    pub identity_addr: String,
    /// The audience of the projected service-account token the issuer checks.
    #[arg(long, default_value = "identity.gofe.io")]
    pub token_audience: String,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Serve as a mutating admission webhook (HTTPS, AdmissionReview v1) instead.
    #[arg(long)]
    pub webhook: bool,
    /// (webhook) Where to listen.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: std::net::SocketAddr,
    /// (webhook) The serving certificate chain, PEM.
    #[arg(long, default_value = "/var/run/gofe/webhook/tls.crt")]
    pub tls_cert: PathBuf,
    /// (webhook) The serving key, PEM.
    #[arg(long, default_value = "/var/run/gofe/webhook/tls.key")]
    pub tls_key: PathBuf,
}

pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    if args.webhook {
        return crate::webhook::run(args);
    }
    let text = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file))?
    };
    let ns = namespace_annotations(&args.namespace_annotations)?;
    print!("{}", inject_documents(&text, &Injector::new(args), &ns)?);
    Ok(())
}

fn namespace_annotations(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("--namespace-annotations {p:?}: expected key=value"))
        })
        .collect()
}

/// Injects every document of a YAML stream; prints them back as YAML documents.
pub fn inject_documents(
    text: &str,
    injector: &Injector,
    namespace_annotations: &BTreeMap<String, String>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("document {} is not valid YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        let mut value = value;
        injector.inject_object(&mut value, namespace_annotations)?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(&value)?);
    }
    Ok(out)
}

/// What the injector adds, and where the mesh is.
#[derive(Clone, Debug)]
pub struct Injector {
    pub image: String,
    pub init_image: String,
    pub identity_addr: String,
    pub token_audience: String,
    pub trust_domain: String,
}

impl Injector {
    pub fn new(args: &InjectArgs) -> Injector {
        Injector {
            image: args.image.clone(),
            init_image: args.init_image.clone(),
            identity_addr: args.identity_addr.clone(),
            token_audience: args.token_audience.clone(),
            trust_domain: args.trust_domain.clone(),
        }
    }

    /// Injects a workload, a Pod or a List (recursively); other kinds pass unchanged.
    pub fn inject_object(
        &self,
        obj: &mut Value,
        namespace_annotations: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let workload = match obj["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{kind}/{name} in {ns}"),
            None => format!("{kind}/{name}"),
        };
        let template = match kind.as_str() {
            "List" => {
                if let Some(items) = obj["items"].as_array_mut() {
                    for item in items {
                        self.inject_object(item, namespace_annotations)?;
                    }
                }
                return Ok(());
            }
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                obj.pointer_mut("/spec/template")
            }
            "CronJob" => obj.pointer_mut("/spec/jobTemplate/spec/template"),
            "Pod" => Some(obj),
            _ => return Ok(()),
        };
        let Some(template) = template else {
            bail!("{workload} has no pod template");
        };
        self.inject_pod(template, &name, &workload, namespace_annotations)
    }

    /// Injects a pod (or pod template: `metadata` and `spec`) if its annotations or its
    /// namespace's ask for it. `workload` names it in errors.
    pub fn inject_pod(
        &self,
        pod: &mut Value,
        service: &str,
        workload: &str,
        namespace_annotations: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let annotations: BTreeMap<String, String> = pod["metadata"]["annotations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().map_or_else(|| v.to_string(), str::to_string),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let wanted = match annotations.get(INJECT_ANNOTATION).map(String::as_str) {
            Some("disabled") => false,
            Some("enabled") => true,
            Some(other) => bail!(
                "{workload}: annotation {INJECT_ANNOTATION}: {other:?}: expected enabled or disabled"
            ),
            None => {
                namespace_annotations
                    .get(INJECT_ANNOTATION)
                    .map(String::as_str)
                    == Some("enabled")
            }
        };
        // Whatever an earlier injection added goes first: injecting again gives the
        // same pod, and a disabled pod loses a sidecar it had.
        remove_injected(pod);
        if !wanted {
            return Ok(());
        }
        if pod["spec"]["hostNetwork"] == true {
            // Its rules would redirect the node's own traffic.
            eprintln!("gofe inject: {workload} uses the host's network; not injected");
            return Ok(());
        }
        let settings = Settings::read(&annotations, workload, &self.trust_domain)?;
        if !settings.native_sidecar {
            // kubectl logs/exec default to the application, not the proxy in front.
            let app = pod["spec"]["containers"][0]["name"].clone();
            if let (Some(meta), Some(app)) = (
                pod.get_mut("metadata").and_then(Value::as_object_mut),
                app.as_str(),
            ) {
                let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
                if let Some(a) = annotations.as_object_mut() {
                    a.entry("kubectl.kubernetes.io/default-container")
                        .or_insert_with(|| json!(app));
                }
            }
        }
        let spec = pod
            .get_mut("spec")
            .and_then(Value::as_object_mut)
            .with_context(|| format!("{workload}: the pod template has no spec"))?;

        let mut containers = take_array(spec, "containers");
        if containers.is_empty() {
            bail!("{workload}: the pod has no containers");
        }
        let mut app_init = take_array(spec, "initContainers");
        let mut settings = settings;
        if settings.rewrite_probes {
            let mut probes =
                app_probes::rewrite(&mut containers, settings.admin_port, &settings.skip_inbound)
                    .with_context(|| workload.to_string())?;
            if settings.native_sidecar {
                // The app's own native sidecars start after the proxy, so it can
                // answer their probes; ordinary init containers have none. In ordinary
                // mode they start before any proxy runs, and are left alone.
                let mut sidecars: Vec<Value> = app_init
                    .iter()
                    .filter(|c| c["restartPolicy"] == "Always")
                    .cloned()
                    .collect();
                if let Some(more) =
                    app_probes::rewrite(&mut sidecars, settings.admin_port, &settings.skip_inbound)
                        .with_context(|| workload.to_string())?
                {
                    for c in app_init.iter_mut() {
                        if let Some(r) = sidecars.iter().find(|r| r["name"] == c["name"]) {
                            *c = r.clone();
                        }
                    }
                    probes = Some(merge_probes(probes.as_deref(), &more));
                }
            }
            if let Some(p) = probes {
                // The kubelet expands $(VAR) in env values; the JSON means itself.
                settings
                    .proxy_env
                    .insert(config::APP_PROBES.name.into(), p.replace('$', "$$"));
            }
        }
        let proxy = self.proxy_container(&settings, service);
        let mut init_containers = Vec::new();
        if settings.native_sidecar {
            // The rules, then the proxy, then the app's own init containers, which
            // can already use the mesh.
            init_containers.push(self.init_container(&settings));
            init_containers.push(proxy);
            init_containers.extend(app_init);
        } else {
            // The app's init containers run before any proxy does: the rules come
            // after them, or their connections would be redirected to nothing.
            init_containers.extend(app_init);
            init_containers.push(self.init_container(&settings));
            containers.insert(0, proxy);
        }
        spec.insert("initContainers".into(), Value::Array(init_containers));
        spec.insert("containers".into(), Value::Array(containers));
        let mut volumes = take_array(spec, "volumes");
        if settings.identity {
            volumes.push(json!({
                "name": TOKEN_VOLUME,
                "projected": {"sources": [{"serviceAccountToken": {
                    "audience": self.token_audience,
                    "expirationSeconds": 3600,
                    "path": "gofe-identity-token",
                }}]},
            }));
            volumes.push(match settings.anchors_source {
                AnchorsSource::ConfigMap => json!({
                    "name": ANCHORS_VOLUME,
                    "configMap": {"name": ANCHORS_CONFIGMAP},
                }),
                // Every bundle of the mesh's signer, concatenated by the kubelet and
                // updated in place when one changes: a rotation is a second bundle
                // beside the first.
                AnchorsSource::ClusterTrustBundle => json!({
                    "name": ANCHORS_VOLUME,
                    "projected": {"sources": [{"clusterTrustBundle": {
                        "signerName": ANCHORS_SIGNER,
                        "labelSelector": {"matchLabels": {ANCHORS_BUNDLE_LABEL.0: ANCHORS_BUNDLE_LABEL.1}},
                        "path": "ca.crt",
                    }}]},
                }),
            });
        }
        if settings.registry() {
            volumes.push(json!({
                "name": REGISTRY_VOLUME,
                "secret": {"secretName": "gofe-registry", "optional": true},
            }));
        }
        volumes.push(json!({"name": RUN_VOLUME, "emptyDir": {"medium": "Memory"}}));
        spec.insert("volumes".into(), Value::Array(volumes));
        Ok(())
    }

    fn init_container(&self, s: &Settings) -> Value {
        json!({
            "name": INIT_CONTAINER,
            "image": self.init_image,
            "command": [BINARY],
            "args": ["init"],
            "env": env_list(&s.init_env),
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": false,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "resources": {
                "requests": {"cpu": "10m", "memory": "10Mi"},
                "limits": {"memory": "50Mi"},
            },
            // iptables-legacy takes its lock in /run/xtables.lock.
            "volumeMounts": [{"name": RUN_VOLUME, "mountPath": "/run"}],
        })
    }

    fn proxy_container(&self, s: &Settings, service: &str) -> Value {
        let mut env = Vec::new();
        if s.identity {
            env.extend([
                json!({"name": "GOFE_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
                json!({"name": "GOFE_POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}),
                json!({"name": config::IDENTITY_NAME.name, "value": format!(
                    "spiffe://{}/ns/$(GOFE_POD_NAMESPACE)/sa/$(GOFE_POD_SERVICE_ACCOUNT)",
                    s.trust_domain
                )}),
                json!({"name": config::IDENTITY_ADDR.name, "value": self.identity_addr}),
                json!({"name": config::IDENTITY_TRUST_ANCHORS.name, "value": format!("{ANCHORS_DIR}/ca.crt")}),
                json!({"name": config::IDENTITY_TOKEN_FILE.name, "value": format!("{TOKEN_DIR}/gofe-identity-token")}),
            ]);
        }
        env.push(json!({"name": config::TRUST_DOMAIN.name, "value": s.trust_domain}));
        env.push(json!({"name": config::SERVICE_NAME.name, "value": service}));
        if s.proxy_env.contains_key(config::REGISTER.name) {
            // Others reach the pod on its own address.
            env.push(json!({"name": config::REGISTER_ADDRESS.name, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}));
        }
        // An annotation overrides what the injector would set.
        env.retain(|e| {
            e["name"]
                .as_str()
                .is_none_or(|n| !s.proxy_env.contains_key(n))
        });
        env.extend(
            env_list(&s.proxy_env)
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        let probe = |path: &str| {
            json!({
                "httpGet": {"path": path, "port": s.admin_port},
                "periodSeconds": 5,
                "failureThreshold": 3,
            })
        };
        let mut c = json!({
            "name": PROXY_CONTAINER,
            "image": self.image,
            "command": [BINARY],
            "args": ["proxy"],
            "env": env,
            "ports": [
                {"name": "gofe-inbound", "containerPort": s.inbound_port},
                {"name": "gofe-admin", "containerPort": s.admin_port},
            ],
            "readinessProbe": probe("/ready"),
            "livenessProbe": probe("/live"),
            "securityContext": {
                "runAsUser": s.proxy_uid,
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "resources": {
                "requests": {"cpu": "10m", "memory": "20Mi"},
                "limits": {"memory": "250Mi"},
            },
        });
        let mut mounts = Vec::new();
        if s.identity {
            mounts.extend([
                json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}),
                json!({"name": ANCHORS_VOLUME, "mountPath": ANCHORS_DIR, "readOnly": true}),
            ]);
        }
        if s.registry() {
            mounts.push(
                json!({"name": REGISTRY_VOLUME, "mountPath": REGISTRY_DIR, "readOnly": true}),
            );
        }
        if !mounts.is_empty() {
            c["volumeMounts"] = Value::Array(mounts);
        }
        let fields = c.as_object_mut().expect("an object");
        if s.native_sidecar {
            // A native sidecar: started before the app, stopped after it, and not
            // keeping a Job from completing.
            fields.insert("restartPolicy".into(), json!("Always"));
            fields.insert(
                "startupProbe".into(),
                json!({"httpGet": {"path": "/ready", "port": s.admin_port}, "periodSeconds": 1, "failureThreshold": 120}),
            );
        } else {
            // The kubelet starts the next container only once postStart returns.
            fields.insert(
                "lifecycle".into(),
                json!({"postStart": {"exec": {"command": [BINARY, "await", "--timeout", "120s"]}}}),
            );
        }
        c
    }
}

/// The pod's `config.gofe.io/*` annotations as variables, checked.
struct Settings {
    /// Without GOFE_IDENTITY_DISABLED=true: the identity's variables and volumes.
    identity: bool,
    trust_domain: String,
    proxy_env: BTreeMap<String, String>,
    init_env: BTreeMap<String, String>,
    native_sidecar: bool,
    rewrite_probes: bool,
    anchors_source: AnchorsSource,
    /// Probes on these ports reach the application without the proxy.
    skip_inbound: gofe_proxy::config::PortSet,
    proxy_uid: u32,
    inbound_port: u16,
    admin_port: u16,
}

/// `retry-on` → `GOFE_RETRY_ON`.
pub fn variable_of(annotation_name: &str) -> String {
    format!("GOFE_{}", annotation_name.to_uppercase().replace('-', "_"))
}

/// `GOFE_RETRY_ON` → `config.gofe.io/retry-on`.
pub fn annotation_of(var: &str) -> String {
    format!(
        "{CONFIG_PREFIX}{}",
        var.trim_start_matches("GOFE_")
            .to_lowercase()
            .replace('_', "-")
    )
}

impl Settings {
    /// Whether the pod's proxy uses the registry (GOFE_REGISTRY set).
    fn registry(&self) -> bool {
        self.proxy_env
            .get(config::REGISTRY.name)
            .is_some_and(|v| !v.trim().is_empty())
    }

    fn read(
        annotations: &BTreeMap<String, String>,
        workload: &str,
        trust_domain: &str,
    ) -> anyhow::Result<Settings> {
        let known = |v: &str| -> Option<&'static Var> {
            PROXY_VARS
                .iter()
                .chain(POLICY_VARS)
                .chain(INIT_VARS)
                .copied()
                .find(|var| var.name == v)
        };
        let mut proxy_env = BTreeMap::new();
        let mut init_env = BTreeMap::new();
        let mut native_sidecar = true;
        let mut rewrite_probes = true;
        let mut anchors_source = AnchorsSource::ConfigMap;
        let mut errors = Vec::new();
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(CONFIG_PREFIX) else {
                continue;
            };
            if name == NATIVE_SIDECAR {
                match value.as_str() {
                    "true" => native_sidecar = true,
                    "false" => native_sidecar = false,
                    _ => errors.push(format!(
                        "annotation {key}: {value:?} on {workload}: expected true or false"
                    )),
                }
                continue;
            }
            if name == REWRITE_PROBES {
                match value.as_str() {
                    "true" => rewrite_probes = true,
                    "false" => rewrite_probes = false,
                    _ => errors.push(format!(
                        "annotation {key}: {value:?} on {workload}: expected true or false"
                    )),
                }
                continue;
            }
            if name == TRUST_ANCHORS_SOURCE {
                match value.as_str() {
                    "configmap" => anchors_source = AnchorsSource::ConfigMap,
                    "clustertrustbundle" => anchors_source = AnchorsSource::ClusterTrustBundle,
                    _ => errors.push(format!(
                        "annotation {key}: {value:?} on {workload}: expected configmap or clustertrustbundle"
                    )),
                }
                continue;
            }
            let var = variable_of(name);
            // The kubelet expands $(VAR) in env values; a value means itself.
            let value = &value.replace('$', "$$");
            match known(&var) {
                Some(v) if INIT_VARS.iter().any(|i| i.name == v.name) => {
                    init_env.insert(var, value.clone());
                }
                Some(v) if v.name == config::IDENTITY_NAME.name => errors.push(format!(
                    "annotation {key} on {workload}: the identity comes from the pod's namespace and service account"
                )),
                Some(v) if v.name == config::APP_PROBES.name => errors.push(format!(
                    "annotation {key}: {value:?} on {workload}: the injector makes it from the containers' probes (config.gofe.io/{REWRITE_PROBES}: \"false\" turns that off)"
                )),
                Some(_) => {
                    proxy_env.insert(var, value.clone());
                }
                None => errors.push(format!(
                    "annotation {key}: {value:?} on {workload}: no such setting ({var} is not a gofe variable)"
                )),
            }
        }
        // Checked as the proxy and `gofe init` will read them: the identity filled in
        // as the downward API will, the listeners as given.
        let trust_domain = proxy_env
            .get(config::TRUST_DOMAIN.name)
            .cloned()
            .unwrap_or_else(|| trust_domain.to_string());
        let unescaped = |v: &String| v.replace("$$", "$");
        let mut vars: HashMap<String, String> = proxy_env
            .iter()
            .map(|(k, v)| (k.clone(), unescaped(v)))
            .collect();
        vars.entry(config::IDENTITY_NAME.name.into())
            .or_insert_with(|| format!("spiffe://{trust_domain}/ns/default/sa/default"));
        vars.entry(config::IDENTITY_ADDR.name.into())
            .or_insert_with(|| "gofe-identity.gofe-system.svc:8443".into());
        vars.entry(config::IDENTITY_TRUST_ANCHORS.name.into())
            .or_insert_with(|| "/dev/null".into());
        vars.entry(config::TRUST_DOMAIN.name.into())
            .or_insert_with(|| trust_domain.clone());
        let proxy = Config::check_map(&vars);
        // The listener ports go to the init container too, so its rules match.
        for var in [
            &config::OUTBOUND_LISTEN,
            &config::INBOUND_LISTEN,
            &config::ADMIN_LISTEN,
        ] {
            if let Some(v) = proxy_env.get(var.name) {
                init_env.insert(var.name.to_string(), v.clone());
            }
        }
        let init_vars: HashMap<String, String> = init_env
            .iter()
            .map(|(k, v)| (k.clone(), unescaped(v)))
            .collect();
        let init = InitConfig::from_vars(init_vars, &InitArgs::default());
        // What the parsers accept but a pod cannot run with.
        let refuse = |errors: &mut Vec<String>, var: &Var, why: &str| {
            let value = vars
                .get(var.name)
                .or(init_env.get(var.name))
                .cloned()
                .unwrap_or_default();
            errors.push(format!(
                "annotation {}: {value:?} on {workload}: {why}",
                annotation_of(var.name)
            ));
        };
        for var in [&config::INBOUND_LISTEN, &config::ADMIN_LISTEN] {
            if vars
                .get(var.name)
                .and_then(|v| v.parse::<std::net::SocketAddr>().ok())
                .is_some_and(|a| a.ip().is_loopback())
            {
                refuse(
                    &mut errors,
                    var,
                    "in a pod this must listen beyond loopback (the kubelet's probes and redirected traffic arrive on the pod's address)",
                );
            }
        }
        if let Ok(i) = &init
            && i.proxy_uid == 0
        {
            refuse(
                &mut errors,
                &config::PROXY_UID,
                "the proxy does not run as root",
            );
        }
        if vars
            .get(config::POLICY_FILE.name)
            .is_some_and(|v| !v.trim().is_empty())
        {
            refuse(
                &mut errors,
                &config::POLICY_FILE,
                "the proxy container cannot read the pod's files; set the policy with annotations",
            );
        }
        for var in [
            &config::REGISTRY_CA,
            &config::REGISTRY_CERT,
            &config::REGISTRY_KEY,
            &config::REGISTRY_PASSWORD_FILE,
        ] {
            if vars
                .get(var.name)
                .is_some_and(|v| !v.trim().is_empty() && !v.starts_with(REGISTRY_DIR))
            {
                refuse(
                    &mut errors,
                    var,
                    &format!("a file of the gofe-registry Secret, mounted at {REGISTRY_DIR}/"),
                );
            }
        }
        if vars
            .get(config::DISCOVERY.name)
            .is_some_and(|v| v.contains("file:"))
        {
            refuse(
                &mut errors,
                &config::DISCOVERY,
                "the proxy container cannot read the pod's files; use dns",
            );
        }
        for bad in proxy
            .err()
            .into_iter()
            .chain(init.as_ref().err().cloned())
            .flat_map(|e| e.0)
        {
            errors.push(format!(
                "annotation {}: {:?} on {workload}: {}",
                annotation_of(bad.name),
                bad.value,
                bad.expected
            ));
        }
        if !errors.is_empty() {
            errors.sort();
            errors.dedup();
            bail!("{}", errors.join("\n"));
        }
        let init = init.expect("no errors");
        let identity = vars
            .get(config::IDENTITY_DISABLED.name)
            .is_none_or(|v| v != "true");
        Ok(Settings {
            identity,
            trust_domain,
            proxy_env,
            init_env,
            native_sidecar,
            rewrite_probes,
            anchors_source,
            skip_inbound: init.skip_inbound_ports.clone(),
            proxy_uid: init.proxy_uid,
            inbound_port: init.inbound_port,
            admin_port: init.admin_port,
        })
    }
}

/// Where the proxy's trust anchors come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AnchorsSource {
    /// The `gofe-trust-anchors` ConfigMap of the pod's namespace.
    ConfigMap,
    /// The mesh signer's ClusterTrustBundles, projected: one object for the cluster.
    ClusterTrustBundle,
}

/// Two `GOFE_APP_PROBES` values as one (their containers are different).
fn merge_probes(a: Option<&str>, b: &str) -> String {
    let parse = |s: &str| match serde_json::from_str(s) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let mut merged = a.map(parse).unwrap_or_default();
    merged.extend(parse(b));
    Value::Object(merged).to_string()
}

fn env_list(vars: &BTreeMap<String, String>) -> Value {
    Value::Array(
        vars.iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect(),
    )
}

fn take_array(spec: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match spec.remove(key) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

/// Removes the containers and volumes an injection adds.
fn remove_injected(pod: &mut Value) {
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    // The probes an earlier injection rewrote get their originals back.
    let app_probes = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec.get(*k)?.as_array())
        .flatten()
        .filter(|c| c["name"] == PROXY_CONTAINER)
        .filter_map(|c| c["env"].as_array())
        .flatten()
        .find(|e| e["name"] == config::APP_PROBES.name)
        .and_then(|e| e["value"].as_str())
        .map(|v| v.replace("$$", "$"));
    if let Some(probes) = app_probes {
        for key in ["initContainers", "containers"] {
            if let Some(Value::Array(items)) = spec.get_mut(key) {
                app_probes::restore(items, &probes);
            }
        }
    }
    let ours = |v: &Value, names: &[&str]| v["name"].as_str().is_some_and(|n| names.contains(&n));
    for (key, names) in [
        ("initContainers", &[INIT_CONTAINER, PROXY_CONTAINER][..]),
        ("containers", &[PROXY_CONTAINER][..]),
        (
            "volumes",
            &[TOKEN_VOLUME, ANCHORS_VOLUME, REGISTRY_VOLUME, RUN_VOLUME][..],
        ),
    ] {
        if let Some(Value::Array(items)) = spec.get_mut(key) {
            items.retain(|v| !ours(v, names));
            if items.is_empty() && key != "containers" {
                spec.remove(key);
            }
        }
    }
}
