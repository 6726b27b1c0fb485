//! The gateway's OpenAPI 3.0 document, generated from the API's own
//! descriptors (`handid_proto::FILE_DESCRIPTOR_SET`: messages, fields,
//! enums and the proto file's comments) and the route table, so it cannot
//! drift from what the gateway accepts.
//!
//! Schemas follow the proto3 JSON mapping as the gateway speaks it:
//! lowerCamelCase names (the snake_case names are accepted too), 64-bit
//! integers and bytes as strings (bytes in base64), enums by name,
//! Timestamps as RFC 3339 text, and every field present in responses.

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

use super::routes::{ROUTES, Route, split_pattern};

/// The package whose messages and services the document describes.
const PACKAGE: &str = "handid.v1";

/// The whole document.
pub fn document() -> Value {
    let set = FileDescriptorSet::decode(handid_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set compiled into handid-proto decodes");
    let Some(file) = set.file.iter().find(|f| f.package() == PACKAGE) else {
        unreachable!("the descriptor set holds {PACKAGE}");
    };
    let comments = Comments::of(file);
    let mut schemas = Map::new();
    for (index, message) in file.message_type.iter().enumerate() {
        schemas.insert(
            format!("{PACKAGE}.{}", message.name()),
            message_schema(message, &comments, &[4, index as i32]),
        );
    }
    for (index, kind) in file.enum_type.iter().enumerate() {
        let mut schema = json!({
            "type": "string",
            "enum": kind.value.iter().map(|v| v.name()).collect::<Vec<_>>(),
        });
        describe(&mut schema, comments.get(&[5, index as i32]));
        schemas.insert(format!("{PACKAGE}.{}", kind.name()), schema);
    }
    schemas.insert(
        "Error".to_owned(),
        json!({
            "type": "object",
            "description": "A refused call: the HTTP status, the gRPC status it stands for, and the server's message \
                            (naming the field, image or limit at fault).",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "status", "message"],
                    "properties": {
                        "code": {"type": "integer", "description": "The HTTP status."},
                        "status": {"type": "string", "description": "The gRPC status code's name (google.rpc.Code)."},
                        "message": {"type": "string"},
                    },
                },
            },
        }),
    );
    let mut paths = Map::new();
    for route in &ROUTES {
        let entry = paths
            .entry(route.pattern.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[route.method.as_str().to_ascii_lowercase()] = operation(file, route, &comments);
    }
    paths.insert(
        "/healthz".to_owned(),
        json!({"get": {
            "operationId": "Health",
            "summary": "Whether the server serves: the gRPC health check's answer.",
            "security": [],
            "responses": {
                "200": {"description": "SERVING", "content": {"application/json": {"schema": health_schema()}}},
                "503": {"description": "NOT_SERVING (starting, stopping, or the database or model unavailable)",
                        "content": {"application/json": {"schema": health_schema()}}},
            },
        }}),
    );
    paths.insert(
        "/v1/openapi.json".to_owned(),
        json!({"get": {
            "operationId": "OpenApi",
            "summary": "This document.",
            "security": [],
            "responses": {"200": {"description": "The OpenAPI document", "content": {"application/json": {}}}},
        }}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "handid HTTP/JSON gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The handid.v1 gRPC API as REST resources (proto3 JSON mapping; images as base64). \
                            Every call passes the same keys, limits and audit as gRPC.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key (`handid-server keygen`)."},
            },
            "schemas": schemas,
        },
    })
}

