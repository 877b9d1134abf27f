//! Runs a property target (here and, through a `#[path]` module, in `guests/web`): in the normal
//! suite a fixed number of cases from a fixed seed, so a run is fast and repeatable; with
//! `FUZZ_SECONDS=N` (`tests/fuzz`) fresh random seeds for N seconds. A failure is shrunk to a
//! minimal input and reported with the seed that found it (`FUZZ_SEED` replays it).

use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Cases per seed in a long run.
const CASES_PER_SEED: u32 = 1_000;

pub fn run<S>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let budget = std::env::var("FUZZ_SECONDS").ok().map(|seconds| {
        Duration::from_secs(
            seconds
                .parse()
                .expect("FUZZ_SECONDS is a number of seconds"),
        )
    });
    let replayed = std::env::var("FUZZ_SEED")
        .ok()
        .map(|seed| seed.parse::<u64>().expect("FUZZ_SEED is a number"));
    let started = Instant::now();
    let mut total = 0u64;
    let mut seeds = 0u64;
    loop {
        // The first seed is fixed unless a long run or a replay asks otherwise.
        let seed = match (replayed, budget) {
            (Some(seed), _) => seed.wrapping_add(seeds),
            (None, Some(_)) => random_seed(),
            (None, None) => 0,
        };
        // A replayed seed may come from a long run: its failing case can be past the suite's
        // count (the suite's cases are the first of the same sequence).
        let cases = if budget.is_some() || replayed.is_some() {
            CASES_PER_SEED
        } else {
            cases
        };
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
        if let Err(error) = runner.run(&strategy, &test) {
            panic!("fuzz target {name} failed (FUZZ_SEED={seed}): {error}");
        }
        total += u64::from(cases);
        seeds += 1;
        if budget.is_none_or(|budget| started.elapsed() >= budget) {
            break;
        }
    }
    eprintln!(
        "fuzz target {name}: {total} cases from {seeds} seeds in {:.1} s, no failure",
        started.elapsed().as_secs_f64()
    );
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}
