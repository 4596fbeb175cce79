from pathlib import Path

import pytest
from pydantic import ValidationError

from node.core.config import DicomDestination, DicomWebDestination, Rule, load_settings
from segmenters.cropping import DEFAULT_MARGIN_MM

CONFIG = """
data_dir: /srv/segnode
quiet_period_s: 5
scp:
  ae_title: SEGNODE
  port: 11112
  allowed_calling_aes: [CT01, PACS]
destinations:
  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
rules:
  - name: chest
    body_parts: [CHEST]
    segmenter: classical
    destinations: [pacs]
"""


def test_file_is_read_and_environment_overrides_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "segnode.yaml"
    path.write_text(CONFIG)
    monkeypatch.setenv("SEGNODE_SCP__PORT", "2000")
    monkeypatch.setenv("SEGNODE_QUIET_PERIOD_S", "1.5")
    settings = load_settings(path)
    assert settings.scp.port == 2000
    # Nested fields not named in the environment keep the file's values.
    assert settings.scp.allowed_calling_aes == ["CT01", "PACS"]
    assert settings.quiet_period_s == 1.5
    assert settings.rules[0].destinations == ["pacs"]
    assert settings.destinations["pacs"] == DicomDestination(ae_title="ORTHANC", host="127.0.0.1", port=4242)
    assert settings.effective_database_url == "sqlite:////srv/segnode/segnode.sqlite"
    assert settings.effective_broker_url == "sqla+sqlite:////srv/segnode/broker.sqlite"


def test_rule_naming_an_unknown_destination_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "segnode.yaml"
    path.write_text(CONFIG.replace("destinations: [pacs]", "destinations: [nowhere]"))
    with pytest.raises(ValidationError, match="rule 'chest' names unknown destinations: nowhere"):
        load_settings(path)


@pytest.mark.parametrize(
    "bad",
    [
        {"scp": {"ae_title": "THIS-AE-TITLE-IS-TOO-LONG"}},
        {"scp": {"port": 65536}},
        {"scp": {"port": 0, "processes": 2}},  # each process would pick a port of its own
        {"quiet_period_s": 0},
        {"rules": [{"name": "r", "series_description_pattern": "("}]},
        {"unknown_key": 1},
        {"api": {"viewer_url": "https://viewer.example.org/viewer"}},  # no {study}: every link the same
        {"api": {"viewer_url": "viewer.example.org/viewer?StudyInstanceUIDs={study}"}},
        {"api": {"viewer_token_hours": 0}},
    ],
)
def test_invalid_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        load_settings(None, **bad)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


# --- segmenters a rule can name ---------------------------------------------------------------


