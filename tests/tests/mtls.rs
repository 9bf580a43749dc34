//! mTLS between gateways and the message service: certificates from `chatctl certs` (what
//! `make run` uses), the gRPC port refusing every caller without a certificate its CA
//! signed, and renewed files taken up on both ends without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use chat_tests::{bin, eventually, unique, Cluster, ClusterBuilder};
use serde_json::json;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The gRPC health status that means a message service takes calls.
const SERVING: i32 = 1;

/// Reloads happen within `chat_common::tls::RELOAD_EVERY` (5 s) of a change.
const RELOADED_WITHIN: Duration = Duration::from_secs(30);

/// A fresh directory holding a CA of its own and the certificates it signed.
async fn certs() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(unique("mtls"));
    let out = tokio::process::Command::new(bin("chatctl")).args(["certs", "--dir"]).arg(&dir).output().await?;
    anyhow::ensure!(out.status.success(), "chatctl certs failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(dir)
}

/// The message service serving `server`'s certificate to callers `client_ca` signed, and
/// gateways calling it with `gateway`'s.
fn mtls(builder: ClusterBuilder, server: &Path, client_ca: &Path, gateway: &Path) -> ClusterBuilder {
    let path = |dir: &Path, file: &str| dir.join(file).display().to_string();
    builder
        .env("GRPC_TLS_CERT", path(server, "message.crt"))
        .env("GRPC_TLS_KEY", path(server, "message.key"))
        .env("GRPC_TLS_CLIENT_CA", client_ca.display().to_string())
        .env("MESSAGE_TLS_CA", path(server, "ca.crt"))
        .env("MESSAGE_TLS_CERT", path(gateway, "gateway.crt"))
        .env("MESSAGE_TLS_KEY", path(gateway, "gateway.key"))
}

/// The overall health status at `addr`, asked over TLS trusting `dir`'s CA, presenting
/// the gateway certificate of `identity` if any.
async fn health_over_tls(addr: &str, dir: &Path, identity: Option<&Path>) -> Result<i32> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(dir.join("ca.crt"))?))
        .domain_name("chat-message");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(id.join("gateway.crt"))?,
            std::fs::read(id.join("gateway.key"))?,
        ));
    }
    let ask = async {
        let channel = Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect().await?;
        let request = HealthCheckRequest { service: String::new() };
        anyhow::Ok(HealthClient::new(channel).check(request).await?.into_inner().status)
    };
    tokio::time::timeout(Duration::from_secs(10), ask).await.context("no answer within 10 s")?
}

/// The overall health status at `addr`, asked in plaintext.
async fn health_in_plaintext(addr: &str) -> Result<i32> {
    let ask = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
        let request = HealthCheckRequest { service: String::new() };
        anyhow::Ok(HealthClient::new(channel).check(request).await?.into_inner().status)
    };
    tokio::time::timeout(Duration::from_secs(10), ask).await.context("no answer within 10 s")?
}

/// `contents` written to `path` as the kubelet updates a mounted Secret: all at once.
fn replace(path: &Path, contents: &[u8]) -> Result<()> {
    let next = path.with_extension("next");
    std::fs::write(&next, contents)?;
    std::fs::rename(&next, path)?;
    Ok(())
}

#[tokio::test]
async fn gateways_call_over_mtls_and_the_port_refuses_callers_without_a_certificate_its_ca_signed() -> Result<()> {
    let (ours, theirs) = (certs().await?, certs().await?);
    let cluster = mtls(Cluster::builder().gateways(2), &ours, &ours.join("ca.crt"), &ours).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "over mTLS"})).await?;
    assert_eq!(bob.event("message").await?["message"]["text"], "over mTLS");

    let addr = &cluster.grpc_addr;
    assert_eq!(health_over_tls(addr, &ours, Some(&ours)).await?, SERVING, "a gateway's certificate is let in");
    assert!(health_in_plaintext(addr).await.is_err(), "a plaintext caller was answered");
    assert!(health_over_tls(addr, &ours, None).await.is_err(), "a caller without a certificate was answered");
    let foreign = health_over_tls(addr, &ours, Some(&theirs)).await;
    assert!(foreign.is_err(), "a certificate of another CA was let in");
    Ok(())
}

#[tokio::test]
async fn renewed_files_are_taken_up_on_both_ends_without_a_restart() -> Result<()> {
    let (ours, theirs) = (certs().await?, certs().await?);
    // The server trusts our CA only, through a file of its own that the test renews.
    let client_ca = std::env::temp_dir().join(unique("client-ca")).with_extension("crt");
    std::fs::copy(ours.join("ca.crt"), &client_ca)?;
    let mut cluster = mtls(Cluster::builder(), &ours, &client_ca, &ours).start().await?;
    let addr = cluster.grpc_addr.clone();
    assert!(health_over_tls(&addr, &ours, Some(&theirs)).await.is_err(), "their certificate is not trusted yet");

    // The server: its client CA file now holds their CA too.
    let bundle = [std::fs::read(ours.join("ca.crt"))?, std::fs::read(theirs.join("ca.crt"))?].concat();
    replace(&client_ca, &bundle)?;
    eventually(RELOADED_WITHIN, async || {
        health_over_tls(&addr, &ours, Some(&theirs)).await.is_ok_and(|s| s == SERVING)
    })
    .await
    .context("the server did not take up its renewed client CA")?;

    // A gateway: it starts with a certificate the server refuses, and serves once its
    // files hold one the server takes.
    let own = std::env::temp_dir().join(unique("gateway-tls"));
    std::fs::create_dir_all(&own)?;
    let refused = certs().await?;
    for file in ["gateway.crt", "gateway.key"] {
        std::fs::copy(refused.join(file), own.join(file))?;
    }
    let renewal = tokio::spawn({
        let (own, ours) = (own.clone(), ours.clone());
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            for file in ["gateway.key", "gateway.crt"] {
                replace(&own.join(file), &std::fs::read(ours.join(file))?)?;
            }
            anyhow::Ok(())
        }
    });
    let path = |file: &str| own.join(file).display().to_string();
    let env = [("MESSAGE_TLS_CERT", path("gateway.crt")), ("MESSAGE_TLS_KEY", path("gateway.key"))];
    let gateway = cluster.add_gateway_with(&env).await;
    renewal.await??;
    let gateway = gateway.context("a gateway whose certificate was renewed never became ready")?;
    let mut carol = cluster.client(gateway, "carol").await?;
    let room = carol.create_group(&[]).await?;
    carol.ack(json!({"type": "send", "room": room, "text": "renewed"})).await?;
    Ok(())
}

#[tokio::test]
async fn a_key_that_does_not_match_its_certificate_is_refused_at_start_naming_the_setting() -> Result<()> {
    let (ours, theirs) = (certs().await?, certs().await?);
    let db = chat_tests::TestDb::new();
    let out = tokio::process::Command::new(bin("chat-message"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", chat_tests::redis_url())
        .env("MESSAGE_ADDR", format!("127.0.0.1:{}", chat_tests::free_port()))
        .env("METRICS_ADDR", format!("127.0.0.1:{}", chat_tests::free_port()))
        .env("GRPC_TLS_CERT", ours.join("message.crt"))
        .env("GRPC_TLS_KEY", theirs.join("message.key"))
        .env("GRPC_TLS_CLIENT_CA", ours.join("ca.crt"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a key of another certificate");
    assert!(stderr.contains("GRPC_TLS_KEY") && stderr.contains("is it the key of"), "{stderr}");
    Ok(())
}
