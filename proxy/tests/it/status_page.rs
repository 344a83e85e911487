//! The live status page in a real browser: headless Chromium, driven by Selenium through
//! chromedriver (`proxy/tests/drivers/python/status_page.py`), loads `GET /` of a running
//! Sluice under load and checks what it shows against `/status`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::admin::http_get;
use crate::drivers::{drivers_dir, require_program, require_python};
use crate::pg::PgOptions;
use crate::support::process::SluiceProcess;
use crate::support::{output_text, start_pg_with_user};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_status_says_and_its_chart_moves() {
    let python = require_python("selenium");
    require_program("chromium", "chromium");
    require_program("chromedriver", "chromium-driver");
    let pg = start_pg_with_user(PgOptions::default(), "page_u", "pw", "page").await;
    let upstream = pg.url("page_u", "pw", "page");
    let sluice = SluiceProcess::spawn(&[
        ("SLUICE_UPSTREAM", &upstream),
        ("SLUICE_MAX_SERVER_CONNECTIONS", "6"),
        ("SLUICE_POOL_SIZE", "4"),
    ]);

    // The page with no assets from elsewhere: everything it needs is in the one document.
    let (status, page) = http_get(sluice.admin, "/");
    assert_eq!(status, 200);
    for outside in ["src=\"http", "href=\"http", "@import", "<link"] {
        assert!(!page.contains(outside), "{outside} in the page");
    }

    // Load: clients running short transactions, more than the pool, so some wait.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let url = sluice.url("page_u", "pw", "page");
    let mut load = Vec::new();
    for _ in 0..8 {
        let (stop, done, url) = (stop.clone(), done.clone(), url.clone());
        load.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect through Sluice");
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                client
                    .simple_query("SELECT pg_sleep(0.005)")
                    .await
                    .expect("a transaction under load");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let script = drivers_dir().join("python/status_page.py");
    let admin = format!("http://{}/", sluice.admin);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(admin)
            .arg("page_u")
            .arg(&shot)
            .stdin(Stdio::null())
            .output()
            .map(|o| (o, shot))
    })
    .await
    .expect("join")
    .expect("python runs");
    let (out, shot) = out;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    assert!(out.status.success(), "{}", output_text(&out));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)));
    assert_eq!(seen["shown"]["budget_max"], "6", "{seen}");
    assert!(seen["chart_points"].as_u64().unwrap_or(0) >= 2, "{seen}");
    assert!(done.load(Ordering::Relaxed) > 100, "the load ran");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "a screenshot at {}: {size} bytes",
        shot.display()
    );
    eprintln!("status page screenshot: {}", shot.display());
}
