"""Card files: JSON, TOML and PNG cards read from disk, and every bad file refused with one line
that names the file (and the field path)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from protocol.cards import BACKFILL_NOTE, MAX_CARD_BYTES, CardError, export_card, persona_card
from server.card_files import read_card_file, write_png_card

CARDS = Path(__file__).parent.parent / "fixtures" / "cards"


def load(name: str) -> Any:
    return json.loads((CARDS / name).read_text(encoding="utf-8"))


def b64(card: object) -> str:
    return base64.b64encode(json.dumps(card).encode()).decode()


def png(path: Path, **chunks: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (4, 4)).save(path, "PNG", pnginfo=info)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(CardError) as caught:
        read_card_file(path)
    return caught.value.message


def test_json_card_file_is_read() -> None:
    parsed = read_card_file(CARDS / "v2_wren.json")
    assert parsed.spec == "v2" and export_card(parsed, "v2") == load("v2_wren.json")


def test_png_card_carries_the_v3_card_as_written() -> None:
    parsed = read_card_file(CARDS / "v3_mirela.png")
    assert parsed.spec == "v3" and export_card(parsed, "v3") == load("v3_mirela.json")


def test_toml_project_card_is_read_with_its_id_and_material() -> None:
    parsed = read_card_file(CARDS / "bramble.toml")
    assert parsed.persona_id == "professor-bramble" and parsed.enabled is True
    persona = persona_card(parsed)
    assert persona.name == "Professor Bramble"
    assert persona.openers == ("Ah, hello there!", "Oh, splendid!")
    assert persona.sign_off == "Photosynthesise responsibly."


def test_v1_json_card_is_read_with_a_note() -> None:
    assert read_card_file(CARDS / "v1_tobias.json").notes == (
        "no spec: read as a Character Card V1",
    )


def test_png_with_both_chunks_uses_ccv3(tmp_path: Path) -> None:
    v2 = load("v2_wren.json")
    v3 = load("v3_mirela.json")
    parsed = read_card_file(png(tmp_path / "both.png", chara=b64(v2), ccv3=b64(v3)))
    assert parsed.spec == "v3" and parsed.name == "Mirela Quill"


def test_png_with_only_chara_is_read_as_v2(tmp_path: Path) -> None:
    parsed = read_card_file(png(tmp_path / "old.png", chara=b64(load("v2_wren.json"))))
    assert parsed.spec == "v2" and parsed.name == "Wren Halloway"


def test_written_png_card_reads_back_and_its_chara_chunk_is_a_v2_backfill(tmp_path: Path) -> None:
    card = read_card_file(CARDS / "v3_mirela.json")
    path = tmp_path / "out.png"
    write_png_card(path, card)
    assert export_card(read_card_file(path), "v3") == load("v3_mirela.json")
    with Image.open(path) as image:
        assert isinstance(image, PngImagePlugin.PngImageFile)
        chara = json.loads(base64.b64decode(image.text["chara"]))
    assert chara["spec"] == "chara_card_v2"
    assert chara["data"]["creator_notes"].startswith(BACKFILL_NOTE)
    alone = read_card_file(png(tmp_path / "chara.png", chara=image.text["chara"]))
    assert alone.data.creator_notes == "Written for the persona chat test suite."


def test_png_without_a_card_is_refused(tmp_path: Path) -> None:
    path = png(tmp_path / "plain.png", Comment="just a picture")
    assert error_of(path) == f"{path}: a PNG without a card (no ccv3 or chara text chunk)"


def test_png_with_bad_base64_is_refused(tmp_path: Path) -> None:
    path = png(tmp_path / "bad.png", ccv3="not*base64!")
    assert error_of(path) == f"{path}: chunk ccv3: bad base64"


def test_png_with_bad_utf8_is_refused(tmp_path: Path) -> None:
    path = png(tmp_path / "bad.png", chara=base64.b64encode(b'{"name": "\xff"}').decode())
    assert error_of(path) == f"{path}: chunk chara: bad UTF-8: byte 0xff"


def test_png_whose_chunk_is_not_json_is_refused(tmp_path: Path) -> None:
    path = png(tmp_path / "bad.png", ccv3=base64.b64encode(b"name = 1").decode())
    message = error_of(path)
    assert message.startswith(f"{path}: chunk ccv3: not valid JSON: Expecting value")


def test_png_card_over_256_kib_is_refused(tmp_path: Path) -> None:
    card = {"name": "Big", "description": "x" * MAX_CARD_BYTES}
    size = len(json.dumps(card).encode())
    path = png(tmp_path / "big.png", chara=b64(card))
    assert error_of(path) == f"{path}: chunk chara: card over 256 KiB ({size} bytes)"


def test_broken_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert error_of(path).startswith(f"{path}: not a readable PNG: ")


def test_json_file_over_256_kib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"name": "Big", "description": "x" * MAX_CARD_BYTES}))
    size = path.stat().st_size
    assert error_of(path) == f"{path}: card over 256 KiB ({size} bytes)"


def test_json_file_with_bad_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    assert error_of(path) == f"{path}: bad UTF-8: byte 0xe9 at 13"


def test_file_that_is_not_json_png_or_toml_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("Just some notes, = not a card\n")
    binary = tmp_path / "photo.jpg"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    assert error_of(text) == f"{text}: not a JSON, PNG or TOML card"
    assert error_of(binary) == f"{binary}: not a JSON, PNG or TOML card"


def test_json_file_with_a_syntax_error_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"name": "a",}')
    assert error_of(path).startswith(f"{path}: not valid JSON: ")
    assert error_of(path).endswith("line 1 column 14 (char 13)")  # the message varies by Python


def test_toml_file_with_a_syntax_error_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    assert error_of(path).startswith(f"{path}: not valid TOML: ")


def test_bad_field_is_named_with_the_file_and_its_path(tmp_path: Path) -> None:
    card = load("v2_wren.json")
    card["data"]["tags"][2] = 3
    path = tmp_path / "wren.json"
    path.write_text(json.dumps(card))
    assert error_of(path) == f"{path}: data.tags[2]: expected a string"


def test_toml_date_in_a_card_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "dated.toml"
    path.write_text(
        'persona_chat_card = 1\n[card]\nspec = "chara_card_v3"\n[card.data]\nname = "A"\n'
        "[card.data.extensions]\nwhen = 2024-05-01\n"
    )
    assert error_of(path) == (
        f"{path}: card.data.extensions.when: expected a JSON value, not a date"
    )


def test_toml_card_is_sniffed_without_its_suffix(tmp_path: Path) -> None:
    path = tmp_path / "bramble"
    path.write_bytes((CARDS / "bramble.toml").read_bytes())
    assert read_card_file(path).persona_id == "professor-bramble"


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    assert error_of(path) == f"{path}: cannot read the file: No such file or directory"
