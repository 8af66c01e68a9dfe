"""``fastvit-bench`` / ``python -m fastvit.bench``: attention, model and scaling benchmarks.

Subcommands::

    fastvit-bench attention [--seq-lens N ...] [--head-dims D ...] [--heads H] [--batch B|auto] [--mode MODE]
    fastvit-bench model NAME [--batch B] [--img-size S] [--compile]
    fastvit-bench scaling NAME [--img-sizes S ...] [--batch B] [--mode fwd|fwd_bwd]
    fastvit-bench overhead [--reps R] [--number K] [--model-number K] [--batch B] [--backend NAME] [--json PATH]
    fastvit-bench varlen [--model NAME] [--images B] [--min-side S] [--max-side S] [--mode fwd|fwd_bwd|all]

Common options (attention, model, scaling, varlen): ``--device``, ``--dtype``, ``--json PATH``, ``--plot PATH``,
``--warmup-ms``, ``--rep-ms``, ``--no-progress``. ``overhead`` (host cost of dispatch per op, and a host-bound model
against timm) takes ``--device``, ``--threads``, ``--json`` and ``--no-progress`` and always exits 0 after a run: its
targets are reported, not enforced. Defaults are the real ViT shapes on a GPU and small shapes on the CPU. The exit status is 0 when
every provider that could run was correct and no fastvit provider raised (skipped and out-of-memory providers, and
errors of third-party providers, are reported, not failures), 1 when any was ``FAILED`` (wrong answer) or a fastvit
provider raised (``error``), and 2 for bad arguments.

torch is imported only after the arguments are parsed, so argument errors are reported at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Sequence

__all__ = ["build_parser", "main"]

# Defaults: (GPU, CPU).
_ATTN_SEQ_LENS = ([50, 65, 145, 197, 257, 577, 785, 1025, 1370, 4097], [65, 197])
_ATTN_HEAD_DIMS = ([64, 80], [64])
_ATTN_HEADS = (12, 6)
_ATTN_TOKENS = (256 * 197, 2 * 197)
_MODEL_BATCH = (128, 2)
_SCALING_IMG_SIZES = ([224, 384, 512, 768, 1024], [32, 64, 96])
_SCALING_BATCH = (16, 1)
_MODES = ("fwd", "bwd", "fwd_bwd")
_VARLEN_IMAGES = (64, 8)
_VARLEN_SIDES = ((128, 512), (32, 96))
#: On the CPU ``fastvit-bench varlen`` shrinks the model (``--full-size`` keeps the named one).
_VARLEN_CPU_MODEL = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _batch(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fastvit-bench`` (three subcommands sharing the common options)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="input / autocast dtype (default: bf16 on CUDA, fp32 on the CPU)",
    )
    g.add_argument("--json", metavar="PATH", default=None, help="write results + environment as JSON to PATH")
    g.add_argument("--plot", metavar="PATH", default=None, help="write a PNG plot to PATH")
    g.add_argument(
        "--warmup-ms",
        type=_positive_float,
        default=None,
        help="warm-up budget per measurement, ms (default 25 on CUDA, 10 on the CPU)",
    )
    g.add_argument(
        "--rep-ms",
        type=_positive_float,
        default=None,
        help="timed budget per measurement, ms (default 100 on CUDA, 40 on the CPU)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (torch.set_num_threads; default: torch's own choice)",
    )
    g.add_argument("--no-roofline", action="store_true", help="skip measuring the copy-bandwidth / GEMM ceilings")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.add_argument(
        "--providers",
        type=_csv,
        default=None,
        metavar="A,B,...",
        help="only these providers (names as printed in the table)",
    )

    parser = argparse.ArgumentParser(
        prog="fastvit-bench",
        description="Benchmarks for fastvit: attention providers, whole models, cost scaling with image size, and host "
        "overhead.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{attention,model,scaling,overhead,varlen}")
    sub.required = True

    a = sub.add_parser(
        "attention",
        parents=[common],
        help="attention providers side by side over N and D",
        description="Time every attention provider from packed qkv (B, N, 3·H·D) to (B, N, H·D).",
    )
    a.add_argument(
        "--seq-lens",
        type=_positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help=f"tokens N (default GPU: {_ATTN_SEQ_LENS[0]}; CPU: {_ATTN_SEQ_LENS[1]})",
    )
    a.add_argument(
        "--head-dims",
        type=_positive_int,
        nargs="+",
        default=None,
        metavar="D",
        help=f"head dims D (default GPU: {_ATTN_HEAD_DIMS[0]}; CPU: {_ATTN_HEAD_DIMS[1]})",
    )
    a.add_argument("--heads", type=_positive_int, default=None, help="heads H (default 12 on GPU, 6 on CPU)")
    a.add_argument(
        "--batch", type=_batch, default="auto", help="batch B, or 'auto' (default): B = max(1, round(tokens / N))"
    )
    a.add_argument(
        "--tokens",
        type=_positive_int,
        default=None,
        help=f"B·N target for --batch auto (default GPU {_ATTN_TOKENS[0]}, CPU {_ATTN_TOKENS[1]})",
    )
    a.add_argument("--mode", choices=[*_MODES, "all"], default="fwd", help="fwd, bwd, fwd_bwd or all (default fwd)")
    a.add_argument(
        "--rope",
        action="store_true",
        help="rotary position embeddings on q and k (timm's EvaAttention: fastvit rotates inside the kernel, the "
        "SDPA providers rotate with separate ops first)",
    )
    a.add_argument(
        "--num-prefix-tokens",
        type=_non_negative_int,
        default=1,
        help="with --rope: leading tokens left unrotated, e.g. cls + registers (default 1)",
    )

    m = sub.add_parser(
        "model",
        parents=[common],
        help="train-step and inference throughput of one model",
        description="Images/s and peak memory of a train step (fwd+bwd+AdamW) and of inference.",
    )
    m.add_argument("name", help="model name (fastvit.list_models()), e.g. vit_base_patch16_224")
    m.add_argument("--batch", type=_positive_int, default=None, help="batch (default 128 on GPU, 2 on CPU)")
    m.add_argument("--img-size", type=_positive_int, default=None, help="image side (default: the model's)")
    m.add_argument("--num-classes", type=_positive_int, default=None, help="classifier width (default: the model's)")
    m.add_argument("--compile", action="store_true", help="add torch.compile providers (timm, fastvit); GPU only")
    m.add_argument("--force-compile", action="store_true", help="allow the torch.compile providers on the CPU")

    s = sub.add_parser(
        "scaling",
        parents=[common],
        help="per-component time and memory against N",
        description="Sweep the image size (so N) and time each component of a model with fastvit.ops.",
    )
    s.add_argument("name", help="model name whose shapes to use, e.g. vit_base_patch16_224, mae_vit_base_patch16")
    s.add_argument(
        "--img-sizes",
        type=_positive_int,
        nargs="+",
        default=None,
        metavar="S",
        help=f"image sides (default GPU: {_SCALING_IMG_SIZES[0]}; CPU: {_SCALING_IMG_SIZES[1]})",
    )
    s.add_argument("--batch", type=_positive_int, default=None, help="batch (default 16 on GPU, 1 on CPU)")
    s.add_argument("--mode", choices=["fwd", "fwd_bwd"], default="fwd", help="fwd or fwd_bwd (default fwd)")
    s.add_argument(
        "--backend",
        choices=["eager", "triton", "cuda"],
        default=None,
        help="force a fastvit backend (default: automatic selection per op)",
    )
    s.add_argument(
        "--components",
        type=_csv,
        default=None,
        metavar="A,B,...",
        help="only these components (patch_embed, attention, layer_norm, mlp, mae_gather, mae_unshuffle)",
    )

    o = sub.add_parser(
        "overhead",
        help="host overhead of dispatch per op, and a host-bound ViT against timm",
        description="A/B interleaved: fastvit.ops.<op> vs the selected implementation called directly "
        "(tiny tensors), and fastvit.from_timm vs timm on a 12-block ViT, dim 64, 32x32 "
        "images (inference and a training step). Medians with IQR.",
    )
    o.add_argument("--device", default="cpu", help="torch device of the tensors and models (default cpu)")
    o.add_argument("--reps", type=_positive_int, default=30, help="A/B rounds, i.e. samples per variant (default 30)")
    o.add_argument("--number", type=_positive_int, default=200, help="op calls per sample (default 200)")
    o.add_argument("--model-number", type=_positive_int, default=3, help="model steps per sample (default 3)")
    o.add_argument("--batch", type=_positive_int, default=2, help="images per model step (default 2)")
    o.add_argument(
        "--backend",
        choices=["eager", "triton", "cuda"],
        default=None,
        help="force a fastvit backend (default: automatic selection; eager on the CPU)",
    )
    o.add_argument("--json", metavar="PATH", default=None, help="write results + environment as JSON to PATH")
    o.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's own)")
    o.add_argument(
        "--clock",
        choices=["thread", "wall"],
        default=None,
        help="thread: the calling thread's CPU time (default on the CPU: not inflated by other processes); wall: "
        "elapsed time (the default, and the only choice, on a GPU)",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    v = sub.add_parser(
        "varlen",
        parents=[common],
        help="packed (cu_seqlens) against padded mixed-resolution NaFlexVit batches",
        description="A batch of images of random sizes through timm's NaFlexVit, padded (timm) and packed "
        "(fastvit.integrations.patch_timm_): time, tokens processed, peak memory.",
    )
    v.add_argument("--model", default="naflexvit_base_patch16_gap", help="timm NaFlexVit model (default %(default)s)")
    v.add_argument(
        "--images",
        type=_positive_int,
        default=None,
        help=f"images per batch (default GPU {_VARLEN_IMAGES[0]}, CPU {_VARLEN_IMAGES[1]})",
    )
    v.add_argument(
        "--min-side",
        type=_positive_int,
        default=None,
        help=f"smallest image side, px (default GPU {_VARLEN_SIDES[0][0]}, CPU {_VARLEN_SIDES[1][0]})",
    )
    v.add_argument(
        "--max-side",
        type=_positive_int,
        default=None,
        help=f"largest image side, px (default GPU {_VARLEN_SIDES[0][1]}, CPU {_VARLEN_SIDES[1][1]})",
    )
    v.add_argument("--mode", choices=["fwd", "fwd_bwd", "all"], default="all", help="fwd, fwd_bwd or all (default)")
    v.add_argument("--seed", type=int, default=0, help="seed of the sizes, pixels and labels (default 0)")
    v.add_argument(
        "--full-size",
        action="store_true",
        help="on the CPU, run the named model as is (default there: depth 2, width 64, 2 heads)",
    )
    for sp in (a, m, s, o, v):
        sp.set_defaults(_parser=sp)
    return parser


# ----------------------------------------------------------------------------------------------- helpers
def _progress(iterable: Any, total: int, desc: str, disable: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=disable, leave=False)


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def _skipped_summary(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        if r["status"] in ("skipped", "oom", "error", "FAILED"):
            seen.setdefault((r["provider"], f"[{r['status']}] {r['reason']}"), None)
    return [{"provider": p, "reason": reason} for p, reason in seen]


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "mem":
        return f"{v / 2**20:.1f}"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.3g}"
        if abs(v) >= 1e-3:
            return f"{v:.3f}"
        return f"{v:.1e}"
    return str(v)


def _print_table(
    title: str, columns: list[tuple[str, str, str]], rows: list[dict[str, Any]], width: int | None = None
) -> None:
    """Print ``rows`` (only the ok / FAILED ones) with ``columns`` = (header, key, format) via rich or plain text,
    ``width`` characters wide at most (default from the number of columns)."""
    body = [[_fmt(r.get(key), kind) for _, key, kind in columns] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for head, _, kind in columns:
            table.add_column(head, justify="left" if kind == "text" else "right")
        for line in body:
            table.add_row(*line)
        Console(width=width or max(120, min(220, 14 * len(columns))), file=sys.stdout).print(table)
    except ImportError:  # pragma: no cover
        print(title)
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (h, _, _) in enumerate(columns)]
        print("  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths)))
        for line in body:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def _print_skipped(skipped: list[dict[str, str]]) -> None:
    if not skipped:
        return
    print("\nNot timed here (provider: reason):")
    for s in skipped:
        print(f"  {s['provider']}: {s['reason']}")


def _write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_sanitize(payload), f, indent=2, allow_nan=False)
    print(f"wrote {path}", file=sys.stderr)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def _log_axes(ax: Any, xs: list[float], ys: list[float]) -> None:
    if xs and min(xs) > 0:
        ax.set_xscale("log")
    if ys and min(ys) > 0:
        ax.set_yscale("log")


# ----------------------------------------------------------------------------------------------- context
class _Run:
    """Resolved common options: device, dtype, timing budgets, roofline, environment."""

    def __init__(self, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        import torch

        from fastvit.bench import harness

        if args.device is None:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(args.device)
        except RuntimeError as exc:
            parser.error(f"argument --device: {exc}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            parser.error("argument --device: CUDA requested but torch.cuda.is_available() is False")
        if self.device.type not in ("cpu", "cuda"):
            parser.error(f"argument --device: only cpu and cuda are supported, got {args.device!r}")
        self.gpu = self.device.type == "cuda"
        if args.threads:
            torch.set_num_threads(args.threads)
        self.idx = 0 if self.gpu else 1
        self.dtype = harness.parse_dtype(args.dtype or ("bf16" if self.gpu else "fp32"))
        self.bench = {
            "warmup_ms": args.warmup_ms or (25.0 if self.gpu else 10.0),
            "rep_ms": args.rep_ms or (100.0 if self.gpu else 40.0),
        }
        self.args = args
        self.started = time.time()
        self.roofline = None
        if not args.no_roofline:
            gemm_dtype = self.dtype if self.gpu else torch.float32
            self.roofline = harness.measure_roofline(self.device, gemm_dtype)

    def report(
        self,
        command: str,
        argv: Sequence[str],
        title: str,
        columns: list[tuple[str, str, str]],
        rows: list[dict[str, Any]],
        **extra: Any,
    ) -> None:
        """Print the table of the timed (ok / FAILED) ``rows``, then what was not timed and why, and write the JSON
        document (``--json``) with ``extra`` fields."""
        _print_table(title, columns, [r for r in rows if r["status"] in ("ok", "FAILED")])
        _print_skipped(_skipped_summary(rows))
        if self.args.json:
            _write_json(self.args.json, self.payload(command, argv, rows, **extra))

    def payload(self, command: str, argv: Sequence[str], rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """The JSON document (see benchmarks/README.md)."""
        from fastvit.bench import harness

        return {
            "schema": "fastvit-bench/1",
            "command": command,
            "argv": list(argv),
            "args": {k: v for k, v in vars(self.args).items() if not k.startswith("_")},
            "environment": harness.environment(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "timing": dict(self.bench),
            "roofline": self.roofline.as_dict() if self.roofline else None,
            "results": rows,
            "skipped": _skipped_summary(rows),
            "wall_s": time.time() - self.started,
            **extra,
        }


def _exit_status(rows: list[dict[str, Any]], ours: tuple[str, ...] = ("fastvit",)) -> int:
    """1 when any provider gave a wrong answer (``FAILED``) or one of fastvit's own raised (``error``); errors of
    third-party providers (an SDPA backend, flash-attn) are reported but do not fail the run."""
    bad = [r for r in rows if r["status"] == "FAILED" or (r["status"] == "error" and r["provider"].startswith(ours))]
    if bad:
        names = sorted({r["provider"] for r in bad})
        print(f"\n{len(bad)} run(s) FAILED or raised in fastvit: {names} (see the table / the JSON)", file=sys.stderr)
        return 1
    return 0


def _filter_providers(names: list[str], wanted: list[str] | None, parser: argparse.ArgumentParser) -> list[str]:
    if not wanted:
        return names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        parser.error(f"argument --providers: unknown provider(s) {unknown}; choose from {names}")
    return [n for n in names if n in wanted]


# ----------------------------------------------------------------------------------------------- attention
def _cmd_attention(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    run = _Run(args, parser)
    from fastvit.bench.providers import AttentionSpec, attention_providers, run_attention_case

    seq_lens = args.seq_lens or _ATTN_SEQ_LENS[run.idx]
    head_dims = args.head_dims or _ATTN_HEAD_DIMS[run.idx]
    heads = args.heads or _ATTN_HEADS[run.idx]
    tokens = args.tokens or _ATTN_TOKENS[run.idx]
    modes = list(_MODES) if args.mode == "all" else [args.mode]
    providers = attention_providers()
    keep = _filter_providers([p.name for p in providers], args.providers, parser)
    providers = [p for p in providers if p.name in keep]

    cases = [(n, d, mode) for mode in modes for d in head_dims for n in seq_lens]
    rope_note = f", rope after {args.num_prefix_tokens} prefix tokens" if args.rope else ""
    rows: list[dict[str, Any]] = []
    for n, d, mode in _progress(cases, len(cases), "attention", args.no_progress):
        B = args.batch if args.batch != "auto" else max(1, round(tokens / n))
        spec = AttentionSpec(
            B, n, heads, d, run.dtype, run.device, rope=args.rope, num_prefix_tokens=args.num_prefix_tokens * args.rope
        )
        for rec in run_attention_case(spec, mode, providers, run.roofline, bench=run.bench):
            rows.append(rec.as_dict())

    run.report(
        "attention",
        argv,
        f"attention ({run.device.type}, {str(run.dtype)[6:]}, H={heads}{rope_note}) -- ms is the median; "
        "mem = MiB the call adds",
        [
            ("mode", "mode", "text"),
            ("provider", "provider", "text"),
            ("B", "B", ""),
            ("N", "N", ""),
            ("D", "D", ""),
            ("ms", "ms", ""),
            ("TFLOP/s", "tflops", ""),
            ("GB/s", "gbps", ""),
            ("roofline", "roofline_fraction", "pct"),
            ("mem MiB", "peak_mem_bytes", "mem"),
            ("max|err|", "max_abs_diff", ""),
            ("status", "status", "text"),
        ],
        rows,
        heads=heads,
        tokens_target=tokens,
        rope=args.rope,
    )
    if args.plot:
        _plot_sweep(
            args.plot,
            rows,
            x_key="N",
            series_key="provider",
            panel_keys=("mode", "D"),
            title=f"attention, H={heads}, {str(run.dtype)[6:]}, {run.device.type}{rope_note}",
        )
    return _exit_status(rows)


def _plot_sweep(
    path: str, rows: list[dict[str, Any]], *, x_key: str, series_key: str, panel_keys: tuple[str, ...], title: str
) -> None:
    """One row of panels per combination of ``panel_keys``: time (ms) and memory (MiB) against ``x_key``, log axes."""
    plt = _plt()
    timed = [r for r in rows if r["status"] == "ok" and r.get("ms")]
    panels = list(dict.fromkeys(tuple(r.get(k) for k in panel_keys) for r in timed)) or [tuple()]
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4 * len(panels)), squeeze=False)
    for (ax_t, ax_m), panel in zip(axes, panels):
        sub = [r for r in timed if tuple(r.get(k) for k in panel_keys) == panel]
        label = ", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel))
        all_x, all_t, all_m = [], [], []
        for name in dict.fromkeys(r[series_key] for r in sub):
            pts = sorted((r[x_key], r["ms"], r.get("peak_mem_bytes")) for r in sub if r[series_key] == name)
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], marker="o", label=name)
            all_x += xs
            all_t += [p[1] for p in pts]
            mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None and p[2] > 0]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=name)
                all_m += [m[1] for m in mem]
        ax_t.set_title(f"{title}: time ({label})" if label else f"{title}: time")
        ax_t.set_xlabel(x_key)
        ax_t.set_ylabel("median time (ms)")
        _log_axes(ax_t, all_x, all_t)
        ax_m.set_title(f"peak memory ({label})" if label else "peak memory")
        ax_m.set_xlabel(x_key)
        ax_m.set_ylabel("memory the call adds (MiB)")
        if all_m:
            _log_axes(ax_m, all_x, all_m)
        else:
            ax_m.text(0.5, 0.5, "memory is measured on CUDA only", ha="center", va="center", transform=ax_m.transAxes)
            if all_x and min(all_x) > 0:
                ax_m.set_xscale("log")
                ax_m.set_xlim(ax_t.get_xlim())
        for ax in (ax_t, ax_m):
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- model
def _check_model_name(name: str, parser: argparse.ArgumentParser) -> None:
    try:
        from fastvit import list_models
    except ImportError:
        try:
            from fastvit.nn import list_models
        except ImportError as exc:
            parser.error(f"argument name: fastvit.list_models() is not available ({exc})")
    names = list(list_models())
    if name not in names:
        parser.error(f"argument name: unknown model {name!r}; fastvit.list_models() has {names}")


def _cmd_model(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    _check_model_name(args.name, parser)
    if args.img_size is not None:
        P = _model_config_meta(args.name)["patch_size"]
        if args.img_size % P:
            parser.error(f"argument --img-size: {args.img_size} is not divisible by the patch size {P} of {args.name}")
    run = _Run(args, parser)
    from fastvit.bench.providers import ModelSpec, model_provider_names, run_model

    spec = ModelSpec(
        args.name,
        args.batch or _MODEL_BATCH[run.idx],
        args.img_size,
        run.dtype,
        run.device,
        compile=args.compile,
        force_compile=args.force_compile,
        num_classes=args.num_classes,
    )
    names = _filter_providers(model_provider_names(spec), args.providers, parser)
    bar = _progress(None, len(names), f"model {args.name}", args.no_progress)
    records, info = run_model(
        spec,
        run.roofline,
        providers=names,
        bench=run.bench,
        progress=(lambda name: bar.update(1)) if hasattr(bar, "update") else None,
    )
    if hasattr(bar, "close"):
        bar.close()
    rows = [r.as_dict() for r in records]
    run.report(
        "model",
        argv,
        f"model {args.name} ({run.device.type}, {str(run.dtype)[6:]}{' autocast' if str(run.dtype) != 'torch.float32' else ''}"
        f", B={spec.batch}, img {info['img_size']}, {info['params'] / 1e6:.1f}M params)",
        [
            ("provider", "provider", "text"),
            ("train ms", "train_ms", ""),
            ("train img/s", "train_images_per_s", ""),
            ("train TFLOP/s", "train_tflops", ""),
            ("MFU", "train_mfu", "pct"),
            ("train MiB", "train_peak_mem_bytes", "mem"),
            ("infer ms", "infer_ms", ""),
            ("infer img/s", "infer_images_per_s", ""),
            ("infer MiB", "infer_peak_mem_bytes", "mem"),
            ("max|err|", "max_abs_diff", ""),
            ("status", "status", "text"),
        ],
        rows,
        model=info,
    )
    if args.plot:
        _plot_model(args.plot, rows, f"{args.name} B={spec.batch} img {info['img_size']} {run.device.type}")
    return _exit_status(rows)


def _plot_model(path: str, rows: list[dict[str, Any]], title: str) -> None:
    plt = _plt()
    timed = [r for r in rows if r["status"] == "ok" and r.get("train_images_per_s")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["provider"] for r in timed]
    for ax, key, label in (
        (axes[0], "train_images_per_s", "train step (images/s)"),
        (axes[1], "infer_images_per_s", "inference (images/s)"),
    ):
        ax.barh(names, [r.get(key) or 0 for r in timed])
        ax.set_xlabel(label)
        ax.set_title(f"{title}: {label}")
        ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- scaling
def _model_config_meta(name: str) -> dict[str, Any]:
    import torch

    import fastvit
    from fastvit.bench.providers import model_config

    try:
        with torch.device("meta"):
            model = fastvit.create_model(name)
    except Exception:  # noqa: BLE001 -- some init code cannot run on meta tensors; build it for real
        model = fastvit.create_model(name)
    return model_config(model)


def _cmd_scaling(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    _check_model_name(args.name, parser)
    run = _Run(args, parser)
    from fastvit.bench.providers import run_scaling_point, scaling_components

    cfg = _model_config_meta(args.name)
    comps = scaling_components(cfg)
    names = [c.name for c in comps]
    if args.components:
        unknown = [c for c in args.components if c not in names]
        if unknown:
            parser.error(f"argument --components: unknown component(s) {unknown} for {args.name}; choose from {names}")
        comps = [c for c in comps if c.name in args.components]
    if args.providers:
        parser.error("argument --providers: scaling times fastvit ops only; use --backend and --components")
    P = cfg["patch_size"]
    sizes = args.img_sizes or _SCALING_IMG_SIZES[run.idx]
    bad = [s for s in sizes if s % P]
    if bad:
        parser.error(f"argument --img-sizes: {bad} not divisible by the patch size {P} of {args.name}")
    B = args.batch or _SCALING_BATCH[run.idx]
    cases = [(c, s) for s in sizes for c in comps]
    rows = []
    for comp, size in _progress(cases, len(cases), f"scaling {args.name}", args.no_progress):
        rec = run_scaling_point(
            comp, B, size, run.dtype, run.device, args.mode, args.backend, run.roofline, bench=run.bench
        )
        rows.append(rec.as_dict())
    run.report(
        "scaling",
        argv,
        f"scaling {args.name} ({run.device.type}, {str(run.dtype)[6:]}, B={B}, {args.mode})",
        [
            ("component", "provider", "text"),
            ("backend", "backend", "text"),
            ("img", "img_size", ""),
            ("N", "N", ""),
            ("ms", "ms", ""),
            ("TFLOP/s", "tflops", ""),
            ("GB/s", "gbps", ""),
            ("roofline", "roofline_fraction", "pct"),
            ("mem MiB", "peak_mem_bytes", "mem"),
            ("max|err|", "max_abs_diff", ""),
            ("status", "status", "text"),
        ],
        rows,
        model={"name": args.name, "config": cfg},
        batch=B,
    )
    if args.plot:
        _plot_sweep(
            args.plot,
            rows,
            x_key="N",
            series_key="provider",
            panel_keys=(),
            title=f"{args.name} components, B={B}, {args.mode}, {run.device.type}",
        )
    return _exit_status(rows, ours=tuple(c.name for c in comps))


# ----------------------------------------------------------------------------------------------- overhead
def _iqr(s: dict[str, Any], unit: str, digits: int = 1) -> str:
    """``median [q25, q75]`` of a :func:`fastvit.bench.overhead.summary`."""
    return f"{s[f'median_{unit}']:.{digits}f} [{s[f'q25_{unit}']:.{digits}f}, {s[f'q75_{unit}']:.{digits}f}]"


def _cmd_overhead(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    import torch

    from fastvit.bench import harness, overhead

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"argument --device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        clock, _ = overhead.clock_for(device, args.clock)
    except ValueError as exc:
        parser.error(f"argument --clock: {exc}")
    started = time.time()
    cases = overhead.op_cases(device)
    bar = _progress(None, len(cases) + 2, "overhead", args.no_progress)
    tick = (lambda _name: bar.update(1)) if hasattr(bar, "update") else None
    ops_rows = overhead.measure_ops(
        device=device, reps=args.reps, number=args.number, backend=args.backend, progress=tick, clock=clock
    )
    model = overhead.measure_model(
        device=device,
        batch=args.batch,
        reps=args.reps,
        number=args.model_number,
        backend=args.backend,
        progress=tick,
        clock=clock,
    )
    if hasattr(bar, "close"):
        bar.close()

    rows = [
        {
            "op": r["case"],
            "backend": r["backend"],
            "ops": _iqr(r["variants"]["fastvit.ops"], "us"),
            "direct": _iqr(r["variants"]["direct"], "us"),
            "added": f"{r['added_us']['median']:+.1f} [{r['added_us']['q25']:+.1f}, {r['added_us']['q75']:+.1f}]",
            "note": "value check of caller-made indices" if r["value_check"] else "",
        }
        for r in ops_rows
    ]
    _print_table(
        f"dispatch overhead per op ({device.type}, {clock} clock; {args.reps} A/B rounds x {args.number} calls; "
        "median [IQR])",
        [
            ("op", "op", "text"),
            ("backend", "backend", "text"),
            ("fastvit.ops us", "ops", "text"),
            ("direct us", "direct", "text"),
            ("added us", "added", "text"),
            ("note", "note", "text"),
        ],
        rows,
        width=150,
    )
    mrows = [
        {
            "mode": r["mode"],
            "timm": _iqr(r["variants"]["timm"], "ms", 2),
            "fastvit": _iqr(r["variants"]["fastvit"], "ms", 2),
            "ratio": f"{r['ratio']['median']:.3f} [{r['ratio']['q25']:.3f}, {r['ratio']['q75']:.3f}]",
            "target": "ok" if r["within_target"] else f"> {r['target_ratio']:g}",
        }
        for r in model["rows"]
    ]
    cfg = model["config"]
    _print_table(
        f"host-bound ViT ({device.type}, depth {cfg['depth']}, C={cfg['embed_dim']}, {cfg['img_size']}px/P{cfg['patch_size']}, "
        f"B={model['batch']}, {clock} clock; {args.reps} A/B rounds x {args.model_number} steps; median [IQR])",
        [
            ("mode", "mode", "text"),
            ("timm ms", "timm", "text"),
            ("fastvit ms", "fastvit", "text"),
            ("fastvit / timm", "ratio", "text"),
            (f"<= {overhead.MODEL_RATIO_TARGET:g}", "target", "text"),
        ],
        mrows,
    )
    if args.json:
        _write_json(
            args.json,
            {
                "schema": "fastvit-bench/1",
                "command": "overhead",
                "argv": list(argv),
                "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                "environment": harness.environment(device),
                "clock": clock,
                "ops": ops_rows,
                "model": model,
                "wall_s": time.time() - started,
            },
        )
    return 0


# ----------------------------------------------------------------------------------------------- varlen
def _cmd_varlen(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    try:
        import timm
    except ImportError:
        parser.error("varlen needs timm (pip install timm) for its NaFlexVit")
    if args.model not in timm.list_models("naflexvit*"):
        parser.error(
            f"argument --model: {args.model!r} is not a timm NaFlexVit; choose from {timm.list_models('naflexvit*')}"
        )
    if args.providers:
        parser.error("argument --providers: varlen always runs its two providers (timm padded, fastvit packed)")
    run = _Run(args, parser)
    from fastvit.bench.varlen import VarlenSpec, run_varlen

    lo = args.min_side or _VARLEN_SIDES[run.idx][0]
    hi = args.max_side or _VARLEN_SIDES[run.idx][1]
    if lo > hi:
        parser.error(f"argument --min-side: {lo} exceeds --max-side {hi}")
    if lo < 16:
        parser.error(f"argument --min-side: {lo} px is below one 16 px patch")
    kwargs = {} if run.gpu or args.full_size else dict(_VARLEN_CPU_MODEL)
    spec = VarlenSpec(
        args.model, args.images or _VARLEN_IMAGES[run.idx], lo, hi, run.dtype, run.device, args.seed, kwargs
    )
    modes = ["fwd", "fwd_bwd"] if args.mode == "all" else [args.mode]
    bar = _progress(None, 2 * len(modes), "varlen", args.no_progress)
    rows, info = run_varlen(
        spec, modes, bench=run.bench, progress=(lambda _label: bar.update(1)) if hasattr(bar, "update") else None
    )
    if hasattr(bar, "close"):
        bar.close()
    shrunk = f", shrunk to {kwargs}" if kwargs else ""
    run.report(
        "varlen",
        argv,
        f"varlen {args.model}{shrunk} ({run.device.type}, {str(run.dtype)[6:]}, B={spec.num_images}, sides "
        f"{lo}-{hi} px, {info['valid_fraction']:.0%} of padded patches valid)",
        [
            ("mode", "mode", "text"),
            ("provider", "provider", "text"),
            ("tokens", "tokens", ""),
            ("ms", "ms", ""),
            ("img/s", "images_per_s", ""),
            ("speedup", "speedup", ""),
            ("mem MiB", "peak_mem_bytes", "mem"),
            ("max|err|", "max_abs_diff", ""),
            ("status", "status", "text"),
        ],
        rows,
        batch=info,
    )
    return _exit_status(rows)


# ----------------------------------------------------------------------------------------------- main
_COMMANDS = {
    "attention": _cmd_attention,
    "model": _cmd_model,
    "scaling": _cmd_scaling,
    "overhead": _cmd_overhead,
    "varlen": _cmd_varlen,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastvit-bench``; returns the exit status (0 ok, 1 a provider FAILED or raised, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return _COMMANDS[args.command](args, getattr(args, "_parser", parser), argv)


if __name__ == "__main__":
    sys.exit(main())
