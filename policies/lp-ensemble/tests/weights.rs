//! The LP's weights against brute force: every vertex of the minimax LP solved in closed form
//! (small linear systems), and a fine grid over the simplex.

use moerge_policy_lp_ensemble::weights::{
    minimax_weights, mixture_weights, Objective, WeightsError,
};
use moerge_sdk::testing::Rng;

/// `max_t Σ_e w_e L[e][t]`, a plain loop.
fn worst(losses: &[Vec<f64>], w: &[f64]) -> f64 {
    let mut worst = f64::NEG_INFINITY;
    for t in 0..losses[0].len() {
        let mut mixed = 0.0;
        for e in 0..losses.len() {
            mixed += w[e] * losses[e][t];
        }
        worst = worst.max(mixed);
    }
    worst
}

/// Solves `m x = rhs` by Gaussian elimination with partial pivoting; `None` when singular.
fn solve(mut m: Vec<Vec<f64>>, mut rhs: Vec<f64>) -> Option<Vec<f64>> {
    let n = rhs.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        rhs.swap(col, pivot);
        for row in col + 1..n {
            let f = m[row][col] / m[col][col];
            let (top, bottom) = m.split_at_mut(row);
            for (x, p) in bottom[0][col..].iter_mut().zip(&top[col][col..]) {
                *x -= f * p;
            }
            rhs[row] -= f * rhs[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (rhs[row] - tail) / m[row][row];
    }
    Some(x)
}

/// The exact minimax value by vertex enumeration: a vertex of the LP has support `S` and `|S|`
/// tight tasks `A`, with `Σ_{e∈S} w_e L[e][t] = z` on `A` and `Σ w = 1`.
fn vertex_minimum(losses: &[Vec<f64>]) -> f64 {
    let (experts, tasks) = (losses.len(), losses[0].len());
    let mut best = f64::INFINITY;
    for support in 1u32..1 << experts {
        let s: Vec<usize> = (0..experts).filter(|e| support >> e & 1 == 1).collect();
        for active in 1u32..1 << tasks {
            let a: Vec<usize> = (0..tasks).filter(|t| active >> t & 1 == 1).collect();
            if a.len() != s.len() {
                continue;
            }
            // Unknowns: w on S, then z.
            let mut m: Vec<Vec<f64>> = a
                .iter()
                .map(|&t| s.iter().map(|&e| losses[e][t]).chain([-1.0]).collect())
                .collect();
            m.push(s.iter().map(|_| 1.0).chain([0.0]).collect());
            let mut rhs = vec![0.0; a.len()];
            rhs.push(1.0);
            let Some(x) = solve(m, rhs) else { continue };
            if x[..s.len()].iter().any(|&w| w < -1e-12) {
                continue;
            }
            let mut w = vec![0.0; experts];
            for (i, &e) in s.iter().enumerate() {
                w[e] = x[i].max(0.0);
            }
            best = best.min(worst(losses, &w));
        }
    }
    best
}

/// The minimax value over the grid of the simplex with step `1/steps` (3 or 4 experts).
fn grid_minimum(losses: &[Vec<f64>], steps: usize) -> f64 {
    let mut best = f64::INFINITY;
    let h = 1.0 / steps as f64;
    for i in 0..=steps {
        for j in 0..=steps - i {
            if losses.len() == 3 {
                let w = [i as f64 * h, j as f64 * h, (steps - i - j) as f64 * h];
                best = best.min(worst(losses, &w));
                continue;
            }
            for k in 0..=steps - i - j {
                let w = [i, j, k, steps - i - j - k].map(|x| x as f64 * h);
                best = best.min(worst(losses, &w));
            }
        }
    }
    best
}

fn random_matrix(rng: &mut Rng, experts: usize, tasks: usize) -> Vec<Vec<f64>> {
    (0..experts)
        .map(|_| (0..tasks).map(|_| 1.5 + f64::from(rng.uniform())).collect())
        .collect()
}

fn assert_on_simplex(w: &[f64]) {
    assert!(w.iter().all(|&x| x >= 0.0), "{w:?}");
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
}

/// Checks the LP's weights on `losses` against the vertex and grid minima; returns how many
/// experts they mix.
fn check_minimax(losses: &[Vec<f64>], grid_steps: usize) -> usize {
    let w = minimax_weights(losses).unwrap();
    assert_eq!(w.len(), losses.len());
    assert_on_simplex(&w);
    let got = worst(losses, &w);
    let exact = vertex_minimum(losses);
    assert!(
        (got - exact).abs() < 1e-5,
        "LP {got} vs vertices {exact} on {losses:?}"
    );
    // The grid's best is an upper bound of the optimum, within one grid step of it (every
    // entry changes by at most 1 per unit of weight moved).
    let grid = grid_minimum(losses, grid_steps);
    assert!(got <= grid + 1e-5, "LP {got} vs grid {grid} on {losses:?}");
    assert!(
        got >= grid - 4.0 / grid_steps as f64,
        "LP {got} vs grid {grid}"
    );
    let nonzero = w.iter().filter(|&&x| x > 1e-9).count();
    assert!(nonzero <= losses[0].len(), "{w:?}: more experts than tasks");
    nonzero
}

#[test]
fn random_small_matrices_match_brute_force() {
    let mut rng = Rng(20240611);
    let mut mixtures = 0;
    for experts in [3, 4] {
        for tasks in 2..=4 {
            for _ in 0..4 {
                let losses = random_matrix(&mut rng, experts, tasks);
                let mixed = check_minimax(&losses, if experts == 3 { 200 } else { 60 });
                mixtures += usize::from(mixed > 1);
            }
        }
    }
    // The comparison means little if the optimum were always a single expert.
    assert!(mixtures >= 5, "only {mixtures} of 24 optima mix experts");
}

#[test]
fn larger_random_matrices_match_vertex_enumeration_and_stay_sparse() {
    let mut rng = Rng(7);
    for (experts, tasks) in [(8, 3), (10, 5), (6, 6)] {
        let losses = random_matrix(&mut rng, experts, tasks);
        let w = minimax_weights(&losses).unwrap();
        assert_on_simplex(&w);
        let (got, exact) = (worst(&losses, &w), vertex_minimum(&losses));
        assert!((got - exact).abs() < 1e-5, "LP {got} vs vertices {exact}");
        assert!(w.iter().filter(|&&x| x > 1e-9).count() <= tasks, "{w:?}");
    }
}

#[test]
fn a_dominating_expert_gets_all_the_weight() {
    let losses = vec![
        vec![2.0, 2.5, 3.0],
        vec![1.0, 1.2, 0.9],
        vec![1.1, 1.3, 2.0],
        vec![3.0, 1.25, 1.0],
    ];
    let w = minimax_weights(&losses).unwrap();
    for (e, &x) in w.iter().enumerate() {
        let want = if e == 1 { 1.0 } else { 0.0 };
        assert!((x - want).abs() < 1e-9, "{w:?}");
    }
}

#[test]
fn two_experts_each_best_on_one_task_split_the_weight() {
    let w = minimax_weights(&[vec![1.0, 3.0], vec![3.0, 1.0]]).unwrap();
    assert!(
        (w[0] - 0.5).abs() < 1e-9 && (w[1] - 0.5).abs() < 1e-9,
        "{w:?}"
    );
    // Unequal: w a + (1-w) c = w b + (1-w) d at w = (d - c) / (a - b - c + d).
    let (a, b, c, d) = (1.0, 3.0, 3.0, 1.2);
    let w = minimax_weights(&[vec![a, b], vec![c, d]]).unwrap();
    let want = (d - c) / (a - b - c + d);
    assert!((w[0] - want).abs() < 1e-7, "{w:?} vs {want}");
    assert!((w[1] - (1.0 - want)).abs() < 1e-7, "{w:?}");
}

#[test]
fn the_mean_objective_picks_the_expert_with_the_lowest_mean() {
    let mut rng = Rng(99);
    for _ in 0..5 {
        let losses = random_matrix(&mut rng, 5, 3);
        let means: Vec<f64> = losses.iter().map(|l| l.iter().sum::<f64>() / 3.0).collect();
        let mut best = 0;
        for e in 1..5 {
            if means[e] < means[best] {
                best = e;
            }
        }
        let w = mixture_weights(&losses, Objective::Mean).unwrap();
        assert!((w[best] - 1.0).abs() < 1e-9, "{w:?} vs means {means:?}");
    }
}

#[test]
fn equal_losses_keep_the_first_expert() {
    let w = minimax_weights(&[vec![2.0, 2.0], vec![2.0, 2.0]]).unwrap();
    assert_eq!(w, [1.0, 0.0]);
}

#[test]
fn bad_matrices_are_refused_with_the_expert_and_task() {
    assert_eq!(minimax_weights(&[]), Err(WeightsError::NoExpert));
    assert_eq!(minimax_weights(&[vec![]]), Err(WeightsError::NoTask));
    assert_eq!(
        minimax_weights(&[vec![1.0, 2.0], vec![1.0]]),
        Err(WeightsError::Ragged {
            expert: 1,
            found: 1,
            expected: 2
        })
    );
    let err = minimax_weights(&[vec![1.0, 2.0], vec![1.0, f64::NAN]]).unwrap_err();
    assert!(
        matches!(err, WeightsError::NotFinite { expert: 1, task: 1, value } if value.is_nan()),
        "{err:?}"
    );
}
