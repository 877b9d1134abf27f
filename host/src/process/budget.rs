//! `--memory-budget`: the worst case of a configuration, computed before anything starts, so a
//! config that cannot fit is refused with the arithmetic instead of being found out by an
//! out-of-memory kill in production.
//!
//! worst case = shared pages (the binary and the compiled app, mapped once by every worker)
//!              + workers × (worker baseline + instances per worker × (`--memory-limit` + 4 MiB)
//!                           + SQLite heap)
//!              + part buffers (`--encrypt-concurrency` × `--part-buffer`, host-wide)
//!
//! The SQLite heap is what SQLite may hold in a worker (its process-wide hard heap limit, set
//! from the same figures): for each app granted SQL on SQLite files, two values of the longest
//! it may make (half its `--memory-limit`) and 1 MiB per connection, and 2 MiB for the host's
//! own tables.
//!
//! The baseline is measured, not guessed: the private resident memory of a process that has
//! built the engine and loaded and linked the component exactly as a worker does; what it maps
//! from files (the binary's code, the compiled component) is counted once, as the machine does. At run time the worst
//! case cannot be exceeded: a worker never runs more than its instance slots, each capped by
//! the limiter, and requests beyond the slots wait in the queue; TTIN that would break the
//! budget is refused.

use anyhow::{Result, bail};

use crate::capabilities::sql::SqlLimits;
use crate::proc_memory;
use crate::settings::{Settings, human_size};

/// A loaded worker's resident memory: its own, and what it shares with the other workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Baseline {
    pub private: u64,
    pub shared: u64,
}

impl Baseline {
    /// This process's, from /proc/self/statm.
    pub fn measure() -> Baseline {
        let (resident, shared) = proc_memory::statm("self").unwrap_or_default();
        Baseline {
            private: resident.saturating_sub(shared),
            shared,
        }
    }
}

impl std::fmt::Display for Baseline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.private, self.shared)
    }
}

impl std::str::FromStr for Baseline {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Baseline> {
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(private)), Some(Ok(shared))) => Ok(Baseline { private, shared }),
            _ => bail!("not a baseline: {text:?}"),
        }
    }
}

/// What a running instance costs the host beyond its linear memory: its stack, its stores and
/// resources, the chunks of the streams it reads (a few a stage). Measured under the seed's
/// load (four 10 MiB parts at once through Lenzeye): a worker's private memory grew by about
/// 4 MiB per busy instance besides the instances' linear memory.
pub const HOST_MEMORY_PER_INSTANCE: u64 = 4 << 20;

/// One app's share of a worker: its instances, each up to its memory cap.
#[derive(Debug, Clone)]
pub struct AppShare {
    pub name: String,
    pub instances: u64,
    pub memory_limit: u64,
    /// What SQLite may hold for the app in a worker (0 when it has no SQLite database).
    pub sqlite_heap: u64,
}

impl AppShare {
    /// One instance: its memory cap and the host memory that serves it.
    fn per_instance(&self) -> u64 {
        self.memory_limit.saturating_add(HOST_MEMORY_PER_INSTANCE)
    }

    fn worst_case(&self) -> u64 {
        self.instances
            .saturating_mul(self.per_instance())
            .saturating_add(self.sqlite_heap)
    }
}

/// The worst case of a configuration. Apps do not share their instance memory: each worker
/// reserves every app's instances at its own cap, so an app at its limit can never take memory
/// another app was promised (its admission queue waits instead).
#[derive(Debug, Clone)]
pub struct Plan {
    pub workers: u64,
    pub apps: Vec<AppShare>,
    /// A worker's private memory, loaded and idle.
    pub baseline: u64,
    /// What SQLite may hold for the host's own tables in a worker (0 on PostgreSQL).
    pub host_tables_heap: u64,
    /// Memory every worker maps from the same files, counted once.
    pub shared: u64,
    /// Part buffers held at once across the host, and the most each holds in memory.
    pub buffers: u64,
    pub part_buffer: u64,
}

impl Plan {
    pub fn of(settings: &Settings, workers: usize, baseline: Baseline) -> Plan {
        Plan {
            workers: workers as u64,
            apps: settings
                .apps
                .iter()
                .map(|app| AppShare {
                    name: app.name.clone(),
                    instances: app.settings.concurrency as u64,
                    memory_limit: app.settings.memory_limit,
                    sqlite_heap: SqlLimits::sqlite_heap_of(settings, app),
                })
                .collect(),
            baseline: baseline.private,
            host_tables_heap: if settings.apps.iter().any(|app| {
                app.settings
                    .database_url
                    .as_deref()
                    .is_none_or(str::is_empty)
            }) {
                crate::capabilities::database::SQLITE_HOST_TABLES_HEAP
            } else {
                0
            },
            shared: baseline.shared,
            buffers: u64::from(settings.encrypt_concurrency),
            part_buffer: settings.part_buffer,
        }
    }

    fn buffer_memory(&self) -> u64 {
        self.buffers.saturating_mul(self.part_buffer)
    }

    fn per_worker(&self) -> u64 {
        self.apps.iter().fold(
            self.baseline.saturating_add(self.host_tables_heap),
            |sum, app| sum.saturating_add(app.worst_case()),
        )
    }

    pub fn worst_case(&self) -> u64 {
        self.workers
            .saturating_mul(self.per_worker())
            .saturating_add(self.buffer_memory())
            .saturating_add(self.shared)
    }

