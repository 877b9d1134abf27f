//! The apps one host serves, from the config file's `[[app]]` entries (or the one component of
//! `host serve app.wasm`, which takes every request): each with its component, its routes, the
//! capabilities it is granted, its environment and its settings.
//!
//! An app's settings are the host's, overridden by its entry: the entry's keys are read through
//! the same table of settings as every other source, so they take the same forms and get the
//! same messages.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{ArgMatches, FromArgMatches};

use super::{ConfigFile, Layered};
use crate::settings::app::{Routes, lowercase, validate_name};
use crate::settings::{App, AppArgs, AppSettings, Capability, ServeArgs, Settings};

/// Keys of an `[[app]]` entry that only apps have.
const APP_KEYS: [&str; 8] = [
    "name",
    "component",
    "hosts",
    "path",
    "default",
    "capabilities",
    "env",
    "secrets",
];

/// The app of `host serve COMPONENT.wasm`: named after the file, granted every capability,
/// taking every request.
pub fn single(component: PathBuf, host: &Settings) -> Result<App> {
    let name = component.file_stem().map_or_else(
        || "app".to_owned(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    validate_name(&name).with_context(|| {
        format!(
            "{}: the app is named after the file; rename it, or declare it as an [[app]] with a `name`",
            component.display()
        )
    })?;
    let mut app = App::new(name, component, host.env.clone(), host.app.clone());
    app.routes.default = true;
    Ok(app)
}

/// The `[[app]]` entries of the config file, each an app's own keys and its overrides of the
/// host's settings as arguments of the settings table.
pub struct Declaration<'a> {
    /// Keys with `-` spelled `_`, as everywhere in the config file.
    table: toml::Table,
    config_file: &'a Path,
}

pub fn declarations(config: Option<&ConfigFile>) -> Result<Vec<Declaration<'_>>> {
    let Some(ConfigFile { path, document }) = config else {
        return Ok(Vec::new());
    };
    let Some(apps) = document.get("app") else {
        return Ok(Vec::new());
    };
    let apps = apps
        .as_array()
        .with_context(|| format!("{}: apps are declared as [[app]] tables", path.display()))?;
    apps.iter()
        .map(|app| {
            let table = app
                .as_table()
                .with_context(|| format!("{}: each [[app]] must be a table", path.display()))?;
            Ok(Declaration {
                table: table
                    .iter()
                    .map(|(key, value)| (key.replace('-', "_"), value.clone()))
                    .collect(),
                config_file: path,
            })
        })
        .collect()
}

