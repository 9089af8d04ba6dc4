"""User-facing input errors: each names the file, the key path and what was expected."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class InputError(Exception):
    """Bad user input. The CLI prints ``str(err)`` and exits with code 2 (no traceback)."""

    def __init__(self, file: str | Path, key: str, expected: str):
        self.file, self.key, self.expected = str(file), key, expected
        where = f"{self.file}: {key}" if key else self.file
        # One line, always: a YAML parser's or OS's message may carry newlines of its own.
        super().__init__(re.sub(r"\s*\n\s*", " ", f"{where}: {expected}"))


def read_text(path: Path, kind: str) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is dropped). A missing file, a
    directory, an unreadable file or bytes that are not UTF-8 are an InputError naming the file and,
    for undecodable bytes, the line; ``kind`` (e.g. "a YAML file") says what was expected."""
    if path.is_dir():
        raise InputError(path, "", f"is a directory, expected {kind}")
    if not path.is_file():
        raise InputError(path, "", f"not a regular file, expected {kind}" if path.exists() else "file not found")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(path, "", f"cannot be read ({err.strerror or err}), expected {kind}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputError(path, f"line {line}", f"expected UTF-8 text, found byte 0x{data[err.start]:02x} "
                                               f"(save the file as UTF-8)") from None
    # As text mode would: \r\n and \r become \n, so line numbers match what an editor shows.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line; a missing, undecodable or bad-JSON file is an
    InputError naming the line."""
    import json

    out = []
    for n, line in enumerate(read_text(path, "a JSONL file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            raise InputError(path, f"line {n}", f"expected a JSON object ({err.msg})") from None
    return out


def read_yaml(path: Path) -> Any:
    """Safe-load a YAML file; a missing, undecodable or unparsable file is an InputError."""
    text = read_text(path, "a YAML file")
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as err:  # a control character: YAML admits printable text only
        line = text[:err.position].count("\n") + 1
        found = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
        raise InputError(path, f"line {line}", f"expected printable text, found character {found}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise InputError(path, "", f"expected valid YAML{at}: {getattr(err, 'problem', err)}") from None


def _key_path(loc: tuple[Any, ...], data: Any) -> str:
    """Dotted path of real keys: pydantic's tagged-union tags (e.g. ``choice``) are left out."""
    out = ""
    node = data
    for i, part in enumerate(loc):
        nxt = loc[i + 1] if i + 1 < len(loc) else None
        if (isinstance(node, dict) and part in (node.get("type"), node.get("kind"))
                and (part not in node or (nxt is not None and nxt in node))):
            continue  # a discriminator tag, not a key the user wrote
        node = node.get(part) if isinstance(node, dict) else (
            node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validate(model: type[M], data: Any, file: str | Path, prefix: str = "") -> M:
    """Validate ``data`` against ``model``; the first error becomes an InputError naming the key."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as err:
        e = err.errors()[0]
        key = _key_path(tuple(e["loc"]), data)
        key = f"{prefix}.{key}" if prefix and key else prefix or key
        if e["type"] == "extra_forbidden":
            expected = "unknown key (not part of the schema; check spelling)"
        elif e["type"] == "missing":
            expected = "required key is missing"
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            expected = f"{e['msg']} (got {shown[:80]})"
        raise InputError(file, key, expected) from None
