"""`bench/train_throughput.py` runs end to end (`--quick`) and writes its report; no timing assertions."""

import importlib.util
from pathlib import Path

import pytest

from tests.bench.conftest import run_quick

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "train_throughput.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "results"
    report = run_quick("train_throughput.py", out)
    assert (out / "train_throughput.md").read_text(encoding="utf-8").startswith("# Training throughput")

    assert report["settings"]["quick"] is True
    for key in ("cpu", "cores", "torch", "transformers", "date"):
        assert report["machine"][key]
    assert report["parameters"] > 0
    assert [(r["path"], r["length"]) for r in report["results"]] == [("chunked", 64), ("sequential", 64)]
    for result in report["results"]:
        assert "error" not in result, result
        assert result["steps"] >= 1
        assert result["tokens_per_s"] > 0
        assert result["peak_rss_mib"] > 0
        assert result["peak_rss_mib"] >= result["rss_after_build_mib"] > 0
        assert result["system_s_per_step"] >= 0 and result["minor_faults_per_step"] >= 0
    (row,) = report["summary"]
    assert row["length"] == 64 and row["speedup"] > 0 and row["memory_ratio"] > 0


def test_batch_is_halved_until_the_prediction_fits() -> None:
    bench = _load_bench()
    size = {"hidden_size": 256, "num_hidden_layers": 12, "state_size": 64, "head_dim": 64, "chunk_size": 64}
    states_8 = bench.state_bytes(size, 1024, 8)
    assert (
        states_8 == 12 * 1024 * 8 * 8 * 64 * 64 * 4
    )  # layers · length · batch · heads · P · N floats: 12 GiB
    chunked = {"batch": 8, "rss_after_build_mib": 400.0, "peak_rss_mib": 8400.0}
    assert bench.fitting_batch(size, 1024, 8, chunked, 1.0, 64 * bench.GIB) == 8
    assert bench.fitting_batch(size, 1024, 8, chunked, 1.0, 16 * bench.GIB) == 4
    assert bench.fitting_batch(size, 1024, 8, chunked, 2.0, 16 * bench.GIB) == 2
    assert bench.fitting_batch(size, 1024, 8, chunked, 2.0, 1 * bench.GIB) == 1


def test_markdown_reports_failures_and_smaller_batches() -> None:
    bench = _load_bench()
    ok = {"steps": 2, "budget_cut": False, "seconds": 2.0, "rss_after_build_mib": 400.0}
    results = [
        {"path": "chunked", "length": 256, "batch": 8, "tokens_per_s": 1000.0, "peak_rss_mib": 2000.0, **ok},
        {
            "path": "sequential",
            "length": 256,
            "batch": 4,
            "tokens_per_s": 100.0,
            "peak_rss_mib": 3000.0,
            **ok,
        },
        {"path": "chunked", "length": 1024, "batch": 8, "tokens_per_s": 900.0, "peak_rss_mib": 8000.0, **ok},
        {"path": "sequential", "length": 1024, "batch": 1, "error": "RuntimeError: can't allocate memory"},
    ]
    summary = bench.summarise(results, [256, 1024])
    assert summary[0]["speedup"] == 10.0 and summary[0]["same_batch"] is False
    assert summary[0]["memory_ratio"] is None
    assert summary[1]["speedup"] is None
    assert bench.is_memory_error(results[3])

    machine = {
        "cpu": "cpu",
        "cores": 2,
        "torch_threads": 2,
        "memory_gib": 8,
        "memory_available_gib": 7,
        "python": "3.11",
        "torch": "2",
        "transformers": "5",
        "date": "today",
        "load_average_start": [0.0],
        "load_average_end": [0.0],
        "environment": {},
    }
    settings = {"quick": False, "vocab": 16000, "batch": 8, "warmup": 1, "budget": 40.0}
    text = bench.markdown(
        {
            "machine": machine,
            "settings": settings,
            "parameters": 9_000_000,
            "results": results,
            "summary": summary,
            "notes": ["a note"],
            "command": "python bench/train_throughput.py",
        }
    )
    assert "failed: RuntimeError" in text
    assert "10.0× (chunked at another batch)" in text
    assert "- a note" in text


def test_out_of_memory_halves_the_batch_and_retimes_chunked(tmp_path: Path, monkeypatch) -> None:
    """The driver logic, with the children faked: sequential only fits at batch 2 at length 1024."""
    bench = _load_bench()

    def fake_run_job(job):
        if job.path == "sequential" and job.length == 1024 and job.batch > 2:
            return {
                "path": job.path,
                "length": job.length,
                "batch": job.batch,
                "error": "RuntimeError: DefaultCPUAllocator: can't allocate memory",
            }
        speed = 1000.0 if job.path == "chunked" else 100.0
        return {
            "path": job.path,
            "length": job.length,
            "batch": job.batch,
            "parameters": 1,
            "steps": 1,
            "budget_cut": False,
            "seconds": job.batch * job.length / speed,
            "tokens_per_s": speed,
            "rss_after_build_mib": 100.0,
            "peak_rss_mib": 100.0 + job.batch,
        }

    monkeypatch.setattr(bench, "run_job", fake_run_job)
    report = bench.main(["--lengths", "1024", "256", "--mem-limit-gib", "0", "--out", str(tmp_path)])
    runs = [(r["path"], r["length"], r["batch"], "error" in r) for r in report["results"]]
    assert runs == [
        ("chunked", 256, 8, False),
        ("sequential", 256, 8, False),
        ("chunked", 1024, 8, False),
        ("sequential", 1024, 2, False),
        ("chunked", 1024, 2, False),
    ]
    assert [n for n in report["notes"] if "ran out of memory" in n] == [
        "length 1024: sequential at batch 8 ran out of memory; halved",
        "length 1024: sequential at batch 4 ran out of memory; halved",
    ]
    by_length = {row["length"]: row for row in report["summary"]}
    assert by_length[1024]["batch"] == 2 and by_length[1024]["same_batch"] is True
    assert by_length[1024]["speedup"] == 10.0
    assert (tmp_path / "train_throughput.md").is_file()


