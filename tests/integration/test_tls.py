"""DICOM over TLS against DCMTK: delivery to storescp +tls, the listener with mutual authentication,
and the clear refusals of a certificate that is not trusted, for a host it does not name, or missing.

The certificates are made once for this module with the openssl command: a CA, a server certificate
for the DNS name localhost alone, a client certificate from the same CA, and an unrelated CA with a
client certificate of its own (the wrong certificate).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import DestinationTls, DicomDestination, ScpSettings
from node.db import engine as db
from node.db.models import Instance, JobState
from node.receive.listener import start_scp
from node.receive.storage import Storage
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses
from workers.destinations.dicom import send_by_c_store
from workers.errors import DeliveryRefusedError, DestinationUnavailableError

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_key: Path
    server_cert: Path  # DNS:localhost only, so that 127.0.0.1 is a name it does not hold
    client_key: Path
    client_cert: Path
    other_ca: Path
    other_client_key: Path  # signed by other_ca: the wrong certificate
    other_client_cert: Path


def _openssl(*args: str | Path) -> None:
    made = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=segnode test {name}"),
        *("-keyout", key, "-out", cert),
        *("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return key, cert


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{extensions}\n"
    )
    _openssl(
        *("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-days", "2"),
        *("-set_serial", str(secrets.randbits(63)), "-extfile", ext, "-out", cert),
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = _make_ca(folder, "ca"), _make_ca(folder, "other-ca")
    server = _make_leaf(folder, "localhost", ca, "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth")
    client = _make_leaf(folder, "segnode-node", ca, "extendedKeyUsage=clientAuth")
    other = _make_leaf(folder, "intruder", other_ca, "extendedKeyUsage=clientAuth")
    return Pki(ca[1], *server, *client, other_ca[1], *other)


@pytest.fixture
def one_slice(tmp_path: Path) -> list[Path]:
    return factory.make_ct_series(tmp_path / "ct", n_slices=1, rows=32, cols=32)


def _tls_storescp(
    storescp_factory: Callable[..., peers.StoreSCP], pki: Pki, *, client_certificates: bool
) -> peers.StoreSCP:
    """storescp over TLS; with client_certificates it requires one that the CA signed."""
    peer_auth = ["+cf", str(pki.ca)] if client_certificates else ["-ic"]  # -rc is its default
    return storescp_factory(extra_args=["+tls", str(pki.server_key), str(pki.server_cert), *peer_auth])


def _destination(peer: peers.StoreSCP, host: str = "localhost", **tls: object) -> DicomDestination:
    return DicomDestination.model_validate(
        {"ae_title": peer.aet, "host": host, "port": peer.port, "tls": DestinationTls.model_validate(tls)}
    )


# --- outbound: the node delivers to a destination over TLS ------------------------------------------


def test_delivery_over_tls_to_a_pacs_the_ca_bundle_trusts(
    storescp_factory: Callable[..., peers.StoreSCP], pki: Pki, one_slice: list[Path]
) -> None:
    pacs = _tls_storescp(storescp_factory, pki, client_certificates=False)
    answer = send_by_c_store(_destination(pacs, ca_bundle=pki.ca), one_slice, "SEGNODE", timeout_s=10)
    assert answer.endswith("answered 0x0000")
    assert len(pacs.wait_for_files(1)) == 1


def test_a_pacs_certificate_the_bundle_does_not_trust_is_refused(
    storescp_factory: Callable[..., peers.StoreSCP], pki: Pki, one_slice: list[Path]
) -> None:
    pacs = _tls_storescp(storescp_factory, pki, client_certificates=False)
    untrusting = _destination(pacs, ca_bundle=pki.other_ca)
    with pytest.raises(DeliveryRefusedError) as refused:
        send_by_c_store(untrusting, one_slice, "SEGNODE", timeout_s=10)
    assert "the destination's certificate is refused, certificate verify failed" in str(refused.value)
    assert "unable to get local issuer certificate" in str(refused.value)
    assert pacs.files() == []


def test_a_pacs_certificate_for_another_host_name_is_refused_unless_the_check_is_off(
    storescp_factory: Callable[..., peers.StoreSCP], pki: Pki, one_slice: list[Path]
) -> None:
    pacs = _tls_storescp(storescp_factory, pki, client_certificates=False)
    by_address = _destination(pacs, host="127.0.0.1", ca_bundle=pki.ca)  # the certificate names localhost
    with pytest.raises(DeliveryRefusedError) as refused:
        send_by_c_store(by_address, one_slice, "SEGNODE", timeout_s=10)
    assert "certificate verify failed: IP address mismatch" in str(refused.value)
    assert "not valid for '127.0.0.1'" in str(refused.value)
    assert pacs.files() == []

    unchecked = _destination(pacs, host="127.0.0.1", ca_bundle=pki.ca, check_hostname=False)
    send_by_c_store(unchecked, one_slice, "SEGNODE", timeout_s=10)
    assert len(pacs.wait_for_files(1)) == 1


def test_mutual_tls_delivery_takes_the_node_certificate_and_refuses_none_or_a_wrong_one(
    storescp_factory: Callable[..., peers.StoreSCP], pki: Pki, one_slice: list[Path]
) -> None:
    pacs = _tls_storescp(storescp_factory, pki, client_certificates=True)
    refusals = [
        (
            _destination(pacs, ca_bundle=pki.ca),
            [
                "the destination wants a client certificate and tls.certificate is not set",
                "alert certificate required",
            ],
        ),
        (
            _destination(
                pacs, ca_bundle=pki.ca, certificate=pki.other_client_cert, private_key=pki.other_client_key
            ),
            [
                f"STORESCP@localhost:{pacs.port}: TLS: the destination refused the node's client certificate",
                "alert unknown ca",
            ],
        ),
    ]
    for destination, said in refusals:
        with pytest.raises(DeliveryRefusedError) as refused:
            send_by_c_store(destination, one_slice, "SEGNODE", timeout_s=10)
        assert all(words in str(refused.value) for words in said), str(refused.value)
    assert pacs.files() == []

    node = _destination(pacs, ca_bundle=pki.ca, certificate=pki.client_cert, private_key=pki.client_key)
    send_by_c_store(node, one_slice, "SEGNODE", timeout_s=10)
    assert len(pacs.wait_for_files(1)) == 1


def test_a_pacs_that_never_answers_the_handshake_costs_the_timeout_and_a_retry(
    pki: Pki, one_slice: list[Path]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never accepted, never answers
        port = silent.getsockname()[1]
        pacs = DicomDestination(
            ae_title="PACS", host="localhost", port=port, tls=DestinationTls(ca_bundle=pki.ca)
        )
        started = time.monotonic()
        with pytest.raises(DestinationUnavailableError, match="no answer over TLS"):
            send_by_c_store(pacs, one_slice, "SEGNODE", timeout_s=1)
        assert time.monotonic() - started < 5  # the handshake's timeout, once: no probe after a wait


def test_tls_files_that_cannot_be_used_are_refused_before_connecting(
    pki: Pki, one_slice: list[Path], tmp_path: Path
) -> None:
    nowhere = peers.free_port()  # nothing listens: a refusal here comes from the files alone
    missing = DicomDestination(
        ae_title="PACS", host="localhost", port=nowhere, tls=DestinationTls(ca_bundle=tmp_path / "no.pem")
    )
    with pytest.raises(DeliveryRefusedError, match=r"cannot use tls.ca_bundle .*no.pem: No such file"):
        send_by_c_store(missing, one_slice, "SEGNODE", timeout_s=10)
    swapped = DicomDestination(
        ae_title="PACS",
        host="localhost",
        port=nowhere,
        tls=DestinationTls(ca_bundle=pki.ca, certificate=pki.client_key, private_key=pki.client_cert),
    )
    with pytest.raises(DeliveryRefusedError, match="not a PEM certificate and its matching private key"):
        send_by_c_store(swapped, one_slice, "SEGNODE", timeout_s=10)


# --- inbound: the node's listener with mutual TLS ---------------------------------------------------


@dataclass
class Listener:
    port: int
    sessions: sessionmaker[Session]

    def instance_count(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count(Instance.id))) or 0


@pytest.fixture
def listener_factory(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    """The node's listener in this process (as test_scp.py's scp_factory), stopped at the end."""
    url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    servers = []

    def start(**scp: object) -> Listener:
        settings = ScpSettings.model_validate({"port": 0, "min_free_bytes": 0, **scp})
        server = start_scp(settings, Storage(tmp_path / "store", engine, settings.min_free_bytes))
        servers.append(server)
        return Listener(server.server_address[1], db.make_sessionmaker(engine))

    yield start
    for server in servers:
        server.shutdown()
    engine.dispose()


def test_the_listener_with_mutual_tls_stores_from_a_trusted_client_only(
    listener_factory: Callable[..., Listener], pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = listener_factory(
        tls_certificate=pki.server_cert, tls_private_key=pki.server_key, tls_ca_bundle=pki.ca
    )
    first, second = (factory.make_ct_series(tmp_path / name, n_slices=1, rows=32, cols=32) for name in "ab")
    trust = ["+cf", str(pki.ca)]

    def store(paths: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
        return peers.storescu(paths, node.port, aet="SEGNODE", extra_args=[*tls, *trust], timeout=60)

    wrong = store(first, "+tls", str(pki.other_client_key), str(pki.other_client_cert))
    assert wrong.returncode != 0
    anonymous = store(first, "+tla")
    assert anonymous.returncode != 0
    assert node.instance_count() == 0
    refusals = [
        r.getMessage() for r in caplog.records if "TLS connection from 127.0.0.1 refused" in r.message
    ]
    assert "certificate verify failed: unable to get local issuer certificate" in refusals[0]
    assert "peer did not return a certificate" in refusals[1]

    trusted = store(first, "+tls", str(pki.client_key), str(pki.client_cert))
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert node.instance_count() == 1
    # The refusals left the listener serving, and a refused client is refused again.
    assert store(second, "+tla").returncode != 0
    assert store(second, "+tls", str(pki.client_key), str(pki.client_cert)).returncode == 0
    assert node.instance_count() == 2


# --- both ways, through the node's own processes and configuration file -----------------------------


def test_a_series_received_over_mutual_tls_is_delivered_over_mutual_tls(
    segnode_factory: Callable[..., SegnodeProcesses],
    storescp_factory: Callable[..., peers.StoreSCP],
    pki: Pki,
    tmp_path: Path,
) -> None:
    pacs = _tls_storescp(storescp_factory, pki, client_certificates=True)
    tls = {"ca_bundle": str(pki.ca), "certificate": str(pki.client_cert), "private_key": str(pki.client_key)}
    node = segnode_factory(
        scp={
            "tls_certificate": str(pki.server_cert),
            "tls_private_key": str(pki.server_key),
            "tls_ca_bundle": str(pki.ca),
        },
        destinations={"pacs": {"ae_title": pacs.aet, "host": "localhost", "port": pacs.port, "tls": tls}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve()
    paths = factory.make_ct_series(tmp_path / "series", n_slices=8)
    client = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    sent = peers.storescu(paths, node.port, aet="SEGNODE", extra_args=client)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=120)
    (seg,) = pacs.wait_for_files(1)
    assert dcmread(seg).SOPInstanceUID == job.output_sop_instance_uid
