"""End-to-end runs of the real-data examples (``examples/*.py``) with reduced epochs, in subprocesses.

Each run's last stdout line is parsed as JSON. Thresholds come from measured runs (2-core CPU shared with other
jobs, ``--epochs 12``: test accuracy 0.911-0.950 over seeds 0-5; ``--epochs 8`` under torchrun with 2 processes:
0.90; ``mae_digits --epochs 4``: test loss from 2.1-3.1 down to 0.555-0.558, seeds 0-2), with a wide margin so that a
different CPU, thread count or BLAS cannot make them flaky -- yet a model that does not learn fails them.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(args: list[str], cwd: Path, timeout: float = 300) -> dict:
    """Run ``args`` (a command line) in ``cwd``; return its last stdout line parsed as JSON."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FASTVIT_BACKEND", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{args} exited with {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{args} printed nothing on stdout; stderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_train_digits_reaches_high_accuracy(tmp_path):
    """12 epochs of the digits ViT: well above chance (0.1), and the JSON reports the eager backend on the CPU."""
    ckpt = tmp_path / "vit.pt"
    out = _run(
        [sys.executable, str(EXAMPLES / "train_digits.py"), "--epochs", "12", "--device", "cpu", "--save", str(ckpt)],
        cwd=tmp_path,
    )
    assert out["test_accuracy"] > 0.85, out
    assert out["backend"] == "eager" and out["world_size"] == 1 and out["epochs"] == 12, out
    assert out["seconds"] > 0

    # --save: a fresh model loads the weights strictly and scores the reported accuracy on the test split
    import importlib.util

    import torch

    from fastvit.nn import VisionTransformer

    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLES / "train_digits.py")
    td = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(td)
    saved = torch.load(ckpt, weights_only=False)
    a = saved["args"]
    model = VisionTransformer(
        img_size=8,
        patch_size=a["patch_size"],
        in_chans=1,
        num_classes=10,
        global_pool="avg",
        embed_dim=a["embed_dim"],
        depth=a["depth"],
        num_heads=a["num_heads"],
        mlp_ratio=a["mlp_ratio"],
    )
    model.load_state_dict(saved["state_dict"], strict=True)
    _, _, x_test, y_test = td.load_data()
    with torch.no_grad():
        model.eval()
        acc = (model((x_test - saved["mean"]) / saved["std"]).argmax(-1) == y_test).float().mean().item()
    assert abs(acc - out["test_accuracy"]) <= 1 / len(y_test), (acc, out)


def test_train_digits_is_deterministic(tmp_path):
    """Same --seed, same result to the last digit; another seed, another result."""
    cmd = [sys.executable, str(EXAMPLES / "train_digits.py"), "--epochs", "1", "--device", "cpu", "--quiet"]
    a = _run(cmd + ["--seed", "3"], cwd=tmp_path)
    b = _run(cmd + ["--seed", "3"], cwd=tmp_path)
    c = _run(cmd + ["--seed", "4"], cwd=tmp_path)
    assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])
    assert a["test_loss"] != c["test_loss"]


def test_train_digits_under_torchrun(tmp_path):
    """Two gloo processes (DDP): only rank 0 prints the JSON, which says world_size 2; the model learns."""
    out = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(EXAMPLES / "train_digits.py"),
            "--epochs",
            "8",
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
    )
    assert out["world_size"] == 2, out
    assert out["test_accuracy"] > 0.75, out


def test_train_digits_rejects_unavailable_backend(tmp_path):
    """Forcing the CUDA backend on a machine without it fails loudly instead of silently running eager."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the cuda backend may well run")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_digits.py"), "--epochs", "1", "--device", "cpu", "--backend", "cuda"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "cuda" in proc.stderr and "cannot run" in proc.stderr, proc.stderr[-2000:]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_mae_digits_loss_falls_and_writes_png(tmp_path):
    """MAE pre-training: the fixed-mask test loss at least halves, and the figure is a real PNG of the right shape."""
    png = tmp_path / "figs" / "mae.png"
    out = _run(
        [sys.executable, str(EXAMPLES / "mae_digits.py"), "--epochs", "4", "--device", "cpu", "--out", str(png)],
        cwd=tmp_path,
    )
    assert out["final_loss"] < 0.5 * out["initial_loss"], out
    assert out["final_loss"] < 0.8, out  # below the ~1.0 of predicting 0 in standardised units
    assert Path(out["png"]) == png.resolve() and png.exists()
    width, height = _png_size(png)
    # 10 digits across, 4 rows (original, masked, reconstruction, reconstruction + visible)
    assert 600 <= width <= 3000 and 250 <= height <= 1500 and width > 2 * height, (width, height)


def test_mae_digits_default_out_is_cwd(tmp_path):
    """Without --out the PNG lands as mae_digits.png in the working directory; --mask-ratio is honoured."""
    out = _run(
        [
            sys.executable,
            str(EXAMPLES / "mae_digits.py"),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--mask-ratio",
            "0.5",
            "--quiet",
        ],
        cwd=tmp_path,
    )
    assert Path(out["png"]) == (tmp_path / "mae_digits.png").resolve()
    assert (tmp_path / "mae_digits.png").read_bytes()[:4] == b"\x89PNG"
    assert out["mask_ratio"] == 0.5
