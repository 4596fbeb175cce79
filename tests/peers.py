"""Real peers for integration tests: Orthanc, DCMTK, PostgreSQL and Redis on 127.0.0.1.

Every server gets its own free ports and a temporary folder, so parallel test runs do not collide,
and is stopped (SIGTERM, then SIGKILL) by the fixture that started it; a child also dies with the test
process (PR_SET_PDEATHSIG), so a killed pytest leaves nothing behind.

Debian's DCMTK 3.6.7, and Orthanc's DICOM side (which is DCMTK), leave Nagle's algorithm on unless the
environment says TCP_NODELAY=1; with it on, every C-STORE waits ~40 ms for a delayed ACK on loopback.
Orthanc's own "TcpNoDelay" option only covers its HTTP server. So every DCMTK program and Orthanc
started here gets TCP_NODELAY=1 in its environment.

The fixtures that wrap these helpers are in conftest.py. Tests import the helpers as
`from tests import peers`, which needs the repository root on sys.path: `python -m pytest` (what
./dev test runs) puts it there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import redis
from psycopg import sql
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

LOCALHOST = "127.0.0.1"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_HOST_URL = "redis://127.0.0.1:6379"
ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")

# A direct opener: an http_proxy in the environment must not swallow requests to 127.0.0.1.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- ports and processes ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it; bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = LOCALHOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 10.0, host: str = LOCALHOST) -> None:
    """Wait until something accepts TCP connections on host:port; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not port_open(port, host):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")
        time.sleep(0.05)


