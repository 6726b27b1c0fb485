//! ListSubjects' page tokens.

use super::{Result, types::Id};
use crate::error::ServiceError;

/// Page tokens are opaque to clients: a version tag and the hex of the last
/// subject id of the page.
const PAGE_TOKEN_PREFIX: &str = "p1.";

pub(super) fn encode_page_token(last_subject: &str) -> String {
    format!("{PAGE_TOKEN_PREFIX}{}", hex::encode(last_subject))
}

pub fn decode_page_token(token: &str) -> Result<Option<Id>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(|h| hex::decode(h).ok())
        .ok_or(ServiceError::BadPageToken)?;
    let text = String::from_utf8(bytes).map_err(|_| ServiceError::BadPageToken)?;
    Id::parse("page_token", text)
        .map(Some)
        .map_err(|_| ServiceError::BadPageToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let token = encode_page_token("subject-42");
        assert_eq!(
            decode_page_token(&token)
                .expect("ours")
                .map(|i| i.as_str().to_owned()),
            Some("subject-42".to_owned())
        );
        assert_eq!(decode_page_token("").expect("first page"), None);
        for bad in ["subject-42", "p1.zz", "p1.20", "p2.6162"] {
            assert!(
                matches!(decode_page_token(bad), Err(ServiceError::BadPageToken)),
                "{bad}"
            );
        }
    }
}
