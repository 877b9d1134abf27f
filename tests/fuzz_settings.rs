//! The fuzz targets of the settings parsers, through the real binary: values of every kind
//! (numbers past their types, sizes and seconds past their ranges, lists with empty or bogus
//! items, control characters, anything Unicode) given on the command line, in `HOST_*`
//! variables, in `HOST_CMD_ARGS` and in the config file, and config files of any shape.
//!
//! What a user must see, whatever they type: the host starts or refuses with one `Error:` that
//! says why, never a panic or a signal; `--print-config` prints a config file that `-c` reads
//! back to the same settings; `--check-config` agrees.
//!
//! `tests/fuzz settings` and `tests/fuzz config_files` run them long.

use std::process::{Command, Output};

use blackbox::{cache_dir, fuzzing, guest, host_bin};
use proptest::prelude::*;

/// The settings fuzzed here, by kind. Paths, the database and the object store are left out:
/// `--check-config` would create files or call servers wherever a case pointed them.
const INTEGERS: &[&str] = &[
    "workers",
    "max_requests",
    "max_requests_jitter",
    "backlog",
    "threads",
    "worker_connections",
    "max_connections",
    "limit_request_line",
    "limit_request_fields",
    "limit_request_field_size",
    "outbound_connections",
    "encrypt_concurrency",
];
const SECONDS: &[&str] = &[
    "timeout",
    "graceful_timeout",
    "keep_alive",
    "outbound_connect_timeout",
    "outbound_timeout",
    "database_timeout",
    "upload_expiry",
    "idle_recycle",
];
const SIZES: &[&str] = &[
    "limit_request_body",
    "memory_limit",
    "memory_budget",
    "part_buffer",
    "spill_limit",
];
const LISTS: &[&str] = &[
    "env",
    "bind",
    "allow_outbound",
    "metrics_bind",
    "forwarded_allow_ips",
];
const WORDS: &[&str] = &[
    "worker_class",
    "log_level",
    "access_logformat",
    "master_key",
];
const FLAGS: &[&str] = &["preload", "reuse_port"];

#[derive(Debug, Clone, Copy)]
enum Source {
    CommandLine,
    Environment,
    CmdArgs,
    ConfigFile,
}

#[derive(Debug, Clone)]
struct Setting {
    name: &'static str,
    value: String,
    source: Source,
}

