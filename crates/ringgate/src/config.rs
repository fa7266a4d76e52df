//! Where settings come from: flag > environment (`RINGGATE_<FLAG>`) > TOML file
//! (`--config`) > default.
//!
//! The command line (clap, with an `env` name on every setting) is the schema.
//! A file is applied as extra arguments for exactly the settings whose value
//! still comes from a default, so every value, whatever its layer, goes through
//! the same parser and the same checks. Keys are the flag names
//! (`max-connections = 100000`); an unknown key is an error naming it and its line.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// Arguments that are not settings: they never come from a file.
const NOT_SETTINGS: &[&str] = &["config", "print_config", "help", "version"];

/// Why the configuration could not be loaded.
pub enum LoadError {
    /// A command-line problem clap reports itself (and --help, --version).
    Clap(clap::Error),
    /// A problem with the file, in one line.
    File(String),
}

/// The effective settings and where they came from.
pub struct Loaded {
    pub cli: Cli,
    pub matches: ArgMatches,
}

/// Parses `args`, the environment and the `--config` file, in that precedence.
pub fn load(args: Vec<OsString>) -> Result<Loaded, LoadError> {
    let command = Cli::command();
    let first = command
        .clone()
        .try_get_matches_from(&args)
        .map_err(LoadError::Clap)?;
    let path = first.get_one::<std::path::PathBuf>("config").cloned();
    let matches = match path {
        None => first,
        Some(path) => {
            let (extra, text) = file_arguments(&path, &first)?;
            let mut all = args;
            all.extend(extra);
            command
                .try_get_matches_from(&all)
                .map_err(|e| LoadError::File(file_value_error(&path, &text, &e)))?
        }
    };
    let cli = Cli::from_arg_matches(&matches).map_err(LoadError::Clap)?;
    Ok(Loaded { cli, matches })
}

/// `RINGGATE_*` variables in `vars` that no flag reads (a typo, or a setting
/// that does not exist), sorted: reported, as a file's unknown keys are.
pub fn unknown_variables(vars: impl Iterator<Item = (OsString, OsString)>) -> Vec<String> {
    let command = Cli::command();
    let known: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    let mut unknown: Vec<String> = vars
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .filter(|name| name.starts_with("RINGGATE_") && !known.contains(name))
        .collect();
    unknown.sort();
    unknown
}

/// The arguments a config file adds: one per key whose setting is still at its default.
fn file_arguments(path: &Path, matches: &ArgMatches) -> Result<(Vec<OsString>, String), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadError::File(format!(
            "cannot read the config file {}: {e}",
            path.display()
        ))
    })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(0, |span| {
            text[..span.start.min(text.len())].matches('\n').count() + 1
        });
        LoadError::File(format!(
            "{}:{line}: not valid TOML: {}",
            path.display(),
            e.message().trim()
        ))
    })?;
    let command = Cli::command();
    let mut extra = Vec::new();
    for (key, value) in &table {
        if value.is_table() {
            let line = text
                .lines()
                .position(|l| l.trim() == format!("[{key}]"))
                .map_or(0, |i| i + 1);
            return Err(LoadError::File(format!(
                "{}:{line}: `[{key}]` is a table; settings are top-level keys named like the flags (see --help)",
                path.display()
            )));
        }
        let at = || format!("{}:{}", path.display(), line_of(&text, key));
        let arg = command
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(key.as_str()) && !NOT_SETTINGS.contains(&a.get_id().as_str())
            })
            .ok_or_else(|| {
                LoadError::File(format!(
                    "{}: unknown key `{key}` (keys are the flag names, see --help)",
                    at()
                ))
            })?;
        // A flag or variable wins over the file: for this setting, and for
        // any setting this one conflicts with (`--control-token` given, the
        // file's `control-token-file` is not a conflict but a lower layer).
        let overridden = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        // (A conflict is declared on one side only: look both ways.)
        let conflicts = |a: &clap::Arg, b: &clap::Arg| {
            command
                .get_arg_conflicts_with(a)
                .iter()
                .any(|c| c.get_id() == b.get_id())
        };
        if overridden(arg.get_id().as_str())
            || command.get_arguments().any(|other| {
                (conflicts(arg, other) || conflicts(other, arg))
                    && overridden(other.get_id().as_str())
            })
        {
            continue;
        }
        let flag = format!("--{key}");
        match (value, arg.get_action()) {
            (toml::Value::Boolean(on), ArgAction::SetTrue) => {
                if *on {
                    extra.push(flag.into());
                }
            }
            (toml::Value::Integer(n), ArgAction::Count) => {
                extra.extend((0..*n).map(|_| OsString::from(&flag)));
            }
            (toml::Value::String(s), ArgAction::Set) => extra.push(format!("{flag}={s}").into()),
            (toml::Value::Integer(n), ArgAction::Set) => extra.push(format!("{flag}={n}").into()),
            (toml::Value::Float(x), ArgAction::Set) => extra.push(format!("{flag}={x}").into()),
            (other, _) => {
                return Err(LoadError::File(format!(
                    "{}: `{key}` cannot be {} (expected {})",
                    at(),
                    other.type_str(),
                    expected(arg.get_action())
                )))
            }
        }
    }
    Ok((extra, text))
}

fn expected(action: &ArgAction) -> &'static str {
    match action {
        ArgAction::SetTrue => "true or false",
        ArgAction::Count => "a whole number",
        _ => "a string or a number",
    }
}

