//! Qwen3 `config.json`: the fields the model needs, read from either layout seen in the wild
//! (top-level `rope_theta`, or the newer `rope_parameters` object).

use std::path::Path;

use serde_json::Value;

use super::ModelError;

/// The dimensions and constants of a Qwen3 checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
}

impl Qwen3Config {
    /// Reads and validates `config.json`; every error names the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, "reading", e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::file(path, None, format!("not valid JSON: {e}")))?;
        Self::from_value(&value).map_err(|(field, msg)| ModelError::file(path, Some(field), msg))
    }

    /// Parses a config object; an error is `(field, message)`.
    pub fn from_value(v: &Value) -> Result<Self, (String, String)> {
        let obj = v.as_object().ok_or(("(root)".to_string(), "expected a JSON object".to_string()))?;
        let usize_field = |name: &str| -> Result<usize, (String, String)> {
            match obj.get(name) {
                Some(Value::Number(n)) => n
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or((name.to_string(), format!("must be a positive integer, got {n}"))),
                Some(other) => Err((name.to_string(), format!("must be a positive integer, got {other}"))),
                None => Err((name.to_string(), "missing".to_string())),
            }
        };
        let f64_in = |o: &serde_json::Map<String, Value>, name: &str| -> Option<Result<f64, (String, String)>> {
            o.get(name).map(|x| {
                x.as_f64()
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .ok_or((name.to_string(), format!("must be a positive number, got {x}")))
            })
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => usize_field("num_key_value_heads")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err((
                "num_key_value_heads".into(),
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) => hidden_size / num_attention_heads,
            Some(_) => usize_field("head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(("head_dim".into(), format!("must be even for rotary embeddings, got {head_dim}")));
        }
        // Newer configs move rope_theta into `rope_parameters`; older ones keep it at the top.
        let rope_theta = match obj.get("rope_parameters").and_then(Value::as_object) {
            Some(rp) => f64_in(rp, "rope_theta")
                .map(|r| r.map_err(|(f, m)| (format!("rope_parameters.{f}"), m)))
                .or_else(|| f64_in(obj, "rope_theta")),
            None => f64_in(obj, "rope_theta"),
        }
        .unwrap_or(Ok(1_000_000.0))?;
        let rms_norm_eps = f64_in(obj, "rms_norm_eps").unwrap_or(Ok(1e-6))?;
        let tie_word_embeddings = match obj.get("tie_word_embeddings") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(("tie_word_embeddings".into(), format!("must be true or false, got {other}")));
            }
        };
        Ok(Self {
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings,
        })
    }

    /// Parameters of the transformer body (everything but the embedding table).
    pub fn body_params(&self) -> u64 {
        let (d, hd) = (self.hidden_size as u64, self.head_dim as u64);
        let q = self.num_attention_heads as u64 * hd;
        let kv = self.num_key_value_heads as u64 * hd;
        let attn = d * q + 2 * d * kv + q * d;
        let mlp = 3 * d * self.intermediate_size as u64;
        let norms = 2 * d + 2 * hd;
        self.num_hidden_layers as u64 * (attn + mlp + norms) + d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"vocab_size": 100, "hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": true})
    }

    #[test]
    fn rope_theta_in_both_layouts() {
        let mut v = base();
        v["rope_theta"] = json!(5000.0);
        assert_eq!(Qwen3Config::from_value(&v).unwrap().rope_theta, 5000.0);
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 7000.0});
        assert_eq!(Qwen3Config::from_value(&v).unwrap().rope_theta, 7000.0);
    }

    #[test]
    fn bad_field_is_named() {
        let mut v = base();
        v["hidden_size"] = json!("sixteen");
        assert_eq!(Qwen3Config::from_value(&v).unwrap_err().0, "hidden_size");
        let mut v = base();
        v.as_object_mut().unwrap().remove("num_hidden_layers");
        assert_eq!(Qwen3Config::from_value(&v).unwrap_err().0, "num_hidden_layers");
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert_eq!(Qwen3Config::from_value(&v).unwrap_err().0, "num_key_value_heads");
    }
}
