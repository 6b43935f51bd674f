//! How every settings file a user writes is read: the job file (`job.rs`), `config.toml`
//! (`config.rs`) and a corpus's `policy.json` (`store/policy.rs`). One idiom, as ripgrep's
//! low-level arguments: the text is deserialized into a raw struct of optional fields
//! (`#[serde(deny_unknown_fields)]`, enum spellings from serde only) with the offending field's
//! path from `serde_path_to_error`, then each file's own `resolve()` checks ranges and fills
//! defaults through the helpers here. Every rejection is one [`SettingsError`].

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A settings file that is wrong: which file (when there is one), which field (when one is to
/// blame, as a path like `train.lr`), what is wrong, and how to mend it. Serialized as the
/// `.error.json` of a rejected job: `{"error", "field", "hint"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SettingsError {
    #[serde(skip)]
    pub path: Option<PathBuf>,
    pub field: Option<String>,
    #[serde(rename = "error")]
    pub message: String,
    pub hint: Option<String>,
}

impl SettingsError {
    /// Wrong at `field` (a dotted path).
    pub fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: None, field: Some(field.into()), message: message.into(), hint: None }
    }

    /// Wrong as a whole (not valid JSON, not a regular file, ...).
    pub fn whole(message: impl Into<String>) -> Self {
        Self { path: None, field: None, message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Names the file the error is in.
    pub fn in_file(mut self, path: &Path) -> Self {
        self.path = Some(path.to_path_buf());
        self
    }
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.message)?,
            None => write!(f, "{}", self.message)?,
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for SettingsError {}

/// A field path as `serde_path_to_error` gives it, for people: the root is `(root)`, and list
/// indices are dropped (`lora.target_modules[1]` names `lora.target_modules`; the message names
/// the value).
fn field_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let names: Vec<&str> = path
        .iter()
        .filter_map(|seg| match seg {
            Segment::Map { key: name } | Segment::Enum { variant: name } => Some(name.as_str()),
            Segment::Seq { .. } | Segment::Unknown => None,
        })
        .collect();
    if names.is_empty() { "(root)".to_string() } else { names.join(".") }
}

/// The raw struct a JSON settings text holds, or the error at its field.
pub fn from_json<T: DeserializeOwned>(text: &[u8]) -> Result<T, SettingsError> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let raw = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let syntax = e.inner().is_syntax() || e.inner().is_eof();
        let field = (!syntax).then(|| field_of(e.path()));
        let message = e.into_inner().to_string();
        match field {
            None => SettingsError::whole(format!("not valid JSON: {message}")),
            Some(f) => SettingsError::at(f, message),
        }
    })?;
    de.end().map_err(|e| SettingsError::whole(format!("not valid JSON: {e}")))?;
    Ok(raw)
}

/// The raw struct a TOML settings text holds, or the error at its field.
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, SettingsError> {
    let de = toml::Deserializer::parse(text)
        .map_err(|e| SettingsError::whole(format!("not valid TOML: {}", e.message().trim())))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = Some(field_of(e.path())).filter(|f| f != "(root)");
        let message = e.into_inner().message().trim().to_string();
        match field {
            None => SettingsError::whole(message),
            Some(f) => SettingsError::at(f, message),
        }
    })
}

/// An integer setting: absent -> `default`, else within `lo..=hi`.
pub fn int<T>(field: &str, v: Option<T>, lo: T, hi: T, default: T) -> Result<T, SettingsError>
where
    T: PartialOrd + Copy + std::fmt::Display,
{
    match v {
        None => Ok(default),
        Some(n) if lo <= n && n <= hi => Ok(n),
        Some(n) => Err(SettingsError::at(field, format!("must be an integer from {lo} to {hi}, got {n}"))),
    }
}

/// Where a number's range ends.
#[derive(Clone, Copy)]
pub enum Upper {
    Closed(f64),
    Open(f64),
}

/// A real-valued setting: absent -> `default`, else finite and within `lo` up to `hi`.
pub fn num(field: &str, v: Option<f64>, lo: f64, hi: Upper, default: f64) -> Result<f64, SettingsError> {
    let Some(x) = v else { return Ok(default) };
    let (ok, range) = match hi {
        Upper::Closed(h) => (x >= lo && x <= h, format!("[{lo}, {h}]")),
        Upper::Open(h) => (x >= lo && x < h, format!("[{lo}, {h})")),
    };
    if ok && x.is_finite() {
        Ok(x)
    } else {
        Err(SettingsError::at(field, format!("must be a number in {range}, got {x}")))
    }
}

/// A duration in seconds: absent -> `default`, else finite and within `lo..=hi`.
pub fn seconds(
    field: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    default: std::time::Duration,
) -> Result<std::time::Duration, SettingsError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(std::time::Duration::from_secs_f64(x)),
        Some(x) => {
            Err(SettingsError::at(field, format!("must be a finite number of seconds from {lo} to {hi}, got {x}")))
        }
    }
}

/// A command run by `sh -c`: absent stays absent, blank is refused.
pub fn command(field: &str, v: Option<String>) -> Result<Option<String>, SettingsError> {
    match v {
        Some(c) if c.trim().is_empty() => Err(SettingsError::at(field, "must be a command, got an empty string")),
        other => Ok(other),
    }
}

/// The enum value `s` spells, by serde's spelling of `T` (a CLI argument reads as the files do).
pub fn spelled<T: DeserializeOwned>(s: &str) -> Result<T, String> {
    use serde::de::value::{Error, StrDeserializer};
    T::deserialize(StrDeserializer::<Error>::new(s)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Raw {
        a: Option<u64>,
        inner: Option<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        list: Option<Vec<u64>>,
    }

    #[test]
    fn fields_are_named_by_their_path() {
        let field = |t: &str| from_json::<Raw>(t.as_bytes()).unwrap_err().field;
        assert_eq!(field(r#"{"a": "x"}"#).as_deref(), Some("a"));
        assert_eq!(field(r#"{"inner": {"list": [1, "x"]}}"#).as_deref(), Some("inner.list"));
        assert_eq!(field(r#"{"inner": {"colour": 1}}"#).as_deref(), Some("inner.colour"));
        assert_eq!(field(r#"[1]"#).as_deref(), Some("(root)"));
        assert_eq!(field(r#"{"a": 1"#), None);
        assert_eq!(field(r#"{"a": 1} {}"#), None);
        let t = |t: &str| from_toml::<Raw>(t).unwrap_err();
        assert_eq!(t("a = \"x\"").field.as_deref(), Some("a"));
        assert_eq!(t("[inner]\nlist = [1, \"x\"]").field.as_deref(), Some("inner.list"));
        assert_eq!(t("[inner]\ncolour = 1").field.as_deref(), Some("inner.colour"));
        assert!(t("a = ").message.contains("TOML"));
    }
}
