//! `host:capabilities/status` as a guest calls it.

use super::{Fixture, MEMORY_LIMIT, app, data_dir};
use crate::capabilities::host::capabilities::status::{Host, MemoryFigures};

/// Held by the tests that read this process's resident memory, so that one of them making
/// 128 MiB resident does not move the figures another is comparing.
static RESIDENT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the other tests, running at once in this process, may make resident or give back
/// between two readings of one call (their largest buffers are a few MiB).
const OTHERS: u64 = 32 << 20;

async fn memory(fixture: &mut Fixture) -> MemoryFigures {
    fixture.view().memory().await.expect("memory does not trap")
}

#[tokio::test]
async fn the_instance_figures_are_its_request_bounds() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "dashboard").await;
    let figures = memory(&mut fixture).await;
    // The app runs with the default --memory-limit, and the fixture's instance uses 1 MiB.
    assert_eq!(figures.instance_limit, MEMORY_LIMIT);
    assert_eq!(figures.instance_used, 1 << 20);
    fixture.bounds.memory_limit = 16 << 20;
    fixture.bounds.instance_memory = 3 << 20;
    let figures = memory(&mut fixture).await;
    assert_eq!(figures.instance_limit, 16 << 20);
    assert_eq!(figures.instance_used, 3 << 20);
    assert!(figures.instance_used <= figures.instance_limit);
}

#[tokio::test]
async fn the_host_figures_are_the_processes_and_the_limit() {
    let _alone = RESIDENT.lock().await;
    let dir = data_dir();
    let mut fixture = app(dir.path(), "dashboard").await;
    let figures = memory(&mut fixture).await;
    // This process stands for the worker: it is resident, and counted in the host (its parent
    // and the parent's children). The two are read one after the other, while other tests run.
    assert!(
        figures.worker_resident > 1 << 20,
        "{}",
        figures.worker_resident
    );
    assert!(
        figures.host_resident + OTHERS >= figures.worker_resident,
        "host {} < worker {}",
        figures.host_resident,
        figures.worker_resident
    );
    // No --memory-budget: the limit is the cgroup's or the machine's, which holds this process.
    assert_eq!(figures.host_budget, None);
    assert!(
        figures.host_limit > figures.worker_resident,
        "{}",
        figures.host_limit
    );
    let machine = crate::proc_memory::machine_memory_limit();
    assert_eq!(figures.host_limit, machine);

    // With a budget, the budget is the limit.
    fixture.bounds.memory_budget = Some(512 << 20);
    let figures = memory(&mut fixture).await;
    assert_eq!(figures.host_budget, Some(512 << 20));
    assert_eq!(figures.host_limit, 512 << 20);
}

#[tokio::test]
async fn the_figures_are_read_at_each_call() {
    let _alone = RESIDENT.lock().await;
    let dir = data_dir();
    let mut fixture = app(dir.path(), "dashboard").await;
    let before = memory(&mut fixture).await.worker_resident;
    // 128 MiB made resident by writing to every page.
    let held = vec![1u8; 128 << 20];
    let after = memory(&mut fixture).await.worker_resident;
    assert!(
        after + OTHERS >= before + (128 << 20),
        "resident {before} then {after} with 128 MiB more in use"
    );
    assert_eq!(std::hint::black_box(&held)[held.len() - 1], 1);
}
