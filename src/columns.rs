//! `skillsync columns`: surveys the mirrored documents of a type, prints
//! each field (top level and one level nested) with its JSON types and fill
//! rate, which report column already shows it, and the `[reporting]` lines
//! that would add the others. Reads the database read-only; writes nothing.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use crate::config::{Config, UpstreamConfig};
use crate::model::DocType;
use crate::reporting::{ColumnType, ReportSpec, Source, Survey, snake_case};
use crate::store::ReadOnlyStore;

/// Surveys `types` in the database at `path` and prints the result; the
/// error (the CLI prints it and exits 2) says why the database could not be
/// read. A type surveyed before the failure is already printed.
pub fn print_columns(
    path: &Path,
    config: Option<&Config>,
    types: &[DocType],
) -> Result<(), String> {
    let db = ReadOnlyStore::open(path).map_err(|e| e.to_string())?;
    let spec = config
        .map(|c| ReportSpec::new(&c.reporting))
        .unwrap_or_default();
    for (i, ty) in types.iter().enumerate() {
        let mut survey = Survey::default();
        db.survey(*ty, |d| survey.add(d))
            .map_err(|e| format!("cannot read {} from {}: {e}", ty.table(), path.display()))?;
        if i > 0 {
            println!();
        }
        print!(
            "{}",
            render(*ty, &survey, &spec, config.map(|c| &c.upstream), path)
        );
    }
    Ok(())
}

/// What a field is already shown as, if anything.
fn shown_as(
    ty: DocType,
    field: &str,
    spec: &ReportSpec,
    upstream: Option<&UpstreamConfig>,
) -> Option<String> {
    let lower = field.to_lowercase();
    let is = |names: &[String]| names.iter().any(|n| n.to_lowercase() == lower);
    // Without a config, the `[upstream]` defaults.
    let default = UpstreamConfig::default();
    let u = upstream.unwrap_or(&default);
    let ids = [
        "Id".to_string(),
        match ty {
            DocType::Job => u.job_id_field.clone(),
            DocType::Project => u.project_id_field.clone(),
        },
    ];
    if is(&ids) {
        return Some("id".into());
    }
    for c in spec.columns(ty) {
        let hit = match &c.source {
            Source::Table("number") => is(&u.number_fields),
            Source::Table("name") => is(&u.name_fields),
            Source::Table("modified_on") => is(&u.modified_fields),
            Source::Table("version") => is(&u.version_fields),
            Source::Table(_) => false,
            Source::Fields(paths) => paths
                .iter()
                .any(|p| p.to_string().to_lowercase() == format!("$.{lower}")),
        };
        if hit {
            return Some(c.name.clone());
        }
    }
    None
}

fn render(
    ty: DocType,
    survey: &Survey,
    spec: &ReportSpec,
    upstream: Option<&UpstreamConfig>,
    path: &Path,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{ty}: {} live document{} in {}",
        survey.documents,
        if survey.documents == 1 { "" } else { "s" },
        path.display()
    );
    if survey.documents == 0 {
        let _ = writeln!(out, "  (nothing mirrored yet: no fields to show)");
        return out;
    }
    let width = survey
        .fields
        .keys()
        .map(|k| k.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        out,
        "\n  {:width$}  {:28}  {:>7}  report column",
        "field", "JSON types", "filled"
    );
    let mut taken: BTreeSet<String> = spec.columns(ty).iter().map(|c| c.name.clone()).collect();
    taken.extend(["tenant".to_string(), "id".to_string()]);
    let mut lines = Vec::new();
    for (field, stats) in &survey.fields {
        let types = stats
            .types
            .iter()
            .map(|(t, n)| {
                if *n == survey.documents {
                    t.to_string()
                } else {
                    format!("{t} {n}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let filled = 100.0 * stats.filled() as f64 / survey.documents as f64;
        let column = match (shown_as(ty, field, spec, upstream), stats.suggested_type()) {
            (Some(c), _) => c,
            // A field the config's path syntax cannot name (dots, quotes,
            // brackets…) or whose column name would be refused: say so
            // instead of printing a line check-config rejects.
            (None, Some(_))
                if crate::reporting::FieldPath::parse(&format!("$.{field}")).is_err()
                    || !crate::reporting::is_column_name(&snake_case(field)) =>
            {
                "- (name not expressible in [reporting])".into()
            }
            (None, Some(t)) => {
                let base = snake_case(field);
                let mut name = base.clone();
                let mut n = 2;
                while taken.contains(&name) {
                    name = format!("{base}_{n}");
                    n += 1;
                }
                taken.insert(name.clone());
                lines.push(match t {
                    ColumnType::Text => format!("{name} = \"$.{field}\""),
                    t => format!(
                        "{name} = {{ path = \"$.{field}\", type = \"{}\" }}",
                        t.as_str()
                    ),
                });
                format!("+ {name} ({})", t.as_str())
            }
            (None, None) => "-".into(),
        };
        let _ = writeln!(
            out,
            "  {field:width$}  {types:28}  {filled:>6.1}%  {column}"
        );
    }
    if lines.is_empty() {
        let _ = writeln!(
            out,
            "\nEvery field with values already has a report column."
        );
    } else {
        let _ = writeln!(
            out,
            "\nTo show the fields marked + in {ty}_report, add to the config (then restart serve):\n\n[reporting.{ty}]"
        );
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
    }
    out
}