def test_segmenters_declare_a_checkpoint_or_a_cropped_installed_one() -> None:
    settings = load_settings(
        None,
        segmenters={
            "thorax": {"checkpoint": "/models/thorax.pt", "device": "cpu", "crop_to_body": True},
            "demo-cropped": {"base": "demo-thorax-unet", "crop_to_body": True, "crop_margin_mm": 25},
        },
        rules=[{"name": "chest", "segmenter": "demo-cropped"}],
    )
    thorax, demo = settings.segmenters["thorax"], settings.segmenters["demo-cropped"]
    assert thorax.checkpoint == Path("/models/thorax.pt") and thorax.base is None
    assert thorax.crop_to_body and thorax.crop_margin_mm == DEFAULT_MARGIN_MM
    assert demo.base == "demo-thorax-unet" and demo.checkpoint is None and demo.crop_margin_mm == 25


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"crop_to_body": True}, "give exactly one of checkpoint, .* or base .*; got none"),
        (
            {"checkpoint": "m.pt", "base": "demo-thorax-unet"},
            "give exactly one of checkpoint, .* or base .*; got checkpoint, base",
        ),
        ({"onnx": "m.onnx", "torchscript": "m.ts"}, "got torchscript, onnx"),
        ({"onnx": "m.onnx", "folds": [0, 1]}, "folds apply to an nnU-Net model"),
        (
            {"checkpoint": "m.pt", "card": "c.json"},
            "card describes a TorchScript, ONNX, MONAI bundle or nnU-Net",
        ),
        ({"base": "demo-thorax-unet"}, "without crop_to_body: true is 'demo-thorax-unet' itself"),
        (
            {"base": "demo-thorax-unet", "crop_to_body": True, "device": "cuda"},
            "device applies to a network",
        ),
        (
            {"base": "demo-thorax-unet", "crop_to_body": True, "amp": False, "batch_size": 2},
            "amp, batch_size apply to a network",
        ),
        ({"base": "classical", "crop_to_body": True}, "finds the body itself"),
        ({"checkpoint": "m.pt", "crop_margin_mm": 10}, "crop_margin_mm applies only with crop_to_body"),
        ({"checkpoint": "m.pt", "crop_to_body": True, "crop_margin_mm": -1}, "greater than or equal to 0"),
        ({"checkpoint": "m.pt", "crop_to_bdy": True}, "crop_to_bdy\n  Extra inputs are not permitted"),
    ],
)
def test_segmenter_declarations_that_make_no_sense_are_refused(
    entry: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        load_settings(None, segmenters={"thorax": entry})


def test_a_base_declared_in_the_same_file_is_refused() -> None:
    with pytest.raises(ValidationError, match="base 'thorax' is declared in this file"):
        load_settings(
            None,
            segmenters={
                "thorax": {"checkpoint": "m.pt"},
                "thorax-cropped": {"base": "thorax", "crop_to_body": True},
            },
        )


# --- TLS: mutual authentication inbound, TLS to destinations ------------------------------------------

TLS_CONFIG = CONFIG.replace(
    "  allowed_calling_aes: [CT01, PACS]\n",
    "  allowed_calling_aes: [CT01, PACS]\n"
    "  tls_certificate: /etc/segnode/tls.crt\n"
    "  tls_private_key: /etc/segnode/tls.key\n"
    "  tls_ca_bundle: /etc/segnode/clients-ca.pem\n",
).replace(
    "port: 4242}",
    "port: 2762, tls: {ca_bundle: /etc/segnode/pacs-ca.pem, "
    "certificate: /etc/segnode/node.crt, private_key: /etc/segnode/node.key}}",
)


def test_tls_settings_are_read_for_the_listener_and_a_destination(tmp_path: Path) -> None:
    path = tmp_path / "segnode.yaml"
    path.write_text(TLS_CONFIG)
    settings = load_settings(path)
    assert settings.scp.tls_ca_bundle == Path("/etc/segnode/clients-ca.pem")
    pacs = settings.destinations["pacs"]
    assert isinstance(pacs, DicomDestination)
    tls = pacs.tls
    assert tls is not None and tls.ca_bundle == Path("/etc/segnode/pacs-ca.pem")
    assert tls.certificate == Path("/etc/segnode/node.crt") and tls.check_hostname
    plain = load_settings(None, destinations={"pacs": {"ae_title": "P", "host": "h", "port": 1}})
    assert plain.destinations["pacs"] == DicomDestination(ae_title="P", host="h", port=1)


@pytest.mark.parametrize(
    ("scp", "message"),
    [
        ({"tls_ca_bundle": "ca.pem"}, r"scp.tls_ca_bundle \(client certificates\) needs TLS on"),
        ({"tls_certificate": "t.crt", "tls_ca_bundle": "ca.pem"}, "given together or not at all"),
    ],
)
def test_client_certificates_without_tls_are_refused(scp: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_settings(None, scp=scp)


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"certificate": "node.crt"}, "tls.certificate and tls.private_key are given together or not at all"),
        ({"private_key": "node.key"}, "tls.certificate and tls.private_key are given together or not at all"),
        ({"ca_bundel": "ca.pem"}, "ca_bundel\n  Extra inputs are not permitted"),
    ],
)
def test_destination_tls_that_cannot_work_is_refused(tls: dict[str, object], message: str) -> None:
    pacs = {"ae_title": "PACS", "host": "pacs.example", "port": 2762, "tls": tls}
    with pytest.raises(ValidationError, match=message):
        load_settings(None, destinations={"pacs": pacs})


def test_a_rules_outputs_are_known_distinct_and_an_sr_comes_with_its_seg() -> None:
    assert Rule(name="r").outputs == ["seg"]
    assert Rule(name="r", outputs=["rtstruct", "overlay"]).outputs == ["rtstruct", "overlay"]
    for outputs, words in [
        ([], "at least one"),
        (["seg", "seg"], "twice"),
        (["sr"], "sr refers to the SEG's segments"),
        (["seg", "pdf"], "Input should be"),
    ]:
        with pytest.raises(ValidationError, match=words):
            Rule(name="r", outputs=outputs)


def test_a_dicomweb_destination_is_told_apart_by_its_kind_and_checked() -> None:
    settings = load_settings(
        None,
        destinations={
            "archive": {"kind": "dicomweb", "url": "https://pacs.example/dicom-web", "bearer_token": "t"},
            "pacs": {"ae_title": "P", "host": "h", "port": 104},  # no kind: a DICOM peer
        },
    )
    archive = settings.destinations["archive"]
    assert isinstance(archive, DicomWebDestination) and archive.address == "https://pacs.example/dicom-web"
    assert isinstance(settings.destinations["pacs"], DicomDestination)
    for wrong, words in (
        ({"url": "ftp://x"}, "should match pattern"),
        ({"url": "https://x", "bearer_token": "t", "username": "u", "password": "p"}, "not both"),
        ({"url": "https://x", "username": "u"}, "together"),
        ({"url": "https://x", "ae_title": "P"}, "Extra inputs"),
    ):
        with pytest.raises(ValueError, match=words):
            load_settings(None, destinations={"a": {"kind": "dicomweb", **wrong}})
