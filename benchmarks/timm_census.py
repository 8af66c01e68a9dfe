"""Census: how much of timm's ViT-family models runs on fastvit after ``patch_timm_``.

Builds each model on the meta device (no weights, no memory; ``pretrained=False``), patches it with
:func:`fastvit.integrations.timm.patch_timm_` and reads :func:`fastvit.integrations.timm.patch_report`: per model the
attention, MLP and norm modules that run on fastvit (status ``patched`` or ``modular``) out of those present, and the
reasons for the rest. A model counts as "attention on fastvit" when every attention module of its blocks does.

    python benchmarks/timm_census.py [--json PATH] [--models a,b,c]

Models timm does not know (another timm version) are listed as missing, not counted.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

#: The models tried: every ViT family timm packages, the newest (2D RoPE, gated MLPs, RMSNorm) included.
MODELS = (
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch14_clip_224",
    "vit_base_patch16_clip_quickgelu_224",
    "vit_base_patch16_siglip_224",
    "vit_so400m_patch14_siglip_224",
    "deit_small_patch16_224",
    "deit3_base_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_giant_patch14_dinov2",
    "vit_small_patch16_dinov3",
    "vit_large_patch16_dinov3",
    "vit_huge_plus_patch16_dinov3",
    "eva02_tiny_patch14_224",
    "eva02_base_patch14_224",
    "vit_pe_core_base_patch16_224",
    "vit_base_patch16_rope_224",
    "vit_base_patch16_rope_mixed_224",
    "vit_base_patch16_rope_ape_224",
    "vit_base_patch16_rope_mixed_ape_224",
    "naflexvit_base_patch16_gap",
    "naflexvit_base_patch16_par_gap",
    "aimv2_large_patch14_224",
    "vit_base_patch16_xp_224",
    "vit_medium_patch16_gap_256",
    "vit_little_patch16_reg1_gap_256",
    "vit_betwixt_patch16_reg4_gap_256",
    "flexivit_small",
    "beit_base_patch16_224",
    "vit_relpos_base_patch16_224",
    "samvit_base_patch16",
    # the vision towers timm packages (2D RoPE in EvaBlocks; Gemma 4's own attention)
    "qwen3_vit_88m",
    "deepseek_vit_412m",
    "vit_base_patch16_sapiens2",
    "vit_small_patch16_lingbot",
    "gemma4_vit_167m",
)

_ON_FASTVIT = ("patched", "modular")
_KINDS = {
    "attention": ("Attention",),
    "mlp": ("Mlp", "SwiGLU", "Glu"),
    "norm": ("Norm",),
}


def census(names: tuple[str, ...] = MODELS) -> list[dict]:
    """One row per model: ``model``, then per kind (attention, mlp, norm) ``[on fastvit, present]`` and the reasons
    (class: reason) of the modules left on timm; ``error`` when the model could not be built."""
    import timm

    from fastvit.integrations.timm import patch_report, patch_timm_

    known = set(timm.list_models())
    rows = []
    for name in names:
        if name not in known:
            rows.append({"model": name, "error": "not in this timm"})
            continue
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception as exc:  # noqa: BLE001 -- a model that does not build on meta is reported, not counted
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        patch_timm_(model)
        report = patch_report(model)
        row: dict = {"model": name}
        reasons = set()
        for kind, marks in _KINDS.items():
            mods = [r for r in report if any(m in r.class_name for m in marks)]
            row[kind] = [sum(r.status in _ON_FASTVIT for r in mods), len(mods)]
            reasons |= {f"{r.class_name}: {r.reason}" for r in mods if r.status not in _ON_FASTVIT}
        row["left_on_timm"] = sorted(reasons)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the census (and write it as JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--models", help="comma-separated timm model names (default: the built-in list)")
    args = parser.parse_args(argv)
    rows = census(tuple(args.models.split(",")) if args.models else MODELS)
    counted = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"{r['model']:40s} {r['error']}")
            continue
        cells = "  ".join(f"{k} {r[k][0]:>3}/{r[k][1]:<3}" for k in _KINDS)
        print(f"{r['model']:40s} {cells}  {'; '.join(r['left_on_timm'])[:150]}")
    for kind in _KINDS:
        full = sum(1 for r in counted if r[kind][1] and r[kind][0] == r[kind][1])
        present = sum(1 for r in counted if r[kind][1])
        print(f"{kind}: all on fastvit in {full} of {present} models that have one ({len(counted)} models tried)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