impl Declaration<'_> {
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(text)) => Ok(Some(text.clone())),
            Some(other) => bail!("`{key}` must be a string, got {other}"),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(text)) => Ok(Some(vec![text.clone()])),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("`{key}` must be a list of strings"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => bail!("`{key}` must be a list of strings, got {other}"),
        }
    }

    /// The app's overrides as arguments of the settings table.
    pub fn override_arguments(&self) -> Result<Vec<OsString>> {
        let table = ServeArgs::table();
        let app_settings = AppArgs::names();
        let mut arguments = Vec::new();
        for (key, value) in &self.table {
            // `allow_outbound` replaces the host's list rather than adding to it: see `resolve`.
            if APP_KEYS.contains(&key.as_str()) || key == "allow_outbound" {
                continue;
            }
            let values = app_settings
                .contains(key)
                .then(|| super::setting_arguments(&table, key, value))
                .transpose()?
                .flatten()
                .with_context(|| {
                    format!(
                        "`{key}` cannot be set per app; an [[app]] takes {} and the host settings {}",
                        APP_KEYS.join(", "),
                        app_settings.join(", ")
                    )
                })?;
            arguments.extend(values);
        }
        Ok(arguments)
    }

    /// The entry's settings: the host's, with its overrides applied; and those settings as the
    /// table read them. Errors name the entry (`source`).
    fn settings(&self, layered: &Layered, source: &str) -> Result<(AppSettings, ArgMatches)> {
        let overrides = self.override_arguments().context(source.to_owned())?;
        let matches = super::with_overrides(layered, &overrides, source)?;
        let settings = ServeArgs::from_arg_matches(&matches)
            .map_err(anyhow::Error::from)
            .and_then(|args| AppSettings::from_args(args.app))
            .context(source.to_owned())?;
        Ok((settings, matches))
    }

    /// The app, from its settings and the host's (`host`). Errors name the entry (`index`).
    fn app(&self, layered: &Layered, host: &Settings, index: usize) -> Result<(App, ArgMatches)> {
        let source = format!("[[app]] entry {}", index + 1);
        let (settings, matches) = self.settings(layered, &source)?;
        let app = self.resolve(host, settings).context(source)?;
        Ok((app, matches))
    }

    fn resolve(&self, host: &Settings, settings: AppSettings) -> Result<App> {
        let name = self
            .string("name")?
            .context("every [[app]] needs a `name`")?;
        validate_name(&name)?;
        let component = self
            .string("component")?
            .with_context(|| format!("app `{name}` needs a `component`"))?;
        let component = self.relative_to_config(&component);
        let mut app = App::new(name.clone(), component, host.env.clone(), settings);
        app.routes = Routes {
            hosts: lowercase(self.strings("hosts")?.unwrap_or_default()),
            path: match self.string("path")? {
                Some(path) => Some(normalized_prefix(&path)?),
                None => None,
            },
            default: match self.table.get("default") {
                None => false,
                Some(toml::Value::Boolean(default)) => *default,
                Some(other) => bail!("`default` must be true or false, got {other}"),
            },
        };
        if let Some(capabilities) = self.strings("capabilities")? {
            app.capabilities = capabilities
                .iter()
                .map(|text| Capability::parse(text))
                .collect::<Result<_>>()?;
        }
        if let Some(pairs) = self.strings("env")? {
            for pair in pairs {
                let (key, value) = crate::settings::parse_env_pair(&pair)
                    .map_err(|error| anyhow::anyhow!("`env`: {error}"))?;
                app.env.retain(|(existing, _)| *existing != key);
                app.env.push((key, value));
            }
        }
        if let Some(secrets) = self.table.get("secrets") {
            let secrets = secrets
                .as_table()
                .context("`secrets` must be a table of NAME = \"file\"")?;
            for (variable, file) in secrets {
                let file = file
                    .as_str()
                    .with_context(|| format!("secret {variable} must name a file"))?;
                app.secrets
                    .push((variable.clone(), self.relative_to_config(file)));
            }
        }
        // A list replaces the host's list: an app is granted exactly the hosts its entry names.
        if let Some(hosts) = self.strings("allow_outbound")? {
            app.settings.outbound.allowed_hosts = lowercase(hosts);
        }
        Ok(app)
    }

    fn relative_to_config(&self, path: &str) -> PathBuf {
        let path = PathBuf::from(path);
        match self.config_file.parent() {
            Some(dir) if path.is_relative() && !dir.as_os_str().is_empty() => {
                let beside = dir.join(&path);
                // A path that exists from the working directory is taken as it is.
                if path.exists() { path } else { beside }
            }
            _ => path,
        }
    }
}

/// Checks the apps together: unique names, one default at most, no two apps on the same route.
pub fn validate(apps: &[App]) -> Result<()> {
    let mut names = BTreeSet::new();
    for app in apps {
        if !names.insert(app.name.as_str()) {
            bail!("two apps are named `{}`; names must be unique", app.name);
        }
    }
    let defaults: Vec<&str> = apps
        .iter()
        .filter(|app| app.routes.default)
        .map(|app| app.name.as_str())
        .collect();
    if defaults.len() > 1 {
        bail!(
            "more than one default app ({}); at most one app takes the requests no route matches",
            defaults.join(", ")
        );
    }
    for (index, app) in apps.iter().enumerate() {
        for other in &apps[index + 1..] {
            let same_hosts = app.routes.hosts == other.routes.hosts
                || app
                    .routes
                    .hosts
                    .iter()
                    .any(|host| other.routes.hosts.contains(host));
            if same_hosts && app.routes.path == other.routes.path {
                bail!(
                    "apps `{}` and `{}` have the same route (hosts {:?}, path {:?})",
                    app.name,
                    other.name,
                    app.routes.hosts,
                    app.routes.path
                );
            }
        }
        if app.routes.hosts.is_empty() && app.routes.path.is_none() && !app.routes.default {
            bail!(
                "app `{}` has no route: give it `hosts`, a `path`, or make it the `default`",
                app.name
            );
        }
    }
    Ok(())
}

