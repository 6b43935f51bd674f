//! LoRA adapters on the attention and MLP projections, in PEFT's on-disk format
//! (`adapter_config.json` + `adapter_model.safetensors`, tensors named
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so adapters move between
//! rerankd and Python's peft unchanged.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ModelError, Qwen3Config, Result};

/// The seven projections LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    fn module_path(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    /// (in_features, out_features) of the projection.
    pub fn dims(self, c: &Qwen3Config) -> (usize, usize) {
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        match self {
            Target::Q => (c.hidden_size, q),
            Target::K | Target::V => (c.hidden_size, kv),
            Target::O => (q, c.hidden_size),
            Target::Gate | Target::Up => (c.hidden_size, c.intermediate_size),
            Target::Down => (c.intermediate_size, c.hidden_size),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a LoRA adapter is: rank, scaling, dropout, which projections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// PEFT's rsLoRA: scale alpha / sqrt(r) instead of alpha / r.
    #[serde(default)]
    pub use_rslora: bool,
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Target::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown target module `{s}` (expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
            ))
        })
    }
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f64, dropout: f64, targets: &[Target]) -> Self {
        let mut targets = targets.to_vec();
        targets.sort();
        targets.dedup();
        Self { r, alpha, dropout, targets, use_rslora: false }
    }

    /// Trainable parameters of this adapter on `model` (A and B of every target, every layer).
    pub fn param_count(&self, model: &Qwen3Config) -> u64 {
        let per_layer: usize = self
            .targets
            .iter()
            .map(|t| {
                let (i, o) = t.dims(model);
                self.r * (i + o)
            })
            .sum();
        (per_layer * model.num_hidden_layers) as u64
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    /// The `adapter_config.json` PEFT writes for this adapter.
    pub fn to_peft_json(&self, base_model: Option<&str>) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }

    /// Reads PEFT's `adapter_config.json`, refusing variants this engine does not compute.
    pub fn from_peft_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, "reading", e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::file(path, None, format!("not valid JSON: {e}")))?;
        let err = |field: &str, msg: &str| ModelError::file(path, Some(field.to_string()), msg.to_string());
        if v.get("peft_type").and_then(Value::as_str).is_some_and(|t| t != "LORA") {
            return Err(err("peft_type", "only LORA adapters are supported"));
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| err("r", "must be a positive integer"))?;
        let alpha = v.get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| err("lora_alpha", "must be a number"))?;
        let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let targets = match v.get("target_modules") {
            Some(Value::Array(a)) => {
                a.iter()
                    .map(|t| t.as_str().and_then(Target::parse))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| err("target_modules", "only q/k/v/o/gate/up/down_proj are supported"))?
            }
            _ => return Err(err("target_modules", "must be a list of module names")),
        };
        for flag in ["use_dora", "fan_in_fan_out"] {
            if v.get(flag).and_then(Value::as_bool).unwrap_or(false) {
                return Err(err(flag, "is not supported"));
            }
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if v.get(pattern).and_then(Value::as_object).is_some_and(|o| !o.is_empty()) {
                return Err(err(pattern, "per-module ranks or alphas are not supported"));
            }
        }
        let mut cfg = Self::new(r as usize, alpha, dropout, &targets);
        cfg.use_rslora = v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        Ok(cfg)
    }
}

/// One adapted projection: `delta(x) = scale * (x A^T) B^T`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

/// The LoRA tensors of a whole model.
#[derive(Debug, Clone)]
pub struct LoraSet {
    pub cfg: LoraConfig,
    layers: Vec<[Option<LoraPair>; 7]>,
}

fn peft_name(layer: usize, t: Target, ab: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight", t.module_path(), t.name())
}

impl LoraSet {
    /// PEFT's initialisation: A ~ kaiming-uniform (bound 1/sqrt(in)), B = 0, seeded.
    pub fn init(cfg: &LoraConfig, model: &Qwen3Config, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let layers = (0..model.num_hidden_layers)
            .map(|_| {
                let mut row: [Option<LoraPair>; 7] = Default::default();
                for &t in &cfg.targets {
                    let (i, o) = t.dims(model);
                    let bound = 1.0 / (i as f32).sqrt();
                    let a: Vec<f32> = (0..cfg.r * i).map(|_| rng.random_range(-bound..bound)).collect();
                    row[t.index()] = Some(LoraPair {
                        a: Var::from_tensor(&Tensor::from_vec(a, (cfg.r, i), device)?)?,
                        b: Var::zeros((o, cfg.r), DType::F32, device)?,
                    });
                }
                Ok(row)
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg: cfg.clone(), layers })
    }

