"""A minimal, strict DICOM element walker for the fast path (Part 10 files, little endian).

It reads only the top-level elements ingest needs (dicom_headers.HEADER_TAGS) and the position of PixelData,
skipping everything else, including sequences of defined or undefined length. Anything unusual (no DICM
preamble, big endian or deflated syntaxes, malformed element headers) raises :class:`Unsupported` and the
caller falls back to pydicom, which then either reads the file or reports why it cannot. A buffer that ends
too early raises :class:`NeedMore`.
"""

from __future__ import annotations

import struct

_U16 = struct.Struct("<H")
_S16 = struct.Struct("<h")
_U32 = struct.Struct("<I")
_TAGLEN = struct.Struct("<HHI")  # implicit VR: group, element, 32-bit length
_TAGVR = struct.Struct("<HH2sH")  # explicit VR short form: group, element, VR, 16-bit length

UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
_NOT_LE = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated

# tag -> keyword (the keywords of dicom_headers.HEADER_TAGS)
TAGS = {
    0x00080008: "ImageType",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080060: "Modality",
    0x00080070: "Manufacturer",
    0x00080080: "InstitutionName",
    0x00081090: "ManufacturerModelName",
    0x0008103E: "SeriesDescription",
    0x00100020: "PatientID",
    0x00180010: "ContrastBolusAgent",
    0x00180050: "SliceThickness",
    0x00180060: "KVP",
    0x00181120: "GantryDetectorTilt",
    0x00181210: "ConvolutionKernel",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber",
    0x00200032: "ImagePositionPatient",
    0x00200037: "ImageOrientationPatient",
    0x00280002: "SamplesPerPixel",
    0x00280004: "PhotometricInterpretation",
    0x00280008: "NumberOfFrames",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280030: "PixelSpacing",
    0x00280100: "BitsAllocated",
    0x00280101: "BitsStored",
    0x00280103: "PixelRepresentation",
    0x00280120: "PixelPaddingValue",
    0x00280121: "PixelPaddingRangeLimit",
    0x00281052: "RescaleIntercept",
    0x00281053: "RescaleSlope",
}
_US_TAGS = {0x00280002, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280103}
_XS_TAGS = {0x00280120, 0x00280121}  # US or SS by PixelRepresentation


class Unsupported(Exception):
    """Not a file the fast path handles: use pydicom."""


class NeedMore(Exception):
    """The buffer ends before the needed elements."""


class Parsed:
    """Result of a walk: ``values`` keyword -> str | list[str] | int, transfer syntax, PixelData position.

    pixel_offset/pixel_length: byte offset of the PixelData value and its declared length
    (UNDEFINED for encapsulated data); None when the walk stopped before PixelData (header-only).
    """

    __slots__ = ("pixel_length", "pixel_offset", "transfer_syntax", "values")

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.transfer_syntax: str | None = None
        self.pixel_offset: int | None = None
        self.pixel_length: int | None = None

    def get(self, key: str, default=None):
        return self.values.get(key, default)


def _text(b: bytes) -> str | list[str]:
    s = b.decode("latin-1").strip(" \x00")
    if "\\" in s:
        return [p.strip(" \x00") for p in s.split("\\")]
    return s


def _header(buf, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, vr, length, header size) of the element at ``pos``."""
    end = len(buf)
    if pos + 8 > end:
        raise NeedMore
    if not explicit:
        g, e, ln = _TAGLEN.unpack_from(buf, pos)
        return (g << 16) | e, None, ln, 8
    g, e, vr, ln = _TAGVR.unpack_from(buf, pos)
    tag = (g << 16) | e
    if g == 0xFFFE:  # item / delimiters carry no VR
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], 8
    if vr in _LONG_VRS:
        if pos + 12 > end:
            raise NeedMore
        return tag, vr, _U32.unpack_from(buf, pos + 8)[0], 12
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise Unsupported(f"bad VR {vr!r} at {pos}")
    return tag, vr, ln, 8


def _skip_sequence(buf, pos: int, explicit: bool, depth: int = 0) -> int:
    """Skip the items of an undefined-length sequence starting at ``pos``; return the position after it."""
    if depth > 16:
        raise Unsupported("sequences nested too deep")
    while True:
        tag, _, ln, hl = _header(buf, pos, False)
        pos += hl
        if tag == SEQ_END:
            return pos
        if tag != ITEM:
            raise Unsupported(f"expected an item, got {tag:08X}")
        if ln != UNDEFINED:
            pos += ln
            continue
        while True:  # item of undefined length: walk its elements to the item delimiter
            tag, vr, ln, hl = _header(buf, pos, explicit)
            pos += hl
            if tag == ITEM_END:
                break
            if ln == UNDEFINED:
                pos = _skip_sequence(buf, pos, explicit and vr != b"UN", depth + 1)
            else:
                pos += ln
            if pos > len(buf):
                raise NeedMore


def walk(buf, header_only: bool) -> Parsed:
    """Walk a Part 10 file held in ``buf`` (bytes/memoryview). Stops at PixelData."""
    if len(buf) < 132:
        raise NeedMore
    if bytes(buf[128:132]) != b"DICM":
        raise Unsupported("no DICM preamble")
    out = Parsed()
    pos = 132
    # file meta group: always explicit VR little endian
    while True:
        if pos + 8 > len(buf):
            raise NeedMore
        if _U16.unpack_from(buf, pos)[0] != 0x0002:
            break
        tag, vr, ln, hl = _header(buf, pos, True)
        if ln == UNDEFINED or pos + hl + ln > len(buf):
            raise NeedMore if ln != UNDEFINED else Unsupported("undefined length in file meta")
        if tag == 0x00020010:
            out.transfer_syntax = bytes(buf[pos + hl : pos + hl + ln]).decode("ascii", "replace").strip(" \x00")
        pos += hl + ln
    ts = out.transfer_syntax
    if ts is None or ts in _NOT_LE:
        raise Unsupported(f"transfer syntax {ts}")
    explicit = ts != IMPLICIT_LE
    vals = out.values
    end = len(buf)
    while pos < end:
        tag, vr, ln, hl = _header(buf, pos, explicit)
        if tag == PIXEL_DATA:
            out.pixel_offset, out.pixel_length = pos + hl, ln
            return out
        if tag > PIXEL_DATA:
            break
        pos += hl
        if ln == UNDEFINED:
            if tag in TAGS:
                raise Unsupported(f"undefined length for {TAGS[tag]}")
            pos = _skip_sequence(buf, pos, explicit and vr != b"UN")
            continue
        if tag in TAGS:
            if pos + ln > end:
                raise NeedMore
            raw = bytes(buf[pos : pos + ln])
            key = TAGS[tag]
            if tag in _US_TAGS:
                if ln != 2:
                    raise Unsupported(f"{key} length {ln}")
                vals[key] = _U16.unpack(raw)[0]
            elif tag in _XS_TAGS:
                if ln != 2:
                    raise Unsupported(f"{key} length {ln}")
                signed = vr == b"SS" or (vr is None and vals.get("PixelRepresentation") == 1)
                vals[key] = (_S16 if signed else _U16).unpack(raw)[0]
            else:
                vals[key] = _text(raw)
        pos += ln
    if header_only:
        raise NeedMore  # a header-only buffer must reach PixelData
    if pos > end:
        raise Unsupported("file ends inside an element")
    return out  # a whole file without PixelData
