//! The dev overlay as Kubernetes would run it (`make k8s-smoke`): rendered with
//! `kubectl kustomize`, every container of our image started with exactly its command,
//! args and environment (Secrets, ConfigMaps and all), probed with its own probes, and two
//! gateways chatting. A renamed variable, a missing Secret key or a wrong probe path fails
//! here rather than in a rollout. What is remapped to run on one machine, and why, is in
//! `chat_tests::manifests`.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use chat_tests::manifests::{LocalRun, Manifests, Replicas};
use chat_tests::WsClient;
use serde_json::{json, Value};

const GATEWAY: &str = "chat-gateway";

fn dev_overlay() -> Result<Manifests> {
    Manifests::render(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../k8s/overlays/dev"))
}

/// Two gateways, whatever the overlay's autoscaler starts with: fan-out crosses them.
fn two_gateways() -> Replicas {
    Replicas(vec![(GATEWAY.to_owned(), 2)])
}

/// A token the gateways accept: signed with the JWT_SECRET their manifests gave them.
fn token(secret: &str, sub: &str) -> Result<String> {
    let claims = json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 3600});
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)?)
}

async fn client(addr: &str, secret: &str, user: &str) -> Result<WsClient> {
    let (client, welcome) = WsClient::connect_bearer(&format!("ws://{addr}/ws"), &token(secret, user)?).await?;
    anyhow::ensure!(welcome["type"] == "welcome", "expected welcome, got {welcome}");
    Ok(client)
}

/// The gateway Deployment's pod template, for a test to break.
fn gateway_container(manifests: &mut Manifests) -> Result<&mut Value> {
    manifests
        .objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == GATEWAY)
        .and_then(|d| d["spec"]["template"]["spec"]["containers"].get_mut(0))
        .ok_or_else(|| anyhow!("no {GATEWAY} Deployment in the dev overlay"))
}

#[tokio::test]
async fn the_dev_overlay_starts_as_rendered_passes_its_probes_and_chats_across_two_gateways() -> Result<()> {
    let manifests = dev_overlay()?;
    let mut run = LocalRun::plan(&manifests, &two_gateways())?;
    run.start().await?;
    run.probe().await?;

    let gateways = run.containers(GATEWAY);
    assert_eq!(gateways.len(), 2, "two gateway replicas");
    assert_eq!(run.containers("chat-message").len(), 1, "the dev overlay's one message pod");
    let secret = gateways[0].env("JWT_SECRET").context("the gateway got no JWT_SECRET")?.to_owned();
    let (a, b) = (gateways[0].addr("http")?, gateways[1].addr("http")?);
    let mut alice = client(&a, &secret, "alice").await?;
    let mut bob = client(&b, &secret, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "from gateway 1"})).await?;
    let event = bob.event("message").await?;
    assert_eq!(event["message"]["text"], "from gateway 1", "{event}");
    bob.ack(json!({"type": "send", "room": room, "text": "from gateway 2"})).await?;
    let mine = alice.event("message").await?;
    assert_eq!(mine["message"]["text"], "from gateway 1", "alice's own message first: {mine}");
    let event = alice.event("message").await?;
    assert_eq!(event["message"]["text"], "from gateway 2", "{event}");
    assert_eq!(event["message"]["seq"], 2);
    Ok(())
}

#[tokio::test]
async fn a_wrong_probe_path_fails_naming_the_container_probe_path_and_port() -> Result<()> {
    let mut manifests = dev_overlay()?;
    gateway_container(&mut manifests)?["readinessProbe"]["httpGet"]["path"] = json!("/readyz/nope");
    let mut run = LocalRun::plan(&manifests, &Replicas::default())?;
    run.start().await?;
    let err = run.probe().await.expect_err("a probe of a path the gateway does not serve passes");
    let text = format!("{err:#}");
    for part in ["chat-gateway-0/gateway", "readinessProbe", "httpGet /readyz/nope", "port http (8080)", "HTTP 404"] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
    Ok(())
}

#[tokio::test]
async fn a_renamed_variable_fails_the_probes() -> Result<()> {
    let mut manifests = dev_overlay()?;
    let env = gateway_container(&mut manifests)?["env"].as_array_mut().ok_or_else(|| anyhow!("no env"))?;
    let var = env.iter_mut().find(|v| v["name"] == "JWT_SECRET").ok_or_else(|| anyhow!("no JWT_SECRET"))?;
    var["name"] = json!("JWT_SECRETS");
    let mut run = LocalRun::plan(&manifests, &Replicas::default())?;
    run.start().await?;
    let err = run.probe().await.expect_err("a gateway without its secret passes its probes");
    let text = format!("{err:#}");
    assert!(text.contains("chat-gateway-0/gateway: startupProbe httpGet /healthz on port http (8080)"), "{text}");
    assert!(text.contains("exited") && text.contains("JWT_SECRET must be set"), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_missing_secret_key_is_refused_before_anything_starts() -> Result<()> {
    let mut manifests = dev_overlay()?;
    let secret = manifests
        .objects
        .iter_mut()
        .find(|o| o["kind"] == "Secret" && o["data"].get("jwt-secret").is_some())
        .ok_or_else(|| anyhow!("no Secret with jwt-secret"))?;
    secret["data"].as_object_mut().ok_or_else(|| anyhow!("no data"))?.remove("jwt-secret");
    let err = LocalRun::plan(&manifests, &Replicas::default()).err().ok_or_else(|| anyhow!("planned anyway"))?;
    let text = format!("{err:#}");
    assert!(text.contains("JWT_SECRET: secretKeyRef") && text.contains("has no key jwt-secret"), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_job_runs_to_completion_before_the_pods_and_its_failure_stops_the_run() -> Result<()> {
    let mut manifests = dev_overlay()?;
    // A Job of our image, as a migration Job is: a command the binary refuses exits non-zero.
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "chat-broken", "namespace": "chat-dev"},
        "spec": {"template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "broken",
                "image": "chat:dev",
                "command": ["/usr/local/bin/chat-message", "--no-such-flag"],
                "env": [{"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": secret_name(&manifests)?, "key": "database-url"}}}],
            }],
        }}},
    });
    manifests.objects.push(job);
    let mut run = LocalRun::plan(&manifests, &Replicas::default())?;
    let err = run.start().await.expect_err("a failing Job stops the run");
    let text = format!("{err:#}");
    assert!(text.contains("Job/chat-broken chat-broken-0/broken failed (exit status: 2)"), "{text}");
    assert!(run.containers(GATEWAY).iter().all(|c| !c.was_started()), "a pod started after the failed Job");
    Ok(())
}

/// The generated name (with its hash suffix) of the Secret holding database-url.
fn secret_name(manifests: &Manifests) -> Result<String> {
    manifests
        .objects
        .iter()
        .find(|o| o["kind"] == "Secret" && o["data"].get("database-url").is_some())
        .and_then(|o| o["metadata"]["name"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow!("no Secret with database-url"))
}
