//! The README's flag table and `deploy/config.example.toml`, generated from what the exporter
//! itself knows: the command line clap builds ([`Cli::full_command`]: each flag's doc comment,
//! its environment variable and its default from [`shown_defaults`]), the settings read only
//! from the environment ([`env_only`]) and the tables and keys serde reads ([`FileConfig`]).
//! The tests compare the generated text with the checked-in files;
//! `UPDATE_GOLDEN=1 cargo test --lib config::docs` rewrites them instead.

use std::any::TypeId;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

use super::{Cli, FileConfig, env_only, shown_defaults};

const REFRESH: &str = "UPDATE_GOLDEN=1 cargo test --lib config::docs";
/// Where the README's generated table begins; it ends at [`END`].
fn begin() -> String {
    format!(
        "<!-- BEGIN generated from the flags by src/config/docs.rs ({REFRESH}); edit the doc \
         comments, not this table -->"
    )
}
const END: &str = "<!-- END generated -->";
const EXAMPLE_PATH: &str = "deploy/config.example.toml";

/// Values for the keys whose default is not a value the key takes (none at all, another
/// flag's, or `all`), written as on the command line: the example config shows them,
/// marked as examples. `cost.currency` is one too: it is read only with a price (alone it is
/// refused), so its default is no line to uncomment on its own.
const EXAMPLES: [(&str, &str); 12] = [
    ("qoder.pat-file", "/run/secrets/qoder-pat"),
    ("qoder.session", "sesn_example1,sesn_example2"),
    ("qoder.workspace-id", "your-workspace-id"),
    ("web.config.file", "/etc/qoder-exporter/web-config.yml"),
    ("otlp.endpoint", "http://otel-collector:4318"),
    (
        "otlp.metrics.endpoint",
        "http://otel-collector:4318/v1/metrics",
    ),
    ("otlp.metrics.protocol", "http/protobuf"),
    ("otlp.logs.endpoint", "http://otel-collector:4318/v1/logs"),
    ("otlp.logs.protocol", "http/protobuf"),
    (
        "otlp.logs.event-types",
        "session.error,span.model_request_end",
    ),
    ("cost.credit-price", "0.01"),
    ("cost.currency", "EUR"),
];

/// Keys that are not the flag's name less its table (a list is named in the plural).
const KEYS: [(&str, &str); 1] = [("qoder.session", "sessions")];

/// After a value that is an example, not the default (uncommented, it is a TOML comment).
const EXAMPLE_MARK: &str = "  # an example; ";

/// One flag as the docs show it.
struct Flag {
    arg: Arg,
    long: String,
    heading: String,
    /// As the help shows it (`[default: X]`).
    default: Option<String>,
}

impl Flag {
    /// What the help says after the flag, less the `[default: X]` that `with_defaults` added:
    /// the long help (`--help`) or the short one (`-h`, its first paragraph).
    fn help(&self, long: bool) -> String {
        let help = match (long, self.arg.get_long_help()) {
            (true, Some(l)) => l.to_string(),
            _ => self
                .arg
                .get_help()
                .map(ToString::to_string)
                .unwrap_or_default(),
        };
        match &self.default {
            Some(d) => help
                .strip_suffix(&format!(" [default: {d}]"))
                .unwrap_or_else(|| {
                    panic!("--{}: the help does not end with its default", self.long)
                })
                .to_owned(),
            None => help,
        }
    }

    fn is_switch(&self) -> bool {
        matches!(self.arg.get_action(), ArgAction::SetTrue)
    }

    /// The default's value: what comes before a comma (`1, no sharding`).
    fn default_value(&self) -> Option<&str> {
        let d = self.default.as_deref()?;
        Some(d.split_once(", ").map_or(d, |(v, _)| v))
    }
}

/// The documented flags: those of every subcommand but the subcommands' own (`demo.*`, and
/// those without a namespace, as `--serve`), each once, in the order of the help: by
/// heading, the headings in the order they first appear.
fn flags() -> Vec<Flag> {
    let root = Cli::full_command();
    let shown = shown_defaults();
    let mut out: Vec<Flag> = Vec::new();
    let args = std::iter::once(&root)
        .chain(root.get_subcommands())
        .flat_map(clap::Command::get_arguments);
    for arg in args {
        let Some(long) = arg.get_long() else { continue };
        if !long.contains('.') || long.starts_with("demo.") || out.iter().any(|f| f.long == long) {
            continue;
        }
        out.push(Flag {
            arg: arg.clone(),
            long: long.to_owned(),
            heading: arg.get_help_heading().unwrap_or("Options").to_owned(),
            default: shown
                .iter()
                .find(|(flag, _)| *flag == long)
                .map(|(_, d)| d.clone()),
        });
    }
    let mut headings: Vec<String> = Vec::new();
    for f in &out {
        if !headings.contains(&f.heading) {
            headings.push(f.heading.clone());
        }
    }
    out.sort_by_key(|f| headings.iter().position(|h| *h == f.heading));
    out
}

