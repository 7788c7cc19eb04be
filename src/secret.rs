//! The personal access token, in a type that never shows itself.
//!
//! `Debug` and `Display` print `***`; the only way to the value is [`Pat::expose`], called in
//! exactly one place (building the `Authorization` header, which is marked sensitive).

use std::fmt;
use std::sync::Arc;

#[derive(Clone, PartialEq, Eq)]
pub struct Pat(Arc<str>);

impl Pat {
    /// A token from text as it sits in an environment variable or file: surrounding white
    /// space (a file's final newline) is not part of it. `None` when nothing is left.
    pub fn new(raw: &str) -> Option<Pat> {
        let t = raw.trim();
        (!t.is_empty()).then(|| Pat(Arc::from(t)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pat(***)")
    }
}

impl fmt::Display for Pat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_itself() {
        let p = Pat::new(" pt-secret-value\n").expect("token");
        assert_eq!(p.expose(), "pt-secret-value");
        assert_eq!(
            format!("{p} {p:?} {:?}", Some(&p)),
            "*** Pat(***) Some(Pat(***))"
        );
        assert!(Pat::new(" \n").is_none());
    }
}