def nodelay_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DCMTK programs and Orthanc: ours plus TCP_NODELAY=1 (see module doc)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: new process group, and SIGTERM when the test process dies."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class PeerProcess:
    """A server process in its own process group, its output in a log file."""

    def __init__(
        self, argv: Sequence[str], log_path: Path, cwd: Path, env: Mapping[str, str], user: str | None = None
    ) -> None:
        """``user``: run as that user (PostgreSQL will not run as root), still this process's child."""
        self.argv = list(argv)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # the test process starts peers from one thread
                user=user,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the whole group (storescp --fork children too), SIGKILL after `grace` seconds.

        grace=0 sends SIGKILL at once, for a server whose files are thrown away anyway.
        """
        steps = [(signal.SIGTERM, grace)] if grace > 0 else []
        for sig, wait in [*steps, (signal.SIGKILL, 5.0)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; make sure no forked child is left in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            return
        raise RuntimeError(f"{self.argv[0]} (pid {self.popen.pid}) survived SIGKILL")


# --- DCMTK ---------------------------------------------------------------------------------------------


def run_dcmtk(
    program: str, args: Sequence[str | os.PathLike[str]], timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK command-line program with TCP_NODELAY=1; the caller asserts on the result."""
    exe = shutil.which(program)
    if exe is None:
        raise FileNotFoundError(f"{program} not found: install Debian's dcmtk (./dev test does)")
    return subprocess.run(
        [exe, *map(str, args)],
        env=nodelay_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def echoscu(
    port: int,
    *,
    aet: str = "ANY-SCP",
    calling_aet: str = "ECHOSCU",
    host: str = LOCALHOST,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO to `aet` at host:port with DCMTK's echoscu."""
    return run_dcmtk("echoscu", ["-aet", calling_aet, "-aec", aet, *extra_args, host, str(port)], timeout)


def storescu(
    paths: Sequence[str | os.PathLike[str]],
    port: int,
    *,
    aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    host: str = LOCALHOST,
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """C-STORE files (folders are scanned recursively) to `aet` at host:port with DCMTK's storescu."""
    if not paths:
        raise ValueError("storescu needs at least one file or folder")
    scan = ["+sd", "+r"] if any(Path(p).is_dir() for p in paths) else []
    args = ["-aet", calling_aet, "-aec", aet, *scan, *extra_args, host, str(port), *map(str, paths)]
    return run_dcmtk("storescu", args, timeout)


@dataclass
class StoreSCP:
    """DCMTK storescp as a minimal PACS: every instance it receives becomes a file in `directory`."""

    port: int
    aet: str
    directory: Path
    process: PeerProcess

    @property
    def address(self) -> tuple[str, int]:
        return LOCALHOST, self.port

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least `count` files arrived; storescp writes each before it answers."""
        deadline = time.monotonic() + timeout
        while len(files := self.files()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"storescp has {len(files)} files, not {count}, after {timeout} s")
            time.sleep(0.05)
        return files

    def stop(self) -> None:
        self.process.stop()


def start_storescp(
    workdir: Path,
    *,
    aet: str = "STORESCP",
    fork: bool = False,
    extra_args: Sequence[str] = (),
    attempts: int = 3,
    port: int | None = None,
) -> StoreSCP:
    """Start storescp on a free port (or on ``port``: a PACS back after an outage), writing into
    workdir/"received"; retried on another free port if the port was taken."""
    directory = workdir / "received"
    directory.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("storescp")
    if exe is None:
        raise FileNotFoundError("storescp not found: install Debian's dcmtk (./dev test does)")
    fixed = port
    for _ in range(1 if fixed is not None else attempts):
        port = fixed or free_port()
        argv = [exe, "-aet", aet, "-od", str(directory), "+xa", *(["--fork"] if fork else []), *extra_args]
        process = PeerProcess([*argv, str(port)], workdir / "storescp.log", workdir, nodelay_env())
        if _wait_until_listening(process, port, timeout=10.0):
            return StoreSCP(port=port, aet=aet, directory=directory, process=process)
        process.stop()
    raise RuntimeError(f"storescp did not start after {attempts} attempts:\n{process.log()}")


def _wait_until_listening(process: PeerProcess, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            return False
        if port_open(port):
            return True
        time.sleep(0.05)
    return False


# --- Orthanc ------------------------------------------------------------------------------------------


class OrthancError(RuntimeError):
    """Orthanc answered an HTTP error; the message carries its status and body."""


def orthanc_executable() -> str:
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if exe is None:
        raise FileNotFoundError("Orthanc not found: install Debian's orthanc (./dev test does)")
    return exe


def dicomweb_plugin() -> Path:
    """The Orthanc DICOMweb plugin from Debian's orthanc-dicomweb package."""
    candidates = sorted(ORTHANC_PLUGIN_DIR.glob("libOrthancDicomWeb.so*"))
    if not candidates:
        listing = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
        ).stdout
        candidates = [Path(p) for p in listing.split() if "DicomWeb" in p and ".so" in p]
    if not candidates:
        raise FileNotFoundError("Orthanc's DICOMweb plugin not found: install Debian's orthanc-dicomweb")
    return candidates[0]


@dataclass
class Orthanc:
    """A running Orthanc with small JSON REST helpers (stdlib urllib)."""

    http: str  # base URL, no trailing slash: http://127.0.0.1:PORT
    http_port: int
    dicom_port: int
    aet: str
    workdir: Path
    config: dict[str, Any]
    process: PeerProcess = field(repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return LOCALHOST, self.dicom_port

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None,
        content_type: str | None = None,
        timeout: float = 60.0,
    ) -> Any:
        """One HTTP call; JSON bodies are encoded and JSON answers decoded, anything else is bytes."""
        data: bytes | None
        if body is None or isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
            content_type = content_type or "text/plain"
        else:
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        req = urllib.request.Request(self.http + path, data=data, method=method)  # noqa: S310 - our http URL
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with _HTTP.open(req, timeout=timeout) as resp:
                payload: bytes = resp.read()
                kind = resp.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
        if kind == "application/json" or kind.endswith("+json"):  # DICOMweb: application/dicom+json
            return json.loads(payload) if payload else None
        return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None) -> Any:
        return self.request("POST", path, b"" if body is None else body)

    def put(self, path: str, body: bytes | str | Mapping[str, Any] | Sequence[Any]) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        ids: list[str] = self.get("/instances")
        return ids

    def series(self) -> list[str]:
        ids: list[str] = self.get("/series")
        return ids

    def studies(self) -> list[str]:
        ids: list[str] = self.get("/studies")
        return ids

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (`/instances/{id}/simplified-tags`)."""
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return tags

    def sop_instance_uids(self) -> set[str]:
        return {self.instance_tags(i)["SOPInstanceUID"] for i in self.instances()}

    def upload(self, source: str | os.PathLike[str] | bytes) -> dict[str, Any]:
        """POST one DICOM file (a path or its bytes) to /instances; Orthanc's answer (ID, Status, ...)."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        answer: dict[str, Any] = self.request("POST", "/instances", data, "application/dicom")
        return answer

    def add_modality(self, name: str, aet: str, port: int, host: str = LOCALHOST) -> None:
        """Register (or replace) a DICOM modality at run time, e.g. once the node's port is known."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def send(self, modality: str, resources: Sequence[str], timeout: float = 60.0) -> Any:
        """C-STORE Orthanc resources (ids of instances, series, ...) to a modality; waits for the end."""
        body = {"Resources": list(resources), "Synchronous": True}
        return self.request("POST", f"/modalities/{modality}/store", body, timeout=timeout)

    def wait_for_instances(self, count: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(ids := self.instances()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc holds {len(ids)} instances, not {count}, after {timeout} s")
            time.sleep(0.1)
        return ids

    def log(self, tail: int = 4000) -> str:
        return self.process.log(tail)

    def stop(self, graceful: bool = True) -> None:
        """Stop Orthanc; a graceful stop takes ~3.5 s (its HTTP and DICOM servers poll), a kill none."""
        self.process.stop(grace=10.0 if graceful else 0)


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, Any] | None = None,
    lua_scripts: Sequence[str | Path] = (),
    stable_age: int = 1,
    dicomweb: bool = True,
    config: Mapping[str, Any] | None = None,
    startup_timeout: float = 30.0,
    attempts: int = 3,
) -> Orthanc:
    """Start an Orthanc with its own ports and storage under `workdir`.

    modalities: Orthanc's "DicomModalities", e.g. {"SEGNODE": ["SEGNODE", "127.0.0.1", 11112]}.
    lua_scripts: each a Path to a script file, or a str holding Lua source (written to workdir).
    stable_age: seconds without a new instance before a series/study is "stable" (Lua OnStable*).
    config: any other Orthanc options; they override the defaults below.
    """
    exe = orthanc_executable()
    workdir.mkdir(parents=True, exist_ok=True)
    scripts: list[str] = []
    for number, script in enumerate(lua_scripts):
        if isinstance(script, Path):
            scripts.append(str(script))
        else:
            path = workdir / f"script-{number}.lua"
            path.write_text(script)
            scripts.append(str(path))
    for sub in ("storage", "index", "tmp"):
        (workdir / sub).mkdir(exist_ok=True)

    process: PeerProcess | None = None
    for attempt in range(attempts):
        http_port, dicom_port = free_port(), free_port()
        while dicom_port == http_port:
            dicom_port = free_port()
        settings: dict[str, Any] = {
            "Name": f"test-{aet}",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "TemporaryDirectory": str(workdir / "tmp"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": dict(modalities or {}),
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomCheckCalledAet": False,
            "StableAge": stable_age,
            "LuaScripts": scripts,
            "Plugins": [str(dicomweb_plugin())] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/", "EnableWado": False},
            # HTTP side only (CivetWeb); the DICOM side takes TCP_NODELAY=1 from the environment.
            "TcpNoDelay": True,
            "KeepAlive": True,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 2,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "ExecuteLuaEnabled": True,
            "DicomScuTimeout": 10,
            "StorageCompression": False,
        }
        settings.update(config or {})
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(settings, indent=2))
        process = PeerProcess(
            [exe, str(config_path)], workdir / f"orthanc-{attempt}.log", workdir, nodelay_env()
        )
        orthanc = Orthanc(
            http=f"http://{LOCALHOST}:{settings['HttpPort']}",
            http_port=int(settings["HttpPort"]),
            dicom_port=int(settings["DicomPort"]),
            aet=aet,
            workdir=workdir,
            config=settings,
            process=process,
        )
        if _wait_for_orthanc(orthanc, startup_timeout):
            return orthanc
        process.stop()
    log = process.log() if process else ""
    raise RuntimeError(f"Orthanc did not start after {attempts} attempts; last log:\n{log}")


def _wait_for_orthanc(orthanc: Orthanc, timeout: float) -> bool:
    """Ready when /system answers and the DICOM port accepts; False if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not orthanc.process.alive():
            return False
        try:
            orthanc.get("/system")
        except (OSError, OrthancError):
            time.sleep(0.1)
            continue
        return _wait_until_listening(orthanc.process, orthanc.dicom_port, deadline - time.monotonic())
    return False


# --- PostgreSQL and Redis -----------------------------------------------------------------------------


def create_pg_database(prefix: str = "segnode_test", template: str | None = None) -> str:
    """CREATE a uniquely named database (a copy of the database of URL ``template``, which nobody
    may be connected to); its SQLAlchemy URL (postgresql+psycopg://...)."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template.rsplit("/", 1)[1]))
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute(create)
    return f"postgresql+psycopg://postgres@{LOCALHOST}:5432/{name}"


def drop_pg_database(url: str) -> None:
    """DROP the database of a URL made by create_pg_database, closing its leftover connections."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def terminate_pg_connections(url: str) -> int:
    """End every connection to the database of ``url`` from the server's side, as a restart does;
    how many were ended."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
        ended = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchone()
    return int(ended[0]) if ended else 0


@contextlib.contextmanager
def pg_outage(url: str) -> Iterator[None]:
    """The database of ``url`` unreachable while the block runs: it refuses new connections and
    every open one is ended, as while its server is down; then it takes connections again."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
    terminate_pg_connections(url)
    try:
        yield
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))


