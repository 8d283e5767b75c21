"""benchmarks/gpu_flash_bench.py without a GPU: the FLOP convention, the grid, the no-GPU exit,
per-point error handling, and a dry run that writes well-formed CSV, JSON and PNG.

Nothing here needs attnlib.triton_flash: the dry run's default 'ours' is attnlib.flash_attention.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_flash_bench.py"

_spec = importlib.util.spec_from_file_location("gpu_flash_bench", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_flops_follow_the_flashattention2_convention():
    # Dao 2023, section 4.1 (and flash-attn's benchmark_flash_attention.py): 4 B H L S D forward.
    B, H, L, D = 4, 32, 4096, 64
    fwd = bench.attention_flops(B, H, L, L, D, False)
    assert fwd == 4 * B * H * L * L * D == 549_755_813_888
    assert bench.attention_flops(B, H, L, L, D, True) * 2 == fwd  # causal: halved
    assert bench.attention_flops(B, H, L, L, D, False, "bwd") == 2.5 * fwd
    assert bench.attention_flops(B, H, L, L, D, False, "fwd_bwd") == 3.5 * fwd
    assert bench.attention_flops(B, H, L, L, D, True, "fwd_bwd") == 3.5 * fwd / 2
    assert bench.attention_flops(1, 1, 3, 5, 7, False) == 4 * 3 * 5 * 7  # L != S
    assert bench.tflops(2e12, 0.5) == 4.0 and bench.tflops(1.0, 0.0) is None
    with pytest.raises(ValueError):
        bench.attention_flops(1, 1, 8, 8, 8, False, "backward")


def test_default_grid_holds_16k_tokens_and_hidden_2048():
    configs = bench.grid()
    assert len(configs) == 5 * 2 * 2 * 2
    keys = {(c["dtype"], c["causal"], c["head_dim"], c["L"]) for c in configs}
    assert len(keys) == len(configs)
    assert {c["L"] for c in configs} == {1024, 2048, 4096, 8192, 16384}
    assert {c["dtype"] for c in configs} == {"float16", "bfloat16"}
    assert {c["causal"] for c in configs} == {False, True}
    for c in configs:
        assert c["L"] == c["S"]
        assert c["batch"] * c["L"] == 16384
        assert c["heads"] * c["head_dim"] == 2048
    first = configs[0]  # fp16, non-causal, head_dim 64 first: the headline point comes early
    assert (first["dtype"], first["causal"], first["head_dim"]) == ("float16", False, 64)
    assert (bench.HEADLINE["dtype"], bench.HEADLINE["causal"], bench.HEADLINE["head_dim"],
            bench.HEADLINE["L"]) in keys
    assert bench.shape(16384, 128, heads=16) == (1, 16)
    dry = bench.grid(dry_run=True)
    assert [c["L"] for c in dry[:5]] == [8, 16, 32, 64, 128]
    assert all(c["batch"] == 1 and c["heads"] == bench.DRY_RUN_HEADS for c in dry)


def test_slug_and_summary_headline():
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    where = {"dtype": "float16", "causal": False, "head_dim": 64, "L": 4096}
    rows = [{**where, "method": "ours", "fwd_tflops": 300.0, "fwd_bwd_tflops": 200.0,
             "max_abs_err": 1e-3, "max_abs_err_grad": 3e-3},
            {**where, "method": "torch_flash", "fwd_tflops": 400.0, "fwd_bwd_tflops": 250.0,
             "max_abs_err": 1e-3, "max_abs_err_grad": 1e-3},
            {**where, "L": 1024, "method": "ours", "error": "forward: OutOfMemoryError: x"},
            {**where, "L": 1024, "method": "torch_flash", "fwd_tflops": 100.0}]
    s = bench.summarize(rows, where)
    assert s["ours_fwd_fraction_of_torch"] == 0.75 and s["target_status"] == "MISSED"
    assert s["ours_fwd_bwd_fraction_of_torch"] == 0.8
    assert s["configs_compared_fwd"] == 1 and s["points_with_errors"] == 1
    assert s["error_within_rule"] == "1/2"  # the gradient error is 3x PyTorch's
    rows[0]["fwd_tflops"] = 320.0
    assert bench.summarize(rows, where)["target_status"] == "met"
    assert bench.summarize(rows[2:], where)["target_status"] == "not measured"
    assert bench.summarize(rows, where, dry_run=True)["target_status"] == "dry run: not applicable"


def test_without_a_gpu_the_script_says_so_and_fails(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a machine that has one
    run = subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert bench.NO_GPU in run.stderr
    assert "make test" in bench.NO_GPU and "Triton interpreter" in bench.NO_GPU
    assert list(tmp_path.iterdir()) == []


def test_a_failing_point_is_recorded_and_the_sweep_goes_on():
    import torch

    calls = []

    def out_of_memory(q, k, v, causal):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    def no_backward(q, k, v, causal):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(),
                                                                is_causal=causal)

    args = bench.argparse.Namespace(methods=bench.METHODS, check=True, seed=0, warmup=0, repeats=1,
                                    dry_run=True)
    cfg = bench.grid([1024], [64], ["float16"], ["causal"], dry_run=True)[0]
    ours, theirs = bench.run_config(cfg, {"ours": out_of_memory, "torch_flash": no_backward},
                                    args, "cpu")
    assert ours["error"].startswith("forward: OutOfMemoryError: CUDA out of memory")
    assert "fwd_tflops" not in ours
    assert theirs["fwd_tflops"] > 0 and theirs["max_abs_err"] < 1e-2  # forward kept
    assert "forward+backward: RuntimeError" in theirs["error"] and "fwd_bwd_tflops" not in theirs
    assert theirs["fwd_flops"] == bench.attention_flops(1, 2, 8, 8, 64, True)
    assert calls


def test_dry_run_writes_labelled_csv_json_png(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--dry-run", "--lengths", "1024", "4096", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the dry run uses 1 thread; later tests in this process don't
    stem = tmp_path / "gpu_flash_dry-run-cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem.name + ext for ext in
                                                          (".csv", ".json", ".png")]
    with open(stem.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # lengths x head_dims x dtypes x masks x methods
    assert list(rows[0]) == bench.FIELDS
    for r in rows:
        assert r["error"] == "", r["error"]
        assert r["device"] == "cpu (dry run, not a benchmark)"
        B, H, L, S, D = (int(r[k]) for k in ("batch", "heads", "L", "S", "head_dim"))
        causal = r["causal"] == "True"
        assert int(r["fwd_flops"]) == bench.attention_flops(B, H, L, S, D, causal)
        assert int(r["fwd_bwd_flops"]) == bench.attention_flops(B, H, L, S, D, causal, "fwd_bwd")
        fwd_s = float(r["fwd_ms"]) / 1e3
        assert float(r["fwd_tflops"]) == pytest.approx(int(r["fwd_flops"]) / fwd_s / 1e12, rel=2e-3)
        assert 0 <= float(r["max_abs_err"]) < 2e-2 and 0 <= float(r["max_abs_err_grad"]) < 5e-2
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["dry_run"] is True and "not a benchmark" in meta["note"]
    assert "STAND-IN" in meta["methods"]["ours"]
    assert "Dao 2023, FlashAttention-2, section 4.1" in meta["flops"] and "3.5" in meta["flops"]
    assert meta["machine"]["gpu"] is None and len(meta["results"]) == len(rows)
    s = meta["summary"]
    assert s["headline_config"] == {"dtype": "float16", "causal": False, "head_dim": 64, "L": 32}
    assert s["ours_fwd_fraction_of_torch"] > 0 and s["target_status"] == "dry run: not applicable"
    from PIL import Image

    with Image.open(stem.with_suffix(".png")) as im:
        im.verify()
    with Image.open(stem.with_suffix(".png")) as im:
        assert im.format == "PNG" and im.width <= 7.5 * 110 + 1  # course style: 110 dpi
    assert "wrote" in capsys.readouterr().out


def test_dry_run_never_writes_into_benchmarks_results():
    with pytest.raises(SystemExit, match="not a benchmark"):
        bench.main(["--dry-run", "--out-dir", str(bench.RESULTS / "dry")])
    assert not (bench.RESULTS / "dry").exists()


def test_device_script_parses():
    script = REPO / "benchmarks" / "run_gpu_bench.sh"
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "gpu_flash_bench.py" in script.read_text()
