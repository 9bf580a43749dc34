//! Kubernetes manifests run on one machine as the kubelet would run them: every container
//! of our `chat` image started with exactly its rendered command, args and environment,
//! then probed with its own probes, so a renamed variable or a wrong probe path fails a
//! test rather than a rollout.
//!
//! What one machine cannot share with a cluster is remapped, and only that: container
//! ports → free local ports (and the listen addresses in env that carry them), Service
//! names → the local address behind them, Postgres and Redis → the shared local servers
//! (a fresh database per database name, a private channel prefix), container binary paths
//! → the binaries built next to the tests, Secret/ConfigMap volumes → files in a temp dir.
//! Database users are mapped to the local superuser: roles are server-wide, so creating
//! the manifests' roles on the shared server would leak between runs (and the dev
//! overlay's own Postgres makes its POSTGRES_USER a superuser too). The role a migration
//! Job grants to (`DB_APP_ROLE`) must exist for the grant, so it is created, without
//! login, once per server and kept. A Service routes to
//! its workload's first replica. Containers of other images (sidecars, the dev Postgres
//! and Redis) are not started; Jobs run first, to completion, and must exit 0.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sqlx::Connection as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::db::TestDb;
use crate::process::bin_dir;
use crate::shared::{postgres_base, redis_url};
use crate::unique::{free_port, unique};

/// The image whose containers are ours to start; everything else (the dev Postgres and
/// Redis) stands for the shared local servers.
const OUR_IMAGE: &str = "chat";

/// How long a Job or an init container may run when it sets no `activeDeadlineSeconds`.
const JOB_WITHIN: Duration = Duration::from_secs(120);

/// PyYAML, as the Kubernetes YAML parser does, reads every document; JSON is what we read.
const YAML_TO_JSON: &str =
    "import json, sys, yaml\njson.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";

/// The rendered objects of an overlay.
pub struct Manifests {
    pub objects: Vec<Value>,
}

impl Manifests {
    /// `kubectl kustomize <overlay>`, parsed.
    pub fn render(overlay: &Path) -> Result<Self> {
        let out = std::process::Command::new("kubectl").arg("kustomize").arg(overlay).output().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "kubectl is not installed: install it (https://kubernetes.io/docs/tasks/tools/; CI installs \
                     it) to render {}",
                    overlay.display()
                )
            } else {
                anyhow!(e).context("running kubectl kustomize")
            }
        })?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl kustomize {} failed: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self::from_yaml(out.stdout)
    }

    /// Parses a multi-document YAML stream (python3 with PyYAML).
    pub fn from_yaml(yaml: Vec<u8>) -> Result<Self> {
        let mut child = std::process::Command::new("python3")
            .args(["-c", YAML_TO_JSON])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("python3 (with PyYAML) reads the rendered manifests: install python3-yaml")?;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        // A thread writes while we read: a large rendering would fill both pipes otherwise.
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &yaml));
        let out = child.wait_with_output()?;
        writer.join().map_err(|_| anyhow!("writing to python3 panicked"))??;
        anyhow::ensure!(
            out.status.success(),
            "parsing the manifests failed (python3 -c 'import yaml' must work): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self { objects: serde_json::from_slice(&out.stdout)? })
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    /// The keys and bytes of Secret or ConfigMap `name` (`None`: no such object).
    fn data(&self, kind: &str, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
        let Some(object) = self.of_kind(kind).find(|o| o["metadata"]["name"] == name) else {
            return Ok(None);
        };
        let (plain, encoded) = if kind == "Secret" { ("stringData", "data") } else { ("data", "binaryData") };
        let mut data = BTreeMap::new();
        for (key, value) in object[encoded].as_object().into_iter().flatten() {
            let text = value.as_str().ok_or_else(|| anyhow!("{kind} {name}: {key} is not a string"))?;
            data.insert(key.clone(), base64_decode(text).with_context(|| format!("{kind} {name}: {key}"))?);
        }
        // stringData wins over data, as the API server merges them.
        for (key, value) in object[plain].as_object().into_iter().flatten() {
            let text = value.as_str().ok_or_else(|| anyhow!("{kind} {name}: {key} is not a string"))?;
            data.insert(key.clone(), text.as_bytes().to_vec());
        }
        Ok(Some(data))
    }

    /// One key of a Secret or ConfigMap, as `secretKeyRef`/`configMapKeyRef` read it.
    fn key(&self, kind: &str, reference: &Value) -> Result<Option<String>> {
        let name = reference["name"].as_str().unwrap_or_default();
        let key = reference["key"].as_str().unwrap_or_default();
        let optional = reference["optional"].as_bool().unwrap_or(false);
        match self.data(kind, name)?.and_then(|mut data| data.remove(key)) {
            Some(bytes) => Ok(Some(String::from_utf8(bytes).with_context(|| format!("{kind} {name}: {key}"))?)),
            None if optional => Ok(None),
            None => bail!("{kind} {name} has no key {key}"),
        }
    }
}

