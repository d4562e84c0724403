"""Which package decodes which DICOM transfer syntax, and is it installed?

pydicom decodes compressed pixel data through plugins (pylibjpeg-openjpeg, pylibjpeg-rle,
pyjpegls, python-gdcm, Pillow). When none of the plugins for a file's transfer syntax is
importable, the reader reports an ``error`` whose reason names the syntax and what to install —
never a bare traceback. Availability comes from pydicom's own decoder registry
(:func:`pydicom.pixels.get_decoder`), so this module never disagrees with what pydicom will do.
"""

from __future__ import annotations

from functools import lru_cache

from pydicom.uid import UID

__all__ = [
    "INSTALL_HINTS",
    "syntax_name",
    "decoder_status",
    "decode_failure_reason",
    "decoder_complaint",
    "is_native",
]

# Permissively licensed packages first; GPL decoders (pylibjpeg-libjpeg) are never suggested as
# the default fix.
INSTALL_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pip install python-gdcm (or pillow)",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pip install python-gdcm (or pillow)",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pip install python-gdcm",  # JPEG Lossless P14
    "1.2.840.10008.1.2.4.70": "pip install python-gdcm",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pip install pyjpegls (or python-gdcm)",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pip install pyjpegls (or python-gdcm)",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90": "pip install pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pip install pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.92": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.93": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pip install 'pylibjpeg-openjpeg>=2.4'",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pip install 'pylibjpeg-openjpeg>=2.4'",
    "1.2.840.10008.1.2.4.203": "pip install 'pylibjpeg-openjpeg>=2.4'",
    "1.2.840.10008.1.2.5": "pip install pylibjpeg-rle (pydicom's own RLE decoder also works)",
}

_NATIVE = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (zlib, stdlib)
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    }
)


def syntax_name(uid: str | None) -> str:
    """Human name of a transfer syntax UID (the UID itself if pydicom does not know it)."""
    if not uid:
        return "unknown transfer syntax"
    name = UID(str(uid)).name
    return name or str(uid)


def is_native(uid: str | None) -> bool:
    """True for uncompressed (native) pixel data encodings."""
    return str(uid or "") in _NATIVE


@lru_cache(maxsize=64)
def decoder_status(uid: str) -> tuple[bool, str]:
    """(available, reason) for decoding pixel data in transfer syntax ``uid``.

    ``reason`` is empty when a decoder is available, else an actionable sentence such as
    ``"JPEG-LS Lossless Image Compression transfer syntax: no decoder installed — pip install
    pyjpegls (or python-gdcm)"``. Video syntaxes (MPEG, HEVC) are never decodable here.
    """
    uid = str(uid)
    if uid in _NATIVE:
        return True, ""
    name = syntax_name(uid)
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(UID(uid))
    except Exception:  # noqa: BLE001 - pydicom raises NotImplementedError for unknown syntaxes
        return False, f"{name} transfer syntax: no image decoder exists for it in osteoscan"
    if decoder.is_available:
        return True, ""
    hint = INSTALL_HINTS.get(uid, "install a pydicom decoder plugin for it")
    return False, f"{name} transfer syntax: no decoder installed — {hint}"


def decode_failure_reason(uid: str, message: str, printed: str = "") -> str:
    """An actionable reason for a decoder plugin that is installed but refused the data.

    The common case in practice: 12-bit JPEG Extended (Process 4), which neither GDCM's Python
    build nor Pillow decodes; only pylibjpeg-libjpeg does, and it is GPL-licensed, so it is an
    opt-in install rather than a default dependency. ``printed`` is what the decoder printed to
    stderr meanwhile (:mod:`osteoscan.readers.capture`): usually the real cause.
    """
    name = syntax_name(uid)
    if "12-bit" in message and "JPEG Extended" in message:
        return (
            f"{name} transfer syntax with 12-bit samples: no installed decoder supports it — "
            "pip install 'osteoscan[gpl]' (pylibjpeg-libjpeg, GPL-3.0 licensed, "
            "hence not installed by default)"
        )
    first = message.strip().splitlines()[-1].strip() if message.strip() else "unknown error"
    if printed:
        return (
            f"cannot decode {name} pixel data (corrupt or truncated?): {first[:160]}; "
            f"the decoder printed: {printed}"
        )
    return f"cannot decode {name} pixel data: {first[:200]}"


def decoder_complaint(uid: str, printed: str) -> str:
    """The reason for pixel data that decoded, but with the decoder printing a complaint."""
    return (
        f"corrupt {syntax_name(uid)} pixel data: the decoder reported: {printed} "
        "(the image it returned may be partly made up)"
    )
