//! The session cookie: finding it in a request, verifying its signature, and writing `Set-Cookie`.
//!
//! The cookie's value is `base64(HMAC-SHA256(id)) ‖ id` ([`cookie::SignedJar`]). A cookie that does
//! not verify with the current key or one of the old keys, or whose id is not in the exact format herd
//! makes, is treated as absent: the visitor is anonymous, no Redis key is built from it and no error
//! is shown.

use std::time::Duration;

use base64::Engine as _;
use cookie::{Cookie, CookieJar, Key, SameSite};
use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;

use crate::keys::SessionId;

/// Cookie attributes of one layer.
#[derive(Clone, Debug)]
pub(crate) struct CookieConfig {
    /// The name as sent (with the `__Host-` prefix when enabled).
    pub(crate) name: String,
    pub(crate) secure: bool,
    pub(crate) same_site: SameSite,
    pub(crate) path: String,
    pub(crate) domain: Option<String>,
    pub(crate) persistent: bool,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: "herd_session".into(),
            secure: true,
            same_site: SameSite::Lax,
            path: "/".into(),
            domain: None,
            persistent: false,
        }
    }
}

/// Longest cookie value looked at; anything longer is not ours and is ignored unread.
const MAX_COOKIE_VALUE: usize = 256;

/// The raw value of the cookie named `name`, if the request carries one (first match wins). Header
/// values that are not visible ASCII are skipped.
#[cfg(test)]
pub(crate) fn find(headers: &http::HeaderMap, name: &str) -> Option<String> {
    find_in(headers.get_all(http::header::COOKIE), name).map(str::to_owned)
}

