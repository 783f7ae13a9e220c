//! Report columns: which typed columns `job_report` and `project_report`
//! show, where each value comes from in a document, and how it is typed;
//! plus the field survey behind `skillsync columns`, and the text of the
//! report and stage views, written once for SQLite and PostgreSQL
//! ([`report_view_sql`], [`stages_view_sql`]). Pure: no I/O, nothing runs
//! SQL here (the store and the PostgreSQL mirror run what this writes).
//!
//! Values are taken at write time, in Rust, with the same case-insensitive
//! "first present wins" rule as the `number`/`name`/`modified_on` columns,
//! because the view SQL must give the same answers in sqlite3, Datasette and
//! DuckDB, and DuckDB runs a SQLite view's SQL itself: its `json_extract`
//! returns quoted JSON, a `CAST` of a bad value aborts the query, and no date
//! function means the same in both dialects (README, "Reporting").

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::model::{DocType, fmt_ts, get_ci, parse_upstream_ts};

/// How a report column is typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ColumnType {
    Text,
    Integer,
    Real,
    /// RFC 3339 UTC text with milliseconds, like every time in the database.
    Timestamp,
}

impl ColumnType {
    pub fn parse(s: &str) -> Option<ColumnType> {
        match s {
            "text" => Some(ColumnType::Text),
            "integer" => Some(ColumnType::Integer),
            "real" => Some(ColumnType::Real),
            "timestamp" => Some(ColumnType::Timestamp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Integer => "integer",
            ColumnType::Real => "real",
            ColumnType::Timestamp => "timestamp",
        }
    }

    /// The declared SQL type (readers such as DuckDB and Metabase type the column by it).
    pub fn sql_type(self) -> &'static str {
        match self {
            ColumnType::Text | ColumnType::Timestamp => "TEXT",
            ColumnType::Integer => "INTEGER",
            ColumnType::Real => "REAL",
        }
    }
}

/// A field of a document: `$.X` or `$.X.Y`, each name matched case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Parses `$.X` or `$.X.Y`; a bare `X` is taken as `$.X`.
    pub fn parse(s: &str) -> Result<FieldPath, String> {
        let body = s.strip_prefix("$.").unwrap_or(s);
        let parts: Vec<String> = body.split('.').map(str::to_string).collect();
        let ok_part = |p: &String| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == ' ')
                && p.trim() == p
        };
        if parts.len() > 2 || !parts.iter().all(ok_part) {
            return Err(format!(
                "`{s}` is not a field path: write \"$.Field\" or \"$.Field.Nested\" (letters, digits, _ - and spaces)"
            ));
        }
        Ok(FieldPath(parts))
    }

    pub fn single(name: &str) -> FieldPath {
        FieldPath(vec![name.to_string()])
    }

    /// The value at this path: each name exact first, else case-insensitively.
    pub fn lookup<'a>(&self, doc: &'a Map<String, Value>) -> Option<&'a Value> {
        let mut v = get_ci(doc, &self.0[0])?;
        for part in &self.0[1..] {
            v = get_ci(v.as_object()?, part)?;
        }
        Some(v)
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "$.{}", self.0.join("."))
    }
}

/// One `[reporting.job]` / `[reporting.project]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredColumn {
    pub name: String,
    pub path: FieldPath,
    pub ty: ColumnType,
}

/// The `[reporting]` section, validated. Its `Default` (no `[reporting]`)
/// is in `config`, beside the declaration of `reporting.stage_field`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportingConfig {
    /// The field whose changes make `job_stages` / `project_stages`.
    pub stage_field: FieldPath,
    pub job: Vec<ConfiguredColumn>,
    pub project: Vec<ConfiguredColumn>,
}

/// Column names no configuration may take: the view's key.
pub const RESERVED_COLUMNS: [&str; 2] = ["tenant", "id"];

/// `name` as a quoted SQL identifier (SQLite and PostgreSQL alike).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// True for a snake_case SQL identifier (`budget`, `stage_type2`).
pub fn is_column_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

/// Where a report column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A column the mirror table already extracts (`number`, `name`, `modified_on`, `version`).
    Table(&'static str),
    /// Candidate fields, first present wins.
    Fields(Vec<FieldPath>),
}

/// One column of a report view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportColumn {
    pub name: String,
    pub source: Source,
    pub ty: ColumnType,
}

/// Everything the store needs to maintain the report views: the resolved
/// columns of both types and the stage field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSpec {
    pub stage_field: FieldPath,
    pub job: Vec<ReportColumn>,
    pub project: Vec<ReportColumn>,
}