/// Standard base64 with padding, as Secret `data` holds it.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => bail!("not base64: {c:?}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

fn name_of(object: &Value) -> String {
    object["metadata"]["name"].as_str().unwrap_or_default().to_owned()
}

/// Whether `image` (`registry/path/name:tag@digest`) is our image, whatever the tag.
fn is_ours(image: &str) -> bool {
    let image = image.split('@').next().unwrap_or_default();
    let last = image.rsplit('/').next().unwrap_or_default();
    last.split(':').next() == Some(OUR_IMAGE)
}

fn containers(pod: &Value, key: &str) -> Vec<Value> {
    pod[key].as_array().cloned().unwrap_or_default()
}

fn pod_has_ours(pod: &Value) -> bool {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| containers(pod, k))
        .any(|c| c["image"].as_str().is_some_and(is_ours))
}

/// The image's default command (deploy/Dockerfile's `CMD`), for a container that sets none.
fn image_cmd() -> Result<Vec<String>> {
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    let text = std::fs::read_to_string(&dockerfile)?;
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("CMD "))
        .ok_or_else(|| anyhow!("no CMD in {}", dockerfile.display()))?;
    Ok(serde_json::from_str(line.trim())?)
}

/// The pod template of a workload: Deployment, StatefulSet, DaemonSet, ReplicaSet or Job.
fn pod_template(workload: &Value) -> Option<&Value> {
    let spec = &workload["spec"]["template"];
    spec.is_object().then_some(spec)
}

/// What a local pod's clients call for a Service's `host:port`.
struct ServiceRoute {
    host: String,
    port: u16,
    local: String,
}

/// A container started locally (or ready to start).
pub struct Container {
    /// `<pod>/<container>`, e.g. `chat-gateway-1/gateway`.
    pub id: String,
    /// The binary's file name, e.g. `chat-gateway`.
    pub binary: String,
    program: PathBuf,
    args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Declared ports: name (if any), container port, local port.
    pub ports: Vec<(Option<String>, u16, u16)>,
    /// Every container port of its pod (shared network namespace) → the local port.
    pod_ports: HashMap<u16, u16>,
    spec: Value,
    log: PathBuf,
    child: Option<Child>,
    started: Option<Instant>,
}

