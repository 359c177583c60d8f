//! `hostmem bench --repeat N`: N whole runs in one process and what they say together (per
//! target, each run's median and how many runs passed; per case, each run's CPU per pair
//! over the floor's).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::report::{render, write_out, BenchReport, Target};
use crate::latency::Spread;

/// The runs and their summary (`--repeat N --json`).
#[derive(Debug, Clone, Serialize)]
pub struct RepeatReport {
    /// Runs asked for.
    pub repeat: usize,
    /// Each run's report, in order.
    pub runs: Vec<BenchReport>,
    /// Across the runs.
    pub summary: RepeatSummary,
}

/// What the runs say together.
#[derive(Debug, Clone, Serialize)]
pub struct RepeatSummary {
    /// Runs summarized.
    pub runs: usize,
    /// Per target, in the reports' order.
    pub targets: Vec<TargetAcross>,
    /// Per case, each run's CPU per pair over the floor's (`None`: not measured that run).
    pub cpu_ratio_to_floor: BTreeMap<String, Vec<Option<f64>>>,
    /// The same without the guest's steps (`CpuReport::excl_guest_ratio_to_floor`).
    pub cpu_excl_guest_ratio_to_floor: BTreeMap<String, Vec<Option<f64>>>,
    /// Runs that reported errors.
    pub runs_with_errors: usize,
}

/// One target across the runs.
#[derive(Debug, Clone, Serialize)]
pub struct TargetAcross {
    /// What is measured.
    pub name: String,
    /// The goal.
    pub goal: String,
    /// Each run's value (a ratio's: the median of that run's rounds), in run order.
    pub values: Vec<Option<f64>>,
    /// Runs that passed.
    pub passed: usize,
    /// Runs with a verdict.
    pub judged: usize,
    /// Median and interquartile range of the runs' values.
    pub spread: Option<Spread>,
}

/// The summary of `runs`.
pub fn summarize(runs: &[BenchReport]) -> RepeatSummary {
    let targets: Vec<&[Target]> = runs.iter().map(|r| r.targets.as_slice()).collect();
    let per_case = |f: &dyn Fn(&super::report::CaseReport) -> Option<f64>| {
        let mut out: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
        for (i, r) in runs.iter().enumerate() {
            for c in &r.cases {
                let v = out.entry(c.name.to_string()).or_default();
                v.resize(i, None);
                v.push(f(c));
            }
        }
        for v in out.values_mut() {
            v.resize(runs.len(), None);
        }
        out
    };
    RepeatSummary {
        runs: runs.len(),
        targets: summarize_targets(&targets),
        cpu_ratio_to_floor: per_case(&|c| c.cpu.ratio_to_floor),
        cpu_excl_guest_ratio_to_floor: per_case(&|c| c.cpu.excl_guest_ratio_to_floor),
        runs_with_errors: runs.iter().filter(|r| !r.errors.is_empty()).count(),
    }
}

/// Each target (by name, in the first run's order) across the runs' targets.
fn summarize_targets(runs: &[&[Target]]) -> Vec<TargetAcross> {
    let Some(first) = runs.first() else {
        return vec![];
    };
    first
        .iter()
        .map(|t| {
            let each: Vec<Option<&Target>> = runs
                .iter()
                .map(|ts| ts.iter().find(|x| x.name == t.name))
                .collect();
            let values: Vec<Option<f64>> = each.iter().map(|x| x.and_then(|x| x.value)).collect();
            let known: Vec<f64> = values.iter().flatten().copied().collect();
            TargetAcross {
                name: t.name.clone(),
                goal: t.goal.clone(),
                passed: each
                    .iter()
                    .filter(|x| x.and_then(|x| x.pass) == Some(true))
                    .count(),
                judged: each
                    .iter()
                    .filter(|x| x.and_then(|x| x.pass).is_some())
                    .count(),
                spread: Spread::of(&known),
                values,
            }
        })
        .collect()
}

