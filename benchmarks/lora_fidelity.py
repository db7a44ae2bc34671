"""How close an exported LoRA, loaded by plain diffusers, comes to the full erased model.

For each case (a model folder obliviate wrote, erased from the shipped `shapes` model):
1. export its lineage as a LoRA (`obliviate export --format lora --rank R`);
2. in a child process that imports diffusers, torch and numpy but never obliviate, load the
   plain base pipeline, `pipe.load_lora_weights(LORA)`, and generate the evaluation prompts
   (every object x colour x style, `--images-per-combo` each) with the same seed, batches
   and sampler settings as `obliviate eval`;
3. judge those images and the full erased model's own (`obliviate eval`'s protocol) with the
   shipped judge, and compare UA (1 − accuracy, mean over removed concepts) and the mean
   accuracy of the never-removed concepts.

    python benchmarks/lora_fidelity.py --work .work/fid --rank 16 --images-per-combo 1 \
        --cases duge-1,uce-1,esd-1,duge-6

A case `METHOD-K` is METHOD's lineage after the first K requests of star, striped, square,
red, triangle, dotted (`METHOD:KEY=VALUE;...-K` with method options, e.g. `esd:lora_rank=16-1`:
ESD trained through rank-16 adapters; `seed=N` is the erase seed, 0 unless given); a missing folder `WORK/METHOD-K` is erased first (default settings,
seed 0, one request after another). Prints a markdown table; `--json` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SEQUENCE = ("star", "striped", "square", "red", "triangle", "dotted")

# The child: plain diffusers only. It reads a JSON spec and writes the images as .npy.
CHILD = r'''
import json, sys
import numpy as np, torch
from diffusers import StableDiffusionPipeline
spec = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(spec["threads"])
pipe = StableDiffusionPipeline.from_pretrained(spec["base"], safety_checker=None, requires_safety_checker=False,
                                               use_safetensors=True, local_files_only=True)
pipe.load_lora_weights(spec["lora"])
pipe.set_progress_bar_config(disable=True)
prompts, b, out = spec["prompts"], spec["batch_size"], []
with torch.no_grad():
    for i in range(0, len(prompts), b):
        gen = torch.Generator(device="cpu").manual_seed(spec["seed"] + i)
        images = pipe(prompts[i:i + b], generator=gen, output_type="np", **spec["sampler"]).images
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
np.save(spec["out"], np.concatenate(out))
assert not any(m == "obliviate" or m.startswith("obliviate.") for m in sys.modules), "obliviate was imported"
print("plain diffusers: obliviate not imported")
'''


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def ensure_case(work: Path, case: str) -> Path:
    """The folder of case METHOD-K, erasing (and the requests before it) where missing."""
    from obliviate import load_pipeline
    from obliviate.erase import erase
    from obliviate.request import Request

    name, k = case.rsplit("-", 1)
    method, _, setting = name.partition(":")
    options = {key: json.loads(value) for key, value in (pair.split("=") for pair in setting.split(";") if pair)}
    seed = options.pop("seed", 0)
    previous = "shapes"
    for i in range(1, int(k) + 1):
        folder = work / f"{name}-{i}"
        if not folder.exists():
            erase(load_pipeline(previous), Request((SEQUENCE[i - 1],)), method=method, options=options,
                  seed=seed, out=folder)
        previous = folder
    return work / case


def judged(images, prompts, judge, removed: list[str]) -> dict:
    """UA (mean over `removed` of 1 − accuracy) and never-removed accuracy of judged images."""
    from obliviate.evaluate.metrics import per_concept_accuracy

    labels = [p.labels for p in prompts]
    per = per_concept_accuracy(labels, judge.predict(images))
    kept = [c for c in per if c not in removed]
    return {"ua": sum(1 - per[c]["accuracy"] for c in removed) / len(removed),
            "kept": sum(per[c]["accuracy"] for c in kept) / len(kept), "images": len(images)}


def delta_bytes(folder: Path) -> int:
    """Bytes a `--save delta` folder of this model takes (the changed tensors + ledger)."""
    from obliviate.erase import save_model
    from obliviate.ledger import Ledger
    from obliviate.pipeline import load_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        save_model(load_pipeline(folder), Path(tmp) / "d", Ledger.load(folder), storage="delta")
        return folder_bytes(Path(tmp) / "d")


def measure(work: Path, case: str, rank: int, images_per_combo: int, threads: int, dtype: str) -> dict:
    from obliviate.evaluate.evaluation import load_judge, shapes_eval_prompts
    from obliviate.export_lora import LORA_FILE, export_lora
    from obliviate.generate import generate_images
    from obliviate.ledger import Ledger
    from obliviate.pipeline import load_pipeline, resolve_model, sampler_settings

    folder = ensure_case(work, case)
    ledger = Ledger.load(folder)
    removed = ledger.removed()
    lora = work / f"{case}-lora-r{rank}-{dtype}"
    report = export_lora(folder, lora, rank=rank, overwrite=True, dtype=dtype)
    full = load_pipeline(folder)
    judge = load_judge(full)
    prompts = shapes_eval_prompts(images_per_combo)
    sampler, seed, batch = sampler_settings(full), 0, 64
    full_fig = judged(generate_images(full, [p.text for p in prompts], seed=seed, batch_size=batch),
                      prompts, judge, removed)
    spec = {"base": str(resolve_model(ledger.base)), "lora": str(lora), "prompts": [p.text for p in prompts],
            "sampler": sampler, "seed": seed, "batch_size": batch, "threads": threads,
            "out": str(work / f"{case}-lora-images.npy")}
    spec_path = work / f"{case}-lora-spec.json"
    spec_path.write_text(json.dumps(spec))
    child = subprocess.run([sys.executable, "-c", CHILD, str(spec_path)], capture_output=True, text=True,
                           env={"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if child.returncode != 0:
        raise SystemExit(f"plain-diffusers child failed:\n{child.stderr[-3000:]}")
    import numpy as np

    lora_fig = judged(np.load(spec["out"]), prompts, judge, removed)
    return {"case": case, "removed": removed, "rank": rank, "dtype": dtype, "energy_kept": report.energy_kept,
            "left_out_energy": report.left_out_energy, "left_out": len(report.left_out),
            "full": full_fig, "lora": lora_fig,
            "bytes": {"full": folder_bytes(folder), "delta": delta_bytes(folder),
                      "lora": (lora / LORA_FILE).stat().st_size}}


def table(rows: list[dict]) -> str:
    out = ["| case | removed | images | UA full / LoRA (diff) | never-removed full / LoRA (diff) | rank, dtype | "
           "energy kept | full save | delta save | LoRA file | full / LoRA |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, lo, b = r["full"], r["lora"], r["bytes"]
        out.append(f"| {r['case']} | {', '.join(r['removed'])} | {lo['images']} | {f['ua']:.3f} / {lo['ua']:.3f} "
                   f"({lo['ua'] - f['ua']:+.3f}) | {f['kept']:.3f} / {lo['kept']:.3f} ({lo['kept'] - f['kept']:+.3f}) "
                   f"| {r['rank']}, {r.get('dtype', 'float32')} | {r['energy_kept']:.1%} | {b['full'] / 1e6:.2f} MB | {b['delta'] / 1e6:.2f} MB "
                   f"| {b['lora'] / 1e6:.3f} MB | {b['full'] / b['lora']:.0f}x |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=".work/fid", help="folder of the erased models and LoRAs")
    parser.add_argument("--cases", default="duge-1,uce-1,esd-1,duge-6", help="comma list of METHOD-K")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    parser.add_argument("--images-per-combo", type=int, default=1, help="images per prompt, 144 prompts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the child (default: 2)")
    parser.add_argument("--dtype", default="float32", help="LoRA precision: float32 or float16")
    parser.add_argument("--json", help="write the figures here (appended to an existing file)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else []
    for case in args.cases.split(","):
        rows.append(measure(work, case, args.rank, args.images_per_combo, args.threads, args.dtype))
        print(table(rows[-1:]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
