//! The figures of a run, their medians and ratios, the table, and the check against the crate's
//! targets.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::{json, Value};

use crate::scenarios::Sizes;
use crate::server::Mode;

pub(crate) struct Figure {
    pub(crate) key: String,
    pub(crate) label: String,
    pub(crate) unit: &'static str,
    /// Whether a ratio to bare means something for this figure.
    pub(crate) ratio: bool,
    pub(crate) values: BTreeMap<Mode, Vec<f64>>,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) figures: Vec<Figure>,
    pub(crate) failures: Vec<String>,
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn record(
        &mut self,
        key: &str,
        label: &str,
        unit: &'static str,
        ratio: bool,
        mode: Mode,
        value: f64,
    ) {
        let idx = match self.figures.iter().position(|f| f.key == key) {
            Some(i) => i,
            None => {
                self.figures.push(Figure {
                    key: key.to_owned(),
                    label: label.to_owned(),
                    unit,
                    ratio,
                    values: BTreeMap::new(),
                });
                self.figures.len() - 1
            }
        };
        self.figures[idx]
            .values
            .entry(mode)
            .or_default()
            .push(value);
    }

    pub(crate) fn median(&self, key: &str, mode: Mode) -> Option<f64> {
        let f = self.figures.iter().find(|f| f.key == key)?;
        median(f.values.get(&mode)?)
    }

    pub(crate) fn fail(&mut self, scenario: &str, mode: Mode, error: impl std::fmt::Display) {
        let line = format!("{scenario} [{}]: {error}", mode.name());
        eprintln!("FAILED: {line}");
        self.failures.push(line);
    }
}

pub(crate) fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The `q` quantile (nearest rank) of sorted values.
pub(crate) fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

pub(crate) fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else if v.abs() >= 10_000.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 || v == 0.0 {
        format!("{v:.2}")
    } else {
        // Three significant digits.
        let digits = (2 - v.abs().log10().floor() as i32).clamp(2, 9) as usize;
        format!("{v:.digits$}")
    }
}

/// The layer modes' ratios to the baselines, `(layer, baseline)`: to bare, and to bare broadcast
/// when it was measured.
pub(crate) fn ratio_pairs(rep: &Report, modes: &[Mode]) -> Vec<(Mode, Mode)> {
    let broadcast = rep
        .figures
        .iter()
        .any(|f| f.values.contains_key(&Mode::BareBroadcast));
    let baselines: &[Mode] = if broadcast {
        &[Mode::Bare, Mode::BareBroadcast]
    } else {
        &[Mode::Bare]
    };
    modes
        .iter()
        .filter(|m| !m.is_bare())
        .flat_map(|&m| baselines.iter().map(move |&b| (m, b)))
        .collect()
}

/// The ratio of the medians of `f` in `mode` and in `baseline`, when it means something.
pub(crate) fn figure_ratio(f: &Figure, mode: Mode, baseline: Mode) -> Option<f64> {
    let v = median(f.values.get(&mode)?)?;
    let b = median(f.values.get(&baseline)?)?;
    (f.ratio && b != 0.0).then(|| v / b)
}

pub(crate) fn print_table(
    out: &mut dyn Write,
    rep: &Report,
    modes: &[Mode],
) -> std::io::Result<()> {
    let pairs = ratio_pairs(rep, modes);
    let mut shown = modes.to_vec();
    if pairs.iter().any(|&(_, b)| b == Mode::BareBroadcast) {
        shown.push(Mode::BareBroadcast);
        shown.sort();
    }
    let mut header = "| figure | unit |".to_owned();
    for m in &shown {
        header.push_str(&format!(" {} |", m.name()));
    }
    for (m, b) in &pairs {
        header.push_str(&format!(" {}/{} |", m.name(), b.name()));
    }
    writeln!(out, "{header}")?;
    writeln!(out, "|{}", "---|".repeat(2 + shown.len() + pairs.len()))?;
    for f in &rep.figures {
        let mut row = format!("| {} | {} |", f.label, f.unit);
        for m in &shown {
            let v = f.values.get(m).and_then(|v| median(v));
            row.push_str(&format!(" {} |", v.map_or("-".to_owned(), fmt_value)));
        }
        for &(m, b) in &pairs {
            let ratio = figure_ratio(f, m, b).map_or("-".to_owned(), |r| format!("{r:.2}x"));
            row.push_str(&format!(" {ratio} |"));
        }
        writeln!(out, "{row}")?;
    }
    if shown.contains(&Mode::BareBroadcast) {
        writeln!(
            out,
            "\nfan-out baselines: `bare` is independent streams (a generator per connection); \
             `bare broadcast` is one generator per session whose frames every connection of the \
             session gets, the work the layer does."
        )?;
    }
    Ok(())
}

