//! Hostile input: a property test over bodies and headers (unauthenticated
//! requests never write; authenticated ones get a precise status and a row
//! exactly when they get 200), and the connection limits: header size,
//! header read time (slow-loris), connection cap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};
use serde_json::{Value, json};
use skillsync::http::{WebhookParts, WebhookState, routes};
use skillsync::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// A request shape: which secret, which content type, which body.
#[derive(Debug, Clone)]
struct Req {
    secret: Option<String>,
    content_type: Option<String>,
    path: String,
    body: Vec<u8>,
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-zA-Z0-9.:/-]{0,40}".prop_map(Value::from),
        Just(json!("32a8c937-2c65-463d-a292-e4c4e13ed263")),
        Just(json!("SkillsWorkflow.Job")),
        Just(json!("created")),
        Just(json!("test")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    Just("action".to_string()),
                    Just("document".to_string()),
                    Just("type".to_string()),
                    Just("id".to_string()),
                    Just("url".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body(base: String) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Arbitrary bytes.
        prop::collection::vec(any::<u8>(), 0..300),
        // Arbitrary JSON.
        json_value().prop_map(|v| v.to_string().into_bytes()),
        // Nearly valid events: each field may be off.
        (
            prop_oneof![
                Just(json!("created")),
                Just(json!("updated")),
                Just(json!("test")),
                Just(json!(7)),
                Just(Value::Null)
            ],
            prop_oneof![
                Just(json!("SkillsWorkflow.Job")),
                Just(json!("SkillsWorkflow.Project")),
                Just(json!("Job")),
                Just(json!("Invoice")),
                Just(json!(1))
            ],
            prop_oneof![
                Just(json!("32a8c937-2c65-463d-a292-e4c4e13ed263")),
                Just(json!("32A8C937-2C65-463D-A292-E4C4E13ED263")),
                Just(json!("nope")),
                Just(json!(5))
            ],
            prop_oneof![
                Just(format!(
                    "{base}/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263"
                )),
                Just(format!(
                    "{base}/api/projects/32a8c937-2c65-463d-a292-e4c4e13ed263"
                )),
                Just("http://169.254.169.254/latest/meta-data".to_string()),
                Just(format!(
                    "{base}/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263?x=1"
                )),
                "[ -~]{0,30}",
            ],
        )
            .prop_map(|(a, t, i, u)| {
                json!({"action": a, "document": {"type": t, "id": i, "url": u}})
                    .to_string()
                    .into_bytes()
            }),
        // Oversized.
        Just(vec![b' '; 70_000]),
    ]
}

fn request(base: String) -> impl Strategy<Value = Req> {
    (
        prop_oneof![
            Just(None),
            Just(Some(SECRET_ACME.to_string())),
            Just(Some("wrong-secret".to_string())),
            "[ -~]{0,20}".prop_map(Some)
        ],
        prop_oneof![
            Just(Some("application/json".to_string())),
            Just(Some("application/json; charset=utf-8".to_string())),
            Just(Some("text/plain".to_string())),
            Just(None)
        ],
        prop_oneof![
            Just("/skillsevent".to_string()),
            Just("/skillsevent/acme".to_string()),
            Just("/skillsevent/other".to_string()),
            Just("/elsewhere".to_string())
        ],
        body(base),
    )
        .prop_map(|(secret, content_type, path, body)| Req {
            secret,
            content_type,
            path,
            body,
        })
}

#[test]
fn property_every_request_gets_a_precise_status_and_only_200_writes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = "https://integration-api-we.skillsworkflow.com".to_string();
    let config = Arc::new(TestConfig::new(&dir.path().join("p.db"), &base).config());
    let store = rt
        .block_on(skillsync::app::open_store(
            &config,
            skillsync::store::ReportRole::Owner,
        ))
        .unwrap();
    let state = WebhookState::new(WebhookParts {
        config: config.clone(),
        store: store.clone(),
        wake: Arc::new(HashMap::new()),
        metrics: Metrics::install(),
        health: skillsync::health::Health::new(Duration::from_secs(5), Duration::from_secs(1)),
    });
    let filter = routes(state);
    let mut runner = TestRunner::new(PtConfig {
        cases: 400,
        failure_persistence: None,
        ..PtConfig::default()
    });
    let reader = rusqlite::Connection::open(dir.path().join("p.db")).unwrap();
    let result = runner.run(&request(base), |req| {
        let before = count(&reader, "SELECT count(*) FROM events");
        let mut r = warp::test::request()
            .method("POST")
            .path(&req.path)
            .body(req.body.clone());
        if let Some(s) = &req.secret {
            r = r.header("x-webhook-secret", s.as_str());
        }
        if let Some(ct) = &req.content_type {
            r = r.header("content-type", ct.as_str());
        }
        let resp = rt.block_on(r.reply(&filter));
        let status = resp.status().as_u16();
        let after = count(&reader, "SELECT count(*) FROM events");
        let authed = req.secret.as_deref() == Some(SECRET_ACME)
            && (req.path == "/skillsevent" || req.path == "/skillsevent/acme");
        if req.path == "/elsewhere" {
            prop_assert_eq!(status, 404);
        } else if !authed {
            prop_assert_eq!(status, 401, "unauthenticated: {:?}", req);
        } else {
            prop_assert!(
                [200, 400, 413, 415].contains(&status),
                "status {} for {:?}",
                status,
                req
            );
        }
        prop_assert_eq!(
            after - before,
            i64::from(status == 200),
            "a row exactly when 200: {:?}",
            req
        );
        let v: Value = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
        if status == 400 {
            prop_assert!(v["field"].is_string(), "400 names the field: {}", v);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

async fn read_all(sock: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), sock.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let app = spawn_app().await;
    let addr = app.base_url.trim_start_matches("http://").to_string();
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "POST /skillsevent HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {SECRET_ACME}\r\nx-junk: {}\r\ncontent-length: 0\r\n\r\n",
        "a".repeat(40_000)
    );
    let _ = sock.write_all(req.as_bytes()).await;
    let answer = read_all(&mut sock).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert_eq!(count(&app.sql(), "SELECT count(*) FROM events"), 0);
}

#[tokio::test]
async fn a_slow_loris_client_is_dropped_and_does_not_hold_the_server() {
    // Two connection slots and a one-second header deadline.
    let mut app = spawn_app_with(|c| {
        c.server.max_connections = Some(2);
        c.server.header_read_timeout_secs = Some(1);
    })
    .await;
    let addr = app.base_url.trim_start_matches("http://").to_string();
    // Two slow clients take both slots, sending a header byte now and then.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /skillsevent HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // A real sender queues behind them, then is served once the server drops them.
    let id = app.sim.create(skillsync::model::DocType::Job);
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://{addr}/skillsevent"))
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET_ACME)
        .body(
            app.sim
                .webhook_payload(skillsync::model::DocType::Job, &id, "created")
                .to_string(),
        )
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("served after the slow clients were dropped");
    assert_eq!(resp.status().as_u16(), 200);
    for mut s in slow {
        // The server closed them (408 or a bare close), having read no request.
        let answer = read_all(&mut s).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    app.stop().await;
}