impl Default for ReportSpec {
    fn default() -> Self {
        ReportSpec::new(&ReportingConfig::default())
    }
}

impl ReportSpec {
    /// The default columns (SPEC order), with configured columns replacing a
    /// default of the same name in place or appended after them.
    pub fn new(cfg: &ReportingConfig) -> ReportSpec {
        ReportSpec {
            stage_field: cfg.stage_field.clone(),
            job: resolve(DocType::Job, &cfg.stage_field, &cfg.job),
            project: resolve(DocType::Project, &cfg.stage_field, &cfg.project),
        }
    }

    pub fn columns(&self, ty: DocType) -> &[ReportColumn] {
        match ty {
            DocType::Job => &self.job,
            DocType::Project => &self.project,
        }
    }

    /// The select list of the `{ty}_report` view, the same in SQLite and
    /// PostgreSQL: table columns from the document row `d`, extracted
    /// values from the values row `v`, each named as configured.
    pub fn view_select_list(&self, ty: DocType) -> Vec<String> {
        self.columns(ty)
            .iter()
            .map(|c| match &c.source {
                Source::Table(col) => format!("d.{col} AS {}", quote_ident(&c.name)),
                Source::Fields(_) => {
                    let name = quote_ident(&c.name);
                    format!("v.{name} AS {name}")
                }
            })
            .collect()
    }

    /// The columns whose values the store keeps beside the documents.
    pub fn stored_columns(
        &self,
        ty: DocType,
    ) -> impl Iterator<Item = (&ReportColumn, &[FieldPath])> {
        self.columns(ty).iter().filter_map(|c| match &c.source {
            Source::Fields(paths) => Some((c, paths.as_slice())),
            Source::Table(_) => None,
        })
    }

    /// The stored values of one document, in [`ReportSpec::stored_columns`] order.
    pub fn values(&self, ty: DocType, doc: &Map<String, Value>) -> Vec<Typed> {
        self.stored_columns(ty)
            .map(|(c, paths)| extract(doc, paths, c.ty))
            .collect()
    }

    /// The stage of one document (text, first present wins).
    pub fn stage(&self, doc: &Map<String, Value>) -> Option<String> {
        match extract(
            doc,
            std::slice::from_ref(&self.stage_field),
            ColumnType::Text,
        ) {
            Typed::Text(s) => Some(s),
            _ => None,
        }
    }
}

fn resolve(ty: DocType, stage: &FieldPath, configured: &[ConfiguredColumn]) -> Vec<ReportColumn> {
    let fields =
        |names: &[&str]| Source::Fields(names.iter().map(|n| FieldPath::single(n)).collect());
    let mut cols = vec![
        ReportColumn {
            name: "number".into(),
            source: Source::Table("number"),
            ty: ColumnType::Text,
        },
        ReportColumn {
            name: "name".into(),
            source: Source::Table("name"),
            ty: ColumnType::Text,
        },
        ReportColumn {
            name: "client".into(),
            source: fields(&["Client"]),
            ty: ColumnType::Text,
        },
        ReportColumn {
            name: "stage".into(),
            source: Source::Fields(vec![stage.clone()]),
            ty: ColumnType::Text,
        },
    ];
    if ty == DocType::Job {
        cols.push(ReportColumn {
            name: "project_id".into(),
            source: fields(&["ProjectId"]),
            ty: ColumnType::Text,
        });
    }
    cols.extend([
        ReportColumn {
            name: "created_on".into(),
            source: fields(&["CreatedOn", "CreatedOnUtc", "CreatedAt"]),
            ty: ColumnType::Timestamp,
        },
        ReportColumn {
            name: "modified_on".into(),
            source: Source::Table("modified_on"),
            ty: ColumnType::Timestamp,
        },
        ReportColumn {
            name: "start_date".into(),
            source: fields(&["StartDate"]),
            ty: ColumnType::Timestamp,
        },
        ReportColumn {
            name: "end_date".into(),
            source: fields(&["EndDate"]),
            ty: ColumnType::Timestamp,
        },
        ReportColumn {
            name: "version".into(),
            source: Source::Table("version"),
            ty: ColumnType::Integer,
        },
    ]);
    for c in configured {
        let col = ReportColumn {
            name: c.name.clone(),
            source: Source::Fields(vec![c.path.clone()]),
            ty: c.ty,
        };
        match cols.iter_mut().find(|x| x.name == c.name) {
            Some(existing) => *existing = col,
            None => cols.push(col),
        }
    }
    cols
}

/// A typed value as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Typed {
    Null,
    Text(String),
    Integer(i64),
    Real(f64),
}

