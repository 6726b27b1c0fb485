//! The gateway's REST resources: one row per gRPC method, and the matching
//! of a request's method and path against them.
//!
//! Paths follow Google's API design guide: resources are nouns
//! (`/v1/galleries/{gallery_id}/subjects/{subject_id}`), the standard
//! methods are GET and DELETE on them, and the other calls are custom
//! methods, POST with a `:verb` after the resource. Ids may themselves hold
//! `:` (`[A-Za-z0-9._:-]`), so the verb is what follows the *last* colon of
//! the last segment, and an id can always be sent percent-encoded.

use http::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

use handid_proto::v1 as pb;

/// Turns a JSON request (its text) into the protobuf bytes of the call's message, or
/// says why it is not one.
pub type DecodeRequest = fn(&[u8]) -> Result<Vec<u8>, serde_json::Error>;
/// Turns the call's protobuf response into JSON.
pub type EncodeResponse = fn(&[u8]) -> Result<Vec<u8>, String>;

/// One REST resource and the gRPC method it calls.
#[derive(Debug, Clone)]
pub struct Route {
    /// GET, POST or DELETE.
    pub method: Method,
    /// The path template: literal segments, `{field}` segments (a field of
    /// the request message, by its proto name), and an optional `:verb`.
    pub pattern: &'static str,
    /// The gRPC method's path, `/handid.v1.HandId/Identify`.
    pub grpc: &'static str,
    /// Whether the request's other fields come from a JSON body (POST) or
    /// from the query string (GET, DELETE).
    pub body: bool,
    /// Request conversion.
    pub decode: DecodeRequest,
    /// Response conversion.
    pub encode: EncodeResponse,
}

fn decode<M: prost::Message + DeserializeOwned>(json: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    Ok(serde_json::from_slice::<M>(json)?.encode_to_vec())
}

fn encode<M: prost::Message + Default + Serialize>(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let message = M::decode(bytes).map_err(|e| e.to_string())?;
    serde_json::to_vec(&message).map_err(|e| e.to_string())
}

const fn route<Req, Resp>(method: Method, pattern: &'static str, grpc: &'static str) -> Route
where
    Req: prost::Message + DeserializeOwned,
    Resp: prost::Message + Default + Serialize,
{
    let body = matches!(method, Method::POST);
    Route {
        method,
        pattern,
        grpc,
        body,
        decode: decode::<Req>,
        encode: encode::<Resp>,
    }
}

/// Every call of both services, as REST resources.
pub static ROUTES: [Route; 14] = [
    route::<pb::EnrollRequest, pb::EnrollResponse>(
        Method::POST,
        "/v1/galleries/{gallery_id}/subjects/{subject_id}:enroll",
        "/handid.v1.HandId/Enroll",
    ),
    route::<pb::IdentifyRequest, pb::IdentifyResponse>(
        Method::POST,
        "/v1/galleries/{gallery_id}:identify",
        "/handid.v1.HandId/Identify",
    ),
    route::<pb::VerifyRequest, pb::VerifyResponse>(
        Method::POST,
        "/v1/galleries/{gallery_id}/subjects/{subject_id}:verify",
        "/handid.v1.HandId/Verify",
    ),
    route::<pb::EmbedRequest, pb::EmbedResponse>(Method::POST, "/v1/images:embed", "/handid.v1.HandId/Embed"),
    route::<pb::GetSubjectRequest, pb::GetSubjectResponse>(
        Method::GET,
        "/v1/galleries/{gallery_id}/subjects/{subject_id}",
        "/handid.v1.HandId/GetSubject",
    ),
    route::<pb::DeleteSubjectRequest, pb::DeleteSubjectResponse>(
        Method::DELETE,
        "/v1/galleries/{gallery_id}/subjects/{subject_id}",
        "/handid.v1.HandId/DeleteSubject",
    ),
    route::<pb::ListSubjectsRequest, pb::ListSubjectsResponse>(
        Method::GET,
        "/v1/galleries/{gallery_id}/subjects",
        "/handid.v1.HandId/ListSubjects",
    ),
    route::<pb::DeleteGalleryRequest, pb::DeleteGalleryResponse>(
        Method::DELETE,
        "/v1/galleries/{gallery_id}",
        "/handid.v1.HandId/DeleteGallery",
    ),
    route::<pb::GetModelRequest, pb::GetModelResponse>(Method::GET, "/v1/model", "/handid.v1.Admin/GetModel"),
    route::<pb::ReloadModelRequest, pb::ReloadModelResponse>(
        Method::POST,
        "/v1/model:reload",
        "/handid.v1.Admin/ReloadModel",
    ),
    route::<pb::PromoteModelRequest, pb::PromoteModelResponse>(
        Method::POST,
        "/v1/model:promote",
        "/handid.v1.Admin/PromoteModel",
    ),
    route::<pb::RollbackModelRequest, pb::RollbackModelResponse>(
        Method::POST,
        "/v1/model:rollback",
        "/handid.v1.Admin/RollbackModel",
    ),
    route::<pb::CancelMigrationRequest, pb::CancelMigrationResponse>(
        Method::POST,
        "/v1/model:cancelMigration",
        "/handid.v1.Admin/CancelMigration",
    ),
    route::<pb::ReloadSettingsRequest, pb::ReloadSettingsResponse>(
        Method::POST,
        "/v1/settings:reload",
        "/handid.v1.Admin/ReloadSettings",
    ),
];

/// A request's place among the routes.
#[derive(Debug)]
pub enum Found {
    /// The route, and its path fields (proto name, decoded value).
    Route(&'static Route, Vec<(&'static str, String)>),
    /// The path is a resource, but not with this HTTP method; the methods
    /// it has.
    WrongMethod(Vec<Method>),
    /// No resource has this path.
    Nothing,
}