impl Container {
    /// The value of an environment variable as the container got it (remapped).
    pub fn env(&self, name: &str) -> Option<&str> {
        self.env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Whether it has been started (a failed Job stops a run before its pods start).
    pub fn was_started(&self) -> bool {
        self.child.is_some()
    }

    /// `127.0.0.1:<local>` of the declared port named `name`.
    pub fn addr(&self, name: &str) -> Result<String> {
        self.ports
            .iter()
            .find(|(n, _, _)| n.as_deref() == Some(name))
            .map(|(_, _, local)| format!("127.0.0.1:{local}"))
            .ok_or_else(|| anyhow!("{} declares no port named {name}", self.id))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            // Exactly the manifests' environment: nothing of the test's leaks in.
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.id, self.program.display()))?;
        self.child = Some(child);
        self.started = Some(Instant::now());
        Ok(())
    }

    /// Runs it to completion within `within`; fails unless it exits 0.
    async fn run_to_completion(&mut self, what: &str, within: Duration) -> Result<()> {
        self.spawn()?;
        let child = self.child.as_mut().ok_or_else(|| anyhow!("not started"))?;
        let status = tokio::time::timeout(within, child.wait())
            .await
            .map_err(|_| anyhow!("{what} {} still running after {within:?}:\n{}", self.id, self.log_tail()))??;
        anyhow::ensure!(status.success(), "{what} {} failed ({status}):\n{}", self.id, self.log_tail());
        Ok(())
    }

    fn local_port(&self, port: &Value) -> Result<(String, u16)> {
        let number = match port {
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::String(s) => s.parse().ok().or_else(|| {
                self.ports.iter().find(|(n, _, _)| n.as_deref() == Some(s)).map(|(_, container, _)| *container)
            }),
            _ => None,
        }
        .ok_or_else(|| anyhow!("{}: no container port {port}", self.id))?;
        let local = self
            .pod_ports
            .get(&number)
            .ok_or_else(|| anyhow!("{}: port {number} is neither declared nor listened on", self.id))?;
        let shown = match port {
            Value::String(s) if s.parse::<u16>().is_err() => format!("{s} ({number})"),
            _ => number.to_string(),
        };
        Ok((shown, *local))
    }

    /// One probe attempt; `Err` says why it failed.
    async fn check(&self, probe: &Value) -> Result<()> {
        if let Some(get) = probe.get("httpGet") {
            let (_, port) = self.local_port(&get["port"])?;
            anyhow::ensure!(get["scheme"].as_str().unwrap_or("HTTP") == "HTTP", "only HTTP probes are supported");
            let path = get["path"].as_str().unwrap_or("/");
            let mut head = format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\n\
                 Connection: close\r\n"
            );
            for header in get["httpHeaders"].as_array().into_iter().flatten() {
                let _ = write!(head, "{}: {}\r\n", header["name"].as_str().unwrap_or(""), header["value"]);
            }
            head.push_str("\r\n");
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
            stream.write_all(head.as_bytes()).await?;
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).await?;
            let text = String::from_utf8_lossy(&reply);
            let status: u16 =
                text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("no HTTP reply"))?;
            // The kubelet counts any 2xx or 3xx as success.
            anyhow::ensure!((200..400).contains(&status), "HTTP {status}: {}", text.lines().last().unwrap_or(""));
            Ok(())
        } else if let Some(grpc) = probe.get("grpc") {
            let (_, port) = self.local_port(&grpc["port"])?;
            let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?.connect().await?;
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let service = grpc["service"].as_str().unwrap_or_default().to_owned();
            let status = client.check(tonic_health::pb::HealthCheckRequest { service }).await?.into_inner().status;
            // SERVING, as the kubelet's gRPC probe requires.
            anyhow::ensure!(status == 1, "health status {status}");
            Ok(())
        } else if let Some(tcp) = probe.get("tcpSocket") {
            let (_, port) = self.local_port(&tcp["port"])?;
            TcpStream::connect(("127.0.0.1", port)).await?;
            Ok(())
        } else if let Some(exec) = probe.get("exec") {
            let command: Vec<String> = serde_json::from_value(exec["command"].clone())?;
            let (program, args) = command.split_first().ok_or_else(|| anyhow!("an empty exec probe"))?;
            let status = Command::new(local_program(program))
                .args(args)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await?;
            anyhow::ensure!(status.success(), "exited {status}");
            Ok(())
        } else {
            bail!("a probe with no action: {probe}")
        }
    }

    fn describe(&self, kind: &str, probe: &Value) -> String {
        let port_of = |v: &Value| match self.local_port(v) {
            Ok((shown, local)) => format!("port {shown} (local 127.0.0.1:{local})"),
            Err(err) => format!("port {v} ({err})"),
        };
        let action = if let Some(get) = probe.get("httpGet") {
            format!("httpGet {} on {}", get["path"].as_str().unwrap_or("/"), port_of(&get["port"]))
        } else if let Some(grpc) = probe.get("grpc") {
            format!("grpc service {:?} on {}", grpc["service"].as_str().unwrap_or(""), port_of(&grpc["port"]))
        } else if let Some(tcp) = probe.get("tcpSocket") {
            format!("tcpSocket on {}", port_of(&tcp["port"]))
        } else {
            format!("exec {}", probe["exec"]["command"])
        };
        format!("{}: {kind} {action}", self.id)
    }

    /// Probes as the kubelet does: from `initialDelaySeconds` after the start, every
    /// `periodSeconds`, each attempt cut at `timeoutSeconds`; passes after
    /// `successThreshold` successes in a row, fails after `failureThreshold` failures in a row.
    async fn probe(&mut self, kind: &str) -> Result<()> {
        let probe = self.spec[kind].clone();
        if probe.is_null() {
            return Ok(());
        }
        let seconds = |key: &str, default: u64| Duration::from_secs(probe[key].as_u64().unwrap_or(default));
        let (delay, period, timeout) =
            (seconds("initialDelaySeconds", 0), seconds("periodSeconds", 10), seconds("timeoutSeconds", 1));
        let failure_threshold = probe["failureThreshold"].as_u64().unwrap_or(3);
        let success_threshold = probe["successThreshold"].as_u64().unwrap_or(1);
        let started = self.started.ok_or_else(|| anyhow!("{} was not started", self.id))?;
        tokio::time::sleep_until(started + delay).await;
        let (mut failures, mut successes) = (0, 0);
        loop {
            let child = self.child.as_mut().ok_or_else(|| anyhow!("not started"))?;
            if let Some(status) = child.try_wait()? {
                bail!("{} exited ({status}) before it passed:\n{}", self.describe(kind, &probe), self.log_tail());
            }
            let attempt = tokio::time::timeout(timeout, self.check(&probe))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no answer within timeoutSeconds ({timeout:?})")));
            match attempt {
                Ok(()) => {
                    failures = 0;
                    successes += 1;
                    if successes >= success_threshold {
                        return Ok(());
                    }
                }
                Err(err) => {
                    successes = 0;
                    failures += 1;
                    if failures >= failure_threshold {
                        bail!(
                            "{} never passed: {failures} failures {period:?} apart (failureThreshold \
                             {failure_threshold}); the last: {err:#}\n{} log:\n{}",
                            self.describe(kind, &probe),
                            self.id,
                            self.log_tail()
                        );
                    }
                }
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Startup first; readiness and liveness once it has passed, as the kubelet orders them.
    async fn probe_all(&mut self) -> Result<()> {
        self.probe("startupProbe").await?;
        self.probe("readinessProbe").await?;
        self.probe("livenessProbe").await
    }
}

/// A pod started locally: its init containers and containers.
pub struct Pod {
    /// `<workload>-<replica>`.
    pub name: String,
    /// The workload's kind and name, e.g. `Deployment/chat-gateway`.
    pub workload: String,
    init: Vec<Container>,
    pub containers: Vec<Container>,
}

/// Replica counts by workload name, for `LocalRun::plan`: each raises the manifests' own
/// (`spec.replicas`, 1 when unset, as for a Deployment an autoscaler sizes).
#[derive(Default)]
pub struct Replicas(pub Vec<(String, usize)>);

/// Our workloads of a rendering, planned to run on this machine: Jobs to run first, then
/// the pods of every Deployment and StatefulSet.
pub struct LocalRun {
    jobs: Vec<Pod>,
    pub pods: Vec<Pod>,
    /// The channel prefix every process got in REDIS_CHANNEL_PREFIX.
    pub prefix: String,
    dir: PathBuf,
    // Dropped after the pods (field order): the processes stop before their databases go.
    databases: Vec<(String, TestDb)>,
}

/// What every container's environment is remapped with.
struct Remap<'a> {
    routes: &'a [ServiceRoute],
    databases: &'a mut Vec<(String, TestDb)>,
}

impl Remap<'_> {
    /// The local database standing for `name` (one fresh database per name).
    fn database(&mut self, name: &str) -> String {
        if let Some((_, db)) = self.databases.iter().find(|(n, _)| n == name) {
            return db.name.clone();
        }
        let db = TestDb::new();
        let local = db.name.clone();
        self.databases.push((name.to_owned(), db));
        local
    }

    /// `value` as it must read on this machine, for a container of a pod whose ports map
    /// through `ports` and whose volumes were written to `mounts` (mount path → local path).
    fn value(
        &mut self,
        name: &str,
        value: &str,
        ports: &mut HashMap<u16, u16>,
        mounts: &[(String, PathBuf)],
    ) -> String {
        let mut value = value.to_owned();
        if let Some(rest) = value.strip_prefix("postgres://").or_else(|| value.strip_prefix("postgresql://")) {
            let (authority_path, query) = rest.split_once('?').map_or((rest, None), |(a, q)| (a, Some(q)));
            let db = authority_path.split_once('/').map(|(_, db)| db).filter(|db| !db.is_empty()).unwrap_or("postgres");
            let local = self.database(db);
            value = format!("{}/{local}{}", postgres_base(), query.map(|q| format!("?{q}")).unwrap_or_default());
        } else if let Some(rest) = value.strip_prefix("redis://").or_else(|| value.strip_prefix("rediss://")) {
            let path = rest.split_once('/').map(|(_, p)| format!("/{p}")).unwrap_or_default();
            value = format!("{}{path}", redis_url().trim_end_matches('/'));
        } else if let Some(port) = listen_port(&value) {
            let local = *ports.entry(port).or_insert_with(free_port);
            value = format!("127.0.0.1:{local}");
        } else if let Some(local) =
            value.parse::<u16>().ok().filter(|_| name.ends_with("PORT")).and_then(|p| ports.get(&p))
        {
            value = local.to_string();
        } else {
            for route in self.routes {
                value = replace_host_port(&value, &route.host, route.port, &route.local);
            }
        }
        for (mount, local) in mounts {
            if value == *mount || value.starts_with(&format!("{mount}/")) {
                value = format!("{}{}", local.display(), &value[mount.len()..]);
            }
        }
        value
    }
}

