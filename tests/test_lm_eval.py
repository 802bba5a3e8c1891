"""lm-evaluation-harness, on the tasks `fedem lm-eval-tasks` writes, reproduces `fedem evaluate`.

lm_eval runs in-process through `simple_evaluate` (what its CLI calls), with the model arguments
docs/compare.md gives: `add_bos_token=False` for the scoring tasks, the tokenizer's default for
translation. The model is the tiny Seshu with sharpened mixer projections, so that greedy
translations differ from prompt to prompt and comparing them is not vacuous.
"""

import copy
from pathlib import Path

import pytest
import torch

from fedem.evaluate import evaluate
from fedem.generate import load_for_inference
from fedem.lm_eval_tasks import export_lm_eval_tasks

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev and compare extras")

LANGUAGES = ["en", "hi"]
LIMITS = {"max_lines": 6, "max_pairs": 3, "max_new_tokens": 8}
BPB_TOLERANCE = 1e-4  # relative; measured differences are below 1e-6 (float32 summation order)


@pytest.fixture(scope="module")
def sharp_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = load_for_inference(tiny_model_dir, device="cpu")
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("in_proj.weight", "out_proj.weight")):
                param.mul_(8.0)
    folder = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _lm_eval(model_dir: Path, tasks_dir: Path, tasks: list[str], model_args: str = "") -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32{model_args}",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(tasks_dir)),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )


def test_lm_eval_reproduces_fedem_evaluate(sharp_dir, data_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = {"mono": data_dir / "mono", "pairs": data_dir / "parallel", "languages": LANGUAGES, **LIMITS}
    exported = export_lm_eval_tasks(tmp_path / "tasks", **data)
    assert exported["groups"] == ["fedem_text", "fedem_flores", "fedem_translate"]
    ours = evaluate(sharp_dir, None, **data)

    scored = _lm_eval(sharp_dir, tmp_path / "tasks", ["fedem_text", "fedem_flores"], ",add_bos_token=False")
    for section, prefix in (("language_modelling", "fedem_text"), ("flores", "fedem_flores")):
        for code in LANGUAGES:
            theirs = scored["results"][f"{prefix}_{code}"]["bits_per_byte,none"]
            assert theirs == pytest.approx(ours[section][code]["bpb"], rel=BPB_TOLERANCE), (prefix, code)

    translated = _lm_eval(sharp_dir, tmp_path / "tasks", ["fedem_translate"])
    samples = translated["samples"]["fedem_translate_en_hi"]
    theirs = [sample["filtered_resps"][0].strip() for sample in samples]
    assert theirs == [example["hypothesis"] for example in ours["translation"]["en-hi"]["examples"]]
    assert len(set(theirs)) > 1  # the prompts really steer the output
    chrf = translated["results"]["fedem_translate_en_hi"]["chrf,none"]
    assert chrf == pytest.approx(ours["translation"]["en-hi"]["chrf"], abs=1e-3)
