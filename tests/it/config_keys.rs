//! Each config key is declared once (`src/config/keys.rs`), and every place
//! that knows the keys agrees with that declaration: the parser (what
//! `check-config` accepts), the example that `print-config` prints and
//! `systemd/skillsync.example.toml` keeps, the README's key table and the
//! `skillsync.toml(5)` page. A key documented but not declared, or declared
//! but not documented (or not parsed), fails here, naming the key.
//!
//! The README table and the example file are generated text kept in the
//! repository: `SKILLSYNC_BLESS=1 cargo test --test it config_keys` rewrites
//! both from the declarations.

use std::collections::BTreeSet;
use std::path::Path;

use skillsync::config::{
    Config, ConfigKey, EXAMPLE_CONFIG, KEYS, KeyDefault, KeyKind, README_TABLE_END,
    README_TABLE_START, SECTIONS, Show, render_readme_table,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn bless() -> bool {
    std::env::var("SKILLSYNC_BLESS").as_deref() == Ok("1")
}

/// Every declared key as `section.name` (`reporting.job.NAME` for a name of
/// the user's choosing).
fn declared() -> BTreeSet<String> {
    KEYS.iter().map(|k| k.path()).collect()
}

/// `section.key` as the declarations name it: a key of a section whose keys
/// the user names (report columns) is that section's `NAME`.
fn as_declared(key: &str) -> String {
    match key.rsplit_once('.') {
        Some((section, _))
            if KEYS
                .iter()
                .any(|k| k.section == section && k.kind == KeyKind::Column) =>
        {
            format!("{section}.NAME")
        }
        _ => key.to_string(),
    }
}

/// The keys `place` knows and the declarations do not, and the other way
/// round, each named with the side it is missing from.
fn drift(place: &str, known: &BTreeSet<String>) -> Vec<String> {
    let declared = declared();
    let mut wrong: Vec<String> = known
        .difference(&declared)
        .map(|k| format!("{k} (in {place}, not declared)"))
        .collect();
    wrong.extend(
        declared
            .difference(known)
            .map(|k| format!("{k} (declared, not in {place})")),
    );
    wrong
}

/// A minimal valid config: one tenant, every other key left out.
fn minimal(server_extra: &str, tenant_extra: &str, postgres: &str) -> String {
    format!(
        "{server_extra}\n[[tenant]]\nname = \"acme\"\nwebhook_secrets = [\"a-long-secret\"]\n\
         api_base = \"https://a.example.com\"\nextraction_base = \"https://b.example.com\"\n\
         app_tenant = \"t\"\napp_id = \"i\"\napp_secret = \"s\"\n{tenant_extra}\n{postgres}"
    )
}

/// The names a table of the parser accepts, from its own words: an unknown
/// key is refused with "unknown field `x`, expected one of `a`, `b`, …".
fn parsed_fields(section: Option<&str>) -> BTreeSet<String> {
    let probe = "zz_probe = 1\n";
    let text = match section {
        None => format!("{probe}{}", minimal("", "", "")),
        Some("tenant") => minimal("", probe, ""),
        Some("postgres") => minimal(
            "",
            "",
            &format!("[postgres]\nurl = \"postgres://u@h/db\"\n{probe}"),
        ),
        Some(s) => minimal(&format!("[{s}]\n{probe}"), "", ""),
    };
    let e = Config::from_toml(&text, None)
        .err()
        .unwrap_or_else(|| panic!("{section:?}: an unknown key was accepted"));
    assert!(
        e.message.contains("unknown field `zz_probe`"),
        "{section:?}: {e}"
    );
    let expected = e
        .message
        .split_once("expected")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("{section:?}: no list of fields in {e}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_parser_reads_exactly_the_declared_keys() {
    let mut parsed = BTreeSet::new();
    // The top level: the sections (a section name is its own key there).
    let top: BTreeSet<String> = SECTIONS
        .iter()
        .filter(|s| !s.name.contains('.'))
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(parsed_fields(None), top, "the top-level sections");
    for section in SECTIONS.iter().filter(|s| !s.name.contains('.')) {
        for field in parsed_fields(Some(section.name)) {
            let key = format!("{}.{field}", section.name);
            // A sub-table (`[reporting.job]`) is a section, not a key.
            if !SECTIONS.iter().any(|s| s.name == key) {
                parsed.insert(key);
            }
        }
    }
    // A section whose keys the user names takes any name (a column).
    for s in SECTIONS.iter().filter(|s| s.name.contains('.')) {
        let text = minimal(&format!("[{}]\nany_name = \"$.Field\"\n", s.name), "", "");
        Config::from_toml(&text, None).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        parsed.insert(format!("{}.NAME", s.name));
    }
    let wrong = drift("the parser", &parsed);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn each_declared_default_and_range_is_what_validation_applies() {
    let base = Config::from_toml(&minimal("", "", ""), None).expect("a minimal config loads");
    let pg_url = "url = \"postgres://u@h/db\"\n";
    let with_pg = minimal("", "", &format!("[postgres]\n{pg_url}"));
    let pg_base = Config::from_toml(&with_pg, None).expect("with [postgres]");
    // The config with one key set to `value`, and the one it should equal.
    let config_with = |section: &str, name: &str, value: &str| {
        let line = format!("{name} = {value}\n");
        let (text, want) = match section {
            "tenant" => (minimal("", &line, ""), &base),
            "postgres" => (
                minimal("", "", &format!("[postgres]\n{pg_url}{line}")),
                &pg_base,
            ),
            s => (minimal(&format!("[{s}]\n{line}"), "", ""), &base),
        };
        // A key the minimal config sets already (a tenant's name, its
        // secrets, the PostgreSQL url): only the line added here stays.
        let set = format!("{name} = ");
        let lines: Vec<&str> = text.lines().collect();
        let first = lines.iter().position(|l| l.starts_with(&set));
        let last = lines.iter().rposition(|l| l.starts_with(&set));
        let text: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| first == last || Some(*i) != first)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        (text, want)
    };
    // The config with `key = bad` is refused, the error naming the key.
    let refused = |key: &ConfigKey, bad: &str| -> skillsync::config::ConfigError {
        let (text, _) = config_with(key.section, key.name, bad);
        let e = Config::from_toml(&text, None)
            .err()
            .unwrap_or_else(|| panic!("{} = {bad} was accepted", key.path()));
        let named = if key.section == "tenant" {
            key.at(0)
        } else {
            key.path()
        };
        assert_eq!(e.key, named, "{} = {bad}: {e}", key.path());
        e
    };
    let (mut checked, mut shapes) = (0, 0);
    for key in KEYS {
        if let KeyDefault::Value(v) = key.default {
            // Written out, the declared default gives the config a missing key gives.
            let (text, want) = config_with(key.section, key.name, &v.toml());
            let got = Config::from_toml(&text, None)
                .unwrap_or_else(|e| panic!("{} = its default: {e}", key.path()));
            assert_eq!(
                format!("{got:?}"),
                format!("{want:?}"),
                "{}: the declared default {} is not the applied one",
                key.path(),
                v.toml()
            );
            checked += 1;
        }
        // Out of the declared range, or of the wrong shape for the declared kind.
        let wrong: Vec<String> = match key.kind {
            KeyKind::Int { min, max } => vec![(min - 1).to_string(), (max + 1).to_string()],
            KeyKind::Float { min, max } => vec![
                format!("{:?}", min - min.max(0.001) / 2.0),
                format!("{:?}", max * 2.0 + 1.0),
            ],
            KeyKind::Template(_) => vec!["\"/without-its-placeholder\"".into()],
            KeyKind::Names => vec!["[]".into()],
            KeyKind::Schedule => vec!["\"daily\"".into()],
            KeyKind::Address | KeyKind::AddressOrOff => vec!["\"nowhere\"".into()],
            KeyKind::Text if key.default != KeyDefault::Unset("none") => vec!["\"  \"".into()],
            _ => Vec::new(),
        };
        for bad in &wrong {
            let e = refused(key, bad);
            if let KeyKind::Int { min, max } = key.kind {
                assert!(
                    e.message.contains(&format!("between {min} and {max}")),
                    "{}: {e}",
                    key.path()
                );
            }
            shapes += 1;
        }
    }
    assert!(checked > 40, "only {checked} defaults checked");
    assert!(shapes > 60, "only {shapes} wrong values checked");
}

/// Every key the example shows, set or commented, as `section.key`, read
/// with the toml parser: the comment marks are taken off each line that
/// looks like `# key = value` or `# or: key = value`, and the text parsed.
pub fn keys_in_example(example: &str) -> BTreeSet<String> {
    let mut uncommented = String::new();
    for line in example.lines() {
        let t = line.trim_start();
        let body = t.strip_prefix('#').map(str::trim_start).unwrap_or(t);
        let body = body
            .strip_prefix("or:")
            .map(str::trim_start)
            .unwrap_or(body);
        let is_header = body.starts_with('[');
        let is_key = body.split_once('=').is_some_and(|(k, _)| {
            let k = k.trim();
            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        });
        if (is_header || is_key) && !line.starts_with(' ') {
            uncommented.push_str(body.split(" # ").next().unwrap_or(body));
            uncommented.push('\n');
        }
    }
    let doc: toml::Table = uncommented
        .parse()
        .unwrap_or_else(|e| panic!("the uncommented example parses: {e}\n{uncommented}"));
    let mut keys = BTreeSet::new();
    fn walk(prefix: &str, v: &toml::Value, example: &str, keys: &mut BTreeSet<String>) {
        let toml::Value::Table(t) = v else {
            keys.insert(prefix.to_string());
            return;
        };
        for (k, v) in t {
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            // An inline table is a value (`budget = { path, type }`); a
            // sub-table is a section when the example writes it as one.
            let section = matches!(v, toml::Value::Table(_))
                && (prefix.is_empty() || example.contains(&format!("[{name}]")));
            match v {
                toml::Value::Table(_) if section => walk(&name, v, example, keys),
                toml::Value::Array(a) if a.first().is_some_and(|x| x.is_table()) => {
                    for t in a {
                        walk(&name, t, example, keys);
                    }
                }
                _ => {
                    keys.insert(name);
                }
            }
        }
    }
    walk("", &toml::Value::Table(doc), example, &mut keys);
    keys
}

#[test]
fn the_example_shows_exactly_the_declared_keys_and_the_file_is_the_example() {
    let shown: BTreeSet<String> = keys_in_example(&EXAMPLE_CONFIG)
        .iter()
        .map(|k| as_declared(k))
        .collect();
    let wrong = drift("the example", &shown);
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Set keys are set, commented ones commented, alternatives `or:`.
    for key in KEYS.iter().filter(|k| k.kind != KeyKind::Column) {
        let optional = SECTIONS.iter().any(|s| s.name == key.section && s.optional);
        let start = match key.show {
            Show::Set if !optional => format!("\n{} = ", key.name),
            Show::Or => format!("\n# or: {} = ", key.name),
            _ => format!("\n# {} = ", key.name),
        };
        assert!(
            EXAMPLE_CONFIG.contains(&start),
            "{} is not shown as {start:?}",
            key.path()
        );
    }
    // It loads, placeholder secrets and all.
    Config::from_toml(&EXAMPLE_CONFIG, None).expect("the example loads");

    let file = Path::new(ROOT).join("systemd/skillsync.example.toml");
    let kept = std::fs::read_to_string(&file).unwrap_or_default();
    if kept != *EXAMPLE_CONFIG && bless() {
        std::fs::write(&file, EXAMPLE_CONFIG.as_str()).expect("write the example");
        return;
    }
    assert!(
        kept == *EXAMPLE_CONFIG,
        "{} is not what print-config prints; rewrite it with \
         SKILLSYNC_BLESS=1 cargo test --test it config_keys",
        file.display()
    );
}

/// The README's key table: the lines between its markers.
fn readme_table(readme: &str) -> Option<(usize, usize)> {
    let start = readme.find(README_TABLE_START)? + README_TABLE_START.len() + 1;
    let end = readme[start..].find(README_TABLE_END)? + start;
    Some((start, end))
}

#[test]
fn the_readme_documents_exactly_the_declared_keys() {
    let path = Path::new(ROOT).join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let (start, end) = readme_table(&readme).expect("the README has the key table's markers");
    let table = &readme[start..end];
    // The key names in the first column, `tenant[].name` read as `tenant.name`.
    let documented: BTreeSet<String> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|k| k.replace("[]", ""))
        .collect();
    let wrong = drift("the README", &documented);
    let generated = render_readme_table();
    if (table != generated || !wrong.is_empty()) && bless() {
        let updated = format!("{}{generated}{}", &readme[..start], &readme[end..]);
        std::fs::write(&path, updated).expect("write README.md");
        return;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(
        table == generated,
        "the README's key table is not the declared one; rewrite it with \
         SKILLSYNC_BLESS=1 cargo test --test it config_keys"
    );
}

#[test]
fn the_man_page_has_an_entry_for_each_declared_key() {
    let page = skillsync::manpages::config_page_roff("test".into());
    for key in KEYS {
        let at = page
            .find(&format!("\n.TP\n\\fB{}\\fR", key.path()))
            .unwrap_or_else(|| panic!("no entry for {} in skillsync.toml(5)", key.path()));
        let entry = &page[at + 4..];
        let entry = &entry[..entry.find("\n.TP").unwrap_or(entry.len())];
        assert!(
            entry.contains(&format!("default: \\fR{}", key.default).replace('-', "\\-")),
            "{}: {entry}",
            key.path()
        );
    }
    // And no entry for a key that is not declared.
    let entries = page.matches("\n.TP\n\\fB").count();
    assert_eq!(entries, KEYS.len(), "entries on the page");
}