/// The apps to serve: the one component of `host serve COMPONENT.wasm`, or the config file's
/// `[[app]]` entries, each with the host's settings and its own overrides.
pub fn resolve(layered: &Layered, host: &Settings) -> Result<Vec<App>> {
    let declarations = declarations(layered.config.as_ref())?;
    let apps = match layered.args.component.clone() {
        Some(component) if declarations.is_empty() => vec![single(component, host)?],
        None if declarations.is_empty() => bail!(
            "no component to serve: host serve COMPONENT.wasm (or `component`, or [[app]] entries, in the config file)"
        ),
        Some(component) => bail!(
            "{} is given as the component, but the config file declares [[app]] entries: serve one or the other",
            component.display()
        ),
        None => declarations
            .iter()
            .enumerate()
            .map(|(index, declaration)| Ok(declaration.app(layered, host, index)?.0))
            .collect::<Result<Vec<_>>>()?,
    };
    validate(&apps)?;
    Ok(apps)
}

/// `--print-config`: each `[[app]]` entry as it will run: its own keys, and every app setting
/// with its effective value (the host's, or the entry's override).
pub fn print(layered: &Layered, host: &Settings) -> Result<()> {
    let mut entries = Vec::new();
    for (index, declaration) in declarations(layered.config.as_ref())?.iter().enumerate() {
        let (app, matches) = declaration.app(layered, host, index)?;
        let mut entry = toml::Table::new();
        let strings = |items: &[String]| {
            toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect())
        };
        entry.insert("name".into(), app.name.clone().into());
        entry.insert(
            "component".into(),
            app.component.display().to_string().into(),
        );
        entry.insert("hosts".into(), strings(&app.routes.hosts));
        if let Some(path) = &app.routes.path {
            entry.insert("path".into(), path.clone().into());
        }
        entry.insert("default".into(), app.routes.default.into());
        let capabilities: Vec<String> = app
            .capabilities
            .iter()
            .map(|capability| capability.name().to_owned())
            .collect();
        entry.insert("capabilities".into(), strings(&capabilities));
        let env: Vec<String> = app.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        entry.insert("env".into(), strings(&env));
        if !app.secrets.is_empty() {
            let secrets = app
                .secrets
                .iter()
                .map(|(name, file)| (name.clone(), file.display().to_string().into()))
                .collect::<toml::Table>();
            entry.insert("secrets".into(), secrets.into());
        }
        for name in AppArgs::names() {
            if let Some(value) = super::setting_value(&matches, &name) {
                entry.insert(name, value);
            }
        }
        // An entry's list replaces the host's rather than adding to it (`resolve`).
        entry.insert(
            "allow_outbound".into(),
            strings(&app.settings.outbound.allowed_hosts),
        );
        entries.push(toml::Value::Table(entry));
    }
    let mut document = toml::Table::new();
    document.insert("app".into(), toml::Value::Array(entries));
    let text = toml::to_string(&document).context("cannot print the apps as TOML")?;
    println!();
    print!("{text}");
    Ok(())
}

/// `/api/` and `api` are both the prefix `/api`.
fn normalized_prefix(path: &str) -> Result<String> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        bail!("`path = {path:?}`: a prefix such as \"/api\"; for every path leave `path` out");
    }
    if trimmed.contains(['?', '#']) {
        bail!("`path = {path:?}`: a prefix is a path, without a query");
    }
    Ok(format!("/{trimmed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_conflicts_and_defaults_are_refused() {
        let two_defaults = [
            App::routed("a", &[], None, true),
            App::routed("b", &[], None, true),
        ];
        assert!(validate(&two_defaults).is_err());
        let same = [
            App::routed("a", &[], Some("/x"), false),
            App::routed("b", &[], Some("/x"), false),
        ];
        assert!(validate(&same).is_err());
        let unroutable = [App::routed("a", &[], None, false)];
        assert!(validate(&unroutable).is_err());
    }

    #[test]
    fn prefixes_are_normalised() {
        assert_eq!(normalized_prefix("api/").unwrap(), "/api");
        assert_eq!(normalized_prefix("/api/").unwrap(), "/api");
        assert!(normalized_prefix("/").is_err());
        assert!(normalized_prefix("/a?b").is_err());
    }
}
