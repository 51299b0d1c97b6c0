//! Making parts of a model trainable: fresh LoRA factors on chosen modules (everything else
//! frozen), or every weight of a base model (to pre-train a tiny base). Also writes a freshly
//! initialised base checkpoint to start from.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use moerge_library::{BaseModelInfo, ContentHash, NewAdapter};
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};
use crate::models::{BaseModel, Family, Precision};
use crate::plan::export::write_factors;

/// Shape of the LoRA to train.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// Module-name suffixes, PEFT's list form (`q_proj`, `fc1`, ...).
    pub targets: Vec<String>,
    /// Seeds the initialisation of A (B starts at zero, as in PEFT).
    pub seed: u64,
}

impl LoraSpec {
    fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The trainable factors attached to a model by [`BaseModel::with_trainable_lora`].
pub struct TrainableLora {
    spec: LoraSpec,
    base_name: String,
    /// `(module, A [r, in], B [out, r])`, in module order.
    modules: Vec<(String, Var, Var)>,
}

impl TrainableLora {
    /// The variables to optimise.
    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|(_, a, b)| [a.clone(), b.clone()])
            .collect()
    }

    /// Writes the factors as a PEFT adapter folder (atomically) and returns its content hash.
    pub fn save_peft(&self, dir: &Path) -> Result<ContentHash> {
        let header = NewAdapter {
            r: self.spec.rank,
            lora_alpha: self.spec.alpha,
            use_rslora: self.spec.use_rslora,
            target_modules: self.spec.targets.clone(),
            base_model_name_or_path: self.base_name.clone(),
            alpha_overrides: BTreeMap::new(),
            modules: Vec::new(),
        };
        let factors: Vec<(String, Tensor, Tensor)> = self
            .modules
            .iter()
            .map(|(m, a, b)| (m.clone(), a.as_tensor().clone(), b.as_tensor().clone()))
            .collect();
        write_factors(dir, header, &factors)
    }
}

impl BaseModel {
    /// A copy of this model with fresh trainable LoRA factors on every linear layer whose name
    /// ends in one of `spec.targets` (PEFT's list rule); base weights stay frozen. A is drawn
    /// like PEFT's default (uniform in ±1/sqrt(in)), B is zero, so training starts at the base.
    pub fn with_trainable_lora(&self, spec: &LoraSpec) -> Result<(BaseModel, TrainableLora)> {
        if spec.rank == 0 || spec.targets.is_empty() {
            return Err(EngineError::InvalidArgument {
                argument: "lora",
                message: "needs a rank of at least 1 and at least one target module".into(),
            });
        }
        let mut model = self.clone();
        let device = self.device().clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        let mut modules = Vec::new();
        let scale = spec.scale();
        for layer in model.linears_mut() {
            let name = layer.name().to_string();
            if !spec
                .targets
                .iter()
                .any(|t| name == *t || name.ends_with(&format!(".{t}")))
            {
                continue;
            }
            let (out, inp) = layer.shape();
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..spec.rank * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), &device)?)?;
            let b = Var::zeros((out, spec.rank), DType::F32, &device)?;
            layer.set_trainable_lora(a.clone(), b.clone(), scale);
            modules.push((name, a, b));
        }
        if modules.is_empty() {
            return Err(EngineError::InvalidArgument {
                argument: "targets",
                message: format!("{:?} match no linear layer of this model", spec.targets),
            });
        }
        let base_name = self.info().name().to_string();
        Ok((
            model,
            TrainableLora {
                spec: spec.clone(),
                base_name,
                modules,
            },
        ))
    }

    /// Loads a base model whose every weight is a trainable variable (f32), on the CPU.
    pub fn load_trainable(dir: &Path) -> Result<(BaseModel, TrainableBase)> {
        Self::load_trainable_on(dir, &Device::Cpu)
    }

    /// [`BaseModel::load_trainable`] onto `device`.
    pub fn load_trainable_on(dir: &Path, device: &Device) -> Result<(BaseModel, TrainableBase)> {
        let info = BaseModelInfo::from_dir(dir)?;
        let varmap = VarMap::new();
        {
            let mut vars = varmap
                .data()
                .lock()
                .expect("a fresh VarMap is not poisoned");
            for file in info.weight_files() {
                for (name, t) in candle_core::safetensors::load(file, device)? {
                    vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
                }
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = BaseModel::from_var_builder(info, Precision::F32, vb)?;
        Ok((model, TrainableBase { varmap }))
    }
}

/// Every weight of a base model as a variable, from [`BaseModel::load_trainable`].
pub struct TrainableBase {
    varmap: VarMap,
}

impl TrainableBase {
    /// The variables, sorted by name so optimisation is deterministic.
    pub fn vars(&self) -> Vec<Var> {
        let vars = self.varmap.data().lock().expect("VarMap lock");
        let mut named: Vec<(&String, &Var)> = vars.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Writes the current weights as `model.safetensors` in `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        Ok(self.varmap.save(dir.join("model.safetensors"))?)
    }
}

/// Writes `config.json` and a freshly initialised `model.safetensors` for the family the
/// config names: weights and embeddings normal(0, 0.02) as transformers initialises them,
/// biases 0, norm weights 1, all from `seed` (drawn on the host: it only writes a file).
pub fn write_random_base(dir: &Path, config: &serde_json::Value, seed: u64) -> Result<()> {
    let config_path = dir.join("config.json");
    let model_type = config["model_type"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Building the model against an empty VarMap creates every tensor it needs, by name and
    // shape; the values are set below.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Family::load(&model_type, config, &config_path, vb)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vars = varmap.data().lock().expect("VarMap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let n = var.elem_count();
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains("norm") {
            vec![1.0; n]
        } else {
            (0..n).map(|_| 0.02 * standard_normal(&mut rng)).collect()
        };
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
    }
    drop(vars);
    std::fs::create_dir_all(dir).map_err(|e| EngineError::InvalidArgument {
        argument: "out",
        message: format!("cannot create {}: {e}", dir.display()),
    })?;
    let text = serde_json::to_string_pretty(config).expect("JSON serialises");
    std::fs::write(&config_path, text).map_err(|e| EngineError::InvalidArgument {
        argument: "out",
        message: format!("cannot write {}: {e}", config_path.display()),
    })?;
    Ok(varmap.save(dir.join("model.safetensors"))?)
}

/// Box–Muller: one standard normal draw from two uniforms.
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