/// A help text on one line: paragraphs become sentences, the last without its full stop
/// (as the rest of the README's tables).
fn one_line(text: &str) -> String {
    let paragraphs: Vec<&str> = text.split("\n\n").map(str::trim).collect();
    let mut line = String::new();
    for (i, p) in paragraphs.iter().enumerate() {
        if i > 0 {
            if !line.ends_with('.') {
                line.push('.');
            }
            line.push(' ');
        }
        line.push_str(&p.replace('\n', " "));
    }
    line.strip_suffix('.').unwrap_or(&line).to_owned()
}

/// A table cell: a `|` would end it.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

fn code(text: &str) -> String {
    format!("`{text}`")
}

/// The README's flag table: a row per flag and per setting read only from the environment,
/// under a row per help heading.
fn readme_table() -> String {
    let flags = flags();
    let env_only = env_only();
    for e in &env_only {
        assert!(
            flags.iter().any(|f| f.heading == e.heading),
            "({}): no flag has the heading {:?}",
            e.what,
            e.heading
        );
    }
    let mut out = String::from("| flag | env | default | meaning |\n| --- | --- | --- | --- |\n");
    let mut row = |cells: [String; 4]| {
        out.push('|');
        for c in cells {
            match c.as_str() {
                "" => out.push_str(" |"),
                c => out.push_str(&format!(" {} |", cell(c))),
            }
        }
        out.push('\n');
    };
    for (i, f) in flags.iter().enumerate() {
        if i == 0 || flags[i - 1].heading != f.heading {
            row([
                format!("**{}**", f.heading),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        let env = f
            .arg
            .get_env()
            .map(|e| code(&e.to_string_lossy()))
            .unwrap_or_default();
        let default = match (&f.default, f.default_value()) {
            _ if f.is_switch() => "off".to_owned(),
            (Some(d), Some(v)) => {
                // A single token is a value (backticked); words are said as they are.
                let shown = if v.contains(char::is_whitespace) {
                    v.to_owned()
                } else {
                    code(v)
                };
                format!("{shown}{}", &d[v.len()..])
            }
            _ => "—".to_owned(),
        };
        row([
            code(&format!("--{}", f.long)),
            env,
            default,
            one_line(&f.help(true)),
        ]);
        if flags
            .get(i + 1)
            .is_none_or(|next| next.heading != f.heading)
        {
            for e in env_only.iter().filter(|e| e.heading == f.heading) {
                let vars: Vec<String> = e.vars.iter().map(|v| code(v)).collect();
                row([
                    format!("({})", e.what),
                    vars.join(", "),
                    e.default.clone(),
                    e.meaning.to_owned(),
                ]);
            }
        }
    }
    out
}

/// The tables of the config file, each with its keys, as serde sees [`FileConfig`]: in the
/// order of the structs, a nested table (`otlp.metrics`) after its parent.
fn file_tables() -> Vec<(String, Vec<&'static str>)> {
    let structs = RefCell::new(Vec::new());
    FileConfig::deserialize(FieldNames {
        path: String::new(),
        structs: &structs,
    })
    .expect("FileConfig is made of structs, options, switches and lists");
    let structs = structs.into_inner();
    let is_table = |path: &str| structs.iter().any(|(p, _)| p == path);
    structs
        .iter()
        .filter(|(path, _)| !path.is_empty())
        .map(|(path, fields)| {
            let keys = fields
                .iter()
                .copied()
                .filter(|k| !is_table(&format!("{path}.{k}")))
                .collect();
            (path.clone(), keys)
        })
        .collect()
}

/// A deserializer that records the fields each struct asks for (serde hands them to
/// `deserialize_struct`) and gives every field an empty value: no struct of the config file
/// has to be listed by hand.
struct FieldNames<'a> {
    path: String,
    structs: &'a RefCell<Vec<(String, Vec<&'static str>)>>,
}

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.structs
            .borrow_mut()
            .push((self.path.clone(), fields.to_vec()));
        visitor.visit_map(Fields {
            path: self.path,
            fields: fields.iter(),
            current: "",
            structs: self.structs,
        })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_none()
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_bool(false)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_seq(de::value::SeqDeserializer::<_, Self::Error>::new(
            std::iter::empty::<()>(),
        ))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom(format!(
            "{}: not a table, an option, a switch or a list",
            self.path
        )))
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct newtype_struct tuple tuple_struct map enum identifier ignored_any
    }
}

