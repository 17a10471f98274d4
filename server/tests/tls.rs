//! `rediss://`: a replica talks TLS to a real redis-server (certificates made by openssl).

mod support;

use std::{path::Path, process::Command, time::Duration};

use serde_json::json;
use support::{Api, Client, Redis, Replica, TempDir};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs (tools_present checks it is installed)");
    assert!(status.success(), "openssl {args:?}");
}

/// A self-signed CA: `<name>.key` and `<name>.pem` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN=chorus test {name}"),
            "-keyout",
            &key,
            "-out",
            &pem,
        ],
    );
}

#[tokio::test]
async fn rediss_url_connects_over_tls() {
    if !support::tools_present(&["redis-server", "openssl"]) {
        return;
    }
    // Dropped last: the guards below (redis, replicas) stop their processes first.
    let tmp = TempDir::new("chorus-tls");
    let dir = tmp.0.as_path();
    make_ca(dir, "ca");
    // a second CA that signed nothing here, for the replica that must refuse the server
    make_ca(dir, "other-ca");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "redis.key",
            "-out",
            "redis.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "redis.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "redis.pem",
        ],
    );

    let redis = Redis::start_tls(dir);
    let ca = dir.join("ca.pem").to_string_lossy().into_owned();
    let url = redis.url();
    let replicas: Vec<Replica> = (0..2)
        .map(|i| {
            Replica::spawn(
                &format!("tls-{i}"),
                &[("REDIS_URL", url.clone()), ("SSL_CERT_FILE", ca.clone())],
            )
        })
        .collect();
    for r in &replicas {
        r.wait_ready();
        let (_, body) = Api::new(&r.url(), None).get("/readyz").await;
        assert_eq!(body["cluster"], json!("connected"), "{}", r.log_text());
    }
    let a = Client::connect(&replicas[0].url()).await;
    let b = Client::connect(&replicas[1].url()).await;
    b.join("secure").await;
    let ack = a
        .ack(
            "publish",
            json!({"room": "secure", "event": "e", "data": "over tls"}),
        )
        .await;
    support::assert_ok(&ack);
    assert_eq!(b.expect("e").await, json!("over tls"));

    // Trusting another CA, the replica refuses the certificate, says why, and is not ready.
    let untrusting = Replica::spawn(
        "tls-untrusting",
        &[
            ("REDIS_URL", url.clone()),
            (
                "SSL_CERT_FILE",
                dir.join("other-ca.pem").to_string_lossy().into_owned(),
            ),
        ],
    );
    support::wait_until("the refusal logged", Duration::from_secs(20), || {
        let log = untrusting.log_text();
        log.contains("redis unreachable") && log.contains("UnknownIssuer")
    });
    let (status, body) = Api::new(&untrusting.url(), None).get("/readyz").await;
    assert_eq!(status, 503, "{body}");
}
