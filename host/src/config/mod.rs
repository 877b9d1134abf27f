//! Where settings come from, with gunicorn's precedence (later wins):
//! defaults (`PORT`, `WEB_CONCURRENCY`, `FORWARDED_ALLOW_IPS` read here) < the TOML config file
//! (`-c`, else `./host.toml` if present) < `GUNICORN_CMD_ARGS` (shell-split, so an environment set
//! for gunicorn keeps working) < `HOST_<NAME>` environment variables < `HOST_CMD_ARGS`
//! (shell-split) < the command line.
//!
//! The one table of settings is the clap definition of `ServeArgs`: each source is turned into
//! arguments of that table and parsed by it, so every source gets the same names, validators and
//! messages; the winner for each setting is kept with the name of its source.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};

use crate::settings::{ServeArgs, Settings};

pub mod apps;

const DEFAULT_CONFIG_FILE: &str = "host.toml";
/// Arguments that say what to do with the settings rather than being settings.
const NOT_SETTINGS: [&str; 3] = ["config", "print_config", "check_config"];
/// The events the config file's `[hooks]` may name: gunicorn's server hooks.
pub const HOOK_EVENTS: [&str; 13] = [
    "on_starting",
    "on_reload",
    "when_ready",
    "pre_fork",
    "post_fork",
    "post_worker_init",
    "worker_int",
    "worker_abort",
    "worker_exit",
    "child_exit",
    "nworkers_changed",
    "on_exit",
    "pre_request",
];

/// Settings as shell words in the environment, as gunicorn's `GUNICORN_CMD_ARGS`; the
/// gunicorn one is read too, below the host's own.
pub const GUNICORN_CMD_ARGS: &str = "GUNICORN_CMD_ARGS";
const HOST_CMD_ARGS: &str = "HOST_CMD_ARGS";

/// `HOST_` variables the host uses that are not settings.
const OTHER_HOST_VARIABLES: [&str; 1] = ["HOST_CMD_ARGS"];

/// The effective settings, with the source of each.
pub struct Layered {
    pub args: ServeArgs,
    /// Setting name → (its values as arguments, where they came from).
    pub provenance: BTreeMap<String, (Vec<String>, String)>,
    pub config: Option<ConfigFile>,
    /// The winning values of every source, as arguments of the settings table.
    pub arguments: Vec<OsString>,
}

/// The config file, read and parsed once.
pub struct ConfigFile {
    pub path: PathBuf,
    pub document: toml::Table,
}

impl ConfigFile {
    fn read(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let document = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        Ok(ConfigFile {
            path: path.to_owned(),
            document,
        })
    }
}

/// Reads every source; `command_line` is what follows `host serve`.
pub fn load(command_line: &[OsString]) -> Result<Layered> {
    let table = ServeArgs::table();
    let cli = parse(&table, command_line, "the command line")?;
    let from_cmd_args = parse(&table, &shell_words(HOST_CMD_ARGS)?, HOST_CMD_ARGS)?;
    let from_gunicorn = parse(&table, &shell_words(GUNICORN_CMD_ARGS)?, GUNICORN_CMD_ARGS)?;

    let config = config_path(&cli)
        .or_else(|| config_path(&from_cmd_args))
        .or_else(|| config_path(&from_gunicorn))
        .or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG_FILE);
            default.exists().then_some(default)
        })
        .map(|path| ConfigFile::read(&path))
        .transpose()?;

    // Lowest precedence first; each later source replaces a setting wholesale.
    let mut sources = Vec::new();
    if let Some(config) = &config {
        let arguments = config_file_arguments(&table, config)?;
        let label = format!("config file {}", config.path.display());
        sources.push((parse(&table, &arguments, &label)?, label));
    }
    sources.push((from_gunicorn, GUNICORN_CMD_ARGS.to_owned()));
    let (environment, labels) = environment_arguments(&table)?;
    let from_environment = parse(&table, &environment, "HOST_* environment variables")?;
    sources.push((from_environment, String::new()));
    sources.push((from_cmd_args, HOST_CMD_ARGS.to_owned()));
    sources.push((cli, "command line".to_owned()));

    let mut winners: BTreeMap<String, (Vec<String>, String)> = BTreeMap::new();
    for (matches, label) in &sources {
        for arg in table.get_arguments() {
            let id = arg.get_id().as_str();
            if NOT_SETTINGS.contains(&id)
                || matches.value_source(id) != Some(ValueSource::CommandLine)
            {
                continue;
            }
            let tokens = tokens(arg, matches);
            let label = if label.is_empty() {
                labels.get(id).cloned().unwrap_or_default()
            } else {
                label.clone()
            };
            winners.insert(id.to_owned(), (tokens, label));
        }
    }

    let mut final_arguments: Vec<OsString> = winners
        .values()
        .flat_map(|(tokens, _)| tokens.iter().map(OsString::from))
        .collect();
    for flag in ["print_config", "check_config"] {
        if sources.iter().any(|(matches, _)| matches.get_flag(flag)) {
            final_arguments.push(OsString::from(format!("--{}", flag.replace('_', "-"))));
        }
    }
    let matches = parse(&table, &final_arguments, "the combined settings")?;
    final_arguments.retain(|argument| {
        !["--print-config", "--check-config"].contains(&argument.to_string_lossy().as_ref())
    });
    let args =
        ServeArgs::from_arg_matches(&matches).context("cannot read the combined settings")?;

    let mut provenance = BTreeMap::new();
    for arg in table.get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_SETTINGS.contains(&id) {
            continue;
        }
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = match (winners.get(id), matches.value_source(id)) {
            (Some((_, label)), _) => label.clone(),
            (None, Some(ValueSource::EnvVariable)) => {
                format!(
                    "environment ({})",
                    arg.get_env()
                        .map(|e| e.to_string_lossy().into_owned())
                        .unwrap_or_default()
                )
            }
            _ => "default".to_owned(),
        };
        provenance.insert(id.to_owned(), (values, source));
    }
    Ok(Layered {
        args,
        provenance,
        config,
        arguments: final_arguments,
    })
}

