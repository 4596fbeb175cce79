"""The node's one typed settings object.

Built once where a process starts (the CLI), from a YAML file plus ``SEGNODE_*`` environment
variables (nested fields with ``__``, e.g. ``SEGNODE_SCP__PORT=11112``), then passed down. No other
module reads the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# What a job can write and send.
Output = Literal["seg", "rtstruct", "sr", "overlay"]

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]+$")]
# A web origin as browsers send it (scheme, host, port; no path), or "*" for any.
Origin = Annotated[str, Field(pattern=r"^(\*|https?://[^/\s]+)$")]


class ScpSettings(BaseModel):
    """The DICOM listener."""

    ae_title: AETitle = "SEGNODE"
    host: str = "127.0.0.1"
    # 0: any free port, which the start-up log names (for tests; a PACS needs a fixed one).
    port: int = Field(11112, ge=0, le=65535)
    # Calling AE titles allowed to associate; empty means any caller is accepted.
    allowed_calling_aes: list[AETitle] = Field(default_factory=list)
    # For the node as a whole, over all its listener processes.
    max_associations: int = Field(10, ge=1)
    # How many of them one calling AE may hold (in each listener process); 0: half, rounded up.
    max_associations_per_caller: int = Field(0, ge=0)
    # How many one calling address may hold, whatever AE titles it calls with; 0: as one caller.
    max_associations_per_address: int = Field(0, ge=0)
    # Listener processes on the one port (SO_REUSEPORT): more cores for many senders at once.
    processes: int = Field(1, ge=1)
    # On a stop, open associations may go on for this long before they are aborted.
    shutdown_grace_s: float = Field(10.0, ge=0)
    max_pdu_size: int = Field(131072, ge=0)
    # The longest the node waits on a peer: for its association request, the next PDU, the rest of
    # one, a TLS handshake.
    network_timeout_s: float = Field(60.0, gt=0)
    # Below this much free space in the storage folder, C-STORE answers "out of resources".
    min_free_bytes: int = Field(1_000_000_000, ge=0)
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    # Mutual TLS: a caller must present a certificate this bundle (PEM) vouches for, or is refused
    # in the handshake, before any association.
    tls_ca_bundle: Path | None = None
    # Receive through node/receive/fastpath (pynetdicom internals; it runs only on a pynetdicom it
    # was tested with, else the plain path does); off: pynetdicom's public API alone.
    fast_path: bool = True

    @property
    def caller_limit(self) -> int:
        return self.max_associations_per_caller or -(-self.max_associations // 2)

    @property
    def address_limit(self) -> int:
        return self.max_associations_per_address or self.caller_limit

    @model_validator(mode="after")
    def _shared_port_is_fixed(self) -> ScpSettings:
        if self.processes > 1 and self.port == 0:
            raise ValueError("scp.processes > 1 needs a fixed scp.port: each process would pick its own")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ScpSettings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("scp.tls_certificate and scp.tls_private_key are given together or not at all")
        if self.tls_ca_bundle is not None and self.tls_certificate is None:
            raise ValueError(
                "scp.tls_ca_bundle (client certificates) needs TLS on: give scp.tls_certificate "
                "and scp.tls_private_key too"
            )
        return self


class DestinationTls(BaseModel):
    """DICOM over TLS to a destination: whom to trust, and the certificate to show it."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    # PEM file of the CAs that vouch for the destination; unset: the system's trust store.
    ca_bundle: Path | None = None
    # The node's client certificate and key (PEM), for a destination that wants one (mutual TLS).
    certificate: Path | None = None
    private_key: Path | None = None
    # The destination's certificate must name its host; off only for a PACS whose certificate
    # names something else (an IP address, an old name) and that is trusted by its own CA.
    check_hostname: bool = True

    @model_validator(mode="after")
    def _client_pair(self) -> DestinationTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key are given together or not at all")
        return self


class DicomDestination(BaseModel):
    """A DICOM peer that receives results by C-STORE."""

    kind: Literal["dicom"] = "dicom"
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    # Unset: plain TCP.
    tls: DestinationTls | None = None

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DicomSource(DicomDestination):
    """A DICOM peer studies are pulled from: by C-MOVE to the node's own AE title (the peer must
    know the node), or by C-GET on the node's own association (nothing to set up at the peer's end
    but permission)."""

    retrieve: Literal["move", "get"] = "move"


