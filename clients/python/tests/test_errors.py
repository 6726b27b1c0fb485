"""Refusals as HandIdError subclasses with the server's message, and the
client's own argument checks."""

from pathlib import Path
from typing import Dict, List

import grpc
import pytest

import handid
from handid.v1 import handid_pb2, handid_pb2_grpc

GALLERY = "py-errors"
NOT_AN_IMAGE = b"%PDF-1.7 definitely not a hand photo \x00\x01\x02"


@pytest.fixture(scope="module")
def gallery(operator: handid.Client, persons: List[List[Path]]) -> str:
    operator.enroll(GALLERY, "alice", persons[0][0])
    return GALLERY


def test_wrong_or_missing_key_is_unauthenticated(server, gallery: str, persons) -> None:
    for api_key in ("hid_not-a-key", None):
        with handid.Client(server.address, api_key=api_key) as client:
            with pytest.raises(handid.Unauthenticated) as refused:
                client.identify(gallery, persons[0][0], threshold=0.5)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.message


def test_missing_scope_or_gallery_is_permission_denied(
    server, keys: Dict[str, str], gallery: str, persons
) -> None:
    with handid.Client(server.address, api_key=keys["door"]) as door:
        assert door.identify(gallery, persons[0][0], threshold=0.5).matched_subject_id == "alice"
        with pytest.raises(handid.PermissionDenied) as refused:
            door.enroll(gallery, "mallory", persons[1][0])
        assert "enroll" in refused.value.message
        with pytest.raises(handid.PermissionDenied):
            door.get_model()
    with handid.Client(server.address, api_key=keys["site-a"]) as site:
        site.enroll("site-a", "alice", persons[0][0])
        with pytest.raises(handid.PermissionDenied) as refused:
            site.identify(gallery, persons[0][0], threshold=0.5)
        assert gallery in refused.value.message
        # A key limited to galleries may not Embed (it belongs to none).
        with pytest.raises(handid.PermissionDenied):
            site.embed(persons[0][0])


def test_not_an_image_is_invalid_argument_with_the_server_message(
    server, keys: Dict[str, str], operator: handid.Client, gallery: str
) -> None:
    with pytest.raises(handid.InvalidArgument) as refused:
        operator.enroll(gallery, "bob", NOT_AN_IMAGE)
    error = refused.value
    # The message is the server's, verbatim: the same call through the raw stub.
    with grpc.insecure_channel(server.address) as channel:
        stub = handid_pb2_grpc.HandIdStub(channel)
        request = handid_pb2.EnrollRequest(
            gallery_id=gallery, subject_id="bob", images=[handid_pb2.Image(data=NOT_AN_IMAGE)]
        )
        with pytest.raises(grpc.RpcError) as raw:
            stub.Enroll(request, metadata=[("authorization", f"Bearer {keys['operator']}")])
    assert (error.code, error.message) == (raw.value.code(), raw.value.details())
    assert "image 0" in error.message
    assert str(error) == f"INVALID_ARGUMENT: {error.message}"
    # No image byte in what the exception shows.
    for text in (str(error), repr(error), repr(error.args)):
        assert "PDF" not in text and "hand photo" not in text
    assert isinstance(error, handid.HandIdError)


def test_other_refusals(operator: handid.Client, gallery: str, persons) -> None:
    with pytest.raises(handid.InvalidArgument) as refused:
        operator.identify(gallery, persons[0][0], top_k=0, threshold=0.5)
    assert "top_k" in refused.value.message
    with pytest.raises(handid.InvalidArgument):
        operator.enroll(gallery, "nobody", [])
    with pytest.raises(handid.NotFound) as missing:
        operator.verify("py-no-such-gallery", "alice", persons[0][0], threshold=0.5)
    assert "py-no-such-gallery" in missing.value.message


def test_unreachable_server_is_unavailable() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with handid.Client(f"127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(handid.Unavailable):
            client.health()


def test_client_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        handid.Client("http://127.0.0.1:1", tls=True)
    with pytest.raises(ValueError):
        handid.Client("ftp://127.0.0.1:1")
    with pytest.raises(ValueError):
        handid.Client("127.0.0.1:1", api_key="line\nbreak")
    with pytest.raises(ValueError):
        handid.TLS(cert=b"cert only")
    assert "secret" not in repr(handid.TLS(ca=b"x", cert=b"y", key=b"secret"))
    assert "hid_secret" not in repr(handid.Client("127.0.0.1:1", api_key="hid_secret"))
    with handid.Client("127.0.0.1:1") as client:
        with pytest.raises(ValueError):
            client.identify("g", b"...", threshold=0.5, target_fmr=1e-3)
        with pytest.raises(TypeError) as wrong:
            client.embed([42])
        assert "int" in str(wrong.value)
        with pytest.raises(FileNotFoundError):
            client.embed(tmp_path / "missing.jpg")