struct Fields<'a> {
    path: String,
    fields: std::slice::Iter<'static, &'static str>,
    current: &'static str,
    structs: &'a RefCell<Vec<(String, Vec<&'static str>)>>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = de::value::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some(&field) = self.fields.next() else {
            return Ok(None);
        };
        self.current = field;
        seed.deserialize(IntoDeserializer::<Self::Error>::into_deserializer(field))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let path = match self.path.as_str() {
            "" => self.current.to_owned(),
            parent => format!("{parent}.{}", self.current),
        };
        seed.deserialize(FieldNames {
            path,
            structs: self.structs,
        })
    }
}

/// A flag's place in the config file: its table and key.
fn file_key(long: &str, tables: &[(String, Vec<&'static str>)]) -> Option<(String, String)> {
    // The longest table the flag's name starts with: `otlp.metrics`, not `otlp`.
    let (table, _) = tables
        .iter()
        .filter(|(t, _)| long.starts_with(&format!("{t}.")))
        .max_by_key(|(t, _)| t.len())?;
    let key = match KEYS.iter().find(|(flag, _)| *flag == long) {
        Some((_, key)) => (*key).to_owned(),
        None => long[table.len() + 1..].replace('.', "-"),
    };
    Some((table.clone(), key))
}

/// `value`, as the flag takes it, as a TOML value of the type the key has: a switch is a
/// bool, a list (a flag with a delimiter) an array, a string or a path a string, a number a
/// number; a duration is a string unless it is a bare number (milliseconds).
fn toml_value(arg: &Arg, value: &str) -> String {
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return value.to_owned();
    }
    let parser = arg.get_value_parser().type_id();
    let string = parser == TypeId::of::<String>() || parser == TypeId::of::<PathBuf>();
    let one = |v: &str| {
        if string || v.parse::<f64>().is_err() {
            toml::Value::String(v.to_owned()).to_string()
        } else {
            v.to_owned()
        }
    };
    match arg.get_value_delimiter() {
        Some(delimiter) => {
            let items: Vec<String> = value.split(delimiter).map(one).collect();
            format!("[{}]", items.join(", "))
        }
        None => one(value),
    }
}

/// Words wrapped into `# ` comment lines of at most 99 characters.
fn comment(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.chars().count() + 1 + word.chars().count() > 99 && line != "#" {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// `deploy/config.example.toml`: every table, and in it every key, commented out, with its
/// short help and its default (or, where the default is no value of the key, an example).
fn example_config() -> String {
    let tables = file_tables();
    let flags = flags();
    let mut out = comment(
        "The config file (--config.file): every key, commented out, with its default or, where \
         the default is no value the key takes, an example marked as one. Flags and \
         environment variables win over this file. The flag of a key is its table and name \
         (`[web] listen-address` is --web.listen-address, `[otlp.metrics] interval` is \
         --otlp.metrics.interval; `[qoder] sessions` is --qoder.session): `qoder-exporter \
         --help` says more about each.",
    );
    out.push_str(&comment(&format!(
        "Generated from the flags by src/config/docs.rs ({REFRESH}); edit the doc comments, \
         not this file."
    )));
    for (table, _) in &tables {
        out.push_str(&format!("\n[{table}]\n"));
        for f in &flags {
            let Some((t, key)) = file_key(&f.long, &tables) else {
                continue;
            };
            if t != *table {
                continue;
            }
            let example = EXAMPLES.iter().find(|(flag, _)| *flag == f.long);
            let line = match (example, f.default_value()) {
                (Some((_, e)), _) => {
                    let default = match &f.default {
                        Some(d) => format!("default: {d}"),
                        None => "unset by default".to_owned(),
                    };
                    format!("{key} = {}{EXAMPLE_MARK}{default}", toml_value(&f.arg, e))
                }
                (None, _) if f.is_switch() => format!("{key} = false"),
                (None, Some(d)) => format!("{key} = {}", toml_value(&f.arg, d)),
                (None, None) => panic!("--{}: no default; add an example to EXAMPLES", f.long),
            };
            out.push('\n');
            out.push_str(&comment(&f.help(false)));
            out.push_str(&format!("# {line}\n"));
        }
    }
    out
}

/// The example with its `# key = value` lines uncommented: every one, or only the defaults
/// (not the lines marked as examples).
fn uncomment(example: &str, examples_too: bool) -> String {
    let is_key = |line: &str| {
        line.split_once(" = ").is_some_and(|(key, _)| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        })
    };
    let mut out = String::new();
    for line in example.lines() {
        let line = match line.strip_prefix("# ") {
            Some(kv) if is_key(kv) && (examples_too || !kv.contains(EXAMPLE_MARK)) => kv,
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The checked-in text at `path` is `generated`, or (`UPDATE_GOLDEN=1`) becomes it.
fn assert_generated(path: &Path, checked_in: &str, generated: &str, what: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, generated).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    if checked_in == generated {
        return;
    }
    let old: Vec<&str> = checked_in.lines().collect();
    let new: Vec<&str> = generated.lines().collect();
    let diff: Vec<String> = (0..old.len().max(new.len()))
        .filter(|&i| old.get(i) != new.get(i))
        .take(6)
        .map(|i| {
            format!(
                "line {}:\n- {}\n+ {}",
                i + 1,
                old.get(i).unwrap_or(&""),
                new.get(i).unwrap_or(&"")
            )
        })
        .collect();
    panic!(
        "{what} is not what the flags say; regenerate it ({REFRESH}) and review the diff:\n{}",
        diff.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::config::tests::flags as parse;

    fn repo(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    #[test]
    fn the_readme_table_and_the_example_config_are_generated_from_the_flags() {
        // The help is the source: both help texts end with the default the code applies.
        for f in flags() {
            if let Some(d) = &f.default {
                let suffix = format!(" [default: {d}]");
                let short = f
                    .arg
                    .get_help()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                assert!(short.ends_with(&suffix), "--{}: -h says {short:?}", f.long);
                if let Some(long) = f.arg.get_long_help() {
                    assert!(
                        long.to_string().ends_with(&suffix),
                        "--{}: --help says {long:?}",
                        f.long
                    );
                }
            }
        }
        let path = repo("README.md");
        let readme = std::fs::read_to_string(&path).expect("README.md");
        let begin = begin();
        let (before, rest) = readme
            .split_once(&begin)
            .expect("the README marks where its flag table begins (BEGIN)");
        let (_, after) = rest
            .split_once(END)
            .expect("the README marks where its flag table ends (END)");
        let generated = format!("{before}{begin}\n{}{END}{after}", readme_table());
        assert_generated(&path, &readme, &generated, "README.md's flag table");
        let path = repo(EXAMPLE_PATH);
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert_generated(&path, &checked_in, &example_config(), EXAMPLE_PATH);
    }

    #[test]
    fn the_example_config_has_every_key_and_reads() {
        // Every key of the file, and only those (FileConfig denies unknown keys), each with a
        // value of its type.
        let tables = file_tables();
        let keyed: Vec<(String, String)> = flags()
            .iter()
            .filter(|f| f.long != "config.file")
            .map(|f| {
                file_key(&f.long, &tables)
                    .unwrap_or_else(|| panic!("--{}: no table of the config file", f.long))
            })
            .collect();
        for (table, keys) in &tables {
            for key in keys {
                assert!(
                    keyed.iter().any(|(t, k)| t == table && k == key),
                    "[{table}] {key}: no flag has this key"
                );
            }
        }
        let all = uncomment(&example_config(), true);
        let lines = all
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
            .count();
        assert_eq!(lines, keyed.len(), "a line per key:\n{all}");
        toml::from_str::<FileConfig>(&all).unwrap_or_else(|e| panic!("{e}\n{all}"));
        // The README's short example, which points to the full one, reads too.
        let readme = std::fs::read_to_string(repo("README.md")).expect("README.md");
        let example = readme
            .split("example `config.toml`:")
            .nth(1)
            .and_then(|r| r.split("```toml\n").nth(1))
            .and_then(|r| r.split("```").next())
            .expect("an example config in the README");
        toml::from_str::<FileConfig>(example).expect("the README's example config reads");
    }

    #[test]
    fn the_example_config_says_the_defaults_the_code_uses() {
        // Every default of the example uncommented changes nothing, with the signals that are
        // off by default off and on (so their defaults are read too).
        let defaults = uncomment(&example_config(), false);
        let set = defaults
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "));
        assert!(set.count() >= 30, "{defaults}");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("defaults.toml");
        std::fs::write(&path, &defaults).expect("write");
        let file = path.to_str().expect("utf-8");
        for args in [&[][..], &crate::config::tests::ALL_ON[..]] {
            let without = Settings::resolve(parse(args)).expect("resolves");
            let with_file: Vec<&str> = args
                .iter()
                .copied()
                .chain(["--config.file", file])
                .collect();
            let with = Settings::resolve(parse(&with_file))
                .unwrap_or_else(|e| panic!("{e:#}\n{defaults}"));
            assert_eq!(format!("{with:?}"), format!("{without:?}"), "{args:?}");
        }
    }
}