/// The first candidate present in `doc` (a string, number or boolean), typed;
/// NULL when none is present or the first present one does not convert.
pub fn extract(doc: &Map<String, Value>, paths: &[FieldPath], ty: ColumnType) -> Typed {
    let Some(v) = paths.iter().find_map(|p| {
        p.lookup(doc)
            .filter(|v| v.is_string() || v.is_number() || v.is_boolean())
    }) else {
        return Typed::Null;
    };
    let converted = match (ty, v) {
        (ColumnType::Text, Value::String(s)) => Some(Typed::Text(s.clone())),
        (ColumnType::Text, other) => Some(Typed::Text(other.to_string())),
        (ColumnType::Integer, Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            })
            .map(Typed::Integer),
        (ColumnType::Integer, Value::String(s)) => s.trim().parse().ok().map(Typed::Integer),
        (ColumnType::Integer, Value::Bool(b)) => Some(Typed::Integer(i64::from(*b))),
        (ColumnType::Real, Value::Number(n)) => n.as_f64().map(Typed::Real),
        (ColumnType::Real, Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Typed::Real),
        (ColumnType::Timestamp, Value::String(s)) => parse_timestamp(s).map(Typed::Text),
        _ => None,
    };
    converted.unwrap_or(Typed::Null)
}

/// An upstream time as table text; a bare date is midnight UTC.
fn parse_timestamp(s: &str) -> Option<String> {
    parse_upstream_ts(s).map(fmt_ts).or_else(|| {
        chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| fmt_ts(t.and_utc()))
    })
}

