"""WADO-RS frames (PS3.18 10.4.1.1.3, 8.7.3.5): the pixel data of one or more frames of an
instance, as web viewers (OHIF, through cornerstone) load every image. Frames go as stored when the
client takes that syntax (``transfer-syntax=*`` takes any), else decoded to Explicit VR Little
Endian, the standard's default; anything else is refused (406) before the answer starts."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from uuid import uuid4

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydicom import Dataset, dcmread
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pack_bits, pixel_array
from pydicom.uid import UID

from node.api.deps import Config, Db, Reader
from node.api.dicomweb.held import held
from node.api.dicomweb.multipart import accepted_parts
from node.api.dicomweb.retrieve import EXPLICIT_LE, can_make_explicit_le

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
OCTETS = "application/octet-stream"
# The media type of each compressed syntax's frames (PS3.18 Table 8.7.3-2); native ones are octets.
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


# What a frame is cut and decoded by: the rest of the data set is not parsed.
PIXEL_ATTRIBUTES = [
    "PixelData",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
]


@dataclass(frozen=True)
class Accepted:
    media_type: str  # application/octet-stream, an image/ type, or */*
    syntax: str  # a transfer syntax UID, or "*" for any


@dataclass(frozen=True)
class Answer:
    media_type: str
    syntax: str
    decode: bool  # decoded to Explicit VR Little Endian rather than sent as stored


def accepted_frame_types(accept: str) -> list[Accepted]:
    """What the client's Accept takes for frames, in its order. Without a type the part is
    octets; without a transfer syntax, octets are Explicit VR Little Endian (PS3.18 8.7.3.5.2)."""
    found = []
    for part in accepted_parts(accept):
        media_type = part.type or OCTETS
        default = EXPLICIT_LE if media_type in (OCTETS, "*/*") else "*"
        found.append(Accepted(media_type, default if part.syntax is None else part.syntax))
    return found or [Accepted(OCTETS, EXPLICIT_LE)]


def answer_for(stored: str, accepted: list[Accepted]) -> Answer | None:
    """How frames stored in ``stored`` go to a client that takes ``accepted``; None if they cannot."""
    media = FRAME_MEDIA.get(stored, OCTETS)
    uid = UID(stored)
    # Native little endian frames are the same bytes whatever the data set's encoding (implicit,
    # deflated): they are announced as what they are.
    sent_as = (
        EXPLICIT_LE if uid.is_transfer_syntax and not uid.is_compressed and uid.is_little_endian else stored
    )
    for want in accepted:
        if want.syntax in ("*", stored, sent_as) and want.media_type in (media, OCTETS, "*/*"):
            return Answer(media, sent_as, decode=False)
        if want.syntax == EXPLICIT_LE and want.media_type in (OCTETS, "*/*") and can_make_explicit_le(stored):
            return Answer(OCTETS, EXPLICIT_LE, decode=uid.is_compressed)
    return None


def frame_numbers(text: str, count: int) -> list[int]:
    """The frame list of the URL ("1" or "1,3,5"), each checked against the instance's frames."""
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise HTTPException(
            400, f"{text!r} is no frame list (frame numbers from 1, comma separated)"
        ) from None
    beyond = [n for n in numbers if not 1 <= n <= count]
    if beyond:
        raise HTTPException(404, f"the instance has {count} frame(s), not frame {beyond[0]}")
    return numbers


def frame_bytes(ds: Dataset, number: int, answer: Answer) -> bytes:
    """Frame ``number`` (from 1) as ``answer`` says: its encoded bytes, or its pixels decoded."""
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed and not answer.decode:
        return get_frame(ds.PixelData, number - 1, number_of_frames=count)
    if answer.decode:
        pixels = pixel_array(ds, index=number - 1, raw=True)
        if int(ds.BitsAllocated) == 1:
            return pack_bits(pixels)
        return pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    bits = int(ds.BitsAllocated)
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
    if bits == 1:  # frames packed bit after bit need not start on a byte: each is packed anew
        first = (number - 1) * size
        covering = np.frombuffer(ds.PixelData, np.uint8)[first // 8 : -(-(first + size) // 8)]
        return pack_bits(np.unpackbits(covering, bitorder="little")[first % 8 : first % 8 + size])
    size = size * bits // 8
    return bytes(ds.PixelData[(number - 1) * size : number * size])


def _parts(frames: list[bytes], answer: Answer, boundary: str) -> Iterator[bytes]:
    head = f"--{boundary}\r\nContent-Type: {answer.media_type}; transfer-syntax={answer.syntax}\r\n\r\n"
    for frame in frames:
        yield head.encode()
        yield frame
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
def retrieve_frames(
    study: str, series: str, sop: str, frames: str, request: Request, user: Reader, db: Db, settings: Config
) -> Response:
    """The frames asked for, in the URL's order, one part each; read whole before the 200 (an
    instance's frames are what a viewer shows at once)."""
    found = held(db, settings, study, series, sop)
    if not found:
        raise HTTPException(404, f"the node holds no instance {sop}")
    item = found[0]
    answer = answer_for(item.transfer_syntax, accepted_frame_types(request.headers.get("accept", "")))
    if answer is None:
        raise HTTPException(
            406,
            f"frames are stored as {item.transfer_syntax}, which the node cannot send as asked; "
            "transfer-syntax=* takes them as stored, application/octet-stream alone decoded",
        )
    try:
        ds = dcmread(item.path, specific_tags=PIXEL_ATTRIBUTES)
    except (OSError, InvalidDicomError) as err:
        raise HTTPException(
            500, f"the file of instance {sop} cannot be read from the node's storage"
        ) from err
    if "PixelData" not in ds:
        raise HTTPException(404, f"instance {sop} has no pixel data, so no frames")
    numbers = frame_numbers(frames, int(ds.get("NumberOfFrames", 1) or 1))
    try:
        parts = [frame_bytes(ds, number, answer) for number in numbers]
    except Exception as err:
        log.error("WADO-RS: frames of instance %s not made (%s)", sop, type(err).__name__)
        raise HTTPException(500, f"the frames of instance {sop} cannot be read or decoded") from err
    boundary = uuid4().hex
    body = b"".join(_parts(parts, answer, boundary))
    return Response(body, media_type=f'multipart/related; type="{answer.media_type}"; boundary={boundary}')
