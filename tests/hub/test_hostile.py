"""Hostile contributors: crafted files and adapters, each refused with a clear reason, the head unchanged.

Two gates. At publish time (a real server) the hub refuses pickle, unsafe or deceptive file names and
malformed safetensors/JSON, storing no revision and leaving the donor's lease live. Before evaluation
(the worker's screening) it refuses adapters that do not fit their config and base — dtypes, ranks,
smuggled or missing tensors, infinities, other peft methods, an absurd norm — without scoring them.
(tests/hub/test_evaluation.py covers NaN, wrong shapes, foreign bases and out_proj targets.)
"""

import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from fedem.hub.evaluation import run_worker
from tests.hub.conftest import ADAPTER, Hub, push
from tests.hub.test_evaluation import (  # noqa: F401  (eval_data: a fixture make_setup uses)
    ACCEPTING,
    Setup,
    base_dir,
    edit_json,
    edit_tensors,
    eval_data,
    make_adapter,
    make_setup,
)

LAYER0_A = "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight"
LAYER1_B = "base_model.model.backbone.layers.1.mixer.in_proj.lora_B.weight"


def safetensors_with(header: dict[str, Any], data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


HOSTILE_FILES: dict[str, tuple[dict[str, bytes], str, str]] = {
    # name: (files, error code, words of the reason)
    "pickle": (
        {"adapter_model.bin": pickle.dumps({"w": [1.0]})},
        "pickle_refused",
        "pickle is never accepted",
    ),
    "traversal": ({"../adapter_config.json": b"{}"}, "bad_path", "'..', '.' and empty path segments"),
    "absolute": ({"/etc/cron.d/x.json": b"{}"}, "bad_path", "relative to the repo root"),
    "backslash": ({"..\\..\\x.json": b"{}"}, "bad_path", "backslashes"),
    "bidi": ({"evil\u202egnp.safetensors": b"{}"}, "bad_path", "U+202E"),
    "device": ({"CON.json": b"{}"}, "bad_path", "reserved device name"),
    "drive": ({"C:/x.json": b"{}"}, "bad_path", 'the characters < > : " | ? *'),
    "lookalike": ({"e\u0301.json": b"{}"}, "bad_path", "NFC"),
    "trailing-dot": ({"adapter_config.json.": b"{}"}, "bad_path", "ends with a dot"),
    "overlap": (
        {
            "adapter_model.safetensors": safetensors_with(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            )
        },
        "bad_content",
        "gap or overlap",
    ),
    "huge-header": (
        {"adapter_model.safetensors": struct.pack("<Q", 1 << 40) + b"{}"},
        "bad_content",
        "does not fit",
    ),
    "bad-json": ({"adapter_config.json": b'{"r": 4,'}, "bad_content", "malformed JSON"),
}


def test_hostile_files_are_refused_at_publish_and_the_lease_survives(hub: Hub) -> None:
    with hub.client() as client:
        lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("ann")).json()
        replies = {
            name: push(client, hub.auth("ann"), ADAPTER, files, lease_id=lease["lease_id"])
            for name, (files, _, _) in HOSTILE_FILES.items()
        }
        log_after = client.get(f"/api/repos/{ADAPTER}/log").json()
        honest = push(client, hub.auth("ann"), ADAPTER, {"notes.md": b"ok\n"}, lease_id=lease["lease_id"])

    for name, (files, code, words) in HOSTILE_FILES.items():
        body = replies[name].json()
        assert replies[name].status_code == 422 and body["error"] == code, (name, body)
        assert words in body["message"] and body["path"] == next(iter(files)), (name, body)
    assert log_after == []  # nothing was published
    assert honest.status_code == 201 and honest.json()["tag"] == "v1"  # the lease was never spent


def _int32(t: dict[str, torch.Tensor]) -> None:
    t[LAYER0_A] = t[LAYER0_A].to(torch.int32)


def _float64(t: dict[str, torch.Tensor]) -> None:
    t[LAYER0_A] = t[LAYER0_A].double()


def _infinity(t: dict[str, torch.Tensor]) -> None:
    t[LAYER1_B][0, 0] = math.inf


def _smuggled(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.lm_head.weight"] = torch.zeros(4, 4)


def _missing(t: dict[str, torch.Tensor]) -> None:
    del t[LAYER1_B]


# name: (change to the adapter folder, words of the screening reason)
HOSTILE_ADAPTERS: dict[str, tuple[Any, str]] = {
    "int32": (lambda f: edit_tensors(f, _int32), "is I32; adapters must be float32, float16, bfloat16"),
    "float64": (lambda f: edit_tensors(f, _float64), "is F64; adapters must be"),
    "infinity": (lambda f: edit_tensors(f, _infinity), "holds 1 non-finite value(s)"),
    "smuggled": (
        lambda f: edit_tensors(f, _smuggled),
        "tensors the base does not imply: base_model.model.lm_head",
    ),
    "missing": (lambda f: edit_tensors(f, _missing), "lacks tensors the base implies"),
    "rank": (lambda f: edit_json(f / "adapter_config.json", r=8), "but the base and r imply [8, 64]"),
    "ia3": (lambda f: edit_json(f / "adapter_config.json", peft_type="IA3"), "only LoRA adapters"),
    "regex": (lambda f: edit_json(f / "adapter_config.json", target_modules=".*"), "['.*'] are not allowed"),
    "dora": (lambda f: edit_json(f / "adapter_config.json", use_dora=True), "uses use_dora"),
    "alpha": (lambda f: edit_json(f / "adapter_config.json", lora_alpha=8e6), "× the median ‖ΔW‖"),
    "no-config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
}


def test_hostile_adapters_are_refused_by_screening_and_the_head_stays(
    make_setup: Any,  # noqa: F811  (the fixtures imported from test_evaluation)
    base_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    hub: Setup = make_setup(**ACCEPTING)
    hub.submit("ann", make_adapter(base_dir, tmp_path / "honest", seed=1))
    assert [d["decision"] for d in run_worker(hub.settings, once=True)] == ["accepted"]

    commits = {}
    for name, (change, _) in HOSTILE_ADAPTERS.items():
        folder = make_adapter(base_dir, tmp_path / name, seed=2)
        change(folder)
        commits[name] = hub.submit("bo", folder)["commit"]
    decided = run_worker(hub.settings, once=True)

    assert [d["decision"] for d in decided] == ["rejected"] * len(HOSTILE_ADAPTERS)
    for name, (_, words) in HOSTILE_ADAPTERS.items():
        row = hub.evaluation(commits[name])
        assert row["reason"].startswith("screening: ") and words in row["reason"], (name, row["reason"])
        assert "candidate" not in row["scores"]  # never loaded into a model, never scored
    assert hub.head() == "v1" and hub.lease("ann")["from_revision"] == "v1"
