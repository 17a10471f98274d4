//! The JavaScript client helper (`clients/js/chorus.js`), served at `GET /client/chorus.js`.
//!
//! Public, like the Socket.IO endpoint it goes with: a browser page loads it with a plain
//! `<script>` tag, before it has any token. The file is compiled in, so each server serves
//! exactly the helper of its own version, byte for byte.

use axum::{
    Router,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

/// The helper, as it is in the repository.
pub const CHORUS_JS: &str = include_str!("../../clients/js/chorus.js");

/// The route's path.
pub const PATH: &str = "/client/chorus.js";

/// The URL is not versioned, so the file is not `immutable`: five minutes keeps repeated page
/// loads (and shared caches) off the server while a rollout reaches browsers within minutes,
/// and the `ETag` makes each revalidation after that a bodiless 304.
const CACHE_CONTROL: &str = "public, max-age=300";

/// FNV-1a of the file, computed at build time: the `ETag` changes with the file only.
const HASH: u64 = {
    let bytes = CHORUS_JS.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
};

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(PATH, get(chorus_js))
}

fn etag() -> String {
    format!("\"{HASH:016x}\"")
}

async fn chorus_js(request: HeaderMap) -> Response {
    let etag = etag();
    let headers = [
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        ),
        (
            header::ETAG,
            HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\"")),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    if matches_etag(&request, &etag) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (
        headers,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/javascript; charset=utf-8"),
        )],
        CHORUS_JS,
    )
        .into_response()
}

/// Whether `If-None-Match` names `etag` (weakly, as RFC 9110 compares for GET) or is `*`.
fn matches_etag(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_is_compared_weakly_and_in_lists() {
        let etag = etag();
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
            h
        };
        assert!(matches_etag(&with(&etag), &etag));
        assert!(matches_etag(&with(&format!("W/{etag}")), &etag));
        assert!(matches_etag(&with(&format!("\"other\", {etag}")), &etag));
        assert!(matches_etag(&with("*"), &etag));
        assert!(!matches_etag(&with("\"other\""), &etag));
        assert!(!matches_etag(&HeaderMap::new(), &etag));
    }
}
