//! Checks a fit's result against the experts it was fitted on, before anyone stores or runs
//! it: the plan validates, names only given experts, and every tensor the plan needs is there
//! with the right shape (and no tensor is left over).

use std::collections::BTreeSet;

use crate::plan::{
    fixed_a_name, fixed_b_name, router_bias_name, router_weight_name, ModulePlan, Plan, Router,
};
use crate::policy::{ExpertView, Fitted};

/// What [`check_fitted`] demands of learned routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterTensors {
    /// A fit's result: every learned router has its weight.
    Required,
    /// An optimisation template: a router without tensors is initialised by the trainer.
    Optional,
}

/// Checks `fitted` against `experts`; the message names the plan field or tensor at fault.
pub fn check_fitted(
    fitted: &Fitted,
    experts: &[ExpertView<'_>],
    routers: RouterTensors,
) -> Result<(), String> {
    let plan = &fitted.plan;
    if plan.tensors.is_some() {
        return Err(
            "plan.tensors is set; a policy returns its tensors in Fitted.tensors and leaves \
             plan.tensors unset (the host stores them and sets it)"
                .into(),
        );
    }
    // Learned routers and fixed modules need a tensor file; the host makes it later.
    let mut placeholder = plan.clone();
    placeholder.tensors = Some("0".repeat(64));
    placeholder.validate().map_err(|e| format!("plan: {e}"))?;
    for (i, r) in plan.experts.iter().enumerate() {
        match experts.iter().find(|e| e.name == r.name) {
            None => {
                return Err(format!(
                    "plan.experts[{i}]: {:?} is not one of the experts the fit was given",
                    r.name
                ))
            }
            Some(e) if e.hash != r.hash => {
                return Err(format!(
                    "plan.experts[{i}]: hash of {:?} is {}, but the fit was given {}",
                    r.name, r.hash, e.hash
                ))
            }
            Some(_) => {}
        }
    }
    let mut used = BTreeSet::new();
    for (_, pass) in plan.passes() {
        for module in module_shapes(experts) {
            check_module(fitted, &pass, module, routers, &mut used)?;
        }
    }
    for (name, t) in &fitted.tensors {
        if !used.contains(name) {
            return Err(format!("tensor {name:?} is not used by the plan"));
        }
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(format!(
                "tensor {name:?}: shape {:?} holds {} values, but {} were given",
                t.shape,
                t.shape.iter().product::<usize>(),
                t.data.len()
            ));
        }
        if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
            return Err(format!("tensor {name:?}: value {i} is {}", t.data[i]));
        }
    }
    Ok(())
}

/// `(module, in_features, out_features)` of every module any expert adapts.
fn module_shapes<'e>(experts: &'e [ExpertView<'_>]) -> Vec<(&'e str, usize, usize)> {
    let mut out: Vec<(&str, usize, usize)> = Vec::new();
    for m in experts.iter().flat_map(|e| &e.modules) {
        if !out.iter().any(|(p, _, _)| *p == m.module) {
            out.push((m.module, m.in_features, m.out_features));
        }
    }
    out
}

fn check_module(
    fitted: &Fitted,
    pass: &Plan,
    (module, inputs, outputs): (&str, usize, usize),
    routers: RouterTensors,
    used: &mut BTreeSet<String>,
) -> Result<(), String> {
    let shape = |name: &str| fitted.tensors.get(name).map(|t| t.shape.as_slice());
    let mut need = |name: String, want: &[usize], required: bool| -> Result<(), String> {
        match shape(&name) {
            Some(got) if got == want => {
                used.insert(name);
                Ok(())
            }
            Some(got) => Err(format!(
                "tensor {name:?} has shape {got:?}; module {module} needs {want:?}"
            )),
            None if required => Err(format!(
                "module {module}: the plan needs tensor {name:?} {want:?}, which the fit did not return"
            )),
            None => Ok(()),
        }
    };
    match pass.module(module) {
        ModulePlan::Routed {
            router: Router::Learned,
            groups,
            ..
        } => {
            let units = if groups.is_empty() {
                pass.experts.len()
            } else {
                groups.len()
            };
            let required = routers == RouterTensors::Required;
            need(router_weight_name(module), &[units, inputs], required)?;
            need(router_bias_name(module), &[units], false)?;
        }
        ModulePlan::Fixed => {
            let a = fixed_a_name(module);
            let rank = match shape(&a) {
                Some([r, _]) => *r,
                _ => 0,
            };
            need(a, &[rank, inputs], true)?;
            need(fixed_b_name(module), &[outputs, rank], true)?;
        }
        _ => {}
    }
    Ok(())
}
