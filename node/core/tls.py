"""TLS to a destination, shared by whoever talks to it (a worker's C-STORE, the API's C-ECHO)."""

from __future__ import annotations

import ssl

from node.core.config import DestinationTls


class TlsFileError(ValueError):
    """A certificate, key or CA file of the configuration cannot be used; the message says which."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would ask on the terminal, and a worker has none.
    raise ValueError("it is encrypted: give an unencrypted key, readable by the worker's user alone")


def client_context(tls: DestinationTls, where: str) -> ssl.SSLContext:
    """The TLS context for a destination; a file that cannot be used is a configuration fault."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_bundle)
    except (OSError, ValueError) as err:
        raise TlsFileError(f"{where}: cannot use tls.ca_bundle {tls.ca_bundle}: {tls_reason(err)}") from err
    context.check_hostname = tls.check_hostname  # the certificate itself is verified either way
    if tls.certificate is not None:
        try:
            context.load_cert_chain(tls.certificate, tls.private_key, password=_no_password)
        except (OSError, ValueError) as err:
            raise TlsFileError(
                f"{where}: cannot use tls.certificate {tls.certificate} with tls.private_key "
                f"{tls.private_key}: {tls_reason(err)}"
            ) from err
    return context


def tls_reason(err: Exception) -> str:
    if isinstance(err, ssl.SSLError) and "PEM lib" in str(err):  # OpenSSL's words, and no reason
        return "not a PEM certificate and its matching private key"
    if isinstance(err, ssl.SSLError) and err.reason:
        return err.reason.lower().replace("_", " ")
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)
