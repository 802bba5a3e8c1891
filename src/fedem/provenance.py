"""What every output folder says about how it was made (LitGPT-style provenance).

Each command that writes a folder puts `fedem.json` beside its output: the command, the resolved
config, the fedem version, and — for adapters and merged models — the sha256 fingerprint of the base
weights, so that `fedem merge` and the hub can refuse an adapter trained on another base.
"""

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedem import __version__

PROVENANCE_FILE = "fedem.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON via a temporary file and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, ensure_ascii=False, default=str)
            handle.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_provenance(out: Path, command: str, config: dict[str, Any], **extra: Any) -> Path:
    """Record the resolved config of `command` in `out/fedem.json`."""
    path = out / PROVENANCE_FILE
    write_json_atomic(path, {"command": command, "fedem_version": __version__, "config": config, **extra})
    return path


def read_provenance(folder: Path) -> dict[str, Any]:
    """The provenance of a folder fedem wrote, or {} for a folder from elsewhere."""
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return {}
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's safetensors files (sorted by name): the identity of a base model.

    Merging n adapters, fine-tuning with `--init` or screening a submission each ask for the same
    base's fingerprint several times; the hash is computed once per unchanged set of files (same
    paths, sizes and modification times — an atomic rewrite changes them)."""
    files = sorted(model_dir.glob("*.safetensors"))
    signature = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(signature)


@functools.lru_cache(maxsize=64)
def _hash_files(signature: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _size, _mtime in signature:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