/// `ProjectId` → `project_id`, `Budget.Amount` → `budget_amount`.
pub fn snake_case(field: &str) -> String {
    let mut out = String::new();
    let mut prev: Option<char> = None;
    let chars: Vec<char> = field.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_alphanumeric() {
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if c.is_ascii_uppercase()
                && matches!(prev, Some(p) if p.is_ascii_lowercase() || p.is_ascii_digit()
                    || (p.is_ascii_uppercase() && next_lower))
                && !out.ends_with('_')
            {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
        prev = Some(c);
    }
    let out = out.trim_end_matches('_').to_string();
    match out.chars().next() {
        Some(c) if c.is_ascii_lowercase() => out,
        Some(_) => format!("f_{out}"),
        None => "field".into(),
    }
}

/// What `skillsync columns` learned about one field.
#[derive(Debug, Clone, Default)]
pub struct FieldStats {
    /// JSON type name → documents where the field had it.
    pub types: BTreeMap<&'static str, u64>,
    /// Strings that read as a time.
    pub timestamps: u64,
    /// Integers, or strings that read as one.
    pub integers: u64,
}

impl FieldStats {
    /// Documents where the field is present and not null.
    pub fn filled(&self) -> u64 {
        self.types
            .iter()
            .filter(|(t, _)| **t != "null")
            .map(|(_, n)| n)
            .sum()
    }

    /// The column type to suggest: timestamp when every value reads as a
    /// time, integer when every value is whole, real for numbers, else text.
    pub fn suggested_type(&self) -> Option<ColumnType> {
        let filled = self.filled();
        let only = |names: &[&str]| {
            self.types
                .iter()
                .filter(|(t, _)| **t != "null")
                .all(|(t, _)| names.contains(t))
        };
        if filled == 0 || !only(&["string", "number", "boolean"]) {
            return None;
        }
        if only(&["string"]) && self.timestamps == filled {
            Some(ColumnType::Timestamp)
        } else if only(&["number"]) && self.integers == filled {
            Some(ColumnType::Integer)
        } else if only(&["number"]) {
            Some(ColumnType::Real)
        } else {
            Some(ColumnType::Text)
        }
    }
}

/// A survey of documents: per field (`X`, and `X.Y` one level down, names
/// grouped case-insensitively under the first spelling seen).
#[derive(Debug, Clone, Default)]
pub struct Survey {
    pub documents: u64,
    pub fields: BTreeMap<String, FieldStats>,
    /// Lower-cased name → the spelling shown.
    spelling: BTreeMap<String, String>,
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl Survey {
    /// Counts one document's fields.
    pub fn add(&mut self, doc: &Map<String, Value>) {
        self.documents += 1;
        for (k, v) in doc {
            self.count(k.clone(), v);
            if let Value::Object(inner) = v {
                for (k2, v2) in inner {
                    self.count(format!("{k}.{k2}"), v2);
                }
            }
        }
    }

    fn count(&mut self, name: String, v: &Value) {
        let shown = self
            .spelling
            .entry(name.to_lowercase())
            .or_insert(name)
            .clone();
        let stats = self.fields.entry(shown).or_default();
        *stats.types.entry(json_type(v)).or_default() += 1;
        match v {
            Value::String(s) if parse_timestamp(s).is_some() => stats.timestamps += 1,
            Value::Number(n) if n.is_i64() || n.is_u64() => stats.integers += 1,
            _ => {}
        }
    }
}

/// The SQL dialects the shared view text is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlDialect {
    /// SQLite's view, which older sqlite3, Datasette and DuckDB also parse.
    Sqlite,
    Postgres,
}

/// `CREATE VIEW {prefix}{ty}_report`: the live documents of a type with one
/// typed column per report column ([`ReportSpec::view_select_list`]), the
/// one text both databases' report views come from (`prefix` as for
/// [`stages_view_sql`]; only PostgreSQL's ends with `;`).
pub fn report_view_sql(
    spec: &ReportSpec,
    dialect: SqlDialect,
    ty: DocType,
    prefix: &str,
) -> String {
    format!(
        "CREATE VIEW {prefix}{ty}_report AS\nSELECT d.tenant AS tenant, d.id AS id,\n       {}\nFROM {prefix}{} AS d\nLEFT JOIN {prefix}{ty}_report_values AS v ON v.tenant = d.tenant AND v.id = d.id\nWHERE d.deleted_at IS NULL{}",
        spec.view_select_list(ty).join(",\n       "),
        ty.table(),
        match dialect {
            SqlDialect::Sqlite => "",
            SqlDialect::Postgres => ";\n",
        }
    )
}

/// `CREATE VIEW {prefix}{ty}_stages`: each stay of a document in a stage,
/// from the stage recorded for each revision (`document_stages`), with when
/// it entered and left it. The one text both databases' views come from:
/// the store's (SQLite, `prefix` empty) and the PostgreSQL mirror's
/// (`prefix` the quoted schema and a dot). They differ only where a
/// dialect must: SQLite's spells "NULLs compare equal" and `coalesce` as
/// `CASE` (readers with an older SQLite parse it), PostgreSQL's ends with
/// `;` (it is one statement of a script). Each database hashes its text to
/// decide whether to rebuild, so a change here rebuilds both.
pub fn stages_view_sql(dialect: SqlDialect, ty: DocType, prefix: &str) -> String {
    let (a, changed, left_at, end) = match dialect {
        SqlDialect::Sqlite => (
            "s",
            "n = 1
       OR (CASE WHEN stage IS NULL AND previous_stage IS NULL THEN 0
                WHEN stage IS NULL OR previous_stage IS NULL THEN 1
                WHEN stage <> previous_stage THEN 1
                ELSE 0 END) = 1",
            "CASE WHEN t.next_entered_at IS NULL THEN d.deleted_at ELSE t.next_entered_at END",
            "",
        ),
        SqlDialect::Postgres => (
            "st",
            "n = 1 OR stage IS DISTINCT FROM previous_stage",
            "coalesce(t.next_entered_at, d.deleted_at)",
            ";\n",
        ),
    };
    format!(
        "CREATE VIEW {prefix}{ty}_stages AS
WITH revisions AS (
    SELECT {a}.tenant, {a}.id, {a}.revision, {a}.stage, {a}.fetched_at,
           lag({a}.stage) OVER (PARTITION BY {a}.tenant, {a}.id ORDER BY {a}.revision) AS previous_stage,
           row_number() OVER (PARTITION BY {a}.tenant, {a}.id ORDER BY {a}.revision) AS n
    FROM {prefix}document_stages AS {a}
    WHERE {a}.doc_type = '{ty}'
),
entered AS (
    -- a revision starts a stay when its stage differs from the one before (NULLs equal)
    SELECT tenant, id, revision, stage, fetched_at AS entered_at
    FROM revisions
    WHERE {changed}
),
stays AS (
    SELECT tenant, id, stage, entered_at,
           lead(entered_at) OVER (PARTITION BY tenant, id ORDER BY revision) AS next_entered_at
    FROM entered
)
SELECT t.tenant AS tenant, t.id AS id, d.number AS number, t.stage AS stage,
       t.entered_at AS entered_at,
       -- the next stay's start; for the current stay, when the document was deleted upstream (else NULL)
       {left_at} AS left_at
FROM stays AS t
JOIN {prefix}{table} AS d ON d.tenant = t.tenant AND d.id = t.id{end}",
        table = ty.table()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn paths_parse_and_refuse() {
        assert_eq!(
            FieldPath::parse("$.Budget").map(|p| p.to_string()),
            Ok("$.Budget".into())
        );
        assert_eq!(
            FieldPath::parse("$.A.B").map(|p| p.to_string()),
            Ok("$.A.B".into())
        );
        for bad in ["$.", "$.A.B.C", "$.A..B", "$.A[0]", "$.\"A\"", ""] {
            assert!(FieldPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_typed_first_present_wins_case_insensitively() {
        let d = obj(
            json!({"client": "Contoso", "Budget": "12.5", "Count": 3.0, "Flag": true,
            "StartDate": "2026-11-01T01:00:00+01:00", "Day": "2026-11-02", "Bad": "soon",
            "Empty": null, "Owner": {"Name": "Ana"}}),
        );
        let p = |s: &str| vec![FieldPath::parse(s).unwrap_or_else(|_| FieldPath::single("x"))];
        assert_eq!(
            extract(&d, &p("$.Client"), ColumnType::Text),
            Typed::Text("Contoso".into())
        );
        assert_eq!(
            extract(&d, &p("$.budget"), ColumnType::Real),
            Typed::Real(12.5)
        );
        assert_eq!(
            extract(&d, &p("$.Count"), ColumnType::Integer),
            Typed::Integer(3)
        );
        assert_eq!(
            extract(&d, &p("$.Flag"), ColumnType::Integer),
            Typed::Integer(1)
        );
        assert_eq!(
            extract(&d, &p("$.StartDate"), ColumnType::Timestamp),
            Typed::Text("2026-11-01T00:00:00.000Z".into())
        );
        assert_eq!(
            extract(&d, &p("$.Day"), ColumnType::Timestamp),
            Typed::Text("2026-11-02T00:00:00.000Z".into())
        );
        assert_eq!(extract(&d, &p("$.Bad"), ColumnType::Timestamp), Typed::Null);
        assert_eq!(
            extract(&d, &p("$.owner.name"), ColumnType::Text),
            Typed::Text("Ana".into())
        );
        let two = [FieldPath::single("Empty"), FieldPath::single("Client")];
        assert_eq!(
            extract(&d, &two, ColumnType::Text),
            Typed::Text("Contoso".into())
        );
    }

    #[test]
    fn configured_columns_override_in_place_or_append() {
        let cfg = ReportingConfig {
            stage_field: FieldPath::single("Status"),
            job: vec![
                ConfiguredColumn {
                    name: "client".into(),
                    path: FieldPath::single("Customer"),
                    ty: ColumnType::Text,
                },
                ConfiguredColumn {
                    name: "budget".into(),
                    path: FieldPath::single("Budget"),
                    ty: ColumnType::Real,
                },
            ],
            project: vec![],
        };
        let s = ReportSpec::new(&cfg);
        let names: Vec<&str> = s.job.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "number",
                "name",
                "client",
                "stage",
                "project_id",
                "created_on",
                "modified_on",
                "start_date",
                "end_date",
                "version",
                "budget"
            ]
        );
        assert_eq!(
            s.job[2].source,
            Source::Fields(vec![FieldPath::single("Customer")])
        );
        assert_eq!(
            s.job[3].source,
            Source::Fields(vec![FieldPath::single("Status")])
        );
        assert!(!s.project.iter().any(|c| c.name == "project_id"));
    }

    #[test]
    fn snake_case_names() {
        assert_eq!(snake_case("ProjectId"), "project_id");
        assert_eq!(snake_case("JobNumber"), "job_number");
        assert_eq!(snake_case("Budget.Amount"), "budget_amount");
        assert_eq!(snake_case("HTTPStatus"), "http_status");
        assert_eq!(snake_case("Custom Field 2"), "custom_field_2");
        assert_eq!(snake_case("2nd"), "f_2nd");
    }

    #[test]
    fn survey_suggests_types() {
        let mut s = Survey::default();
        s.add(&obj(
            json!({"Due": "2026-11-01T00:00:00Z", "N": 1, "R": 1.5, "T": "x", "O": {"K": 2}}),
        ));
        s.add(&obj(
            json!({"due": "2026-11-02", "N": 2, "R": 2, "T": null}),
        ));
        assert_eq!(s.documents, 2);
        assert_eq!(
            s.fields["Due"].suggested_type(),
            Some(ColumnType::Timestamp)
        );
        assert_eq!(s.fields["N"].suggested_type(), Some(ColumnType::Integer));
        assert_eq!(s.fields["R"].suggested_type(), Some(ColumnType::Real));
        assert_eq!(s.fields["T"].filled(), 1);
        assert_eq!(s.fields["O.K"].suggested_type(), Some(ColumnType::Integer));
        assert_eq!(s.fields["O"].suggested_type(), None);
    }
}
