//! The keys that sign and verify session cookies: given in code
//! ([`SessionLayer::with_key`](super::SessionLayer::with_key)), read from `HERD_SECRET` and
//! `HERD_OLD_SECRETS` ([`SessionLayer::from_env`](super::SessionLayer::from_env)), or, when neither
//! names one, a random key for this process only.

use std::fmt;
use std::sync::{Once, OnceLock};

use base64::Engine as _;
use cookie::Key;

use super::cookie::Verifier;
use crate::config::non_blank;
use crate::error::{Error, Result};

/// The variable holding the current secret.
pub(crate) const ENV_SECRET: &str = "HERD_SECRET";
/// The variable holding earlier secrets, comma-separated.
pub(crate) const ENV_OLD_SECRETS: &str = "HERD_OLD_SECRETS";

/// The current key (signs new cookies and verifies) and the old ones (verify only).
#[derive(Clone)]
pub(crate) struct SigningKeys {
    pub(crate) current: Key,
    pub(crate) old: Vec<Key>,
    /// No key was given: `current` is random, made by this process.
    pub(crate) ephemeral: bool,
}

/// Never shows a key: only how many there are and whether the current one is random.
impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeys")
            .field("current", &"<secret>")
            .field("old", &self.old.len())
            .field("ephemeral", &self.ephemeral)
            .finish()
    }
}

impl SigningKeys {
    /// A random key for this process only (the same for every layer of the process), no old
    /// keys.
    pub(crate) fn ephemeral() -> SigningKeys {
        static PROCESS_KEY: OnceLock<Key> = OnceLock::new();
        SigningKeys {
            current: PROCESS_KEY.get_or_init(Key::generate).clone(),
            old: Vec::new(),
            ephemeral: true,
        }
    }

    /// `HERD_SECRET` and `HERD_OLD_SECRETS` from the process environment.
    pub(crate) fn from_env() -> Result<SigningKeys> {
        SigningKeys::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables: `lookup` answers the value of a
    /// variable, `None` when it is not set. An empty or blank value counts as unset.
    pub(crate) fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<SigningKeys> {
        let var = |name: &str| non_blank(lookup(name));
        let mut keys = match var(ENV_SECRET) {
            Some(secret) => SigningKeys {
                current: key_from_base64(ENV_SECRET, &secret)?,
                old: Vec::new(),
                ephemeral: false,
            },
            None => SigningKeys::ephemeral(),
        };
        if let Some(old) = var(ENV_OLD_SECRETS) {
            let entries: Vec<&str> = old
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let n = entries.len();
            keys.old = entries
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    let source = if n == 1 {
                        ENV_OLD_SECRETS.to_owned()
                    } else {
                        format!("{ENV_OLD_SECRETS} (entry {} of {n})", i + 1)
                    };
                    key_from_base64(&source, s)
                })
                .collect::<Result<_>>()?;
        }
        Ok(keys)
    }

    /// The HMAC states that verify a cookie: the current key first, then the old ones.
    pub(crate) fn verifier(&self) -> Verifier {
        Verifier::new(std::iter::once(&self.current).chain(self.old.iter()))
    }
}

/// Decodes a base64 secret (standard or URL-safe alphabet, padding optional) of at least 64 bytes.
/// `source` names where the text came from, for the error message (`HERD_SECRET`, ...).
pub(crate) fn key_from_base64(source: &str, text: &str) -> Result<Key> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    // `openssl rand -base64 64` wraps its output at 64 columns: line breaks are not part of it.
    let text: String = text.split_ascii_whitespace().collect();
    let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(&text).ok())
        .ok_or_else(|| {
            Error::Config(format!(
                "{source} is not base64; make one with `openssl rand -base64 64`"
            ))
        })?;
    Key::try_from(bytes.as_slice()).map_err(|_| {
        Error::Config(format!(
            "{source} decodes to {} bytes but needs at least 64; make one with `openssl rand -base64 64`",
            bytes.len()
        ))
    })
}