class DicomWebDestination(BaseModel):
    """A DICOMweb archive that receives results by STOW-RS (Orthanc's plugin, dcm4chee, a cloud
    healthcare API). Credentials: a bearer token or a name and password, never both."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://")  # the service root, e.g. https://pacs/dicom-web
    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None
    # PEM file of the CAs that vouch for an https URL; unset: the system's trust store.
    ca_bundle: Path | None = None

    @model_validator(mode="after")
    def _one_credential(self) -> DicomWebDestination:
        if self.bearer_token is not None and self.username is not None:
            raise ValueError("give bearer_token or username and password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password are given together or not at all")
        return self

    @property
    def address(self) -> str:
        return self.url


def _destination_kind(value: Any) -> str:
    """A destination's kind; one without ``kind`` is a DICOM peer (as every one was before)."""
    return str(value.get("kind", "dicom") if isinstance(value, dict) else getattr(value, "kind", "dicom"))


Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]
Source = Annotated[
    Annotated[DicomSource, Tag("dicom")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


class Rule(BaseModel):
    """One routing rule: which series it takes, which segmenter runs, where results go.

    Every condition left unset matches anything. The first rule whose conditions all hold takes the series.
    """

    name: str
    modality: list[str] = Field(default_factory=lambda: ["CT"])
    sop_class_uids: list[str] = Field(default_factory=list)
    exclude_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    min_slices: int = Field(20, ge=1)
    slice_thickness_min_mm: float | None = None
    slice_thickness_max_mm: float | None = None
    body_parts: list[str] = Field(default_factory=list)
    series_description_pattern: str | None = None
    calling_aes: list[str] = Field(default_factory=list)
    segmenter: str = "classical"
    destinations: list[str] = Field(default_factory=list)
    # What the job writes and sends: a SEG; RTSTRUCT contours for planning systems; an SR with each
    # segment's volume and mean HU (it refers to the SEG's segments, so needs seg); overlay images
    # (the CT with the segments drawn in) for viewers that show no SEG.
    outputs: list[Output] = Field(default_factory=lambda: [cast(Output, "seg")])
    # When the series is complete (node.jobs.completion); unset: the node-wide values.
    complete_by: Literal["series", "study"] = "series"
    quiet_period_s: float | None = Field(None, gt=0)
    fast_completion: bool = True
    force_complete_s: float | None = Field(None, gt=0)

    @field_validator("outputs")
    @classmethod
    def _outputs_make_sense(cls, value: list[Output]) -> list[Output]:
        if not value:
            raise ValueError("outputs names at least one of seg, rtstruct, sr, overlay")
        if len(set(value)) != len(value):
            raise ValueError("outputs names an output twice")
        if "sr" in value and "seg" not in value:
            raise ValueError("outputs: sr refers to the SEG's segments, so it needs seg too")
        return value

    @field_validator("series_description_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(
                    f"series_description_pattern is not a valid regular expression: {err}"
                ) from err
        return value


# Where a declared segmenter's network comes from: one of these fields, each a kind of model file.
NETWORK_SOURCES = ("checkpoint", "torchscript", "onnx", "monai_bundle", "nnunet")


class SegmenterSettings(BaseModel):
    """A segmenter a rule can name beside the installed ones: a trained network (a segnode
    checkpoint, a TorchScript or ONNX file with its model card, a MONAI bundle folder, an nnU-Net v2
    trained-model folder, a TotalSegmentator task), or an
    installed segmenter (``base``) cropped to the patient's body; a network can be cropped too.

    One schema for all, so a rule names either the same way. ``device``, ``amp`` and
    ``batch_size`` tell the node how to run a network; an installed segmenter runs as installed.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    checkpoint: Path | None = None  # a model.pt that `segnode train` wrote (its card inside)
    torchscript: Path | None = None
    onnx: Path | None = None  # needs the onnx extra (onnxruntime)
    monai_bundle: Path | None = None  # the bundle's folder
    nnunet: Path | None = None  # an nnU-Net v2 trained-model folder (needs the nnunet extra)
    # nnU-Net: the folds to average (None: every fold_* the folder has) and the checkpoint's file name.
    folds: list[int | Literal["all"]] | None = None
    nnunet_checkpoint: str = Field("checkpoint_final.pth", min_length=1)
    # A TotalSegmentator task (such as total), its classes (roi_subset; None: all) and its 3 mm
    # model (fast); needs the totalsegmentator extra and its weights (TOTALSEG_HOME_DIR).
    totalsegmentator: str | None = Field(None, min_length=1)
    roi_subset: list[str] | None = None
    fast: bool = False
    # The model card of a TorchScript or ONNX file (or one overriding a bundle's labels); by default
    # model_card.json beside the file.
    card: Path | None = None
    base: str | None = Field(None, min_length=1)
    # auto: CUDA when the worker has a GPU (CUDA_VISIBLE_DEVICES picks it); cpu; cuda or cuda:N.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    amp: bool = True  # mixed precision on the GPU
    batch_size: int = Field(8, ge=1)
    # Run on the body's bounding box only, labels outside the body cleared (segmenters.cropping).
    crop_to_body: bool = False
    # Air kept around the body's box for the network to see (segmenters.cropping.DEFAULT_MARGIN_MM).
    crop_margin_mm: float = Field(40.0, ge=0)

    @property
    def network(self) -> tuple[str, Path] | None:
        """The kind of network and its path, or None for an installed segmenter (``base``)."""
        for kind in NETWORK_SOURCES:
            path = getattr(self, kind)
            if path is not None:
                return kind, path
        return None

    @model_validator(mode="after")
    def _one_source(self) -> SegmenterSettings:
        given = [
            kind for kind in (*NETWORK_SOURCES, "totalsegmentator", "base") if getattr(self, kind) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(NETWORK_SOURCES)}, totalsegmentator (a trained network) "
                f"or base (an installed segmenter such as demo-thorax-unet); got {', '.join(given) or 'none'}"
            )
        if self.card is not None and given[0] not in ("torchscript", "onnx", "monai_bundle", "nnunet"):
            raise ValueError("card describes a TorchScript, ONNX, MONAI bundle or nnU-Net model")
        nnunet_only = sorted({"folds", "nnunet_checkpoint"} & self.model_fields_set)
        if nnunet_only and self.nnunet is None:
            raise ValueError(f"{', '.join(nnunet_only)} apply to an nnU-Net model (nnunet: FOLDER)")
        task_only = sorted({"roi_subset", "fast"} & self.model_fields_set)
        if task_only and self.totalsegmentator is None:
            raise ValueError(f"{', '.join(task_only)} apply to TotalSegmentator (totalsegmentator: TASK)")
        if self.base is not None:
            for_networks = sorted({"device", "amp", "batch_size"} & self.model_fields_set)
            if for_networks:
                verb = "applies" if len(for_networks) == 1 else "apply"
                raise ValueError(
                    f"{', '.join(for_networks)} {verb} to a network; base {self.base!r} runs as installed"
                )
            if self.base == "classical":
                raise ValueError("the classical segmenter finds the body itself: it has nothing to crop")
            if not self.crop_to_body:
                raise ValueError(
                    f"base {self.base!r} without crop_to_body: true is {self.base!r} itself; "
                    "name it in the rule instead"
                )
        if "crop_margin_mm" in self.model_fields_set and not self.crop_to_body:
            raise ValueError("crop_margin_mm applies only with crop_to_body: true")
        return self


class WorkerSettings(BaseModel):
    """The Celery side: broker, worker processes, retries."""

    # Empty: the embedded broker, a SQLite file in the data folder (no server to install).
    broker_url: str = ""
    concurrency: int = Field(1, ge=1)
    # Threads a CPU worker may use for numpy/torch/decoding; 0 means all cores.
    cpu_threads: int = Field(0, ge=0)
    delivery_max_attempts: int = Field(12, ge=1)
    delivery_backoff_s: float = Field(5.0, gt=0)
    delivery_backoff_max_s: float = Field(600.0, gt=0)
    # The longest a delivery waits on the PACS at each step (association, each response).
    delivery_timeout_s: float = Field(30.0, gt=0)
    # A QUEUED job that no worker took for this long is sent again (a lost message).
    stale_job_s: float = Field(3600.0, gt=0)
    # A RUNNING job is its worker's while the worker renews this lease (four times a lease); one
    # that lapsed goes to another worker. Clocks of node and workers must agree to well within it.
    lease_s: float = Field(60.0, ge=1)
    seg_transfer_syntax: Literal["explicit", "jpeg2000"] = "explicit"
    # A worker on another machine (no shared storage): the node's API address and a token of a user
    # with the worker role. Its series come over WADO-RS and its results go back over the API;
    # unset: the worker reads and writes the node's data folder.
    node_url: str | None = Field(None, pattern=r"^https?://")
    node_token: str | None = None
    # How often a worker says it lives; /readyz and the dashboard take one silent for three times
    # this as gone.
    heartbeat_s: float = Field(10.0, gt=0)
    # The overlapping body segment via highdicom internals (far less memory); false: its public API.
    seg_fast_overlap: bool = True


class ApiSettings(BaseModel):
    """The REST API (and, later, the dashboard): `segnode serve` runs it beside the listener when
    enabled; `segnode api` runs it alone."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"  # behind a TLS-terminating proxy when others must reach it
    port: int = Field(8080, ge=1, le=65535)
    # The address clients reach the node by (https://segnode.example.org behind a proxy): the
    # base of the URLs DICOMweb answers carry; unset, each request's own Host.
    public_url: str | None = Field(None, pattern=r"^https?://")
    # Proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (addresses or networks, or
    # "*"): the login throttle then counts each client, not the proxy, and the scheme is the client's.
    forwarded_allow_ips: list[str] = ["127.0.0.1", "::1"]
    session_hours: float = Field(12.0, gt=0)  # a login's token expires after this long
    # Pages of these origins may call the API and DICOMweb from a browser (a web viewer served
    # elsewhere, https://viewer.example.org); none by default, the dashboard needing none.
    cors_origins: list[Origin] = []
    # A web viewer's address for a study ({study} is its Study Instance UID): the dashboard's job
    # page then opens the study there with a read token of its own, valid for viewer_token_hours.
    viewer_url: str | None = Field(None, pattern=r"^https?://[^\s]*\{study\}[^\s]*$")
    viewer_token_hours: float = Field(1.0, gt=0)
    # Failed logins allowed per user name and per address within the window, then a wait.
    login_attempts: int = Field(5, ge=1)
    login_window_s: float = Field(300.0, gt=0)


WebhookEvent = Literal["job_failed", "job_rejected", "destination_down", "destination_up"]


class DicomWebSettings(BaseModel):
    """DICOMweb on the API's port, under /dicomweb: STOW-RS in (users with the sender or admin
    role), QIDO-RS and WADO-RS out (viewers and admins)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # A STOW-RS request larger than this is refused (413) before or as it is read.
    max_request_bytes: int = Field(8 * 1024**3, ge=1024)


class Webhook(BaseModel):
    """Where the node POSTs a JSON message when something needs a person."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(get_args(WebhookEvent)))
    # Sent with every message (an Authorization header for the receiving service, say).
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(5.0, gt=0)


class NotificationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhooks: list[Webhook] = Field(default_factory=list)
    # A destination that answers nothing but failures for this long is reported down.
    destination_down_after_s: float = Field(300.0, ge=0)
    # A message a webhook does not take is tried again, with a doubling wait, this many times.
    max_attempts: int = Field(8, ge=1)
    backoff_s: float = Field(5.0, gt=0)


class Settings(BaseSettings):
    """Everything the node needs to run, from one file plus ``SEGNODE_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="SEGNODE_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path("var")
    # Empty: a SQLite database in the data folder.
    database_url: str = ""
    # A series is complete after this long without a new instance...
    quiet_period_s: float = Field(30.0, gt=0)
    # ... or when the association that brought it was released and it forms a whole regular
    # volume (fast completion; a rule may turn it off): its job runs at once, its results held
    # this long after the release unless the sender announced the size ...
    release_grace_s: float = Field(2.0, ge=0)
    # ... or, still receiving, this long after its first instance (0: never forced).
    force_complete_s: float = Field(3600.0, ge=0)
    # How often the scheduler looks for complete series and due work: a fraction of the time a
    # technologist waits for a result, for one indexed query.
    assembly_poll_s: float = Field(0.25, gt=0)
    scp: ScpSettings = Field(default_factory=ScpSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    # Where studies can be pulled from (`segnode pull`): a DICOM peer by C-MOVE to this node's AE
    # title (the peer must know it) or by C-GET, or a DICOMweb archive by QIDO-RS and WADO-RS.
    sources: dict[str, Source] = Field(default_factory=dict)
    # Segmenters by the name rules use, beside the installed ones ("classical", "demo-thorax-unet",
    # entry points), which need no entry: trained checkpoints, and body-cropped segmenters.
    segmenters: dict[str, SegmenterSettings] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    api: ApiSettings = Field(default_factory=ApiSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    dicomweb: DicomWebSettings = Field(default_factory=DicomWebSettings)

    @model_validator(mode="after")
    def _rules_name_known_destinations(self) -> Settings:
        for rule in self.rules:
            unknown = [d for d in rule.destinations if d not in self.destinations]
            if unknown:
                raise ValueError(f"rule {rule.name!r} names unknown destinations: {', '.join(unknown)}")
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return self

    @model_validator(mode="after")
    def _bases_are_installed_segmenters(self) -> Settings:
        # One way to crop a checkpoint (crop_to_body on its own entry), and no chains or cycles.
        for name, segmenter in self.segmenters.items():
            if segmenter.base in self.segmenters:
                raise ValueError(
                    f"segmenter {name!r}: base {segmenter.base!r} is declared in this file; a base is an "
                    "installed segmenter (to crop a checkpoint, set crop_to_body on its own entry)"
                )
        return self

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def output_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'segnode.sqlite').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.worker.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file, which wins over the defaults.
        return (env_settings, init_settings)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read ``config_file`` (YAML) if given, then apply ``SEGNODE_*`` variables on top."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"configuration file {config_file} does not exist")
        source = YamlConfigSettingsSource(Settings, yaml_file=config_file)
        file_values = source()
    file_values.update(overrides)
    return Settings(**file_values)
