"""What the node would do with its configuration, in words, and what is wrong with it: `segnode
config check` prints it and the API shows it."""

from __future__ import annotations

import importlib.util
from typing import Any

from node.core.config import DicomWebDestination, SegmenterSettings, Settings


def report(settings: Settings) -> tuple[list[str], list[str]]:
    """The configuration described line by line, and the problems that keep it from working."""
    from node.receive.paths import describe_path
    from segmenters import registry

    installed = set(registry.available()) | set(settings.segmenters)
    problems = [
        f"rule {r.name!r} names segmenter {r.segmenter!r}, which is not installed "
        f"(installed: {', '.join(sorted(installed))})"
        for r in settings.rules
        if r.segmenter not in installed
    ]
    for name, declared in settings.segmenters.items():
        problems += _network_problems(name, declared)
        if declared.base is not None and declared.base not in registry.available():
            problems.append(
                f"segmenter {name!r}: base {declared.base!r} is not installed "
                f"(installed: {', '.join(sorted(registry.available()))})"
            )
    scp = settings.scp
    lines: list[str] = []
    lines.append(f"DICOM listener: AE {scp.ae_title} on {scp.host}:{scp.port}")
    allowed = ", ".join(scp.allowed_calling_aes) or "any calling AE"
    lines.append(
        f"  accepts associations from: {allowed}; at most {scp.max_associations} at once, "
        f"{scp.caller_limit} from one calling AE, {scp.address_limit} from one address"
    )
    if scp.processes > 1:
        lines.append(f"  {scp.processes} listener processes share the port and the association limit")
    tls = "off"
    if scp.tls_certificate:
        tls = f"on, senders need a certificate from {scp.tls_ca_bundle}" if scp.tls_ca_bundle else "on"
    lines.append(f"  TLS: {tls}")
    lines.append(f"  receives with: {describe_path(scp)}")
    lines.append(f"Data folder: {settings.data_dir}")
    lines.append(f"Database: {redact(settings.effective_database_url)}")
    lines.append(f"Broker: {redact(settings.effective_broker_url)}")
    lines.append(
        f"A series is complete {settings.release_grace_s:g} s after its sender released it whole "
        f"(at once when all it announced arrived), else after {settings.quiet_period_s:g} s without "
        f"new instances"
        + (f", or {settings.force_complete_s:g} s after its first" if settings.force_complete_s else "")
        + "."
    )
    if not settings.rules:
        lines.append("No routing rules: every series is stored and recorded as not routed.")
    for i, rule in enumerate(settings.rules, 1):
        lines.append(
            f"Rule {i} {rule.name!r}: segmenter {rule.segmenter}, "
            f"send to {', '.join(rule.destinations) or '-'}"
        )
        lines.append(f"  when: {_describe(rule)}")
        if rule.model_fields_set & {"complete_by", "quiet_period_s", "fast_completion", "force_complete_s"}:
            lines.append(f"  complete: {_describe_completion(rule)}")
    for name, declared in settings.segmenters.items():
        lines.append(f"Segmenter {name!r}: {_describe_segmenter(declared)}")
    for name, dest in settings.destinations.items():
        if isinstance(dest, DicomWebDestination):
            who = (
                " as " + dest.username
                if dest.username
                else (" with a bearer token" if dest.bearer_token else "")
            )
            lines.append(f"Destination {name!r}: STOW-RS to {dest.url}{who}")
            continue
        over = ""
        if dest.tls is not None:
            trust = dest.tls.ca_bundle or "the system's CAs"
            over = (
                f" over TLS (trusting {trust}{', with a client certificate' if dest.tls.certificate else ''})"
            )
        lines.append(f"Destination {name!r}: C-STORE to {dest.ae_title}@{dest.host}:{dest.port}{over}")
    return lines, problems


def _describe_completion(rule: Any) -> str:
    parts = ["by study, the study's jobs together" if rule.complete_by == "study" else "by series"]
    if rule.quiet_period_s is not None:
        parts.append(f"quiet period {rule.quiet_period_s:g} s")
    if not rule.fast_completion:
        parts.append("no fast completion")
    if rule.force_complete_s is not None:
        parts.append(f"forced after {rule.force_complete_s:g} s")
    return ", ".join(parts)