/// The 1-based line where `key` is assigned (0 if not found).
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            let rest = line
                .strip_prefix(key)
                .or_else(|| line.strip_prefix(&format!("\"{key}\"")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

/// A file's value clap refused, with its line and, for a choice, the allowed values.
fn file_value_error(path: &Path, text: &str, e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let key = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg
            .trim_start_matches("--")
            .split([' ', '='])
            .next()
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    };
    let mut msg = format!(
        "{}:{}: {}",
        path.display(),
        line_of(text, &key),
        first_line(&e.to_string()).trim_start_matches("error: ")
    );
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        msg.push_str(&format!(" (allowed: {})", valid.join(", ")));
    }
    msg
}

fn first_line(text: &str) -> &str {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim_start_matches("error: ")
}

/// The effective settings as a TOML table (sorted by key). Settings
/// with no value (an unset optional) are left out.
pub fn effective(matches: &ArgMatches) -> toml::Table {
    let mut table = toml::Table::new();
    for arg in Cli::command().get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_SETTINGS.contains(&id) {
            continue;
        }
        let Some(key) = arg.get_long() else { continue };
        let value = match arg.get_action() {
            ArgAction::SetTrue => toml::Value::Boolean(matches.get_flag(id)),
            ArgAction::Count => toml::Value::Integer(i64::from(matches.get_count(id))),
            _ => match matches.get_raw(id).and_then(|mut v| v.next()) {
                Some(raw) => {
                    let raw = raw.to_string_lossy();
                    match raw.parse::<i64>() {
                        Ok(n) => toml::Value::Integer(n),
                        Err(_) => toml::Value::String(raw.into_owned()),
                    }
                }
                None => continue,
            },
        };
        table.insert(key.to_string(), value);
    }
    table
}

/// `--print-config`: the effective settings as a TOML file.
pub fn print(matches: &ArgMatches) -> String {
    let mut out = String::from(
        "# ringgate effective configuration (flag > RINGGATE_* > file > default).\n# Unset: shards (one per CPU), max-connections (what the rings hold), client-publish (off), control-token (none), metrics (off), broker (embedded).\n",
    );
    out.push_str(
        &toml::to_string(&effective(matches)).expect("a table of plain values serialises"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_with(file: &str, args: &[&str]) -> Result<Loaded, String> {
        let mut f = tempfile_in_target();
        f.1.write_all(file.as_bytes()).unwrap();
        let mut argv: Vec<OsString> =
            vec!["ringgate".into(), "--config".into(), f.0.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let result = load(argv).map_err(|e| match e {
            LoadError::Clap(e) => e.to_string(),
            LoadError::File(m) => m,
        });
        let _ = std::fs::remove_file(&f.0);
        result
    }

    fn tempfile_in_target() -> (String, std::fs::File) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringgate-config-test-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&path).unwrap();
        (path.to_string_lossy().into_owned(), file)
    }

    #[test]
    fn the_file_fills_in_defaults_and_flags_win() {
        let file = "max-connections = 1000\nping-interval = \"5s\"\nidle-timeout = 30\necho = true\nmax-frame-size = \"32KiB\"\n";
        let cli = load_with(file, &["--max-connections", "7"]).unwrap().cli;
        assert_eq!(cli.max_connections, Some(7), "a flag beats the file");
        assert_eq!(cli.ping_interval, std::time::Duration::from_secs(5));
        assert_eq!(cli.idle_timeout, std::time::Duration::from_secs(30));
        assert!(cli.echo);
        assert_eq!(cli.max_frame_size, 32 * 1024);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let err = load_with("echo = true\n\nmax-conections = 5\n", &[])
            .err()
            .unwrap();
        assert!(err.contains(":3: unknown key `max-conections`"), "{err}");
        let err = load_with("echo = \"yes\"\n", &[]).err().unwrap();
        assert!(err.contains(":1: `echo` cannot be string"), "{err}");
        let err = load_with("max-frame-size = \"lots\"\n", &[]).err().unwrap();
        assert!(err.contains("invalid size"), "{err}");
        let err = load_with("not toml at all [", &[]).err().unwrap();
        assert!(err.contains("not valid TOML"), "{err}");
        let err = load_with("config = \"x.toml\"\n", &[]).err().unwrap();
        assert!(err.contains("unknown key `config`"), "{err}");
    }

    #[test]
    fn unknown_variables_are_named_and_known_ones_are_not() {
        let vars = [
            ("RINGGATE_MAX_CONECTIONS", "1"),
            ("RINGGATE_ECHO", "1"),
            ("RINGGATE_VERBOSE", "1"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        assert_eq!(
            unknown_variables(vars.into_iter()),
            vec!["RINGGATE_MAX_CONECTIONS".to_string()]
        );
    }

    #[test]
    fn printed_configuration_loads_back_to_the_same_settings() {
        let original = load(vec![
            "ringgate".into(),
            "--echo".into(),
            "--max-connections".into(),
            "99".into(),
        ])
        .ok()
        .unwrap();
        let printed = print(&original.matches);
        let reloaded = load_with(&printed, &[]).unwrap();
        assert_eq!(effective(&reloaded.matches), effective(&original.matches));
        assert_eq!(reloaded.cli.max_connections, Some(99));
        assert!(reloaded.cli.echo);
    }
}