/// Says, once per process and loudly, that cookies are signed with a random key.
pub(crate) fn warn_ephemeral_key() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        // A secret in the environment that this layer does not use (built with
        // `SessionLayer::new`) is the likelier mistake behind a random key: say so.
        let msg = if non_blank(std::env::var(ENV_SECRET).ok()).is_some() {
            "HERD_SECRET is set, but this session layer was built without it \
             (SessionLayer::new): it signs cookies with a random key for this process only. \
             Sessions will not survive a restart and cookies will not verify in other \
             processes. Build it with SessionLayer::from_env(redis)? or .with_key(..)."
        } else {
            "HERD_SECRET is not set: using a random cookie key for this process only. \
             Sessions will not survive a restart and cookies will not verify in other \
             processes. Set HERD_SECRET (e.g. `openssl rand -base64 64`) in production."
        };
        if tracing::dispatcher::has_been_set() {
            tracing::warn!("{msg}");
        } else {
            eprintln!("herd: WARNING: {msg}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// `from_env`'s logic over a fixed set of variables.
    fn from_vars(vars: &[(&str, &str)]) -> Result<SigningKeys> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        SigningKeys::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn short_or_garbage_secrets_are_clear_errors() {
        let short = b64(&[7u8; 32]);
        let err = key_from_base64("HERD_SECRET", &short)
            .err()
            .map(|e| e.to_string());
        assert!(err
            .as_deref()
            .unwrap_or("")
            .contains("32 bytes but needs at least 64"));
        let err = key_from_base64("HERD_SECRET", "not base64 at all!").err();
        assert!(err
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("not base64"));
        let good = b64(&[7u8; 64]);
        assert!(key_from_base64("HERD_SECRET", &good).is_ok());
        // As `openssl rand -base64 64` prints it: wrapped at 64 columns.
        let (head, tail) = good.split_at(64);
        assert!(key_from_base64("HERD_SECRET", &format!("{head}\n{tail}\n")).is_ok());
    }

    #[test]
    fn both_variables_are_read() {
        let secret = b64(&[1u8; 64]);
        let old1 = b64(&[2u8; 64]);
        let old2 = b64(&[3u8; 80]);
        let old_list = format!(" {old1} ,, {old2},");
        let keys =
            from_vars(&[("HERD_SECRET", &secret), ("HERD_OLD_SECRETS", &old_list)]).expect("keys");
        assert!(!keys.ephemeral);
        assert_eq!(keys.current.master(), Key::from(&[1u8; 64]).master());
        let old: Vec<&[u8]> = keys.old.iter().map(Key::master).collect();
        assert_eq!(
            old,
            [
                Key::from(&[2u8; 64]).master(),
                Key::from(&[3u8; 80]).master()
            ],
            "old secrets in order, blanks between commas skipped"
        );
        // No key ever shows in Debug output.
        let debug = format!("{keys:?}");
        assert!(
            debug.contains("<secret>") && !debug.contains(&secret),
            "{debug}"
        );
    }

    /// No secret: a random key of this process, flagged, the same for every layer of it.
    #[test]
    fn a_missing_secret_gives_an_ephemeral_random_key() {
        let a = from_vars(&[]).expect("keys");
        let b = from_vars(&[("HERD_SECRET", " "), ("HERD_OLD_SECRETS", "")]).expect("keys");
        assert!(a.ephemeral && b.ephemeral);
        assert!(a.old.is_empty() && b.old.is_empty());
        assert_eq!(a.current.master(), b.current.master());
        assert_eq!(a.current.master().len(), 64);
        let given = from_vars(&[("HERD_SECRET", &b64(&[9u8; 64]))]).expect("keys");
        assert_ne!(given.current.master(), a.current.master());
    }

    #[test]
    fn malformed_secrets_are_errors_that_name_the_variable() {
        let good = b64(&[1u8; 64]);
        let short = b64(&[1u8; 40]);
        let good_then_short = format!("{good},{short}");
        // (variables, the variable the message must name, a detail it must give)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: [Case<'_>; 4] = [
            (
                &[("HERD_SECRET", "not base64!")],
                "HERD_SECRET",
                "not base64",
            ),
            (&[("HERD_SECRET", &short)], "HERD_SECRET", "40 bytes"),
            (
                &[("HERD_SECRET", &good), ("HERD_OLD_SECRETS", "%%%")],
                "HERD_OLD_SECRETS",
                "not base64",
            ),
            (
                &[
                    ("HERD_SECRET", &good),
                    ("HERD_OLD_SECRETS", &good_then_short),
                ],
                "HERD_OLD_SECRETS (entry 2 of 2)",
                "40 bytes",
            ),
        ];
        for (vars, variable, detail) in cases {
            let message = match from_vars(vars) {
                Err(Error::Config(m)) => m,
                other => panic!("{vars:?}: expected a config error, got {other:?}"),
            };
            assert!(
                message.contains(variable) && message.contains(detail),
                "{vars:?}: `{message}` should name {variable} and say {detail:?}"
            );
        }
    }
}