def _describe(rule: Any) -> str:
    parts = [f"modality {'/'.join(rule.modality)}"] if rule.modality else []
    if rule.exclude_image_types:
        parts.append(f"not {'/'.join(rule.exclude_image_types)}")
    parts.append(f"at least {rule.min_slices} slices")
    if rule.slice_thickness_min_mm is not None or rule.slice_thickness_max_mm is not None:
        parts.append(
            f"slice thickness {rule.slice_thickness_min_mm or 0:g}-{rule.slice_thickness_max_mm or 'any'} mm"
        )
    if rule.body_parts:
        parts.append(f"body part {'/'.join(rule.body_parts)}")
    if rule.series_description_pattern:
        parts.append(f"description matches /{rule.series_description_pattern}/")
    if rule.calling_aes:
        parts.append(f"sent by {'/'.join(rule.calling_aes)}")
    if rule.sop_class_uids:
        parts.append(f"SOP class in {', '.join(rule.sop_class_uids)}")
    return ", ".join(parts)


def _network_problems(name: str, declared: SegmenterSettings) -> list[str]:
    """Why the declared network cannot serve: a missing file, or a card that leaves a label uncoded
    (a SEG must say what every segment is)."""
    if declared.totalsegmentator is not None:
        return _totalsegmentator_problems(name, declared)
    network = declared.network
    if network is None:
        return []
    kind, path = network
    if not path.exists():
        return [f"segmenter {name!r}: {kind} {path} does not exist"]
    if kind == "checkpoint":
        return []
    if kind == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return [f"segmenter {name!r}: serving ONNX needs onnxruntime: pip install 'segnode[onnx]'"]
    if kind == "nnunet" and importlib.util.find_spec("nnunetv2") is None:
        return [f"segmenter {name!r}: serving nnU-Net needs nnunetv2: pip install 'segnode[nnunet]'"]
    from segmenters.served.card import ModelCardError
    from segmenters.served.loading import check_served

    try:
        check_served(kind, path, declared.card, declared.folds, declared.nnunet_checkpoint)
    except (ModelCardError, ImportError) as err:
        return [f"segmenter {name!r}: {err}"]
    return []


def _totalsegmentator_problems(name: str, declared: SegmenterSettings) -> list[str]:
    if importlib.util.find_spec("totalsegmentator") is None:
        return [
            f"segmenter {name!r}: serving TotalSegmentator needs it: pip install 'segnode[totalsegmentator]'"
        ]
    from segmenters.served.card import ModelCardError
    from segmenters.served.totalsegmentator import check_weights, task_structures

    task = str(declared.totalsegmentator)
    try:
        task_structures(task, declared.roi_subset)
        check_weights(task, declared.fast, bool(declared.roi_subset))
    except ModelCardError as err:
        return [f"segmenter {name!r}: {err}"]
    return []


def _describe_segmenter(declared: SegmenterSettings) -> str:
    network = declared.network
    if declared.totalsegmentator is not None:
        classes = ", ".join(declared.roi_subset) if declared.roi_subset else "every class"
        what = f"TotalSegmentator task {declared.totalsegmentator} ({classes}) on {declared.device}"
    elif network is not None and network[0] == "nnunet":
        folds = ", ".join(map(str, declared.folds)) if declared.folds else "every trained fold"
        what = (
            f"nnU-Net model {network[1]} ({folds}, {declared.nnunet_checkpoint}) on {declared.device}, "
            "batches and precision as nnU-Net runs them"
        )
    elif network is not None:
        what = (
            f"{network[0]} network {network[1]} on {declared.device}, mixed precision {declared.amp}, "
            f"{declared.batch_size} slices a batch"
        )
    else:
        what = f"installed segmenter {declared.base}"
    if not declared.crop_to_body:
        return what
    return f"{what}, cropped to the body (classical outline) with a {declared.crop_margin_mm:g} mm margin"


def redact(url: str) -> str:
    """Hide a password in a URL before showing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url
