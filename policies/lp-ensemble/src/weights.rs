//! Mixture weights from an expert × task loss matrix, as a linear program solved by
//! `microlp`. Pure: no policy types, so the solve is tested on matrices directly.

use microlp::{ComparisonOp, OptimizationDirection, Problem, SolveOutcome};

/// What the weights minimise over the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// The worst task's mixed loss, `max_t Σ_e w_e L[e][t]` (minimax).
    Worst,
    /// The mean over tasks of the mixed loss: linear in `w`, so a vertex of the simplex — the
    /// single expert with the lowest mean — is optimal (a check on the LP, rarely a choice).
    Mean,
}

/// Why weights could not be found; experts and tasks are the matrix's row and column indices.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WeightsError {
    #[error("the loss matrix has no expert")]
    NoExpert,
    #[error("the loss matrix has no task")]
    NoTask,
    #[error("expert {expert} has {found} task losses, expert 0 has {expected}")]
    Ragged {
        expert: usize,
        found: usize,
        expected: usize,
    },
    #[error("expert {expert}'s loss on task {task} is {value}, not a finite number")]
    NotFinite {
        expert: usize,
        task: usize,
        value: f64,
    },
    #[error("the linear program could not be solved: {0}")]
    Solver(String),
}

/// Normalised losses below this are taken as 0: the solver asks that a row's coefficients
/// span at most six orders of magnitude (the `-1` of `z` is one of them), and a change of a
/// millionth of the loss range is far below the noise of a validation mean.
const ZERO: f64 = 1e-6;

/// The minimax weights: `min_w max_t Σ_e w_e L[e][t]` over the simplex (`w ≥ 0`, `Σ w = 1`),
/// where `losses[e][t]` is expert `e`'s mean loss on task `t`. See [`mixture_weights`].
///
/// ```
/// use moerge_policy_lp_ensemble::weights::minimax_weights;
/// // Two specialists and a generalist: mixing the specialists halves each one's weak task.
/// let w = minimax_weights(&[vec![1.0, 3.0], vec![3.0, 1.0], vec![2.5, 2.5]]).unwrap();
/// assert!((w[0] - 0.5).abs() < 1e-9 && (w[1] - 0.5).abs() < 1e-9 && w[2] < 1e-9);
/// ```
pub fn minimax_weights(losses: &[Vec<f64>]) -> Result<Vec<f64>, WeightsError> {
    mixture_weights(losses, Objective::Worst)
}

/// Weights on the simplex minimising `objective` over `losses[e][t]` (expert `e`, task `t`).
///
/// The worst-case LP: variables `w_e ≥ 0` and a free `z`; minimise `z` subject to
/// `Σ_e w_e L[e][t] ≤ z` for every task and `Σ_e w_e = 1`. Shifting or positively scaling `L`
/// moves every mixture's value alike, so it is solved on `(L - min L) / (max L - min L)`, whose
/// entries lie in `[0, 1]`. The simplex method ends at a vertex, where at most as many
/// variables are nonzero as there are constraints (tasks + 1), `z` among them: at most one
/// expert per task gets weight. When every loss is equal, every mixture is optimal and the
/// first expert alone is returned.
///
/// The result has one weight per expert, each `≥ 0`, summing to 1.
pub fn mixture_weights(
    losses: &[Vec<f64>],
    objective: Objective,
) -> Result<Vec<f64>, WeightsError> {
    let (lo, hi) = check(losses)?;
    let experts = losses.len();
    if hi == lo {
        let mut w = vec![0.0; experts];
        w[0] = 1.0;
        return Ok(w);
    }
    let scaled = |l: f64| {
        let x = (l - lo) / (hi - lo);
        if x < ZERO {
            0.0
        } else {
            x
        }
    };
    let tasks = losses[0].len();
    let mut problem = Problem::new(OptimizationDirection::Minimize);
    let w = match objective {
        Objective::Worst => {
            let w: Vec<_> = (0..experts)
                .map(|_| problem.add_var(0.0, (0.0, f64::INFINITY)))
                .collect();
            let z = problem.add_var(1.0, (f64::NEG_INFINITY, f64::INFINITY));
            for t in 0..tasks {
                let row = w.iter().zip(losses).map(|(&v, l)| (v, scaled(l[t])));
                let row: Vec<_> = row.filter(|&(_, c)| c != 0.0).chain([(z, -1.0)]).collect();
                problem.add_constraint(row.as_slice(), ComparisonOp::Le, 0.0);
            }
            w
        }
        Objective::Mean => losses
            .iter()
            .map(|l| {
                let mean = l.iter().map(|&x| scaled(x)).sum::<f64>() / tasks as f64;
                problem.add_var(mean, (0.0, f64::INFINITY))
            })
            .collect(),
    };
    let simplex: Vec<_> = w.iter().map(|&v| (v, 1.0)).collect();
    problem.add_constraint(simplex.as_slice(), ComparisonOp::Eq, 1.0);
    let solution = match problem.solve() {
        Ok(SolveOutcome::Solution(s)) => s,
        Ok(SolveOutcome::Interrupted(i)) => {
            let reason = i.termination_reason();
            return Err(WeightsError::Solver(format!("stopped early ({reason:?})")));
        }
        Err(e) => return Err(WeightsError::Solver(e.to_string())),
    };
    // The solver meets constraints within 1e-7: clear round-off below 0 and renormalise.
    let raw: Vec<f64> = w.iter().map(|&v| solution.var_value(v).max(0.0)).collect();
    let total: f64 = raw.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return Err(WeightsError::Solver(format!(
            "the weights it returned sum to {total}"
        )));
    }
    Ok(raw.iter().map(|x| x / total).collect())
}

/// Checks the matrix's shape and numbers; returns its smallest and largest entry.
fn check(losses: &[Vec<f64>]) -> Result<(f64, f64), WeightsError> {
    let first = losses.first().ok_or(WeightsError::NoExpert)?;
    if first.is_empty() {
        return Err(WeightsError::NoTask);
    }
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for (expert, row) in losses.iter().enumerate() {
        if row.len() != first.len() {
            return Err(WeightsError::Ragged {
                expert,
                found: row.len(),
                expected: first.len(),
            });
        }
        for (task, &value) in row.iter().enumerate() {
            if !value.is_finite() {
                return Err(WeightsError::NotFinite {
                    expert,
                    task,
                    value,
                });
            }
            lo = lo.min(value);
            hi = hi.max(value);
        }
    }
    Ok((lo, hi))
}
