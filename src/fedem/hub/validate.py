"""What a repo may hold: safe relative paths, and only safetensors, JSON and plain-text content.

A path is written to disk on every donor's machine by `huggingface_hub`, on Linux, macOS and Windows
alike, so it must mean the same file everywhere and look like what it is: no `..`, no absolute or
drive paths, none of the characters or device names Windows refuses (`<>:"|?*`, `CON`, `NUL`, `COM1`,
…), no segment ending in a dot or a space (Windows drops them, so two names would meet), no invisible
or direction-changing characters (`evil\u202egnp.safetensors` displays as `evilsrosnetfas.png`), and
only NFC Unicode (macOS normalises names, so `é` and `e\u0301` would be one file there and two here).

Pickle (`.bin`, `.pt`, `.pkl`, …) is refused by name, because loading it runs arbitrary code on
every donor's machine; safetensors is plain data. Contents are checked on the stored blob by the
suffix of the path it is published under, reading only what is needed (a safetensors header, not
its tensors), so a malformed file is refused with a clear 422 instead of breaking a download later.
"""

import codecs
import json
import re
import struct
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from typing import IO, Any

from fedem.hub.errors import HubError

MAX_PATH = 512
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
WINDOWS_RESERVED_CHARS = re.compile(r'[<>:"|?*]')
WINDOWS_DEVICES = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³])(\..*)?", re.IGNORECASE)
# Unicode categories never wanted in a file name: format (incl. bidi overrides), line/paragraph
# separators, private use, surrogates, unassigned
INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp", "Co", "Cs", "Cn"})
TEXT_SUFFIXES = (".txt", ".md", ".tsv", ".yaml", ".yml")
MAX_JSON_BYTES = 256 << 20  # parsed in memory
MAX_SAFETENSORS_HEADER = 100 << 20  # the limit the safetensors library itself enforces
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# bits per element of every dtype the safetensors format defines
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

Opener = Callable[[], IO[bytes]]


def bad_path(path: str, why: str) -> HubError:
    return HubError(422, "bad_path", f"{path!r}: {why}", path=path)


def check_path(path: str, allowed_suffixes: Iterable[str]) -> str:
    """A repo path: relative, '/'-separated, no '..', '.' or empty parts, an allowed file type."""
    if not path or len(path) > MAX_PATH:
        raise bad_path(path[:MAX_PATH], f"a path has 1 to {MAX_PATH} characters")
    if "\\" in path or CONTROL.search(path):
        raise bad_path(path, "backslashes and control characters are not allowed")
    if path.startswith("/"):
        raise bad_path(path, "paths are relative to the repo root")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise bad_path(path, "'..', '.' and empty path segments are not allowed")
    _check_portable(path, parts)
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise HubError(
            422, "pickle_refused", f"{path!r}: pickle is never accepted; use safetensors", path=path
        )
    allowed = tuple(allowed_suffixes)
    if suffix not in allowed:
        raise HubError(
            422, "bad_suffix", f"{path!r}: only {', '.join(allowed)} files are accepted", path=path
        )
    return path


def _check_portable(path: str, parts: list[str]) -> None:
    """The same file, looking like what it is, on every donor's system (see the module docstring)."""
    if WINDOWS_RESERVED_CHARS.search(path):
        raise bad_path(path, 'the characters < > : " | ? * are not allowed')
    invisible = sorted({f"U+{ord(c):04X}" for c in path if unicodedata.category(c) in INVISIBLE_CATEGORIES})
    if invisible:
        raise bad_path(path, f"invisible or unassigned characters are not allowed ({', '.join(invisible)})")
    if unicodedata.normalize("NFC", path) != path:
        raise bad_path(path, "the path must be NFC-normalised Unicode")
    for part in parts:
        if part != part.strip() or part.endswith("."):
            raise bad_path(path, f"segment {part!r} starts or ends with a space, or ends with a dot")
        if WINDOWS_DEVICES.fullmatch(part):
            raise bad_path(path, f"{part!r} is a reserved device name on Windows")