fn health_schema() -> Value {
    json!({"type": "object", "properties": {"status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]}}})
}

/// One route's operation.
fn operation(file: &FileDescriptorProto, route: &Route, comments: &Comments) -> Value {
    let (service, method) = route.grpc[1..].split_once('/').unwrap_or(("", ""));
    let service_name = service.rsplit('.').next().unwrap_or(service);
    let (service_index, service_descriptor) = file
        .service
        .iter()
        .enumerate()
        .find(|(_, s)| s.name() == service_name)
        .expect("every route's service is in the descriptors (routes test)");
    let (method_index, method_descriptor) = service_descriptor
        .method
        .iter()
        .enumerate()
        .find(|(_, m)| m.name() == method)
        .expect("every route's method is in the descriptors (routes test)");
    let input = method_descriptor.input_type().trim_start_matches('.');
    let output = method_descriptor.output_type().trim_start_matches('.');
    let request = file
        .message_type
        .iter()
        .find(|m| format!("{PACKAGE}.{}", m.name()) == input)
        .expect("the input type is in the file");
    let (segments, _) = split_pattern(route.pattern);
    let path_fields: Vec<&str> = segments
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect();
    let mut parameters: Vec<Value> = path_fields
        .iter()
        .map(|field| json!({"name": field, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    let description = comments
        .get(&[6, service_index as i32, 2, method_index as i32])
        .unwrap_or_default();
    let mut operation = json!({
        "operationId": method,
        "tags": [service_name],
        "summary": format!("{service_name}.{method}"),
        "description": description,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": reference(output)}}}},
            "default": {"description": "The call was refused: the status as Google's API guidelines map gRPC codes",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    });
    if route.body {
        operation["requestBody"] = json!({
            "required": false,
            "description": if path_fields.is_empty() {
                format!("A {input} in the proto3 JSON mapping.")
            } else {
                format!("A {input} in the proto3 JSON mapping; {} come from the path.", path_fields.join(", "))
            },
            "content": {"application/json": {"schema": {"$ref": reference(input)}}},
        });
    } else {
        // The other fields of a GET or DELETE are query parameters.
        for field in request.field.iter().filter(|f| !path_fields.contains(&f.name())) {
            parameters.push(json!({
                "name": field.name(),
                "in": "query",
                "required": false,
                "schema": field_schema(field),
            }));
        }
    }
    if !parameters.is_empty() {
        operation["parameters"] = Value::Array(parameters);
    }
    operation
}

fn reference(full_name: &str) -> String {
    format!("#/components/schemas/{full_name}")
}

/// A message's schema; `path` locates it in the file's source info.
fn message_schema(message: &DescriptorProto, comments: &Comments, path: &[i32]) -> Value {
    let mut properties = Map::new();
    for (index, field) in message.field.iter().enumerate() {
        let mut schema = field_schema(field);
        let mut field_path = path.to_vec();
        field_path.extend([2, index as i32]);
        describe(&mut schema, comments.get(&field_path));
        properties.insert(field.json_name().to_owned(), schema);
    }
    let mut schema = json!({"type": "object", "properties": properties, "additionalProperties": false});
    describe(&mut schema, comments.get(path));
    schema
}

/// A field's schema in the proto3 JSON mapping.
fn field_schema(field: &prost_types::FieldDescriptorProto) -> Value {
    let one = match field.r#type() {
        Type::Double | Type::Float => json!({"type": "number"}),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => json!({"type": "integer", "format": "int32"}),
        Type::Uint32 | Type::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        Type::Int64 | Type::Sint64 | Type::Sfixed64 | Type::Uint64 | Type::Fixed64 => {
            json!({"type": "string", "format": "int64"})
        }
        Type::Bool => json!({"type": "boolean"}),
        Type::String => json!({"type": "string"}),
        Type::Bytes => json!({"type": "string", "format": "byte"}),
        Type::Enum | Type::Message | Type::Group => match field.type_name().trim_start_matches('.') {
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            name => json!({"$ref": reference(name)}),
        },
    };
    if field.label() == Label::Repeated {
        json!({"type": "array", "items": one})
    } else {
        one
    }
}

/// Adds `text` as the schema's description. A `$ref` cannot carry
/// siblings in OpenAPI 3.0, so a described reference becomes `allOf`.
fn describe(schema: &mut Value, text: Option<String>) {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return;
    };
    if schema.get("$ref").is_some() {
        *schema = json!({"allOf": [schema.clone()], "description": text});
    } else {
        schema["description"] = Value::String(text);
    }
}

/// The leading comments of a file's elements, by source path.
struct Comments(Vec<(Vec<i32>, String)>);

impl Comments {
    fn of(file: &FileDescriptorProto) -> Self {
        let locations = file
            .source_code_info
            .as_ref()
            .map(|i| i.location.as_slice())
            .unwrap_or_default();
        Self(
            locations
                .iter()
                .filter_map(|l| {
                    let text = l.leading_comments();
                    (!text.trim().is_empty()).then(|| {
                        let text = text.lines().map(str::trim).collect::<Vec<_>>().join(" ");
                        (l.path.clone(), text.trim().to_owned())
                    })
                })
                .collect(),
        )
    }

    fn get(&self, path: &[i32]) -> Option<String> {
        self.0
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, text)| text.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_describes_every_route_and_message() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.0.3");
        let identify = &doc["paths"]["/v1/galleries/{gallery_id}:identify"]["post"];
        assert_eq!(
            identify["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/handid.v1.IdentifyRequest"
        );
        assert!(
            identify["description"]
                .as_str()
                .is_some_and(|d| d.contains("1:N") || d.len() > 20),
            "the rpc's comment is the description: {identify}"
        );
        let list = &doc["paths"]["/v1/galleries/{gallery_id}/subjects"]["get"]["parameters"];
        let names: Vec<&str> = list
            .as_array()
            .expect("parameters")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(names, ["gallery_id", "page_size", "page_token"]);
        let image = &doc["components"]["schemas"]["handid.v1.Image"]["properties"]["data"];
        assert_eq!(image["format"], "byte");
        let created = &doc["components"]["schemas"]["handid.v1.Subject"]["properties"]["createdAt"];
        assert_eq!(created["format"], "date-time");
        let mode = &doc["components"]["schemas"]["handid.v1.ReloadModelRequest"]["properties"]["mode"];
        assert_eq!(mode["$ref"], "#/components/schemas/handid.v1.ReloadMode");
        let operations: usize = doc["paths"]
            .as_object()
            .expect("paths")
            .values()
            .map(|p| p.as_object().map_or(0, Map::len))
            .sum();
        assert_eq!(operations, ROUTES.len() + 2);
    }
}