/// The port of a listen address on every interface or loopback (`0.0.0.0:8080`, `[::]:8080`,
/// `:8080`, `127.0.0.1:8080`, `localhost:8080`).
fn listen_port(value: &str) -> Option<u16> {
    let (host, port) = value.rsplit_once(':')?;
    let port = port.parse().ok()?;
    ["0.0.0.0", "[::]", "::", "", "127.0.0.1", "localhost"].contains(&host).then_some(port)
}

/// Replaces `host:port` in `value` where `host` stands alone (not the tail of a longer name)
/// and `port` is the whole port.
fn replace_host_port(value: &str, host: &str, port: u16, local: &str) -> String {
    let needle = format!("{host}:{port}");
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find(&needle) {
        let before = if at > 0 { rest[..at].chars().last() } else { out.chars().last() };
        let after = rest[at + needle.len()..].chars().next();
        let alone = !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && !after.is_some_and(|c| c.is_ascii_digit());
        out.push_str(&rest[..at]);
        out.push_str(if alone { local } else { &needle });
        rest = &rest[at + needle.len()..];
    }
    out.push_str(rest);
    out
}

/// Kubernetes' `$(VAR)` expansion in env values, command and args: a defined variable is
/// replaced, `$$` escapes, anything else stays as written.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')')) {
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Our binary for a container path such as `/usr/local/bin/chat-gateway`, by file name;
/// any other program as written.
fn local_program(path: &str) -> PathBuf {
    let name = Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ours = bin_dir().join(&name);
    if ours.exists() {
        ours
    } else {
        PathBuf::from(path)
    }
}