/// Checks the figures against the crate's targets (meaningful at full size only).
pub(crate) fn targets(rep: &Report, sizes: &Sizes) -> Vec<Value> {
    let mut out = Vec::new();
    // `also`: a figure printed with the target but not checked.
    let mut check_also =
        |target: &str, measured: Option<f64>, limit: f64, at_least: bool, also: Option<Value>| {
            let Some(m) = measured.filter(|m| m.is_finite()) else {
                return;
            };
            let met = if at_least { m >= limit } else { m <= limit };
            let mut goal = json!({ "target": target, "measured": m, "limit": limit, "met": met });
            if let Some(also) = also {
                goal["also"] = also;
            }
            out.push(goal);
        };
    let ratio_to = |key: &str, mode: Mode, baseline: Mode| {
        Some(rep.median(key, mode)? / rep.median(key, baseline)?)
    };
    let ratio = |key: &str, mode: Mode| ratio_to(key, mode, Mode::Bare);
    macro_rules! check {
        ($target:expr, $measured:expr, $limit:expr, $at_least:expr $(,)?) => {
            check_also($target, $measured, $limit, $at_least, None)
        };
    }
    let tp = "one_connection.events_per_s";
    check!(
        "layer + memory, one connection, events/s vs bare (>= 0.8x)",
        ratio(tp, Mode::Memory),
        0.8,
        true,
    );
    check!(
        "layer + Redis, one connection, events/s vs bare (>= 0.5x)",
        ratio(tp, Mode::Redis),
        0.5,
        true,
    );
    check!(
        "layer + Redis, concurrent sessions, aggregate events/s vs bare (>= 0.5x)",
        ratio("breadth.events_per_s", Mode::Redis),
        0.5,
        true,
    );
    // Fan-out at the same load: against the bare server that also runs one generator per session
    // and writes its frames to every connection. The ratio to independent streams (a generator per
    // connection, which falls behind and delivers far fewer events) is printed alongside.
    for (s, i) in &sizes.fanout {
        let key = format!("fanout_{s}_{i}ms.p99_ms");
        for m in [Mode::Memory, Mode::Redis] {
            let independent = ratio(&key, m)
                .filter(|r| r.is_finite())
                .map(|r| json!({ "label": "vs bare, independent streams", "measured": r }));
            check_also(
                &format!(
                    "fan-out to {s} at {i} ms, p99 vs bare broadcast, {} (<= 2x)",
                    m.name()
                ),
                ratio_to(&key, m, Mode::BareBroadcast),
                2.0,
                false,
                independent,
            );
        }
    }
    let (small, large) = (
        sizes.resume_sessions.first().copied().unwrap_or(0),
        sizes.resume_sessions.last().copied().unwrap_or(0),
    );
    for (m, limit) in [(Mode::Memory, 1.0), (Mode::Redis, 5.0)] {
        for n in &sizes.resume_sessions {
            check!(
                &format!("resume, {n} events, {}, ms (< {limit})", m.name()),
                rep.median(&format!("resume_{n}.ttfb_ms"), m),
                limit,
                false,
            );
        }
        let grow = rep
            .median(&format!("resume_{large}.ttfb_ms"), m)
            .zip(rep.median(&format!("resume_{small}.ttfb_ms"), m));
        check!(
            &format!("resume, {large} vs {small} events, {} (<= 1.5x)", m.name()),
            grow.map(|(l, s)| l / s),
            1.5,
            false,
        );
    }
    let conns = rep
        .figures
        .iter()
        .filter(|f| f.key.ends_with("redis_connections"))
        .filter_map(|f| {
            f.values
                .get(&Mode::Redis)
                .and_then(|v| v.iter().copied().reduce(f64::max))
        })
        .reduce(f64::max);
    check!("Redis connections per process (<= 4)", conns, 4.0, false);
    for m in [Mode::Memory, Mode::Redis] {
        check!(
            &format!("idle connection RSS vs bare, {} (<= 1.25x)", m.name()),
            ratio("idle.rss_kb_per_connection", m),
            1.25,
            false,
        );
    }
    out
}