/// The summary as text.
pub fn render_summary(s: &RepeatSummary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nacross {} runs (a ratio's value is that run's median over its rounds):",
        s.runs
    );
    for t in &s.targets {
        let values: Vec<String> = t
            .values
            .iter()
            .map(|v| v.map_or("-".into(), |v| format!("{v:.2}")))
            .collect();
        let verdict = match (t.judged, s.runs - t.judged) {
            (0, _) => "n/a".to_string(),
            (_, 0) => format!("{}/{} PASS", t.passed, s.runs),
            (_, na) => format!("{}/{} PASS ({na} n/a)", t.passed, s.runs),
        };
        let _ = writeln!(
            out,
            "  {verdict:<10} {:<62} {}  (goal {})",
            t.name,
            values.join(" "),
            t.goal
        );
    }
    let fmt = |v: &[Option<f64>]| {
        v.iter()
            .map(|v| v.map_or("-".into(), |v| format!("{v:.2}")))
            .collect::<Vec<String>>()
            .join(" ")
    };
    let _ = writeln!(
        out,
        "CPU per pair over the floor's, each run (total; without the guest's steps):"
    );
    for (case, v) in &s.cpu_ratio_to_floor {
        let excl = s
            .cpu_excl_guest_ratio_to_floor
            .get(case)
            .map_or(String::new(), |e| fmt(e));
        let _ = writeln!(out, "  {case:<27} {};  {excl}", fmt(v));
    }
    if s.runs_with_errors > 0 {
        let _ = writeln!(out, "{} of {} runs had errors", s.runs_with_errors, s.runs);
    }
    out
}

/// The whole text: each run's table, then the summary.
pub fn render_repeat(r: &RepeatReport) -> String {
    let mut out = String::new();
    for (i, run) in r.runs.iter().enumerate() {
        out.push_str(&format!("=== run {}/{} ===\n", i + 1, r.repeat));
        out.push_str(&render(run));
    }
    out.push_str(&render_summary(&r.summary));
    out
}

/// Writes each run's files into `dir/run-<i>` and `repeat.json`, `repeat.txt` into `dir`.
pub fn write_repeat(r: &RepeatReport, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, run) in r.runs.iter().enumerate() {
        write_out(run, &dir.join(format!("run-{}", i + 1)))?;
    }
    std::fs::write(dir.join("repeat.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("repeat.txt"), render_repeat(r))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, value: Option<f64>, pass: Option<bool>) -> Target {
        Target {
            name: name.into(),
            goal: "g".into(),
            value,
            pass,
            ratio: None,
            spread: None,
            spread_of: None,
            pooled: None,
        }
    }

    #[test]
    fn targets_across_runs() {
        let a = vec![t("x", Some(0.6), Some(true)), t("y", Some(3.0), Some(true))];
        // Another order, and y failing.
        let b = vec![
            t("y", Some(5.0), Some(false)),
            t("x", Some(0.4), Some(false)),
        ];
        // x not measured.
        let c = vec![t("x", None, None), t("y", Some(3.5), Some(true))];
        // y missing from one run.
        let d = vec![t("x", Some(0.7), Some(true))];
        let s = summarize_targets(&[&a, &b, &c, &d]);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "x");
        assert_eq!(s[0].values, vec![Some(0.6), Some(0.4), None, Some(0.7)]);
        assert_eq!((s[0].passed, s[0].judged), (2, 3));
        assert_eq!(s[0].spread.unwrap().n, 3);
        assert_eq!(s[0].spread.unwrap().p50, 0.6);
        assert_eq!(s[1].values, vec![Some(3.0), Some(5.0), Some(3.5), None]);
        assert_eq!((s[1].passed, s[1].judged), (2, 3));
        assert_eq!(s[1].spread.unwrap().p50, 3.5);
        assert!(summarize_targets(&[]).is_empty());
        let never = summarize_targets(&[&[t("z", None, None)][..], &[t("z", None, None)][..]]);
        let cpu: BTreeMap<String, Vec<Option<f64>>> = [(
            "floor".to_string(),
            vec![Some(1.0), Some(1.0), None, Some(1.0)],
        )]
        .into();
        let text = render_summary(&RepeatSummary {
            runs: 4,
            targets: s.into_iter().chain(never).collect(),
            cpu_ratio_to_floor: cpu.clone(),
            cpu_excl_guest_ratio_to_floor: cpu,
            runs_with_errors: 1,
        });
        assert!(text.contains("2/4 PASS (1 n/a)"), "{text}");
        assert!(text.contains("0.60 0.40 - 0.70"), "{text}");
        assert!(text.contains("  n/a        z"), "{text}");
        assert!(
            text.contains("1.00 1.00 - 1.00;  1.00 1.00 - 1.00"),
            "{text}"
        );
        assert!(text.contains("1 of 4 runs had errors"), "{text}");
    }
}