fn set(env: &mut Vec<(String, String)>, name: &str, value: String) {
    env.retain(|(k, _)| k != name);
    env.push((name.to_owned(), value));
}

impl LocalRun {
    /// Plans every workload of ours in `manifests`: `replicas` raises a workload's count
    /// (by name) above the manifests' own.
    pub fn plan(manifests: &Manifests, replicas: &Replicas) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("k8s-smoke"));
        std::fs::create_dir_all(&dir)?;
        let planned = Self::plan_in(manifests, replicas, dir.clone());
        if planned.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        planned
    }

    /// `plan`, with volumes and logs under `dir`.
    fn plan_in(manifests: &Manifests, replicas: &Replicas, dir: PathBuf) -> Result<Self> {
        let prefix = unique("k8s");
        let pg = postgres_base();
        let pg_addr = pg.rsplit_once('@').map_or(pg.as_str(), |(_, a)| a).trim_start_matches("postgres://").to_owned();
        let redis = redis_url();
        let redis_addr = redis.trim_start_matches("redis://").trim_end_matches('/').to_owned();

        // Pods first, each with its declared ports on free local ports, so Services can
        // route to them before any environment is resolved.
        struct Planned<'a> {
            workload: &'a Value,
            kind: String,
            replica: usize,
            ports: HashMap<u16, u16>,
        }
        let mut planned = Vec::new();
        for workload in &manifests.objects {
            let kind = workload["kind"].as_str().unwrap_or_default();
            if !["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"].contains(&kind) {
                continue;
            }
            let Some(template) = pod_template(workload) else { continue };
            if !pod_has_ours(&template["spec"]) {
                continue;
            }
            let name = name_of(workload);
            let wanted = replicas.0.iter().find(|(n, _)| *n == name).map_or(0, |(_, n)| *n);
            let own = if kind == "Job" { 1 } else { workload["spec"]["replicas"].as_u64().unwrap_or(1) as usize };
            for replica in 0..own.max(wanted) {
                let mut ports = HashMap::new();
                for c in containers(&template["spec"], "containers") {
                    for p in c["ports"].as_array().into_iter().flatten() {
                        if let Some(port) = p["containerPort"].as_u64().and_then(|p| u16::try_from(p).ok()) {
                            ports.entry(port).or_insert_with(free_port);
                        }
                    }
                }
                planned.push(Planned { workload, kind: kind.to_owned(), replica, ports });
            }
        }

        let mut routes = Vec::new();
        for service in manifests.of_kind("Service") {
            let selector = service["spec"]["selector"].as_object().cloned().unwrap_or_default();
            if selector.is_empty() {
                continue;
            }
            let selects = |w: &Value| {
                pod_template(w).is_some_and(|t| selector.iter().all(|(k, v)| t["metadata"]["labels"][k] == *v))
            };
            let name = name_of(service);
            let namespace = service["metadata"]["namespace"].as_str().unwrap_or("default");
            let ours = planned.iter().find(|p| p.replica == 0 && p.kind != "Job" && selects(p.workload));
            let theirs = manifests.objects.iter().find(|w| w["kind"] != "Job" && selects(w));
            for port in service["spec"]["ports"].as_array().into_iter().flatten() {
                let service_port = port["port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or_default();
                let local = if let Some(pod) = ours {
                    let template = pod_template(pod.workload).ok_or_else(|| anyhow!("no template"))?;
                    let target = port.get("targetPort").unwrap_or(&port["port"]);
                    let number = match target {
                        Value::String(s) => containers(&template["spec"], "containers")
                            .iter()
                            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                            .find(|p| p["name"] == *s)
                            .and_then(|p| p["containerPort"].as_u64()),
                        other => other.as_u64(),
                    }
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| anyhow!("Service {name}: targetPort {target} is no container port"))?;
                    let local = pod.ports.get(&number).ok_or_else(|| {
                        anyhow!("Service {name}: targetPort {number} is not declared by its pods' containers")
                    })?;
                    format!("127.0.0.1:{local}")
                } else if let Some(workload) = theirs {
                    let template = pod_template(workload).ok_or_else(|| anyhow!("no template"))?;
                    let images: Vec<String> = containers(&template["spec"], "containers")
                        .iter()
                        .filter_map(|c| c["image"].as_str().map(str::to_owned))
                        .collect();
                    let image_is =
                        |what: &str| images.iter().any(|i| i.rsplit('/').next().is_some_and(|n| n.starts_with(what)));
                    if image_is("postgres") {
                        pg_addr.clone()
                    } else if image_is("redis") {
                        redis_addr.clone()
                    } else {
                        bail!("Service {name} selects {images:?}: no local stand-in for it")
                    }
                } else {
                    continue;
                };
                for host in [
                    name.clone(),
                    format!("{name}.{namespace}"),
                    format!("{name}.{namespace}.svc"),
                    format!("{name}.{namespace}.svc.cluster.local"),
                ] {
                    routes.push(ServiceRoute { host, port: service_port, local: local.clone() });
                }
            }
        }
        // Longest names first: `chat.ns.svc:80` is replaced whole, not as `chat` plus a tail.
        routes.sort_by_key(|r| std::cmp::Reverse(r.host.len()));

        let cmd = image_cmd()?;
        let mut databases = Vec::new();
        let mut remap = Remap { routes: &routes, databases: &mut databases };
        let (mut jobs, mut pods) = (Vec::new(), Vec::new());
        for Planned { workload, kind, replica, mut ports } in planned {
            let template = pod_template(workload).ok_or_else(|| anyhow!("no template"))?;
            let spec = &template["spec"];
            let pod_name = format!("{}-{replica}", name_of(workload));
            let pod_dir = dir.join(&pod_name);
            let volumes = write_volumes(manifests, spec, &pod_dir)?;
            let mut build = |c: &Value, ports: &mut HashMap<u16, u16>| -> Result<Option<Container>> {
                if !c["image"].as_str().is_some_and(is_ours) {
                    return Ok(None);
                }
                let id = format!("{pod_name}/{}", c["name"].as_str().unwrap_or_default());
                let mut mounts = Vec::new();
                for m in c["volumeMounts"].as_array().into_iter().flatten() {
                    let volume = m["name"].as_str().unwrap_or_default();
                    let Some(local) = volumes.get(volume) else { continue };
                    let local = match m["subPath"].as_str() {
                        Some(sub) if !sub.is_empty() => local.join(sub),
                        _ => local.clone(),
                    };
                    mounts.push((m["mountPath"].as_str().unwrap_or_default().to_owned(), local));
                }
                mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
                let env = resolve_env(manifests, workload, template, c, &pod_name)
                    .with_context(|| format!("the environment of {id}"))?;
                let mut env: Vec<(String, String)> =
                    env.iter().map(|(k, v)| (k.clone(), remap.value(k, v, ports, &mounts))).collect();
                // The one addition: a private channel namespace on the shared Redis.
                set(&mut env, "REDIS_CHANNEL_PREFIX", prefix.clone());
                let strings = |key: &str| -> Vec<String> {
                    c[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str())
                        .map(|s| expand(s, &env))
                        .collect()
                };
                let (command, args) = (strings("command"), strings("args"));
                let mut argv = if command.is_empty() {
                    if args.is_empty() {
                        cmd.clone()
                    } else {
                        Vec::new()
                    }
                } else {
                    command
                };
                argv.extend(args);
                let (program, args) = argv.split_first().ok_or_else(|| anyhow!("{id} has no command"))?;
                let args = args.iter().map(|a| remap.value("", a, ports, &mounts)).collect();
                let local = local_program(program);
                anyhow::ensure!(
                    local.is_absolute() && local.exists(),
                    "{id}: {program} has no local binary {} (build it: cargo build --workspace --bins)",
                    local.display()
                );
                let declared = c["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        let number = u16::try_from(p["containerPort"].as_u64()?).ok()?;
                        Some((p["name"].as_str().map(str::to_owned), number, *ports.get(&number)?))
                    })
                    .collect();
                Ok(Some(Container {
                    log: dir.join(format!("{}.log", id.replace('/', "_"))),
                    id,
                    binary: local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    program: local,
                    args,
                    env,
                    ports: declared,
                    pod_ports: HashMap::new(),
                    spec: c.clone(),
                    child: None,
                    started: None,
                }))
            };
            let mut init = Vec::new();
            for c in containers(spec, "initContainers") {
                init.extend(build(&c, &mut ports)?);
            }
            let mut main = Vec::new();
            for c in containers(spec, "containers") {
                main.extend(build(&c, &mut ports)?);
            }
            // Every container of a pod shares its network namespace, listen addresses included.
            for c in init.iter_mut().chain(main.iter_mut()) {
                c.pod_ports = ports.clone();
            }
            let pod = Pod { name: pod_name, workload: format!("{kind}/{}", name_of(workload)), init, containers: main };
            if kind == "Job" {
                jobs.push(pod);
            } else {
                pods.push(pod);
            }
        }
        Ok(Self { jobs, pods, prefix, dir, databases })
    }

    /// Creates the databases (as the dev overlay's Postgres creates POSTGRES_DB), runs every
    /// Job to completion, then every pod's init containers and containers.
    pub async fn start(&mut self) -> Result<()> {
        let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_base())).await?;
        for (_, db) in &self.databases {
            let sql = format!("CREATE DATABASE \"{}\"", db.name);
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await?;
        }
        let containers = self.jobs.iter().chain(&self.pods).flat_map(|p| p.init.iter().chain(&p.containers));
        let roles: std::collections::BTreeSet<&str> =
            containers.flat_map(|c| &c.env).filter(|(k, _)| k == "DB_APP_ROLE").map(|(_, v)| v.as_str()).collect();
        for role in roles {
            // Concurrent runs may race to create it: a duplicate is as good as created.
            let sql = format!(
                "DO $$ BEGIN CREATE ROLE \"{}\" NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
                role.replace('"', "\"\"")
            );
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await?;
        }
        admin.close().await?;
        for job in &mut self.jobs {
            for c in job.init.iter_mut().chain(job.containers.iter_mut()) {
                c.run_to_completion(&job.workload, JOB_WITHIN).await?;
            }
        }
        for pod in &mut self.pods {
            for c in &mut pod.init {
                c.run_to_completion("init container", JOB_WITHIN).await?;
            }
            for c in &mut pod.containers {
                c.spawn()?;
            }
        }
        Ok(())
    }

    /// Probes every container as the kubelet would, all at once; the first failure.
    pub async fn probe(&mut self) -> Result<()> {
        let all = self.pods.iter_mut().flat_map(|p| p.containers.iter_mut()).map(Container::probe_all);
        futures_util::future::try_join_all(all).await?;
        Ok(())
    }

    /// The running containers of binary `name` (`chat-gateway`), one per replica.
    pub fn containers(&self, binary: &str) -> Vec<&Container> {
        self.pods.iter().flat_map(|p| p.containers.iter()).filter(|c| c.binary == binary).collect()
    }
}

