"""C-STORE responses packed by the fast path (store_response.py) are what pynetdicom would send."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from node.receive.fastpath.store_response import encode_store_response, p_data_tf


def _response(instance_uid: str, status: int, comment: str | None) -> C_STORE:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 7
    response.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # even length
    response.AffectedSOPInstanceUID = instance_uid
    response.Status = status
    if comment is not None:
        response.ErrorComment = comment  # type: ignore[assignment]  # pynetdicom annotates it None
    return response


def _pynetdicom_encoding(response: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    (pdata,) = message.encode_msg(context_id=1, max_pdu_length=16384)
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[:1] == b"\x03"  # command, last fragment
    return pdv[1:]


@pytest.mark.parametrize(
    ("instance_uid", "status", "comment"),
    [
        ("1.2.3.4.5", 0x0000, None),  # odd-length UID: padded with NUL
        ("1.2.3.4.56", 0x0000, None),
        ("1.2.3.4.5", 0xA700, "storage full"),  # even-length comment
        ("1.2.3.4.56", 0xC000, "data set is truncated"),  # odd-length comment: padded with a space
        ("1.2.3.4.5", 0x0110, "instance could not be stored"),
        ("1.2.3.4.5", 0xC000, ""),  # an empty comment is still an element
        ("1.2.3.4.\u00e95", 0xC000, "non-ASCII byte in a peer's UID"),  # latin-1, as pydicom writes it
    ],
)
def test_packed_response_is_byte_for_byte_pynetdicoms(
    instance_uid: str, status: int, comment: str | None
) -> None:
    response = _response(instance_uid, status, comment)
    assert encode_store_response(response) == _pynetdicom_encoding(response)


@pytest.mark.parametrize("context_id", [1, 3, 255])
def test_framed_response_is_pynetdicoms_p_data_tf(context_id: int) -> None:
    response = _response("1.2.3.4.5", 0x0000, None)
    value = b"\x03" + encode_store_response(response)
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[context_id, value]]  # type: ignore[list-item]
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    assert p_data_tf(context_id, value) == pdu.encode()
