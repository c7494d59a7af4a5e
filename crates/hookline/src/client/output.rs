//! How client commands print: a table for people (columns cut to the terminal width),
//! or JSON for scripts (`--json`: one object for one thing, an array for a list;
//! `--jsonl`: one compact object per line). Timestamps and durations are converted
//! here, once, for every command.

use chrono::SecondsFormat;
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::Value;

/// The output format every client command honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Jsonl,
}

impl Format {
    /// One thing: an object, or `table` for people.
    pub fn one(self, value: &Value, table: impl FnOnce()) {
        match self {
            Format::Table => table(),
            Format::Json => println!("{}", pretty(value)),
            Format::Jsonl => println!("{value}"),
        }
    }

    /// A list: an array, JSON lines, or a table of `headers` and `rows`.
    pub fn list(self, values: Vec<Value>, headers: &[&str], rows: Vec<Vec<String>>) {
        match self {
            Format::Table => print_table(headers, rows),
            Format::Json => println!("{}", pretty(&Value::Array(values))),
            Format::Jsonl => {
                for v in values {
                    println!("{v}");
                }
            }
        }
    }

    /// A list of `items`, each shown by `json` or as a table row by `row`.
    pub fn items<T>(
        self,
        items: &[T],
        json: impl Fn(&T) -> Value,
        headers: &[&str],
        row: impl Fn(&T) -> Vec<String>,
    ) {
        let values = items.iter().map(json).collect();
        self.list(values, headers, items.iter().map(row).collect());
    }

    pub fn is_json(self) -> bool {
        self != Format::Table
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// Prints a table as wide as the terminal (or unbounded when stdout is not one).
pub fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    println!("{}", render(headers, rows, None));
}

/// A table of one line per row; with a `width` (or a terminal), long cells are cut
/// with `…` so that every line fits.
pub fn render(headers: &[&str], rows: Vec<Vec<String>>, width: Option<u16>) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_truncation_indicator("…")
        .set_header(headers.iter().copied());
    if let Some(w) = width {
        table.set_width(w);
    }
    for row in rows {
        let cells: Vec<String> = row
            .into_iter()
            .map(|c| c.replace(|ch: char| ch.is_control(), " "))
            .collect();
        let mut row = comfy_table::Row::from(cells);
        row.max_height(1);
        table.add_row(row);
    }
    // Two spaces between columns, none before the first.
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// An RFC 3339 timestamp in UTC to the second (`2026-11-27T15:28:48Z`); empty if unset.
pub fn ts(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A timestamp `secs` seconds before now.
pub fn seconds_ago(secs: u64) -> prost_types::Timestamp {
    let at =
        chrono::Utc::now() - chrono::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX));
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    }
}

/// Milliseconds as a protobuf duration.
pub fn duration_from_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A protobuf duration in whole milliseconds.
pub fn duration_ms(d: &prost_types::Duration) -> i64 {
    d.seconds.saturating_mul(1000) + i64::from(d.nanos) / 1_000_000
}

/// A protobuf enum's name without its prefix, lower case: `SUBSCRIPTION_STATE_ENABLED`
/// with prefix `SUBSCRIPTION_STATE_` is `enabled`; unknown values are `unknown`.
pub fn enum_name(full: Option<&str>, prefix: &str) -> String {
    full.map(|n| n.strip_prefix(prefix).unwrap_or(n).to_ascii_lowercase())
        .unwrap_or_else(|| "unknown".into())
}

/// Empty for zero, the number otherwise (a status code that was never received).
pub fn nonzero(n: u32) -> String {
    if n == 0 { String::new() } else { n.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_cells_are_cut_to_the_width() {
        let long = "x".repeat(500);
        let out = render(
            &["ID", "ERROR"],
            vec![vec!["dlv_1".into(), long.clone()]],
            Some(60),
        );
        assert!(out.lines().all(|l| l.chars().count() <= 60), "{out}");
        assert!(out.contains('…'), "{out}");
        let wide = render(
            &["ID", "ERROR"],
            vec![vec!["dlv_1".into(), long.clone()]],
            None,
        );
        assert!(wide.contains(&long));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = prost_types::Timestamp {
            seconds: 1_795_000_000,
            nanos: 5,
        };
        assert_eq!(ts(Some(&t)), "2026-11-18T11:06:40Z");
        assert_eq!(ts(None), "");
    }
}