/// [`find`] over the `Cookie` header values of a request.
pub(crate) fn find_in<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
    name: &str,
) -> Option<&'a str> {
    for value in values {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            if k.trim() == name {
                let v = v.trim().trim_matches('"');
                if v.len() <= MAX_COOKIE_VALUE {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Length of the base64 HMAC-SHA256 digest in front of a signed value ([`cookie::SignedJar`]'s format).
const DIGEST_B64_LEN: usize = 44;

/// Verifies signed cookie values, in the format [`cookie::SignedJar`] writes
/// (`base64(HMAC-SHA256(signing key, value)) ‖ value`), without allocating: the HMAC states keyed
/// with the current and old keys are computed once per layer, so a request pays for hashing its
/// value only (two SHA-256 blocks instead of four).
#[derive(Clone)]
pub(crate) struct Verifier {
    macs: Vec<Hmac<Sha256>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.macs.len())
            .finish()
    }
}

impl Verifier {
    pub(crate) fn new<'a>(keys: impl IntoIterator<Item = &'a Key>) -> Verifier {
        Verifier {
            macs: keys
                .into_iter()
                .filter_map(|k| Hmac::<Sha256>::new_from_slice(k.signing()).ok())
                .collect(),
        }
    }

    /// The id in `raw` if its signature verifies with one of the keys and the id is well-formed.
    pub(crate) fn verify(&self, raw: &str) -> Option<SessionId> {
        if raw.len() <= DIGEST_B64_LEN || !raw.is_char_boundary(DIGEST_B64_LEN) {
            return None;
        }
        let (digest_b64, value) = raw.split_at(DIGEST_B64_LEN);
        // Shape first (cheap), signature second; neither result is revealed separately.
        let id = SessionId::parse(value)?;
        let mut digest = [0u8; 48];
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(digest_b64, &mut digest)
            .ok()?;
        let digest = &digest[..n];
        self.macs
            .iter()
            .any(|mac| {
                let mut mac = mac.clone();
                mac.update(value.as_bytes());
                mac.verify_slice(digest).is_ok()
            })
            .then_some(id)
    }
}

/// `Set-Cookie` carrying `id`, signed with `key`. `max_age` only for persistent cookies.
pub(crate) fn set_cookie(
    config: &CookieConfig,
    key: &Key,
    id: &SessionId,
    max_age: Option<Duration>,
) -> HeaderValue {
    let mut jar = CookieJar::new();
    let mut cookie = base(config, id.as_str().to_owned());
    if let (true, Some(age)) = (config.persistent, max_age) {
        cookie.set_max_age(cookie::time::Duration::try_from(age).ok());
    }
    jar.signed_mut(key).add(cookie);
    let signed = jar
        .delta()
        .next()
        .map(|c| c.to_string())
        .unwrap_or_default();
    HeaderValue::from_str(&signed).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `Set-Cookie` that makes the browser drop the cookie.
pub(crate) fn removal(config: &CookieConfig) -> HeaderValue {
    let mut cookie = base(config, String::new());
    cookie.make_removal();
    HeaderValue::from_str(&cookie.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn base(config: &CookieConfig, value: String) -> Cookie<'static> {
    let mut cookie = Cookie::new(config.name.clone(), value);
    cookie.set_http_only(true);
    // Browsers refuse `SameSite=None` without `Secure`: it always goes with it.
    cookie.set_secure(config.secure || config.same_site == SameSite::None);
    cookie.set_same_site(config.same_site);
    cookie.set_path(config.path.clone());
    if let Some(domain) = &config.domain {
        cookie.set_domain(domain.clone());
    }
    cookie
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{header, HeaderMap};

    fn header_value_of(v: &HeaderValue) -> String {
        v.to_str().unwrap_or_default().to_owned()
    }

    #[test]
    fn same_site_none_is_always_secure() {
        let key = Key::generate();
        let id = SessionId::generate();
        let config = CookieConfig {
            secure: false,
            same_site: SameSite::None,
            ..CookieConfig::default()
        };
        let set = header_value_of(&set_cookie(&config, &key, &id, None));
        assert!(
            set.contains("SameSite=None") && set.contains("Secure"),
            "{set}"
        );
        let lax = CookieConfig {
            secure: false,
            ..CookieConfig::default()
        };
        let set = header_value_of(&set_cookie(&lax, &key, &id, None));
        assert!(!set.contains("Secure"), "{set}");
    }

    #[test]
    fn round_trip_and_attributes() {
        let key = Key::generate();
        let config = CookieConfig::default();
        let id = SessionId::generate();
        let set = header_value_of(&set_cookie(&config, &key, &id, None));
        assert!(set.contains("HttpOnly"), "{set}");
        assert!(set.contains("Secure"), "{set}");
        assert!(set.contains("SameSite=Lax"), "{set}");
        assert!(set.contains("Path=/"), "{set}");
        assert!(!set.contains("Max-Age"), "{set}");
        let value = set
            .split(';')
            .next()
            .and_then(|p| p.split_once('='))
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default();
        assert_eq!(Verifier::new([&key]).verify(&value), Some(id));
        // An old key still verifies when listed; an unknown key never does.
        assert_eq!(
            Verifier::new([&Key::generate(), &key]).verify(&value),
            Some(id)
        );
        assert_eq!(Verifier::new([&Key::generate()]).verify(&value), None);
    }

    #[test]
    fn find_skips_other_cookies_and_oversize_values() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; herd_session=xyz; b=2"),
        );
        assert_eq!(find(&headers, "herd_session").as_deref(), Some("xyz"));
        let mut headers = HeaderMap::new();
        let big = format!("herd_session={}", "x".repeat(10_000));
        headers.append(header::COOKIE, HeaderValue::from_str(&big).expect("ascii"));
        assert_eq!(find(&headers, "herd_session"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any cookie value, of any length or alphabet: no panic, and never verified.
        #[test]
        fn arbitrary_cookie_values_never_verify(raw in ".{0,300}") {
            let key = Key::from(&[9u8; 64]);
            proptest::prop_assert!(Verifier::new([&key]).verify(&raw).is_none());
        }

        /// A genuine signature over a hostile id: verified, but the id is still refused.
        #[test]
        fn signed_hostile_ids_are_refused(id in "[^0-9a-f]{1,64}|[0-9a-f]{0,31}|[0-9a-f]{33,64}") {
            let key = Key::from(&[9u8; 64]);
            let mut jar = CookieJar::new();
            jar.signed_mut(&key).add(Cookie::new("herd_session", id));
            let value = jar.get("herd_session").map(|c| c.value().to_owned()).unwrap_or_default();
            proptest::prop_assert!(Verifier::new([&key]).verify(&value).is_none());
        }

        /// Cookie headers made of arbitrary bytes: no panic.
        #[test]
        fn arbitrary_cookie_headers_do_not_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                headers.append(header::COOKIE, v);
            }
            let _ = find(&headers, "herd_session");
        }
    }
}
