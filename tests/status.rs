//! The status capability: a guest reads the host's memory, its budget, and its own instance's
//! memory against its cap.

use blackbox::{HostProcess, guest, http_client};

async fn status(host: &HostProcess, query: &str) -> serde_json::Value {
    let response = http_client()
        .get(host.url(&format!("/status{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

#[tokio::test]
async fn a_guest_sees_the_host_memory_its_budget_and_its_own_instance() {
    let host = HostProcess::start(
        &guest("faults"),
        &[
            "--workers",
            "2",
            "--memory-limit",
            "16MiB",
            "--memory-budget",
            "1GiB",
        ],
    );
    let idle = status(&host, "").await;
    let grown = status(&host, "?grow=4").await;
    println!("idle: {idle}\nafter growing 4 MiB: {grown}");
    let number = |value: &serde_json::Value, key: &str| {
        value[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {value}"))
    };

    assert_eq!(number(&idle, "instance_limit"), 16 << 20);
    assert_eq!(number(&idle, "host_budget"), 1 << 30);
    assert!(
        number(&grown, "instance_used") >= number(&idle, "instance_used") + (4 << 20),
        "{grown}"
    );
    assert!(number(&grown, "instance_used") <= 16 << 20);
    // The whole host is the master and two workers: more than one worker, less than the budget.
    let host_total = number(&idle, "host_resident");
    let worker = number(&idle, "worker_resident");
    let measured = host.rss_kib() * 1024;
    assert!(host_total > 2 * worker && host_total < 1 << 30, "{idle}");
    assert!(
        host_total.abs_diff(measured) < measured / 2,
        "the guest's host_resident {host_total} is far from the host's RSS {measured}"
    );
}

#[tokio::test]
async fn without_a_budget_the_guest_is_told_there_is_none() {
    let host = HostProcess::start(&guest("faults"), &[]);
    let figures = status(&host, "").await;
    assert!(figures["host_budget"].is_null(), "{figures}");
    assert_eq!(
        figures["instance_limit"].as_u64(),
        Some(128 << 20),
        "the default --memory-limit"
    );
}