/// The flags whose values `GUNICORN_CMD_ARGS` supplied (those no later source replaced):
/// what the host says it took from an environment set for gunicorn. Names only, as a value may
/// be a secret (`--database-url`).
pub fn from_gunicorn(layered: &Layered) -> Vec<String> {
    layered
        .provenance
        .iter()
        .filter(|(_, (_, source))| source == GUNICORN_CMD_ARGS)
        .map(|(name, _)| format!("--{}", name.replace('_', "-")))
        .collect()
}

/// The words of the environment variable `name`, shell-split; none if it is unset.
fn shell_words(name: &str) -> Result<Vec<OsString>> {
    let Ok(text) = std::env::var(name) else {
        return Ok(Vec::new());
    };
    let words = shlex::split(&text).with_context(|| format!("{name} is not valid shell words"))?;
    Ok(words.into_iter().map(OsString::from).collect())
}

/// The settings the host runs with, from every source: its own, its hooks and its apps.
pub fn settings(layered: &Layered) -> Result<Settings> {
    let mut settings = Settings::from_args(layered.args.clone())?;
    settings.hooks = hook_commands(layered.config.as_ref())?;
    settings.config_file = layered.config.as_ref().map(|config| config.path.clone());
    settings.apps = apps::resolve(layered, &settings)?;
    Ok(settings)
}

/// The effective settings with `overrides` (arguments, such as an app's) applied last.
fn with_overrides(layered: &Layered, overrides: &[OsString], source: &str) -> Result<ArgMatches> {
    let mut arguments = layered.arguments.clone();
    arguments.extend_from_slice(overrides);
    parse(&ServeArgs::table(), &arguments, source)
}

/// A setting's effective value in `matches`, as a config file writes it.
fn setting_value(matches: &ArgMatches, name: &str) -> Option<toml::Value> {
    let values: Vec<String> = matches
        .get_raw(name)
        .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    setting_toml(name, &values)
}

/// A setting's values as a config file writes them, `None` if it is unset; a database URL
/// without its password.
fn setting_toml(name: &str, values: &[String]) -> Option<toml::Value> {
    let repeatable = ServeArgs::table()
        .get_arguments()
        .find(|arg| arg.get_id().as_str() == name)
        .is_some_and(|arg| matches!(arg.get_action(), clap::ArgAction::Append));
    match values {
        [] => None,
        [url] if name == "database_url" => Some(toml_value(&crate::settings::redacted_url(url))),
        [one] if !repeatable => Some(toml_value(one)),
        many => Some(toml::Value::Array(
            many.iter().map(|v| toml_value(v)).collect(),
        )),
    }
}

fn parse(table: &clap::Command, arguments: &[OsString], source: &str) -> Result<ArgMatches> {
    table
        .clone()
        .try_get_matches_from(arguments)
        .map_err(|error| {
            anyhow::anyhow!(
                "invalid setting in {source}: {}",
                error.render().to_string().trim()
            )
        })
}

fn config_path(matches: &ArgMatches) -> Option<PathBuf> {
    matches.get_one::<PathBuf>("config").cloned()
}

/// A setting's values as arguments: `--name=value` per value, `--name` for a flag, the bare
/// path for the component.
fn tokens(arg: &clap::Arg, matches: &ArgMatches) -> Vec<String> {
    let values: Vec<String> = matches
        .get_raw(arg.get_id().as_str())
        .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    match arg.get_long() {
        None => values,
        Some(long) if arg.get_action().takes_values() => values
            .into_iter()
            .map(|v| format!("--{long}={v}"))
            .collect(),
        Some(long) => vec![format!("--{long}")],
    }
}

/// The config file's keys are the settings' names (`workers`, `limit_request_line`, …; dashes
/// are accepted too); arrays give repeatable settings several values.
fn config_file_arguments(table: &clap::Command, config: &ConfigFile) -> Result<Vec<OsString>> {
    let mut arguments = Vec::new();
    for (key, value) in &config.document {
        let id = key.replace('-', "_");
        if id == "hooks" || id == "app" {
            continue;
        }
        let values = setting_arguments(table, key, value)?.with_context(|| {
            format!(
                "unknown setting `{key}` in {}; the settings are: {}",
                config.path.display(),
                setting_names(table)
            )
        })?;
        arguments.extend(values);
    }
    Ok(arguments)
}