    pub fn get(&self, layer: usize, t: Target) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[t.index()].as_ref())
    }

    /// Every trainable tensor, in a fixed order (layer, target, A then B).
    pub fn vars(&self) -> Vec<&Var> {
        self.named().into_iter().map(|(_, v)| v).collect()
    }

    /// `(PEFT name, tensor)` for every trainable tensor, in `vars()` order.
    pub fn named(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &l[t.index()] {
                    out.push((peft_name(i, t, "A"), &p.a));
                    out.push((peft_name(i, t, "B"), &p.b));
                }
            }
        }
        out
    }

    /// Writes a PEFT adapter directory.
    pub fn save(&self, dir: &Path, base_model: Option<&str>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, "creating", e))?;
        let tensors: HashMap<String, Tensor> =
            self.named().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let st = dir.join("adapter_model.safetensors");
        candle_core::safetensors::save(&tensors, &st)
            .map_err(|e| ModelError::Write { path: st.clone(), source: Box::new(e) })?;
        let cfg = dir.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&self.cfg.to_peft_json(base_model)).expect("json value serialises");
        std::fs::write(&cfg, text).map_err(|e| ModelError::io(&cfg, "writing", e))
    }

    /// Reads a PEFT adapter directory made here or by Python's peft.
    pub fn load(dir: &Path, model: &Qwen3Config, device: &Device) -> Result<Self> {
        let cfg = LoraConfig::from_peft_json(&dir.join("adapter_config.json"))?;
        Self::load_tensors(&cfg, &dir.join("adapter_model.safetensors"), model, device)
    }

    /// Reads LoRA tensors with PEFT names from one safetensors file.
    pub fn load_tensors(cfg: &LoraConfig, path: &Path, model: &Qwen3Config, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(ModelError::file(path, None, "missing"));
        }
        let map = candle_core::safetensors::load(path, device)
            .map_err(|e| ModelError::file(path, None, format!("not a readable safetensors file: {e}")))?;
        let mut layers: Vec<[Option<LoraPair>; 7]> = (0..model.num_hidden_layers).map(|_| Default::default()).collect();
        let mut found = 0;
        for (i, row) in layers.iter_mut().enumerate() {
            for &t in &cfg.targets {
                let get = |ab: &str| {
                    map.get(&peft_name(i, t, ab))
                        .or_else(|| map.get(&peft_name(i, t, ab).replace(".weight", ".default.weight")))
                };
                let (a, b) = match (get("A"), get("B")) {
                    (Some(a), Some(b)) => (a, b),
                    (None, None) => continue,
                    _ => {
                        return Err(ModelError::file(
                            path,
                            Some(peft_name(i, t, "A/B")),
                            "has only one of lora_A and lora_B",
                        ));
                    }
                };
                let (inp, out) = t.dims(model);
                if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
                    return Err(ModelError::file(
                        path,
                        Some(peft_name(i, t, "A")),
                        format!(
                            "shapes {:?} / {:?} do not fit r={} and this model ({inp} -> {out})",
                            a.dims(),
                            b.dims(),
                            cfg.r
                        ),
                    ));
                }
                row[t.index()] = Some(LoraPair {
                    a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
                    b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
                });
                found += 1;
            }
        }
        if found == 0 {
            return Err(ModelError::file(path, None, "holds no LoRA tensor for this model's layers"));
        }
        Ok(Self { cfg: cfg.clone(), layers })
    }

    /// Copies the values of another set with the same layout (used to keep a best epoch).
    pub fn snapshot(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut row: [Option<LoraPair>; 7] = Default::default();
                for (i, p) in l.iter().enumerate() {
                    if let Some(p) = p {
                        row[i] = Some(LoraPair {
                            a: Var::from_tensor(&p.a.as_tensor().copy()?)?,
                            b: Var::from_tensor(&p.b.as_tensor().copy()?)?,
                        });
                    }
                }
                Ok(row)
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg: self.cfg.clone(), layers })
    }
}
