//! Greedy expert selection over an expert × task loss matrix (the paper's recipe): start
//! empty, add one expert at a time — each time the one that most lowers the mean over tasks
//! of the best selected expert's loss — and keep the whole curve. The *active set* is the
//! smallest prefix whose value is within a tolerance of the full library's value.
//!
//! Pure arithmetic: no engine, no index (shared by the daemon and `moerge eval`). A run is O(N² · T) for N experts and T tasks, a few
//! milliseconds for N = 256, so the selection is simply recomputed on every library change;
//! what is incremental is the matrix (only new rows are evaluated).

use std::collections::BTreeMap;

/// Validation losses: one row per expert, one column per task.
#[derive(Debug, Clone, PartialEq)]
pub struct LossMatrix {
    pub tasks: Vec<String>,
    /// Expert name → one loss per task, in `tasks` order.
    pub rows: BTreeMap<String, Vec<f64>>,
}

/// Why a matrix cannot be selected from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelectionError {
    #[error("no experts to select from")]
    NoExperts,
    #[error("no tasks to select for (records need a \"task\")")]
    NoTasks,
    #[error("expert {expert:?}: {got} losses for {want} tasks")]
    RowLength {
        expert: String,
        got: usize,
        want: usize,
    },
    #[error("expert {expert:?}, task {task:?}: loss {value} is not a finite number")]
    NotFinite {
        expert: String,
        task: String,
        value: f64,
    },
    #[error("tolerance {0} must be a finite number ≥ 0")]
    Tolerance(f64),
}

/// The result of a greedy selection.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    /// Every expert, in the order greedy selection added them.
    pub order: Vec<String>,
    /// `curve[k]`: the mean over tasks of the best loss among the first `k + 1` experts.
    pub curve: Vec<f64>,
    /// The full library's value (`curve`'s last point).
    pub full: f64,
    /// The relative tolerance the active set was chosen with.
    pub tolerance: f64,
    /// How many experts the active set has: the smallest `k` with
    /// `curve[k - 1] ≤ full + tolerance · |full|`.
    pub active: usize,
}

impl Selection {
    /// The active set, in selection order.
    pub fn active_set(&self) -> &[String] {
        &self.order[..self.active]
    }
}