/// Finds the route of `method` and `path` (the URI's path, still
/// percent-encoded).
pub fn find(method: &Method, path: &str) -> Found {
    let mut allowed = Vec::new();
    for route in &ROUTES {
        if let Some(fields) = match_path(route.pattern, path) {
            if route.method == *method {
                return Found::Route(route, fields);
            }
            allowed.push(route.method.clone());
        }
    }
    if allowed.is_empty() {
        Found::Nothing
    } else {
        Found::WrongMethod(allowed)
    }
}

/// A template's segments, and its custom verb.
pub fn split_pattern(pattern: &'static str) -> (&'static str, Option<&'static str>) {
    let last = pattern.rfind('/').unwrap_or(0);
    match pattern[last..].rfind(':') {
        Some(colon) => (&pattern[..last + colon], Some(&pattern[last + colon + 1..])),
        None => (pattern, None),
    }
}

/// The path fields when `path` matches `pattern`.
fn match_path(pattern: &'static str, path: &str) -> Option<Vec<(&'static str, String)>> {
    let (segments, verb) = split_pattern(pattern);
    let path = match verb {
        // The verb follows the last colon of the path: ids may hold colons.
        Some(verb) => {
            let (rest, found) = path.rsplit_once(':')?;
            if found != verb || rest.ends_with('/') {
                return None;
            }
            rest
        }
        None => path,
    };
    let mut fields = Vec::new();
    let (mut want, mut got) = (segments.split('/'), path.split('/'));
    loop {
        match (want.next(), got.next()) {
            (None, None) => return Some(fields),
            (Some(w), Some(g)) => match w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                Some(field) => {
                    let value = percent_decode(g)?;
                    // A field's own segment: not empty, and a verbless
                    // route does not swallow a verb meant for another.
                    if value.is_empty() {
                        return None;
                    }
                    fields.push((field, value));
                }
                None if w == g => {}
                None => return None,
            },
            _ => return None,
        }
    }
}

/// `%XX` escapes decoded; `None` for a broken escape or bytes that are not
/// UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query string's `name=value` pairs, decoded (`+` is a space, as in
/// forms); `None` for a pair that cannot be decoded.
pub fn query_pairs(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((
                percent_decode(&name.replace('+', " "))?,
                percent_decode(&value.replace('+', " "))?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(method: Method, path: &str) -> Option<(&'static str, Vec<(&'static str, String)>)> {
        match find(&method, path) {
            Found::Route(route, fields) => Some((route.grpc, fields)),
            _ => None,
        }
    }

    #[test]
    fn verbs_follow_the_last_colon_and_ids_keep_theirs() {
        assert_eq!(
            fields(Method::POST, "/v1/galleries/site:a:identify"),
            Some((
                "/handid.v1.HandId/Identify",
                vec![("gallery_id", "site:a".to_owned())]
            ))
        );
        assert_eq!(
            fields(Method::POST, "/v1/galleries/g/subjects/p%3A7:enroll"),
            Some((
                "/handid.v1.HandId/Enroll",
                vec![("gallery_id", "g".to_owned()), ("subject_id", "p:7".to_owned())]
            ))
        );
        // GET on a subject whose id ends like a verb is that subject.
        assert_eq!(
            fields(Method::GET, "/v1/galleries/g/subjects/p:enroll"),
            Some((
                "/handid.v1.HandId/GetSubject",
                vec![
                    ("gallery_id", "g".to_owned()),
                    ("subject_id", "p:enroll".to_owned())
                ]
            ))
        );
        assert!(fields(Method::POST, "/v1/galleries/:identify").is_none());
        assert!(fields(Method::POST, "/v1/galleries/g:identify/").is_none());
        assert!(fields(Method::POST, "/v1/galleries/g:nothing").is_none());
        assert!(fields(Method::GET, "/v1/galleries/g/subjects/%ZZ").is_none());
        assert!(fields(Method::GET, "/v1/galleries/g/subjects/%FF").is_none());
    }

    #[test]
    fn a_known_path_with_another_method_names_the_allowed_ones() {
        match find(&Method::PUT, "/v1/galleries/g/subjects/p") {
            Found::WrongMethod(allowed) => assert_eq!(allowed, [Method::GET, Method::DELETE]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(find(&Method::GET, "/v2/model"), Found::Nothing));
    }

    #[test]
    fn every_route_names_a_method_of_the_api() {
        let descriptors =
            <prost_types::FileDescriptorSet as prost::Message>::decode(handid_proto::FILE_DESCRIPTOR_SET)
                .expect("descriptors");
        for route in &ROUTES {
            let (service, method) = route.grpc[1..].split_once('/').expect("path");
            let found = descriptors.file.iter().any(|f| {
                f.service.iter().any(|s| {
                    format!("{}.{}", f.package(), s.name()) == service
                        && s.method.iter().any(|m| m.name() == method)
                })
            });
            assert!(found, "{} is not a method of the API", route.grpc);
        }
        let methods: usize = descriptors
            .file
            .iter()
            .filter(|f| f.package() == "handid.v1")
            .map(|f| f.service.iter().map(|s| s.method.len()).sum::<usize>())
            .sum();
        assert_eq!(methods, ROUTES.len(), "a method of the API has no route");
    }

    #[test]
    fn query_strings_decode_like_forms() {
        assert_eq!(
            query_pairs("page_size=2&page_token=a%2Bb+c&&x"),
            Some(vec![
                ("page_size".to_owned(), "2".to_owned()),
                ("page_token".to_owned(), "a+b c".to_owned()),
                ("x".to_owned(), String::new()),
            ])
        );
        assert_eq!(query_pairs("a=%G0"), None);
    }
}
