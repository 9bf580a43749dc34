//! Micro-benchmarks of the gateway's hot paths: frame parsing, event serialisation, JWT
//! verification, and fan-out of one event to N local connection queues.
//! `cargo bench -p chat-gateway` (criterion; results under target/criterion).

use axum::extract::ws::Utf8Bytes;
use chat_gateway::auth::{KeyConfig, Verifier};
use chat_gateway::outbox::{EventFrame, Outbox};
use chat_gateway::protocol::{client, server};
use chat_proto::v1 as pb;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

fn message() -> pb::Message {
    pb::Message {
        id: "123456".into(),
        room_id: "42".into(),
        seq: 1234,
        sender_id: "alice".into(),
        sender_name: Some("Alice".into()),
        kind: "text".into(),
        text: Some("hello there, this is a typical short chat message".into()),
        created_at_ms: 1_763_769_600_000,
        ..Default::default()
    }
}

fn parsing(c: &mut Criterion) {
    let send = r#"{"type":"send","id":"r7","room":"42","text":"hello there, this is a typical short chat message","client_msg_id":"c-99"}"#;
    let typing = r#"{"type":"typing","room":"42","active":true}"#;
    let mut group = c.benchmark_group("parse");
    group.bench_function("send", |b| b.iter(|| client::parse(std::hint::black_box(send))));
    group.bench_function("typing", |b| b.iter(|| client::parse(std::hint::black_box(typing))));
    group.finish();
}

fn serialisation(c: &mut Criterion) {
    let message = message();
    c.bench_function("serialise message event", |b| b.iter(|| server::message_event(std::hint::black_box(&message))));
}

fn jwt(c: &mut Criterion) {
    let secret = b"bench-secret".to_vec();
    let verifier = Verifier::new(&KeyConfig::Hs256 { secret: secret.clone() }, None, None).expect("verifier");
    let claims = serde_json::json!({"sub": "alice", "exp": chrono::Utc::now().timestamp() + 3600});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .expect("token");
    c.bench_function("verify HS256 token", |b| b.iter(|| verifier.verify(std::hint::black_box(&token))));
}

/// One serialised event shared by N connection queues, as a room task delivers it.
fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan-out to local queues");
    // Queued, as for a busy connection: these queues have no socket to write to.
    let frame = EventFrame::new(Utf8Bytes::from(server::message_event(&message())));
    for n in [10usize, 100, 1000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_batched(
                || {
                    // Queues that have carried an event before: the first one allocates.
                    let queues: Vec<_> = (0..n).map(|i| Outbox::new(i as u64, 64, Default::default())).collect();
                    let mut drained = std::collections::VecDeque::new();
                    for (outbox, queue) in &queues {
                        outbox.push_frame(&frame, Some(0));
                        queue.take(&mut drained);
                        drained.clear();
                    }
                    queues
                },
                |queues| {
                    for (outbox, _queue) in &queues {
                        outbox.push_frame(&frame, Some(0));
                    }
                    queues
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, parsing, serialisation, jwt, fanout);
criterion_main!(benches);
