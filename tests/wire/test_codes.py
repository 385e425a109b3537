"""The error-code table, the exceptions that carry codes and docs/wire.md section 7 agree in both directions."""

from __future__ import annotations

import importlib
import pkgutil
import re
import warnings
from pathlib import Path

import msgpack
import pytest

import guardedp2p
from guardedp2p.errors import GuardedP2PError, RemoteError
from guardedp2p.wire.codecs import UnknownCodec
from guardedp2p.wire.codes import CODES, ErrorCode, info
from guardedp2p.wire.framing import MalformedHeader, Message, decode, encode, error_message
from guardedp2p.wire.messages import ERROR_RATE_LIMITED, ERROR_SHUTTING_DOWN, MsgType

WIRE_MD = Path(__file__).resolve().parents[2] / "docs" / "wire.md"
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)\|(.*)\|\s*$")


def _all_error_classes() -> list[type[GuardedP2PError]]:
    """Every GuardedP2PError subclass defined anywhere in the package (every module imported first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in pkgutil.walk_packages(guardedp2p.__path__, "guardedp2p."):
            importlib.import_module(mod.name)
    seen: list[type[GuardedP2PError]] = []
    todo: list[type[GuardedP2PError]] = [GuardedP2PError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return [c for c in seen if c.__module__.startswith("guardedp2p.")]


def _documented() -> dict[str, str]:
    """code -> retry cell of the table in docs/wire.md section 7."""
    text = WIRE_MD.read_text(encoding="utf-8")
    start = text.index("\n## 7. Error codes")
    end = text.find("\n## ", start + 1)
    rows: dict[str, str] = {}
    for line in text[start : end if end != -1 else None].splitlines():
        m = _ROW.match(line)
        if m and m.group(1) != "code":
            assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
            rows[m.group(1)] = m.group(3).strip()
    return rows


def test_every_exception_code_is_in_the_table():
    classes = _all_error_classes()
    with_code = {c: c.__dict__["code"] for c in classes if "code" in c.__dict__}
    assert len(with_code) >= 25  # the walk found the classes of wire, protocol and designs, not only errors.py
    for cls, code in with_code.items():
        assert code in CODES, f"{cls.__module__}.{cls.__qualname__}.code = {code!r} is not in guardedp2p.wire.codes"
        if cls.__module__ != "guardedp2p.errors":  # errors.py spells its four as strings (the wire imports it)
            assert type(code) is ErrorCode, f"{cls.__qualname__}.code should be an ErrorCode member, not {code!r}"


def test_every_code_is_used_or_sent():
    used = {c.__dict__["code"] for c in _all_error_classes() if "code" in c.__dict__}
    assert set(CODES) - used == {ErrorCode.ERROR}  # the code error_message falls back to


def test_codes_are_hyphenated_lowercase_words():
    for code in ErrorCode:
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", code.value), code
        assert str(code) == code.value  # what error_message puts on the wire


def test_table_and_docs_agree_in_both_directions():
    documented = _documented()
    assert set(documented) == {c.value for c in ErrorCode}, (
        f"only in the table: {sorted(set(map(str, ErrorCode)) - set(documented))}; "
        f"only in docs/wire.md: {sorted(set(documented) - set(map(str, ErrorCode)))}"
    )
    for code, retry_cell in documented.items():
        row = CODES[ErrorCode(code)]
        assert row.meaning and "\n" not in row.meaning
        assert retry_cell.strip("*").startswith("yes") == row.retry, (code, retry_cell)
        if row.local:
            assert "never sent" in WIRE_MD.read_text(encoding="utf-8").split(f"| `{code}` |")[1].split("\n")[0]


def test_codes_a_client_acts_on_keep_their_wire_spelling():
    assert ERROR_RATE_LIMITED == "rate-limited" and CODES[ERROR_RATE_LIMITED].retry
    assert ERROR_SHUTTING_DOWN == "provider-shutting-down" and not CODES[ERROR_SHUTTING_DOWN].retry
    assert info("rate-limited") is CODES[ErrorCode.RATE_LIMITED]
    assert info("some-future-code") is None


@pytest.mark.parametrize(
    "exc, code",
    [
        (MalformedHeader("x"), "malformed-header"),
        (RemoteError("x"), "remote"),
        (GuardedP2PError("x"), "error"),  # no code of its own: the generic one
    ],
)
def test_error_message_carries_the_code_as_a_plain_string(exc, code):
    reply = decode(encode(error_message(exc, "s", 3)))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == code and type(reply.meta["code"]) is str


def test_unknown_codec_reply_uses_the_hyphenated_code():
    header = msgpack.unpackb(encode(Message(MsgType.PING))[0])
    header["tensors"] = [
        {"name": "x", "codec": "zip", "dtype": "float32", "shape": [1], "params": {}, "parts": [["float32", [1]]]}
    ]
    with pytest.raises(UnknownCodec) as info_:
        decode([msgpack.packb(header), b"\0\0\0\0"])
    assert error_message(info_.value).meta["code"] == "unknown-codec"