def check_manifest(paths: list[str], allowed_suffixes: Iterable[str]) -> None:
    """Every path valid, none twice, and no file that is also another file's folder."""
    allowed = tuple(allowed_suffixes)
    seen: set[str] = set()
    for path in paths:
        check_path(path, allowed)
        if path in seen:
            raise bad_path(path, "listed twice")
        seen.add(path)
    folders = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    clash = seen & folders
    if clash:
        raise bad_path(sorted(clash)[0], "is both a file and a folder")


def check_content(path: str, open_blob: Opener, size: int) -> None:
    """Refuse a blob whose bytes do not match the type its path claims (422 `bad_content`)."""
    suffix = PurePosixPath(path).suffix.lower()
    checker = CHECKERS.get(suffix, _check_text if suffix in TEXT_SUFFIXES else None)
    if checker is None:
        return
    with open_blob() as blob:
        try:
            checker(blob, size)
        except (ValueError, UnicodeDecodeError, struct.error) as err:  # JSONDecodeError is a ValueError
            raise HubError(422, "bad_content", f"{path!r}: {err}", path=path) from None


def _check_safetensors(blob: IO[bytes], size: int) -> None:
    """8-byte little-endian header length, a JSON header, and tensors that tile the data exactly."""
    if size < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", blob.read(8))
    if length > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise ValueError(f"not a safetensors file: header length {length} does not fit in {size} bytes")
    try:
        header = json.loads(blob.read(length).decode("utf-8"))
    except ValueError:
        raise ValueError("not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("safetensors __metadata__ must map strings to strings")
    spans = sorted(_tensor_span(name, info) for name, info in header.items())
    end = 0
    for start, stop in spans:
        if start != end:
            raise ValueError(f"safetensors tensors do not tile the data (gap or overlap at byte {start})")
        end = stop
    if end != size - 8 - length:
        raise ValueError(f"safetensors data is {size - 8 - length} bytes but the tensors describe {end}")


def _tensor_span(name: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BITS:
        dtype = info.get("dtype") if isinstance(info, dict) else None
        raise ValueError(f"safetensors tensor {name!r} has an unknown dtype {dtype!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"safetensors tensor {name!r} has a bad shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"safetensors tensor {name!r} has bad data_offsets {offsets!r}")
    count = 1
    for dim in shape:
        count *= dim
    if (count * DTYPE_BITS[info["dtype"]] + 7) // 8 != offsets[1] - offsets[0]:
        raise ValueError(f"safetensors tensor {name!r}: shape {shape} does not match its byte size")
    return offsets[0], offsets[1]


def _check_json(blob: IO[bytes], size: int) -> None:
    if size > MAX_JSON_BYTES:
        raise ValueError(f"JSON files over {MAX_JSON_BYTES} bytes are not accepted")
    try:
        json.loads(blob.read().decode("utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON: {err}") from None


def _check_jsonl(blob: IO[bytes], size: int) -> None:
    for number, line in enumerate(blob, start=1):
        if line.strip():
            try:
                json.loads(line.decode("utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"malformed JSON on line {number}: {err}") from None


def _check_text(blob: IO[bytes], size: int) -> None:
    """UTF-8 throughout, decoded in 1 MiB pieces (a character may straddle two)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while piece := blob.read(1 << 20):
        try:
            decoder.decode(piece)
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 text (near byte {offset + err.start})") from None
        offset += len(piece)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text (truncated character at the end)") from None


def _check_png(blob: IO[bytes], size: int) -> None:
    if blob.read(len(PNG_MAGIC)) != PNG_MAGIC:
        raise ValueError("not a PNG image")


CHECKERS: dict[str, Callable[[IO[bytes], int], None]] = {
    ".safetensors": _check_safetensors,
    ".json": _check_json,
    ".jsonl": _check_jsonl,
    ".png": _check_png,
}
