"""Fixtures: real handid servers on a throwaway PostgreSQL, and real hand photos.

Run by ``scripts/with-postgres.sh scripts/test_python.sh``, which exports
DATABASE_URL and HANDID_BIN (the folder of handid-server and
handid-trainer). The servers serve a tiny random model (``handid-trainer
init --arch tiny-vit``): its embeddings carry no identity, and it has no
calibrated thresholds. Photos come from the 11k Hands sample at
``<repo>/../shared/data/11k-hands-sample`` (or HANDID_SAMPLE).
"""

import csv
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

import handid

REPO = Path(__file__).resolve().parents[3]
SERVE_TIMEOUT_S = 60.0
#: Log files of the servers started, printed when the session fails.
SERVER_LOGS: List[Path] = []


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: run the suite with "
            "scripts/with-postgres.sh scripts/test_python.sh",
            pytrace=False,
        )
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    """A running handid-server."""

    port: int
    #: Its settings file.
    settings: Path
    #: The port of its HTTP/JSON gateway, when it has one.
    http_port: Optional[int] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """The folder holding handid-server and handid-trainer."""
    return Path(_required_env("HANDID_BIN"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 11k Hands sample (read-only)."""
    default = REPO.parent / "shared" / "data" / "11k-hands-sample"
    path = Path(os.environ.get("HANDID_SAMPLE", default))
    if not (path / "HandInfo.csv").is_file():
        pytest.fail(f"the 11k Hands sample is not at {path} (set HANDID_SAMPLE)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def persons(sample_dir: Path) -> List[List[Path]]:
    """Dorsal-right photos without accessories of the persons that have at
    least two, one list per person, in a fixed order."""
    by_person: Dict[str, List[Path]] = {}
    with open(sample_dir / "HandInfo.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["aspectOfHand"] == "dorsal right" and row["accessories"] == "0":
                by_person.setdefault(row["id"].strip(), []).append(
                    sample_dir / "Hands" / row["imageName"]
                )
    found = [sorted(images) for _, images in sorted(by_person.items()) if len(images) >= 2]
    assert len(found) >= 6, f"the sample at {sample_dir} has too few persons"
    return found


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder: checkpoints, keys, settings, logs."""
    return tmp_path_factory.mktemp("handid")


@pytest.fixture(scope="session")
def model_dir(bin_dir: Path, work: Path) -> Path:
    """A serving checkpoint with random weights and no calibrated thresholds."""
    out = work / "model"
    subprocess.run(
        [str(bin_dir / "handid-trainer"), "init", "--arch", "tiny-vit", "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


#: The API keys of the servers: id -> (scopes, galleries or None for all).
KEY_GRANTS = {
    "operator": ("enroll,identify,embed,admin", None),
    "door": ("identify", None),
    "site-a": ("enroll,identify,embed", "site-a"),
}


@pytest.fixture(scope="session")
def keys(bin_dir: Path, work: Path) -> Dict[str, str]:
    """API keys by id (see KEY_GRANTS); their settings entries are in
    ``work/keys.yaml``."""
    entries, keys = [], {}
    for key_id, (scopes, galleries) in KEY_GRANTS.items():
        key_file = work / f"{key_id}.key"
        command = [str(bin_dir / "handid-server"), "keygen", "--id", key_id, "--scopes", scopes]
        if galleries:
            command += ["--galleries", galleries]
        command += ["--key-out", str(key_file)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        entries.append(done.stdout)
        keys[key_id] = key_file.read_text().strip()
    (work / "keys.yaml").write_text("".join(entries))
    return keys


def start_server(
    bin_dir: Path,
    work: Path,
    name: str,
    model_dir: Path,
    sections: str = "",
    auth: str = "",
    http: bool = False,
    model: str = "",
    **client_args,
) -> Iterator[Server]:
    """Starts ``handid-server serve`` with its own settings file: the keys
    of the ``keys`` fixture, plus the top-level ``sections``, the ``auth``
    entries and the ``model`` entries (beside its ``path``) given, and with
    ``http`` the HTTP/JSON gateway on another free port. Waits until its health service (reached with
    ``client_args`` for handid.Client) says SERVING, yields it, and stops it
    with SIGTERM."""
    port = _free_port()
    http_port = _free_port() if http else None
    if http_port is not None:
        sections += f"http:\n  listen: 127.0.0.1:{http_port}\n"
    settings = work / f"{name}.yaml"
    settings.write_text(
        f"""server:
  listen: 127.0.0.1:{port}
  rate_limit_per_second: 0
database:
  url: {_required_env("DATABASE_URL")}
  migrate_on_start: true
model:
  path: {model_dir}
{model}{sections}auth:
{auth}  keys:
{(work / "keys.yaml").read_text()}"""
    )
    log = work / f"{name}.log"
    SERVER_LOGS.append(log)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(bin_dir / "handid-server"), "serve", "--config", str(settings)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"},
        )
    try:
        _wait_serving(process, f"127.0.0.1:{port}", log, client_args)
        yield Server(port=port, settings=settings, http_port=http_port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_serving(process: subprocess.Popen, address: str, log: Path, client_args: dict) -> None:
    """Polls the gRPC health service until it says SERVING."""
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    status = "no answer"
    with handid.Client(address, timeout=2, **client_args) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"handid-server exited ({process.returncode}); its log: {log}")
            try:
                status = client.health()
                if status == "SERVING":
                    return
            except handid.Unavailable as error:
                status = str(error)
            time.sleep(0.2)
    pytest.fail(f"handid-server not SERVING after {SERVE_TIMEOUT_S} s ({status}); its log: {log}")


@pytest.fixture(scope="session")
def server(bin_dir: Path, work: Path, model_dir: Path, keys: Dict[str, str]) -> Iterator[Server]:
    """A plain-text server with the keys of KEY_GRANTS, and its HTTP/JSON
    gateway."""
    yield from start_server(bin_dir, work, "plain", model_dir, http=True)


@pytest.fixture(scope="session")
def side_info_server(
    bin_dir: Path, work: Path, model_dir: Path, keys: Dict[str, str]
) -> Iterator[Tuple[Server, Path]]:
    """A server on the same database whose settings name a side-information
    model (``model.side_info``, another random checkpoint), and that
    model's folder."""
    side = work / "side-info-model"
    subprocess.run(
        [str(bin_dir / "handid-trainer"), "init", "--arch", "tiny-vit", "--seed", "7", "--out", str(side)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for server in start_server(bin_dir, work, "side-info", model_dir, model=f"  side_info: {side}\n"):
        yield server, side


@dataclass(frozen=True)
class Certificates:
    """PEM files of a test PKI: a server CA and certificate, and a separate
    CA for client certificates with one client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path


#: The email subject alternative name of the client certificate.
CLIENT_SAN = "desk@example.org"


@pytest.fixture(scope="session")
def certificates(work: Path) -> Certificates:
    import trustme

    ca, client_ca = trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = client_ca.issue_cert(CLIENT_SAN)
    folder = work / "pki"
    folder.mkdir()
    files = Certificates(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_ca=folder / "client-ca.pem",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    server_cert.private_key_pem.write_to_path(str(files.server_key))
    server_cert.cert_chain_pems[0].write_to_path(str(files.server_cert))
    client_ca.cert_pem.write_to_path(str(files.client_ca))
    client_cert.private_key_pem.write_to_path(str(files.client_key))
    client_cert.cert_chain_pems[0].write_to_path(str(files.client_cert))
    return files


@pytest.fixture(scope="session")
def tls_server(
    bin_dir: Path, work: Path, model_dir: Path, keys: Dict[str, str], certificates: Certificates
) -> Iterator[Server]:
    """A TLS server (server certificate only) on the same database, with
    the keys of KEY_GRANTS, and its HTTP/JSON gateway (HTTPS)."""
    settings = f"""tls:
  cert_file: {certificates.server_cert}
  key_file: {certificates.server_key}
"""
    yield from start_server(
        bin_dir, work, "tls", model_dir, settings, http=True, tls=handid.TLS(ca=certificates.ca)
    )


@pytest.fixture(scope="session")
def mtls_server(
    bin_dir: Path, work: Path, model_dir: Path, keys: Dict[str, str], certificates: Certificates
) -> Iterator[Server]:
    """A mutual-TLS server on the same database: every client needs a
    certificate of the client CA; the client certificate is granted the
    scopes identify and admin."""
    settings = f"""tls:
  cert_file: {certificates.server_cert}
  key_file: {certificates.server_key}
  client_ca_file: {certificates.client_ca}
"""
    grants = f"""  certificates:
    - san: email:{CLIENT_SAN}
      scopes: [identify, admin]
"""
    client_tls = handid.TLS(
        ca=certificates.ca, cert=certificates.client_cert, key=certificates.client_key
    )
    yield from start_server(bin_dir, work, "mtls", model_dir, settings, grants, tls=client_tls)


@pytest.fixture(scope="session")
def operator(server: Server, keys: Dict[str, str]) -> Iterator[handid.Client]:
    """A client holding every scope."""
    with handid.Client(server.address, api_key=keys["operator"]) as client:
        yield client


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:
    """After a failed session, each server's log."""
    if exitstatus == 0:
        return
    for log in SERVER_LOGS:
        if log.is_file():
            terminalreporter.section(f"server log {log}")
            terminalreporter.write(log.read_text(errors="replace"))
