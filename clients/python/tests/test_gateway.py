"""The HTTP/JSON gateway as a curl user meets it: its OpenAPI document
validates, a person enrolled over HTTP is found by the gRPC client (and the
other way round) with the same scores, refusals carry their gRPC status,
and over TLS it speaks HTTPS with the server's certificate."""

import base64
import http.client
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from openapi_spec_validator import validate

import handid

GALLERY = "py-gateway"


def call(
    base: str,
    method: str,
    path: str,
    key: Optional[str] = None,
    body: Optional[dict] = None,
    context: Optional[ssl.SSLContext] = None,
) -> Tuple[int, dict]:
    """One HTTP request: the status and the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_the_openapi_document_validates(server) -> None:
    status, document = call(f"http://127.0.0.1:{server.http_port}", "GET", "/v1/openapi.json")
    assert status == 200
    validate(document)
    paths = document["paths"]
    assert "/v1/galleries/{gallery_id}/subjects/{subject_id}:enroll" in paths
    assert "/v1/galleries/{gallery_id}:identify" in paths
    assert "post" in paths["/v1/model:cancelMigration"]
    operations = sum(len(p) for p in paths.values())
    assert operations == 16, sorted(paths)


def test_http_and_grpc_are_one_service(
    server, operator: handid.Client, keys: Dict[str, str], persons: List[List[Path]]
) -> None:
    base = f"http://127.0.0.1:{server.http_port}"
    status, health = call(base, "GET", "/healthz")
    assert (status, health) == (200, {"status": "SERVING"})

    alice, bob = persons[0], persons[1]
    status, enrolled = call(
        base,
        "POST",
        f"/v1/galleries/{GALLERY}/subjects/alice:enroll",
        keys["operator"],
        {"images": [{"data": b64(alice[0])}]},
    )
    assert status == 200, enrolled
    assert enrolled["templateCount"] == 1 and enrolled["replayed"] is False
    operator.enroll(GALLERY, "bob", bob[0])

    status, found = call(
        base,
        "POST",
        f"/v1/galleries/{GALLERY}:identify",
        keys["door"],
        {"image": {"data": b64(alice[0])}, "topK": 2, "rule": {"threshold": 0.5}},
    )
    assert status == 200, found
    direct = operator.identify(GALLERY, alice[0], top_k=2, threshold=0.5)
    assert found["matchedSubjectId"] == direct.matched_subject_id == "alice"
    assert [c["subjectId"] for c in found["candidates"]] == [c.subject_id for c in direct.candidates]
    for over_http, over_grpc in zip(found["candidates"], direct.candidates):
        assert over_http["score"] == pytest.approx(over_grpc.score, abs=1e-6)

    # A key held to another gallery, and no key: the gRPC codes, as HTTP.
    status, refused = call(
        base,
        "POST",
        f"/v1/galleries/{GALLERY}:identify",
        keys["site-a"],
        {"image": {"data": b64(alice[0])}, "topK": 1},
    )
    assert (status, refused["error"]["status"]) == (403, "PERMISSION_DENIED")
    status, refused = call(base, "GET", "/v1/model")
    assert (status, refused["error"]["status"]) == (401, "UNAUTHENTICATED")
    status, model = call(base, "GET", "/v1/model", keys["operator"])
    assert status == 200 and model["active"]["modelId"] == enrolled["modelId"]
    operator.delete_gallery(GALLERY)


def test_the_gateway_speaks_https_with_the_servers_certificate(
    tls_server, certificates, keys: Dict[str, str]
) -> None:
    context = ssl.create_default_context(cafile=str(certificates.ca))
    base = f"https://localhost:{tls_server.http_port}"
    status, health = call(base, "GET", "/healthz", context=context)
    assert (status, health["status"]) == (200, "SERVING")
    status, model = call(base, "GET", "/v1/model", keys["operator"], context=context)
    assert status == 200 and model["active"]["modelId"]
    # Plain text (answered with a TLS alert, not HTTP), or a client that
    # does not trust the CA: no answer.
    with pytest.raises((OSError, http.client.HTTPException)):
        call(f"http://127.0.0.1:{tls_server.http_port}", "GET", "/healthz")
    with pytest.raises(OSError):
        call(base, "GET", "/healthz", context=ssl.create_default_context())