    /// The instances of a worker, as the arithmetic is printed.
    pub fn instances_arithmetic(&self) -> String {
        let term = |app: &AppShare| {
            let instances = format!(
                "{} instances × ({} --memory-limit + {} host memory)",
                app.instances,
                human_size(app.memory_limit),
                human_size(HOST_MEMORY_PER_INSTANCE)
            );
            match app.sqlite_heap {
                0 => instances,
                heap => format!("{instances} + {} SQLite heap", human_size(heap)),
            }
        };
        let apps = match self.apps.as_slice() {
            [one] => term(one),
            many => many
                .iter()
                .map(|app| format!("{}: {}", app.name, term(app)))
                .collect::<Vec<_>>()
                .join(" + "),
        };
        match self.host_tables_heap {
            0 => apps,
            heap => format!("{apps} + {} host tables' SQLite heap", human_size(heap)),
        }
    }

    /// Refuses a plan that does not fit `budget`, saying why and what would fit.
    pub fn check(&self, budget: u64) -> Result<()> {
        let worst = self.worst_case();
        if worst <= budget {
            return Ok(());
        }
        let for_workers = budget
            .saturating_sub(self.buffer_memory())
            .saturating_sub(self.shared);
        let mut fits = vec![format!(
            "--workers {}",
            for_workers / self.per_worker().max(1)
        )];
        if let [app] = self.apps.as_slice() {
            let share = for_workers / self.workers.max(1);
            let room = share
                .saturating_sub(self.baseline)
                .saturating_sub(self.host_tables_heap)
                .saturating_sub(app.sqlite_heap);
            fits.push(format!(
                "or {} instances per worker (--threads / --worker-connections)",
                room / app.per_instance().max(1)
            ));
            let mib = 1 << 20;
            fits.push(format!(
                "or --memory-limit {}MiB",
                (room / app.instances.max(1)).saturating_sub(HOST_MEMORY_PER_INSTANCE) / mib
            ));
        }
        bail!(
            "the configuration does not fit --memory-budget {}: {} shared by the workers + {} workers × ({} worker baseline + {}) + {} part buffers × {} --part-buffer = {}. What fits with the other settings unchanged: {}",
            human_size(budget),
            human_size(self.shared),
            self.workers,
            human_size(self.baseline),
            self.instances_arithmetic(),
            self.buffers,
            human_size(self.part_buffer),
            human_size(worst),
            fits.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_with_the_arithmetic_and_what_fits() {
        let plan = Plan {
            workers: 4,
            apps: vec![AppShare {
                name: "app".to_owned(),
                instances: 6,
                memory_limit: 64 << 20,
                sqlite_heap: 0,
            }],
            baseline: 8 << 20,
            host_tables_heap: 0,
            shared: 16 << 20,
            buffers: 4,
            part_buffer: 16 << 20,
        };
        assert_eq!(
            plan.worst_case(),
            (16 + 4 * (8 + 6 * (64 + 4)) + 4 * 16) << 20
        );
        let message = plan.check(512 << 20).unwrap_err().to_string();
        assert!(message.contains("16 MiB shared by the workers + 4 workers × (8 MiB worker baseline + 6 instances × (64 MiB --memory-limit + 4 MiB host memory)) + 4 part buffers × 16 MiB --part-buffer = 1744 MiB"), "{message}");
        assert!(message.contains("--workers 1"), "{message}");
        assert!(message.contains("--memory-limit 12MiB"), "{message}");
        assert!(plan.check(2 << 30).is_ok());
    }

    #[test]
    fn each_app_is_reserved_at_its_own_cap() {
        let app = |name: &str, instances, memory_limit| AppShare {
            name: name.to_owned(),
            instances,
            memory_limit,
            sqlite_heap: 0,
        };
        let plan = Plan {
            workers: 2,
            apps: vec![app("lenzeye", 6, 14 << 20), app("hello", 4, 8 << 20)],
            baseline: 10 << 20,
            host_tables_heap: 0,
            shared: 20 << 20,
            buffers: 4,
            part_buffer: 10 << 20,
        };
        assert_eq!(
            plan.worst_case(),
            (20 + 2 * (10 + 6 * (14 + 4) + 4 * (8 + 4)) + 4 * 10) << 20
        );
        let message = plan.check(256 << 20).unwrap_err().to_string();
        assert!(message.contains("2 workers × (10 MiB worker baseline + lenzeye: 6 instances × (14 MiB --memory-limit + 4 MiB host memory) + hello: 4 instances × (8 MiB --memory-limit + 4 MiB host memory))"), "{message}");
        assert!(
            message.contains("What fits with the other settings unchanged: --workers 1"),
            "{message}"
        );
    }

    #[test]
    fn sqlite_heap_is_counted_in_every_worker() {
        let plan = Plan {
            workers: 2,
            apps: vec![AppShare {
                name: "app".to_owned(),
                instances: 4,
                memory_limit: 16 << 20,
                sqlite_heap: 20 << 20,
            }],
            baseline: 8 << 20,
            host_tables_heap: 2 << 20,
            shared: 10 << 20,
            buffers: 4,
            part_buffer: 10 << 20,
        };
        assert_eq!(
            plan.worst_case(),
            (10 + 2 * (8 + 2 + 4 * (16 + 4) + 20) + 4 * 10) << 20
        );
        let message = plan.check(128 << 20).unwrap_err().to_string();
        assert!(message.contains("2 workers × (8 MiB worker baseline + 4 instances × (16 MiB --memory-limit + 4 MiB host memory) + 20 MiB SQLite heap + 2 MiB host tables' SQLite heap)"), "{message}");
    }
}