fn integer() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u64..5000).prop_map(|n| n.to_string()),
        2 => prop::sample::select(vec![
            "-1", "0", "4294967296", "18446744073709551615", "18446744073709551616",
            "99999999999999999999999", "1.5", "1e3", " 3", "0x10", "+7", "007", "", "∞",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn seconds() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u32..100_000).prop_map(|n| format!("{}", f64::from(n) / 1000.0)),
        2 => prop::sample::select(vec![
            "0", "-1", "1e9", "1000000001", "1e10", "1e20", "1e308", "1e309", "inf", "-inf",
            "nan", "NaN", "30s", "", "0.0000000001", "18446744073709551616",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn size() -> impl Strategy<Value = String> {
    let unit = prop::sample::select(vec![
        "", "B", "KiB", "MiB", "GiB", "TiB", "EiB", "KB", "MB", "k", "m", " MiB",
    ]);
    prop_oneof![
        4 => ((0u64..100_000), unit).prop_map(|(n, unit)| format!("{n}{unit}")),
        2 => prop::sample::select(vec![
            "0", "-1MiB", "1.5MiB", "99999999EiB", "18446744073709551615", "18446744073709551616",
            "16EiB", "MiB", "", "1e3", "0x10MiB",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn list_item(name: &'static str) -> BoxedStrategy<String> {
    let typical: Vec<&'static str> = match name {
        "env" => vec![
            "A=1",
            "PATH=/x",
            "=x",
            "A",
            "A=",
            "HOST_MASTER_KEY=x",
            "É=é",
        ],
        "bind" | "metrics_bind" => vec![
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "[::1]:0",
            "unix:/nonexistent/dir/s",
            "unix:",
            "localhost:0",
            ":0",
            "0.0.0.0:0",
            "fd://3",
            "1.2.3.4.5:80",
        ],
        "allow_outbound" => vec![
            "*",
            "example.com",
            "*.example.com",
            "example.com:443",
            "http://x",
            "",
        ],
        _ => vec![
            "*",
            "127.0.0.1",
            "::1",
            "10.0.0.0/8",
            "10.0.0.0/33",
            "bogus",
            "::ffff:1.2.3.4",
            "",
        ],
    };
    prop_oneof![
        4 => prop::sample::select(typical).prop_map(str::to_owned),
        1 => "[ -~]{0,12}",
    ]
    .boxed()
}

fn value(name: &'static str) -> BoxedStrategy<String> {
    if INTEGERS.contains(&name) {
        integer().boxed()
    } else if SECONDS.contains(&name) {
        seconds().boxed()
    } else if SIZES.contains(&name) {
        size().boxed()
    } else if LISTS.contains(&name) {
        prop::collection::vec(list_item(name), 1..4)
            .prop_map(|items| items.join(","))
            .boxed()
    } else if FLAGS.contains(&name) {
        prop::sample::select(vec!["true", "false", "1", "0", "yes", ""])
            .prop_map(str::to_owned)
            .boxed()
    } else {
        prop_oneof![
            3 => prop::sample::select(vec!["sync", "gthread", "gevent", "debug", "info", "warning", "%(h)s %(r)s", "x"])
                .prop_map(str::to_owned),
            1 => any::<String>(),
        ]
        .boxed()
    }
}

fn setting() -> impl Strategy<Value = Setting> {
    let names: Vec<&'static str> = [INTEGERS, SECONDS, SIZES, LISTS, WORDS, FLAGS].concat();
    (
        prop::sample::select(names),
        prop::sample::select(vec![
            Source::CommandLine,
            Source::Environment,
            Source::CmdArgs,
            Source::ConfigFile,
        ]),
    )
        .prop_flat_map(|(name, source)| {
            value(name).prop_map(move |value| Setting {
                name,
                value,
                source,
            })
        })
}

/// `host serve <hello> …` with the settings given where each case says, in a clean
/// environment, with `extra` arguments last.
fn serve(settings: &[Setting], config: Option<&str>, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut command = Command::new(host_bin());
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir(dir.path());
    command.arg("serve").arg(guest("hello"));
    let mut file = String::from(config.unwrap_or_default());
    let mut cmd_args = Vec::new();
    for setting in settings {
        let flag = format!("--{}={}", setting.name.replace('_', "-"), setting.value);
        match setting.source {
            Source::CommandLine => {
                command.arg(without_nul(&flag));
            }
            Source::Environment => {
                command.env(
                    format!("HOST_{}", setting.name.to_uppercase()),
                    without_nul(&setting.value),
                );
            }
            Source::CmdArgs => {
                if let Ok(quoted) = shlex::try_quote(&without_nul(&flag)) {
                    cmd_args.push(quoted.into_owned());
                }
            }
            Source::ConfigFile => {
                let value = toml::Value::String(setting.value.clone());
                file = format!("{} = {value}\n{file}", setting.name);
            }
        }
    }
    if !cmd_args.is_empty() {
        command.env("HOST_CMD_ARGS", cmd_args.join(" "));
    }
    if !file.is_empty() {
        let path = dir.path().join("host.toml");
        std::fs::write(&path, &file).expect("the config file is written");
        command.arg("-c").arg(&path);
    }
    command
        .arg("--cache-dir")
        .arg(cache_dir())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--worker-tmp-dir")
        .arg(dir.path())
        .args(extra);
    command.output().expect("the host binary runs")
}

/// Arguments and environment values cannot carry NUL.
fn without_nul(text: &str) -> String {
    text.replace('\0', "")
}

/// Exits 0, or with an `Error:` that says something: 1 for settings, 2 for a command line
/// clap refuses (as argparse does for gunicorn), 4 for what the machine cannot give (an
/// instance pool larger than the address space), as gunicorn's app-load error; never a panic
/// or a signal.
fn well_behaved(output: &Output, what: &str) -> Result<bool, TestCaseError> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    prop_assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    match output.status.code() {
        Some(0) => Ok(true),
        Some(1 | 2 | 4) => {
            prop_assert!(
                stderr.contains("Error: ") || stderr.contains("error: "),
                "{what} failed without saying why:\n{stderr}"
            );
            Ok(false)
        }
        other => Err(TestCaseError::fail(format!(
            "{what} ended with {other:?} (a signal if None):\n{stderr}"
        ))),
    }
}

/// The settings a `--print-config` output sets, secrets and comments aside.
fn printed(output: &Output) -> Result<toml::Table, TestCaseError> {
    let text = String::from_utf8_lossy(&output.stdout);
    let mut table: toml::Table = text.parse().map_err(|error| {
        TestCaseError::fail(format!(
            "--print-config printed what TOML cannot read ({error}):\n{text}"
        ))
    })?;
    table.remove("master_key");
    table.remove("data_dir");
    table.remove("worker_tmp_dir");
    Ok(table)
}

fn settings_print_back_as_they_are_read(settings: Vec<Setting>) -> Result<(), TestCaseError> {
    let first = serve(&settings, None, &["--print-config"]);
    if !well_behaved(&first, "--print-config")? {
        return Ok(());
    }
    let table = printed(&first)?;
    let again = serve(
        &[],
        Some(&String::from_utf8_lossy(&first.stdout)),
        &["--print-config"],
    );
    prop_assert!(
        well_behaved(&again, "--print-config of the printed config")?,
        "-c refused what --print-config printed:\n{}\n{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&again.stderr)
    );
    let read_back = printed(&again)?;
    for (name, value) in &table {
        prop_assert_eq!(
            Some(value),
            read_back.get(name),
            "`{}` read back from the printed config differs",
            name
        );
    }
    let checked = serve(&settings, None, &["--check-config"]);
    well_behaved(&checked, "--check-config")?;
    Ok(())
}

#[test]
fn settings_from_every_source_print_back_as_they_are_read() {
    fuzzing::run(
        "settings",
        40,
        prop::collection::vec(setting(), 0..6),
        settings_print_back_as_they_are_read,
    );
}

/// TOML values of every type, nested a little.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<String>().prop_map(toml::Value::String),
        any::<i64>().prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        Just(toml::Value::Datetime(
            "1979-05-27T07:32:00Z".parse().expect("a datetime")
        )),
        (0u32..20).prop_map(|n| toml::Value::String(format!("{n}MiB"))),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|map| toml::Value::Table(map.into_iter().collect())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    let known: Vec<&'static str> = [INTEGERS, SECONDS, SIZES, LISTS, WORDS, FLAGS].concat();
    prop_oneof![
        4 => prop::sample::select(known).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["hooks", "app", "config", "print_config", "component", "storage", "database_url"])
            .prop_map(str::to_owned),
        1 => "[a-z_-]{1,12}",
    ]
}

/// An `[[app]]` entry: a name, the component, and any keys.
fn app() -> impl Strategy<Value = toml::Value> {
    let app_key = prop_oneof![
        prop::sample::select(vec![
            "name",
            "hosts",
            "path",
            "default",
            "capabilities",
            "timeout",
            "memory_limit",
            "env",
            "allow_outbound",
            "limit_request_body",
            "secrets"
        ])
        .prop_map(str::to_owned),
        key(),
    ];
    prop::collection::btree_map(app_key, toml_value(), 0..5).prop_map(|mut keys| {
        keys.entry("component".into())
            .or_insert_with(|| toml::Value::String(guest("hello")));
        toml::Value::Table(keys.into_iter().collect())
    })
}

fn config_file() -> impl Strategy<Value = toml::Table> {
    (
        prop::collection::btree_map(key(), toml_value(), 0..6),
        prop::collection::vec(app(), 0..3),
    )
        .prop_map(|(keys, apps)| {
            let mut table: toml::Table = keys.into_iter().collect();
            if !apps.is_empty() {
                table.insert("app".into(), toml::Value::Array(apps));
            }
            table
        })
}

fn any_config_file_is_read_or_refused(document: toml::Table) -> Result<(), TestCaseError> {
    let text = toml::to_string(&document).expect("a table prints as TOML");
    for extra in ["--print-config", "--check-config"] {
        let output = serve(&[], Some(&text), &[extra]);
        well_behaved(&output, &format!("{extra} of\n{text}\n"))?;
    }
    Ok(())
}

#[test]
fn any_config_file_is_read_or_refused_with_a_message() {
    fuzzing::run(
        "config_files",
        40,
        config_file(),
        any_config_file_is_read_or_refused,
    );
}

#[test]
fn the_printed_config_of_the_defaults_reads_back() {
    let output = serve(&[], None, &["--print-config"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.parse::<toml::Table>().is_ok(),
        "--print-config on the defaults is not TOML:\n{text}"
    );
}
