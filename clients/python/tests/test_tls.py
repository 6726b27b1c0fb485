"""TLS with a private CA, plain text refused, and mutual TLS."""

from pathlib import Path
from typing import Dict, List

import pytest

import handid

GALLERY = "py-tls"


def test_private_ca(tls_server, certificates, keys: Dict[str, str], persons: List[List[Path]]) -> None:
    ca_by_path = handid.TLS(ca=certificates.ca)
    ca_by_bytes = handid.TLS(ca=certificates.ca.read_bytes())
    for address, tls in [
        (tls_server.address, ca_by_path),
        (f"https://localhost:{tls_server.port}", ca_by_bytes),
    ]:
        with handid.Client(address, api_key=keys["operator"], tls=tls) as client:
            assert client.health() == "SERVING"
            enrolled = client.enroll(GALLERY, "alice", persons[0][0])
            result = client.identify(GALLERY, persons[0][0], threshold=0.5)
            assert result.matched_subject_id == "alice"
            assert enrolled.template_count >= 1


def test_plain_text_or_unknown_ca_is_unavailable(tls_server, keys: Dict[str, str]) -> None:
    for client in (
        handid.Client(tls_server.address, api_key=keys["operator"], timeout=5),
        handid.Client(f"https://{tls_server.address}", api_key=keys["operator"], timeout=5),
    ):
        with client, pytest.raises(handid.Unavailable):
            client.get_model()


def test_mutual_tls_certificate_instead_of_key(mtls_server, certificates) -> None:
    with_cert = handid.TLS(
        ca=certificates.ca, cert=certificates.client_cert, key=certificates.client_key
    )
    with handid.Client(mtls_server.address, tls=with_cert) as client:
        assert client.get_model().active is not None  # granted admin by its SAN
        with pytest.raises(handid.PermissionDenied):  # but not enroll
            client.delete_gallery(GALLERY)
    with handid.Client(mtls_server.address, tls=handid.TLS(ca=certificates.ca), timeout=5) as client:
        with pytest.raises(handid.Unavailable):  # no certificate: no handshake
            client.health()