impl Drop for LocalRun {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            for c in &mut pod.containers {
                if let Some(child) = c.child.as_mut() {
                    let _ = child.start_kill();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let script = format!(
            "redis-cli -u {url} --scan --pattern '{prefix}:*' | xargs -r redis-cli -u {url} del >/dev/null",
            url = redis_url(),
            prefix = self.prefix
        );
        let _ = std::process::Command::new("sh").args(["-c", &script]).status();
    }
}

/// The environment of container `c`, resolved as the kubelet does: `envFrom` first, then
/// `env` in order, each value expanded with the variables before it.
fn resolve_env(
    manifests: &Manifests,
    workload: &Value,
    template: &Value,
    c: &Value,
    pod_name: &str,
) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let prefix = from["prefix"].as_str().unwrap_or_default();
        let (kind, reference) = if from["secretRef"].is_object() {
            ("Secret", &from["secretRef"])
        } else {
            ("ConfigMap", &from["configMapRef"])
        };
        let name = reference["name"].as_str().unwrap_or_default();
        match manifests.data(kind, name)? {
            Some(data) => {
                for (key, bytes) in data {
                    set(&mut env, &format!("{prefix}{key}"), String::from_utf8(bytes)?);
                }
            }
            None if reference["optional"].as_bool().unwrap_or(false) => {}
            None => bail!("envFrom: no {kind} {name}"),
        }
    }
    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().ok_or_else(|| anyhow!("an env entry without a name"))?;
        let value = if let Some(value) = var["value"].as_str() {
            Some(expand(value, &env))
        } else if let Some(from) = var.get("valueFrom") {
            if let Some(r) = from.get("secretKeyRef") {
                manifests.key("Secret", r).with_context(|| format!("{name}: secretKeyRef"))?
            } else if let Some(r) = from.get("configMapKeyRef") {
                manifests.key("ConfigMap", r).with_context(|| format!("{name}: configMapKeyRef"))?
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                Some(field(workload, template, pod_name, path).with_context(|| format!("{name}: fieldRef"))?)
            } else {
                bail!("{name}: {from} is not supported here (add it to tests/src/manifests.rs)")
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            set(&mut env, name, value);
        }
    }
    Ok(env)
}

