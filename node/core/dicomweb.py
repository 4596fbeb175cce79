"""A DICOMweb client for a configured destination, with its credentials and trust: the workers'
STOW-RS and the API's "test destination" talk to it the same way."""

from __future__ import annotations

import requests
from dicomweb_client.api import DICOMwebClient

from node.core.config import DicomWebDestination


def dicomweb_client(destination: DicomWebDestination, timeout_s: float) -> DICOMwebClient:
    return DICOMwebClient(url=destination.url, session=dicomweb_session(destination), timeout=timeout_s)


def dicomweb_session(destination: DicomWebDestination) -> requests.Session:
    """An HTTP session with the destination's credentials and trust."""
    session = requests.Session()
    if destination.username is not None:
        session.auth = (destination.username, destination.password or "")
    if destination.bearer_token is not None:
        session.headers["Authorization"] = f"Bearer {destination.bearer_token}"
    session.verify = str(destination.ca_bundle) if destination.ca_bundle is not None else True
    return session