def test_vs_llama_quick_run_reports_ratios_against_the_targets(tmp_path: Path) -> None:
    """`bench/vs_llama.py --quick`: Llama, stock-scan and ssd-scan Seshu (its mixer also uncompiled) and a
    Mamba-1 on use_mambapy each train in a child process."""
    out = tmp_path / "results"
    report = run_quick("vs_llama.py", out)
    assert (out / "vs_llama.md").read_text(encoding="utf-8").startswith("# Training: seshu-small vs")
    assert [r["path"] for r in report["results"]] == ["llama", "chunked", "ssd-eager", "ssd", "mamba1"]
    for result in report["results"]:
        assert "error" not in result, result
        assert result["tokens_per_s"] > 0 and result["peak_rss_mib"] > 0
    assert set(report["parameters"]) == {"llama", "chunked", "ssd-eager", "ssd", "mamba1"}
    rows = {row["path"]: row for row in report["summary"]}
    assert rows["ssd"]["speed_vs_llama"] > 0 and rows["ssd"]["memory_vs_llama"] > 0
    assert rows["ssd-eager"]["speed_vs_llama"] > 0
    assert rows["ssd / chunked"]["speed_vs_chunked"] > 0
    assert rows["ssd / Mamba-1 use_mambapy"]["speed_vs_mamba1"] > 0
    assert rows["ssd / Mamba-1 use_mambapy"]["speed_target"] == 10.0
    (turns,) = report["alternating"]  # the Llama and ssd taking turns in one process
    assert "error" not in turns, turns
    assert turns["rounds"] == 2 and all(len(t) == 2 for t in turns["step_seconds"].values())
    assert rows["ssd, taking turns with llama in one process"]["speed_vs_llama"] == pytest.approx(
        turns["tokens_per_s"]["ssd"] / turns["tokens_per_s"]["llama"]
    )


def test_vs_llama_verdicts_say_by_how_much_a_target_is_missed() -> None:
    spec = importlib.util.spec_from_file_location("vs_llama", REPO / "bench" / "vs_llama.py")
    assert spec is not None and spec.loader is not None
    vs_llama = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs_llama)
    assert vs_llama.verdict(0.6, 0.8, at_least=True) == "0.60× (target ≥ 0.8×: missed by 25%)"
    assert vs_llama.verdict(1.0, 0.8, at_least=True) == "1.00× (target ≥ 0.8×: met)"
    assert vs_llama.verdict(1.56, 1.3, at_least=False) == "1.56× (target ≤ 1.3×: missed by 20%)"
    assert vs_llama.verdict(None, 1.3, at_least=False) == "—"
    llama = {"path": "llama", "length": 512, "tokens_per_s": 1000.0, "peak_rss_mib": 2000.0}
    ssd = {"path": "ssd", "length": 512, "tokens_per_s": 900.0, "peak_rss_mib": 2200.0}
    chunked = {"path": "chunked", "length": 512, "error": "MemoryError"}
    rows = {row["path"]: row for row in vs_llama.summarise([llama, chunked, ssd], [512])}
    assert rows["chunked"]["speed_vs_llama"] is None  # the failed run has no ratio
    assert rows["ssd-eager"]["speed_vs_llama"] is None  # nor the one that did not run
    assert rows["ssd"]["speed_vs_llama"] == 0.9 and rows["ssd"]["memory_vs_llama"] == 1.1
    assert rows["ssd"]["speed_target"] == 0.8 and rows["ssd"]["memory_target"] == 1.3
    # Timed taking turns in one process, the ratio carries the speed target instead (one verdict each).
    turns = {"length": 512, "batch": 8, "tokens_per_s": {"llama": 1000.0, "ssd": 850.0}}
    rows = {row["path"]: row for row in vs_llama.summarise([llama, chunked, ssd], [512], [turns])}
    assert rows["ssd"]["speed_vs_llama"] == 0.9 and rows["ssd"]["speed_target"] is None
    assert rows["ssd"]["memory_target"] == 1.3
    alternating = rows["ssd, taking turns with llama in one process"]
    assert alternating["speed_vs_llama"] == 0.85 and alternating["speed_target"] == 0.8
    assert rows["chunked"]["speed_target"] == 0.8