def libpq_url(sqlalchemy_url: str) -> str:
    """postgresql+psycopg://... -> postgresql://... for psycopg.connect or psql."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


_REDIS_CLAIM_TTL_S = 4 * 3600  # outlives any test run; frees the slot if a run dies


@contextlib.contextmanager
def claimed_redis_db() -> Iterator[str]:
    """A Redis URL on a database (1-15) that no other test run holds; flushed before and after.

    Claims are keys in db 0 (SET NX), so parallel test runs on one machine each get their own db.
    """
    admin = redis.Redis.from_url(f"{REDIS_HOST_URL}/0", socket_timeout=10)
    try:
        configured = admin.config_get("databases").get("databases")
        databases = int(configured) if configured else 16
    except redis.ResponseError:  # CONFIG disabled on this server
        databases = 16
    token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    candidates = list(range(1, databases))
    start = secrets.randbelow(len(candidates))
    for db in candidates[start:] + candidates[:start]:
        key = f"segnode-test:claim:{db}"
        if admin.set(key, token, nx=True, ex=_REDIS_CLAIM_TTL_S):
            break
    else:
        admin.close()
        raise RuntimeError(f"all Redis databases 1-{databases - 1} are claimed by other test runs")
    url = f"{REDIS_HOST_URL}/{db}"
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        client.flushdb()
        yield url
    finally:
        client.flushdb()
        client.close()
        if admin.get(key) == token.encode():
            admin.delete(key)
        admin.close()


# --- DICOM test data ----------------------------------------------------------------------------------


def tiny_ct(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    instance_number: int = 1,
    size: int = 8,
    slice_thickness: float = 2.5,
) -> Dataset:
    """A small but well-formed CT image (size x size, 16-bit, HU = stored - 1024) with fresh UIDs."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = "Peers^Test"
    ds.PatientID = "PEERS-TEST"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "segnode tests"
    ds.SeriesDescription = "peers tiny CT"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number - 1) * slice_thickness]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = slice_thickness
    ds.SliceLocation = float(instance_number - 1) * slice_thickness
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    pixels = (np.arange(size * size, dtype=np.uint16).reshape(size, size) * 7 + 24) % 4096
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_tiny_ct(path: Path, **kwargs: Any) -> Dataset:
    """Write tiny_ct(**kwargs) as a DICOM file (with preamble and file meta) to `path`."""
    ds = tiny_ct(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_tiny_ct_series(folder: Path, count: int = 3, **kwargs: Any) -> list[Dataset]:
    """`count` slices of one series (one study, one frame of reference) as folder/1.dcm, 2.dcm, ..."""
    kwargs.setdefault("study_uid", generate_uid())
    kwargs.setdefault("series_uid", generate_uid())
    kwargs.setdefault("frame_of_reference_uid", generate_uid())
    return [write_tiny_ct(folder / f"{n}.dcm", instance_number=n, **kwargs) for n in range(1, count + 1)]


def dciodvfy_errors(path: Path) -> list[str]:
    """The errors dicom3tools' validator finds in a DICOM file (warnings are not errors)."""
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in checked.stderr.splitlines() if line.startswith("Error")]
