"""Token strings: search keys and visible whitespace."""

from __future__ import annotations

import json

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


def visible(text: str) -> str:
    """Whitespace made visible for display: ␣ for a space, ↵ for a newline, ⇥ for a tab."""
    return text.translate(_VISIBLE) if text else "∅"


def quoted(text: str | None) -> str:
    """A token in double quotes, with JSON's escapes ("\\n", "\\"") so that whitespace stays visible
    in plain text (an Open Graph description): ' dog' -> '" dog"'."""
    return "�" if text is None else json.dumps(text, ensure_ascii=False)