impl LossMatrix {
    fn check(&self) -> Result<(), SelectionError> {
        if self.rows.is_empty() {
            return Err(SelectionError::NoExperts);
        }
        if self.tasks.is_empty() {
            return Err(SelectionError::NoTasks);
        }
        for (expert, row) in &self.rows {
            if row.len() != self.tasks.len() {
                return Err(SelectionError::RowLength {
                    expert: expert.clone(),
                    got: row.len(),
                    want: self.tasks.len(),
                });
            }
            if let Some((t, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(SelectionError::NotFinite {
                    expert: expert.clone(),
                    task: self.tasks[t].clone(),
                    value,
                });
            }
        }
        Ok(())
    }
}

/// Runs greedy selection. Ties go to the expert whose name sorts first, so the result is
/// deterministic.
pub fn select(matrix: &LossMatrix, tolerance: f64) -> Result<Selection, SelectionError> {
    if !(tolerance.is_finite() && tolerance >= 0.0) {
        return Err(SelectionError::Tolerance(tolerance));
    }
    matrix.check()?;
    let tasks = matrix.tasks.len() as f64;
    let mut best = vec![f64::INFINITY; matrix.tasks.len()];
    let mut left: Vec<(&String, &Vec<f64>)> = matrix.rows.iter().collect();
    let mut order = Vec::with_capacity(left.len());
    let mut curve = Vec::with_capacity(left.len());
    while !left.is_empty() {
        // `left` stays in name order, and only a strictly lower value replaces the pick.
        let mut pick = (0, f64::INFINITY);
        for (i, (_, row)) in left.iter().enumerate() {
            let value = row.iter().zip(&best).map(|(l, b)| l.min(*b)).sum::<f64>() / tasks;
            if value < pick.1 {
                pick = (i, value);
            }
        }
        let (name, row) = left.remove(pick.0);
        for (b, l) in best.iter_mut().zip(row) {
            *b = b.min(*l);
        }
        order.push(name.clone());
        curve.push(pick.1);
    }
    let full = *curve.last().expect("at least one expert");
    let bound = full + tolerance * full.abs();
    let active = curve
        .iter()
        .position(|&v| v <= bound)
        .expect("full ≤ bound")
        + 1;
    Ok(Selection {
        order,
        curve,
        full,
        tolerance,
        active,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(tasks: usize, rows: &[(&str, Vec<f64>)]) -> LossMatrix {
        LossMatrix {
            tasks: (0..tasks).map(|t| format!("t{t}")).collect(),
            rows: rows
                .iter()
                .map(|(n, r)| (n.to_string(), r.clone()))
                .collect(),
        }
    }

    /// A small seeded generator, so the random matrices repeat.
    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Mean over tasks of the best loss among `subset` (plain loops, no shared code).
    #[allow(clippy::needless_range_loop)] // a plain loop on purpose
    fn value_of(m: &LossMatrix, subset: &[usize]) -> f64 {
        let rows: Vec<&Vec<f64>> = m.rows.values().collect();
        let mut total = 0.0;
        for t in 0..m.tasks.len() {
            let mut b = f64::INFINITY;
            for &e in subset {
                if rows[e][t] < b {
                    b = rows[e][t];
                }
            }
            total += b;
        }
        total / m.tasks.len() as f64
    }

    #[test]
    fn each_step_takes_the_exhaustive_best_next_expert() {
        let mut seed = 7;
        for _ in 0..20 {
            let (n, t) = (6, 4);
            let rows: Vec<(String, Vec<f64>)> = (0..n)
                .map(|e| {
                    (
                        format!("e{e}"),
                        (0..t).map(|_| lcg(&mut seed) * 3.0).collect(),
                    )
                })
                .collect();
            let m = LossMatrix {
                tasks: (0..t).map(|i| format!("t{i}")).collect(),
                rows: rows.into_iter().collect(),
            };
            let s = select(&m, 0.0).unwrap();
            let names: Vec<&String> = m.rows.keys().collect();
            let mut chosen: Vec<usize> = Vec::new();
            for (k, name) in s.order.iter().enumerate() {
                // Every expert not yet chosen, tried one by one.
                let best = (0..n)
                    .filter(|e| !chosen.contains(e))
                    .map(|e| {
                        let mut with = chosen.clone();
                        with.push(e);
                        value_of(&m, &with)
                    })
                    .fold(f64::INFINITY, f64::min);
                let idx = names.iter().position(|x| *x == name).unwrap();
                chosen.push(idx);
                assert!((value_of(&m, &chosen) - best).abs() < 1e-12, "step {k}");
                assert!((s.curve[k] - best).abs() < 1e-12, "curve at step {k}");
            }
            // Curve never rises and ends at the mean of the per-task minima.
            assert!(s.curve.windows(2).all(|w| w[1] <= w[0]));
            assert!((s.full - value_of(&m, &(0..n).collect::<Vec<_>>())).abs() < 1e-12);
        }
    }

    #[test]
    fn redundant_experts_stay_out_of_the_active_set() {
        // Two specialists cover both tasks; a generalist and a worse copy add nothing.
        let m = matrix(
            2,
            &[
                ("a", vec![0.1, 2.0]),
                ("b", vec![2.0, 0.1]),
                ("general", vec![1.0, 1.0]),
                ("worse-a", vec![0.2, 2.5]),
            ],
        );
        let s = select(&m, 0.01).unwrap();
        // The generalist is the best single expert, so greedy starts with it; then the two
        // specialists (tied; "a" sorts first); the worse copy adds nothing.
        assert_eq!(s.order, ["general", "a", "b", "worse-a"]);
        assert_eq!(s.curve, [1.0, 0.55, 0.1, 0.1]);
        assert_eq!(s.active, 3);
        assert_eq!(s.active_set(), ["general", "a", "b"]);
        assert!((s.full - 0.1).abs() < 1e-12);
    }

    #[test]
    fn the_tolerance_decides_the_prefix() {
        let m = matrix(
            3,
            &[
                ("x", vec![1.0, 1.0, 1.0]),
                ("y", vec![0.5, 1.0, 1.0]),
                ("z", vec![1.0, 0.98, 1.0]),
            ],
        );
        // y first (0.8333), then z (0.8267 = the full value), then x (no change).
        let tight = select(&m, 0.0).unwrap();
        assert_eq!(tight.order, ["y", "z", "x"]);
        assert!((tight.curve[0] - 2.5 / 3.0).abs() < 1e-12);
        assert!((tight.full - 2.48 / 3.0).abs() < 1e-12);
        assert_eq!(tight.active, 2);
        // 0.8333 is within 1% of 0.8267: one expert is enough.
        let loose = select(&m, 0.01).unwrap();
        assert_eq!(loose.active, 1);
        assert_eq!(loose.active_set(), ["y"]);
    }

    #[test]
    fn ties_go_to_the_first_name_and_bad_input_is_named() {
        let m = matrix(1, &[("b", vec![1.0]), ("a", vec![1.0])]);
        assert_eq!(select(&m, 0.0).unwrap().order, ["a", "b"]);

        let bad = matrix(2, &[("a", vec![1.0, f64::NAN])]);
        let e = select(&bad, 0.0).unwrap_err().to_string();
        assert!(e.contains("\"a\"") && e.contains("\"t1\""), "{e}");
        let short = matrix(2, &[("a", vec![1.0])]);
        assert!(matches!(
            select(&short, 0.0),
            Err(SelectionError::RowLength {
                got: 1,
                want: 2,
                ..
            })
        ));
        assert_eq!(select(&matrix(1, &[]), 0.0), Err(SelectionError::NoExperts));
        assert_eq!(select(&m, -0.1), Err(SelectionError::Tolerance(-0.1)));
    }
}
