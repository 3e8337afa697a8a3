"""Card files: a JSON, TOML or PNG file read into a parsed card with one-line errors that name
the file, and a card written into a PNG's `ccv3` and `chara` text chunks."""

from __future__ import annotations

import base64
import binascii
import io
import json
import tomllib
import zlib
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from protocol.cards import (
    MAX_CARD_BYTES,
    CardError,
    ParsedCard,
    backfill_v2,
    export_card,
    parse_card,
)

MAX_PNG_BYTES = 16 * 1024 * 1024  # the image around a card may be larger than the card
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHUNKS = ("ccv3", "chara")  # ccv3 (V3) is preferred when both are there


def read_card_file(path: str | Path) -> ParsedCard:
    """The card in a JSON, TOML or PNG file; CardError, naming the file, for anything else."""
    name = str(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_PNG_BYTES + 1)
    except OSError as exc:
        raise CardError("", f"cannot read the file: {exc.strerror or exc}", name) from None
    try:
        return parse_card(_card_value(raw, Path(path).suffix.lower()))
    except CardError as exc:
        raise exc.in_file(name) from None


def _card_value(raw: bytes, suffix: str) -> object:
    """The JSON value of the card in a file's bytes."""
    if raw.startswith(PNG_SIGNATURE):
        if len(raw) > MAX_PNG_BYTES:
            raise CardError("", f"a PNG card may have at most {MAX_PNG_BYTES} bytes")
        chunk, text = _png_text(raw)
        return _json(_decode(text, chunk), f"chunk {chunk}: ")
    if len(raw) > MAX_CARD_BYTES:
        raise CardError("", f"card over 256 KiB ({len(raw)} bytes)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if suffix in (".json", ".toml"):
            raise CardError("", f"bad UTF-8: byte 0x{raw[exc.start]:02x} at {exc.start}") from None
        raise CardError("", "not a JSON, PNG or TOML card") from None
    if suffix == ".json" or (suffix != ".toml" and text.lstrip().startswith(("{", "["))):
        return _json(text, "")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        if suffix == ".toml":
            raise CardError("", f"not valid TOML: {exc}") from None
        raise CardError("", "not a JSON, PNG or TOML card") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError("", f"{where}not valid JSON: {exc}") from None
    except RecursionError:
        raise CardError("", f"{where}not valid JSON: nested too deeply") from None


def _png_text(raw: bytes) -> tuple[str, str]:
    """The name and text of the PNG's card chunk, ccv3 before chara."""
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            chunks = image.text if isinstance(image, PngImagePlugin.PngImageFile) else {}
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
        zlib.error,
    ) as exc:
        raise CardError("", f"not a readable PNG: {exc}") from None
    by_name = {key.lower(): value for key, value in chunks.items() if isinstance(value, str)}
    for chunk in CHUNKS:
        if chunk in by_name:
            return chunk, by_name[chunk]
    raise CardError("", "a PNG without a card (no ccv3 or chara text chunk)")


def _decode(text: str, chunk: str) -> str:
    """A chunk's base64 text as the UTF-8 JSON it carries."""
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise CardError("", f"chunk {chunk}: bad base64") from None
    if len(data) > MAX_CARD_BYTES:
        raise CardError("", f"chunk {chunk}: card over 256 KiB ({len(data)} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CardError("", f"chunk {chunk}: bad UTF-8: byte 0x{data[exc.start]:02x}") from None


def _encode(card: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(card, ensure_ascii=False).encode()).decode("ascii")


def write_png_card(path: str | Path, card: ParsedCard, image: Image.Image | None = None) -> None:
    """Write `card` into a PNG at `path`: V3 in `ccv3`, and a V2 backfill in `chara` for V2
    readers. The image is `image`, or a small plain square."""
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", _encode(backfill_v2(card)))
    info.add_text("ccv3", _encode(export_card(card, "v3")))
    picture = image if image is not None else Image.new("RGB", (64, 64), (96, 120, 168))
    picture.save(path, "PNG", pnginfo=info)