/// A `fieldRef` of the downward API, as it reads for a local pod.
fn field(workload: &Value, template: &Value, pod_name: &str, path: &str) -> Result<String> {
    let label = |key: &str, path: &str| {
        let name = path.strip_prefix(&format!("metadata.{key}['"))?.strip_suffix("']")?;
        Some(template["metadata"][key][name].as_str().unwrap_or_default().to_owned())
    };
    Ok(match path {
        "metadata.name" => pod_name.to_owned(),
        "metadata.namespace" => workload["metadata"]["namespace"].as_str().unwrap_or("default").to_owned(),
        "metadata.uid" => unique("uid"),
        "spec.serviceAccountName" => template["spec"]["serviceAccountName"].as_str().unwrap_or("default").to_owned(),
        "spec.nodeName" => "localhost".to_owned(),
        "status.podIP" | "status.hostIP" => "127.0.0.1".to_owned(),
        other => label("labels", other)
            .or_else(|| label("annotations", other))
            .ok_or_else(|| anyhow!("fieldPath {other} is not supported here (add it to tests/src/manifests.rs)"))?,
    })
}

/// Writes a pod's Secret and ConfigMap volumes under `dir` and makes its emptyDirs; the
/// local directory of each such volume by name.
fn write_volumes(manifests: &Manifests, spec: &Value, dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut local = HashMap::new();
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or_default();
        let path = dir.join("volumes").join(name);
        let (kind, source, object) = if volume["secret"].is_object() {
            ("Secret", &volume["secret"], volume["secret"]["secretName"].as_str())
        } else if volume["configMap"].is_object() {
            ("ConfigMap", &volume["configMap"], volume["configMap"]["name"].as_str())
        } else if volume["emptyDir"].is_object() {
            std::fs::create_dir_all(&path)?;
            local.insert(name.to_owned(), path);
            continue;
        } else {
            // Other volume kinds have no local stand-in; a reference to one fails as a
            // missing file in the process that reads it.
            continue;
        };
        let object = object.unwrap_or_default();
        std::fs::create_dir_all(&path)?;
        let data = match manifests.data(kind, object)? {
            Some(data) => data,
            None if source["optional"].as_bool().unwrap_or(false) => BTreeMap::new(),
            None => bail!("volume {name}: no {kind} {object}"),
        };
        let items: Vec<(String, String)> = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| (i["key"].as_str().unwrap_or("").to_owned(), i["path"].as_str().unwrap_or("").to_owned()))
                .collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (key, file) in items {
            let bytes = data.get(&key).ok_or_else(|| anyhow!("volume {name}: {kind} {object} has no key {key}"))?;
            let target = path.join(file);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(target, bytes)?;
        }
        local.insert(name.to_owned(), path);
    }
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_secret_data() -> Result<()> {
        assert_eq!(base64_decode("ZGV2LW9ubHk=")?, b"dev-only");
        assert_eq!(base64_decode("cmVkaXM6Ly9yZWRpczo2Mzc5")?, b"redis://redis:6379");
        assert!(base64_decode("not base64!").is_err());
        Ok(())
    }

    #[test]
    fn only_a_service_name_standing_alone_is_replaced() {
        let route = |v: &str| replace_host_port(v, "chat-message", 50051, "127.0.0.1:7");
        assert_eq!(route("http://chat-message:50051"), "http://127.0.0.1:7");
        assert_eq!(route("http://my-chat-message:50051"), "http://my-chat-message:50051");
        assert_eq!(route("http://chat-message:500510"), "http://chat-message:500510");
        assert_eq!(route("a:chat-message:50051,chat-message:50051"), "a:127.0.0.1:7,127.0.0.1:7");
    }

    #[test]
    fn variables_expand_as_kubernetes_expands_them() {
        let env = vec![("A".to_owned(), "x".to_owned())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "x-$(B)-$(A)-$");
    }

    #[test]
    fn our_image_is_known_by_name_whatever_the_registry_and_tag() {
        assert!(is_ours("chat:dev"));
        assert!(is_ours("registry.example.com/chat:0.1.0"));
        assert!(is_ours("chat@sha256:abc"));
        assert!(!is_ours("postgres:16"));
        assert!(!is_ours("registry.example.com/chatter:1"));
    }
}
