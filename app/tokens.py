"""Token strings: search keys and visible whitespace."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache

from markupsafe import Markup, escape

LEADING_MARKERS = (" ", "Ġ", "▁")
_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def is_text(s: str) -> bool:
    """False for a string holding half of a surrogate pair, which UTF-8 (and so no database text
    column) can hold: how Python keeps a command-line argument's bytes that are not UTF-8, or
    what JSON's "\\ud800" decodes to."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def search_key(text: str) -> str:
    """The key a token is searched by: one leading space, Ġ or ▁ dropped, then case-folded.

    So "dog", " dog", "Ġdog", "▁Dog" and "DOG" all share the key "dog".
    """
    if text[:1] in LEADING_MARKERS and len(text) > 1:
        text = text[1:]
    return text.casefold()


_IN_CONTEXT = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥"})


def in_context(text: str | None) -> str:
    """A token inside running text: spaces kept as spaces, line breaks and tabs made visible."""
    if text is None:
        return "�"
    return text.translate(_IN_CONTEXT) if text else "∅"


def context_html(text: str | None) -> str:
    """A token's escaped text inside a context (in_context), with a <br> after each ↵ so that
    the context's lines break where the text's do."""
    if not text or "\n" not in text:
        return str(escape(in_context(text)))
    return "↵<br>".join(str(escape(in_context(part))) if part else "" for part in text.split("\n"))


# a <br> followed by another ↵ (in the same token, or first thing in the next token's span)
_BREAK_BEFORE_NEWLINE = re.compile(r"<br>(?=(?:</span><span[^>]*>)?↵)")
# the <br> that ends a run of line breaks the context starts with (the end of a line not shown)
_LEADING_BREAK = re.compile(r"^((?:<span[^>]*>↵+</span>)*<span[^>]*>↵+)<br>")


def one_break_per_run(html: str) -> str:
    """A context's spans (context_html's ↵<br> in them) with each run of line breaks breaking
    the line once, after its last ↵, and a run the window starts with not at all: a blank line
    shows as one more ↵ at the end of the line before, not as an empty line, so that code reads
    as code without a good part of each context being empty lines."""
    if "<br>" not in html:
        return html
    return _LEADING_BREAK.sub(r"\1", _BREAK_BEFORE_NEWLINE.sub("", html), count=1)


def byte_names(data: bytes | bytearray) -> str:
    """Bytes written as <0xXX> each: how a token that is part of a UTF-8 character is stored
    (workers/loading.py), and read back by token_bytes."""
    return "".join(f"<0x{b:02X}>" for b in data)


_BYTE_TOKEN = re.compile(r"(?:<0x[0-9A-F]{2}>)+")


def token_bytes(text: str | None) -> bytes | None:
    """The bytes a token stands for when its text is nothing but <0xXX> groups (byte_names), as
    workers/loading.py writes a token that holds part of a UTF-8 character (a sentencepiece
    byte-fallback piece, or a byte-level BPE token that is not whole characters); else None.
    A token with the byte 0 is left alone (it decodes to no character worth showing)."""
    return _parsed_bytes(text) if text and text.startswith("<0x") else None


@lru_cache(maxsize=1 << 12)
def _parsed_bytes(text: str) -> bytes | None:
    if not _BYTE_TOKEN.fullmatch(text):
        return None
    data = bytes(int(text[i + 3 : i + 5], 16) for i in range(0, len(text), 6))
    return None if 0 in data else data


def _utf8_size(lead: int) -> int:
    """How many bytes the UTF-8 character that starts with this byte has (0: it starts none)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def joined_bytes(tokens: Sequence[str | None]) -> dict[int, str]:
    """{position: text to show} for the byte tokens (token_bytes) of a context, read together:
    each run of consecutive byte tokens is decoded as UTF-8, and a character split across tokens
    (<0xE2><0x80> then <0x99>: ’) is shown on the token that completes it; a token that completes
    no character shows "" (the page draws it as a thin block; its title still names its bytes).
    A byte that starts no whole character (a window cut inside one) stays <0xXX>."""
    out: dict[int, str] = {}
    n, i = len(tokens), 0
    while i < n:
        if token_bytes(tokens[i]) is None:
            i += 1
            continue
        data, owner, j = bytearray(), [], i
        while j < n and (part := token_bytes(tokens[j])) is not None:
            data += part
            owner += [j] * len(part)
            j += 1
        shown: dict[int, list[str]] = {k: [] for k in range(i, j)}
        p = 0
        while p < len(data):
            size = _utf8_size(data[p])
            try:
                char = bytes(data[p : p + size]).decode("utf-8") if size and p + size <= len(data) else None
            except UnicodeDecodeError:
                char = None
            if char is None:
                shown[owner[p]].append(byte_names(data[p : p + 1]))
                p += 1
            else:
                shown[owner[p + size - 1]].append(char)
                p += size
        out.update({k: "".join(texts) for k, texts in shown.items()})
        i = j
    return out


_FROM_VISIBLE = str.maketrans({v: k for k, v in _VISIBLE.items()})


def from_visible(text: str) -> str:
    """The token text a page's chip stands for: ␣, ↵, ⇥ and ␍ (visible's marks) back to the
    space, newline, tab and carriage return they show, so a chip copied into the search finds it."""
    return text.translate(_FROM_VISIBLE)


def visible(text: str | None) -> str:
    """Whitespace made visible for display: ␣ for a space, ↵ for a newline, ⇥ for a tab."""
    return text.translate(_VISIBLE) if text else "∅"


LONG_CHIP = 20  # characters: a longer token's chip may wrap (anywhere) where its table needs it to


def chip_html(text: str | None) -> Markup:
    """A token's text for its chip (code.tok): escaped, whitespace made visible; past LONG_CHIP
    characters (a newline and 35 spaces, a row of 32 dashes) inside a <span class="long"> that
    may wrap anywhere, so a narrow table can hold it, while a shorter chip (white-space: pre)
    never breaks, not even at a hyphen."""
    shown = visible(text)
    if len(shown) <= LONG_CHIP:
        return escape(shown)
    return Markup('<span class="long">') + escape(shown) + Markup("</span>")


def quoted(text: str | None) -> str:
    """A token in double quotes, with JSON's escapes ("\\n", "\\"") so that whitespace stays visible
    in plain text (an Open Graph description): ' dog' -> '" dog"'."""
    return "�" if text is None else json.dumps(text, ensure_ascii=False)