/// A config file's `key = value` as arguments of the settings table (`--key=value`, one per
/// value of an array); `None` if no setting has that name.
pub fn setting_arguments(
    table: &clap::Command,
    key: &str,
    value: &toml::Value,
) -> Result<Option<Vec<OsString>>> {
    let id = key.replace('-', "_");
    let Some(arg) = table
        .get_arguments()
        .find(|arg| arg.get_id().as_str() == id && !NOT_SETTINGS.contains(&id.as_str()))
    else {
        return Ok(None);
    };
    let values = match value {
        toml::Value::Array(items) => items
            .iter()
            .map(|item| scalar(key, item))
            .collect::<Result<Vec<_>>>()?,
        other => vec![scalar(key, other)?],
    };
    Ok(Some(
        values
            .into_iter()
            .flat_map(|value| argument(arg, value))
            .collect(),
    ))
}

fn scalar(key: &str, value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(number) => number.to_string(),
        toml::Value::Float(number) => number.to_string(),
        toml::Value::Boolean(flag) => flag.to_string(),
        other => bail!("setting `{key}`: expected a string, number or boolean, got {other}"),
    })
}

/// One value of a setting from a config file or an environment variable, as arguments.
fn argument(arg: &clap::Arg, value: String) -> Vec<OsString> {
    match arg.get_long() {
        None => vec![OsString::from(value)],
        Some(long) if arg.get_action().takes_values() => {
            vec![OsString::from(format!("--{long}={value}"))]
        }
        Some(long) if value == "true" || value == "1" => vec![OsString::from(format!("--{long}"))],
        Some(_) => Vec::new(),
    }
}

/// `HOST_<NAME>` for every setting; a repeatable one takes comma-separated values.
fn environment_arguments(
    table: &clap::Command,
) -> Result<(Vec<OsString>, BTreeMap<String, String>)> {
    let mut arguments = Vec::new();
    let mut labels = BTreeMap::new();
    for (name, value) in std::env::vars() {
        let Some(setting) = name.strip_prefix("HOST_") else {
            continue;
        };
        if OTHER_HOST_VARIABLES.contains(&name.as_str()) {
            continue;
        }
        let id = setting.to_ascii_lowercase();
        let Some(arg) = table
            .get_arguments()
            .find(|arg| arg.get_id().as_str() == id && !NOT_SETTINGS.contains(&id.as_str()))
        else {
            eprintln!("warning: {name} is not a setting of host serve; ignored");
            continue;
        };
        let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
        let values: Vec<String> = if repeatable {
            value
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect()
        } else {
            vec![value]
        };
        arguments.extend(values.into_iter().flat_map(|value| argument(arg, value)));
        labels.insert(id, format!("environment ({name})"));
    }
    Ok((arguments, labels))
}

fn setting_names(table: &clap::Command) -> String {
    table
        .get_arguments()
        .map(|arg| arg.get_id().as_str())
        .filter(|id| !NOT_SETTINGS.contains(id))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The hook commands of the config file's `[hooks]` table: event name → shell command.
pub fn hook_commands(config: Option<&ConfigFile>) -> Result<BTreeMap<String, String>> {
    let Some(ConfigFile { path, document }) = config else {
        return Ok(BTreeMap::new());
    };
    let Some(hooks) = document.get("hooks") else {
        return Ok(BTreeMap::new());
    };
    let hooks = hooks
        .as_table()
        .context("`hooks` must be a table of event = \"command\"")?;
    let mut commands = BTreeMap::new();
    for (event, command) in hooks {
        if !HOOK_EVENTS.contains(&event.as_str()) {
            bail!(
                "unknown hook `{event}` in {}; the hooks are: {}",
                path.display(),
                HOOK_EVENTS.join(", ")
            );
        }
        let command = command
            .as_str()
            .with_context(|| format!("hook `{event}` must be a command string"))?;
        commands.insert(event.clone(), command.to_owned());
    }
    Ok(commands)
}

/// `--print-config`: the effective settings as a config file `-c` reads back, each with its
/// source; an unset setting is a comment.
pub fn print(layered: &Layered) {
    for (name, (values, source)) in &layered.provenance {
        let line = match setting_toml(name, values) {
            Some(_) if name == "master_key" => format!("{name} = \"<secret>\""),
            Some(value) => format!("{name} = {value}"),
            None => format!("# {name} unset"),
        };
        println!("{line:<60} # {source}");
    }
}

/// A value as TOML: bare where TOML reads it back as the same number or boolean, else a
/// string (every setting accepts its value as a string).
fn toml_value(text: &str) -> toml::Value {
    let bare = format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|table| table.get("v").cloned())
        .filter(|value| match value {
            toml::Value::Integer(n) => n.to_string() == text,
            toml::Value::Float(f) => f.to_string() == text,
            toml::Value::Boolean(b) => b.to_string() == text,
            _ => false,
        });
    bare.unwrap_or_else(|| toml::Value::String(text.to_owned()))
}
