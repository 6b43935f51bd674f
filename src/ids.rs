//! The names that become paths under the state root: [`CorpusName`] and [`RunId`]. Each is built
//! only by its parser, which applies the one rule below, so a value of either type is safe to join
//! onto a directory: never empty, never `.` or `..`, never a separator, never a leading dot. Every
//! entry point (CLI arguments, job files, policy, HTTP routes and bodies, status files) parses into
//! them; the store builds paths only from them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest corpus name.
pub const MAX_CORPUS_LEN: usize = 64;
/// The longest run id: a corpus name, `__`, a UTC time and a counter fit with room to spare.
pub const MAX_RUN_ID_LEN: usize = 128;

/// Why a string is not a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}` is not a {what} ({rule})")]
pub struct NameError {
    /// The offending text, cut to a readable length.
    pub shown: String,
    pub what: &'static str,
    pub rule: &'static str,
}

const CORPUS_RULE: &str = "1-64 of A-Z a-z 0-9 . _ -, not starting with a dot";
const RUN_ID_RULE: &str = "1-128 of A-Z a-z 0-9 . _ -, not starting with a dot";

fn check(s: &str, max: usize, what: &'static str, rule: &'static str) -> Result<(), NameError> {
    let ok = (1..=max).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(NameError { shown: s.chars().take(80).collect(), what, rule }) }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $max:expr, $what:expr, $rule:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, NameError> {
                check(s, $max, $what, $rule)?;
                Ok(Self(s.to_string()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                check(&s, $max, $what, $rule)?;
                Ok(Self(s))
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl From<$name> for serde_json::Value {
            fn from(n: $name) -> serde_json::Value {
                serde_json::Value::String(n.0)
            }
        }

        impl From<&$name> for serde_json::Value {
            fn from(n: &$name) -> serde_json::Value {
                serde_json::Value::String(n.0.clone())
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&self.0)
            }
        }

        impl AsRef<std::ffi::OsStr> for $name {
            fn as_ref(&self) -> &std::ffi::OsStr {
                std::ffi::OsStr::new(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

name_type!(
    /// A corpus name: 1-64 of `[A-Za-z0-9._-]`, not starting with a dot.
    CorpusName,
    MAX_CORPUS_LEN,
    "corpus name",
    CORPUS_RULE
);

name_type!(
    /// A run id, `<corpus>__<UTC YYYYMMDD_HHMMSS>[__N]` when made here; any name of the corpus
    /// alphabet up to 128 bytes is accepted when read back.
    RunId,
    MAX_RUN_ID_LEN,
    "run id",
    RUN_ID_RULE
);

impl RunId {
    /// The id of a new run of `corpus` created at `compact_time` (`YYYYMMDD_HHMMSS`), the `n`th
    /// with that name (1 for the first; later ones get `__n`).
    pub fn new(corpus: &CorpusName, compact_time: &str, n: u32) -> Self {
        let id = if n <= 1 { format!("{corpus}__{compact_time}") } else { format!("{corpus}__{compact_time}__{n}") };
        Self::try_from(id).expect("a corpus name, a compact time and a counter form a run id")
    }

    /// The corpus this run belongs to, as an id made by [`RunId::new`] names it (read from the
    /// right, since a corpus name may itself hold `__`). The run's status file is the authority;
    /// this is for ids seen without one.
    pub fn corpus(&self) -> Option<CorpusName> {
        fn counter(s: &str) -> Option<&str> {
            s.rsplit_once("__").filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).map(|(h, _)| h)
        }
        let time = |t: &str| {
            t.len() == 15 && t.bytes().enumerate().all(|(i, b)| if i == 8 { b == b'_' } else { b.is_ascii_digit() })
        };
        [counter(&self.0), Some(self.0.as_str())]
            .into_iter()
            .flatten()
            .find_map(|head| head.rsplit_once("__").filter(|(_, t)| time(t)).map(|(c, _)| c))
            .and_then(|c| CorpusName::parse(c).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_by_one_rule() {
        assert!(CorpusName::parse("demo-1.x_y").is_ok());
        for bad in ["", ".", "..", "../x", "a/b", ".x", "caf\u{e9}", "/etc", "a\0b"] {
            assert!(CorpusName::parse(bad).is_err(), "{bad:?}");
            assert!(RunId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(CorpusName::parse(&"a".repeat(64)).is_ok());
        assert!(CorpusName::parse(&"a".repeat(65)).is_err());
        assert!(RunId::parse(&"a".repeat(128)).is_ok());
        assert!(RunId::parse(&"a".repeat(129)).is_err());
        let e = CorpusName::parse("../x").unwrap_err().to_string();
        assert!(e.contains("`../x` is not a corpus name"), "{e}");
    }

    #[test]
    fn run_ids_name_their_corpus() {
        let c = CorpusName::parse("docs").unwrap();
        let id = RunId::new(&c, "20261127_120000", 1);
        assert_eq!(id.as_str(), "docs__20261127_120000");
        assert_eq!(RunId::new(&c, "20261127_120000", 3).as_str(), "docs__20261127_120000__3");
        assert_eq!(id.corpus(), Some(c));
        assert_eq!(RunId::parse("plain").unwrap().corpus(), None);
        let odd = CorpusName::parse("a__b").unwrap();
        assert_eq!(RunId::new(&odd, "20261127_120000", 2).corpus(), Some(odd));
    }

    #[test]
    fn serde_refuses_what_the_parser_refuses() {
        let ok: CorpusName = serde_json::from_str("\"docs\"").unwrap();
        assert_eq!(ok, "docs");
        assert!(serde_json::from_str::<CorpusName>("\"../../etc\"").is_err());
        assert!(serde_json::from_str::<RunId>("\"a/b\"").is_err());
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"docs\"");
    }
}
