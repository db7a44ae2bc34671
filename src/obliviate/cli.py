"""The `obliviate` command. Thin: parses arguments, calls the Python API, prints results.

Every user error is an ObliviateError: printed as one line `obliviate: error: ...` with exit
code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from .checks import (check_at_least, check_device, check_finite, check_output_file, check_output_folder,
                     check_seed)
from .errors import ObliviateError

DTYPES = ("float32", "bfloat16", "float16")


def _cmd_generate(args: argparse.Namespace) -> None:
    from .generate import generate_images, image_grid
    from .pipeline import load_pipeline

    out = check_output_file(args.out, "--out", (".png", ".jpg", ".jpeg"))
    check_at_least("-n", args.n, 1)
    check_at_least("--columns", args.columns, 1)
    check_at_least("--scale", args.scale, 1)
    check_at_least("--steps", args.steps, 1)
    check_finite("--guidance", args.guidance)
    check_seed(args.seed)
    check_device(args.device)
    pipe = load_pipeline(args.model, device=args.device)
    overrides = {k: v for k, v in (("num_inference_steps", args.steps),
                                   ("guidance_scale", args.guidance)) if v is not None}
    images = generate_images(pipe, [args.prompt] * args.n, seed=args.seed, progress=True, **overrides)
    scale = args.scale or max(1, 128 // images.shape[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    image_grid(images, columns=args.columns, scale=scale).save(tmp)
    tmp.replace(out)
    print(f"wrote {out} ({args.n} images of {args.prompt!r})")


def _cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate.attacks import ATTACKS, check_attacks
    from .evaluate.evaluation import evaluate_model
    from .pipeline import load_pipeline

    if args.json is not None:
        check_output_file(args.json, "--json")
    for flag, value in (("--images-per-combo", args.images_per_combo), ("--batch-size", args.batch_size),
                        ("--images-per-concept", args.images_per_concept)):
        check_at_least(flag, value, 1)
    check_seed(args.seed)
    check_device(args.device)
    attacks = [a.strip() for a in args.attacks.split(",")] if args.attacks else []
    if args.attacks is not None and not attacks:
        raise ObliviateError(f"--attacks {args.attacks!r}: choose from {', '.join(ATTACKS)} (comma list)")
    check_attacks(attacks, args.attack_budget)
    concepts = [c.strip() for c in (args.concepts or "").split(",") if c.strip()]
    if args.judge:
        from .evaluate.external_judges import check_judge

        check_judge(args.judge)
        if not concepts:
            raise ObliviateError("--judge needs the concepts to evaluate: --concepts a,b,c")
    elif args.concepts:
        raise ObliviateError("--concepts is for real models judged with --judge clip:FOLDER or classifier:FOLDER")
    pipe = load_pipeline(args.model, device=args.device)
    from .evaluate.attacks import check_attacks_for

    check_attacks_for(pipe, attacks)
    if args.judge:
        from .evaluate.external_judges import evaluate_concepts, load_external_judge

        result = {"model": str(args.model), "judge": args.judge,
                  **evaluate_concepts(pipe, load_external_judge(args.judge), concepts,
                                      images_per_concept=args.images_per_concept, seed=args.seed)}
    else:
        result = {"model": str(args.model),
                  **evaluate_model(pipe, images_per_combo=args.images_per_combo, seed=args.seed,
                                   batch_size=args.batch_size)}
    if args.attacks:
        from .evaluate.attacks import run_attacks
        from .evaluate.evaluation import load_judge
        from .ledger import Ledger

        ledger = Ledger.load(Path(pipe.obliviate_source)) if Path(pipe.obliviate_source).is_dir() else None
        removed = ledger.removed() if ledger else []
        if not removed:
            raise ObliviateError(f"{args.model} has no removed concepts in a ledger; nothing to attack")
        original = load_pipeline(ledger.base, device=args.device) if args.attack_budget == "full" else None
        result["attacks"] = run_attacks(pipe, load_judge(pipe), removed, attacks, seed=args.seed,
                                        budget=args.attack_budget, original=original)
    text = json.dumps(result, indent=1)
    _update_card(pipe, result, args)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    _print_eval(result, args.json)


def _update_card(pipe, result: dict, args: argparse.Namespace) -> None:
    """Put the figures of a shapes-world evaluation into the evaluated folder's model card
    (not a shipped model's: its card keeps the documented protocol's figures)."""
    from .ledger import Ledger
    from .model_card import evaluation_text, update_evaluation
    from .pipeline import is_shipped

    folder = Path(getattr(pipe, "obliviate_source", ""))
    if args.judge or not folder.is_dir() or "per_concept" not in result or is_shipped(folder):
        return
    ledger = Ledger.load(folder)
    command = "obliviate eval --model " + str(args.model) + f" --images-per-combo {args.images_per_combo} --seed {args.seed}"
    if update_evaluation(folder, evaluation_text(result, ledger.removed() if ledger else [], command)):
        print(f"updated the figures in {folder / 'README.md'}")


def _print_eval(result: dict, json_path: str | None) -> None:
    acc = result["accuracy"]
    print("accuracy: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    worst = min(result["per_concept"].items(), key=lambda kv: kv[1]["accuracy"])
    fid = f"fid {result['fid']:.3f}" if result.get("fid") is not None else "fid n/a"
    print(f"weakest concept: {worst[0]} {worst[1]['accuracy']:.3f}   {fid}   "
          f"{result['images']} images in {result['seconds']:.0f} s")
    if json_path:
        print(f"wrote {json_path}")


def _cmd_train_base(args: argparse.Namespace) -> None:
    from .shapes.train import BaseTrainer, TrainConfig

    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    if work.exists() and not args.resume:
        raise ObliviateError(f"{work} exists from an earlier run; pass --resume to continue it or remove it")
    if out.exists() and not args.overwrite:
        raise ObliviateError(f"{out} exists; choose another --out or pass --overwrite")
    check_device(args.device)
    config = TrainConfig(seed=args.seed, device=args.device, time_budget_minutes=args.time_budget,
                         init_from=args.init_from or None, family=args.family)
    if args.unet_steps:
        config.unet_steps = args.unet_steps
    if args.schedule_steps:
        config.schedule_steps = args.schedule_steps
    BaseTrainer(out, work, config).run()
    print(f"wrote {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    index = run_demo(Path(args.out), model=args.model)
    print(f"wrote {index}")




def parse_options(pairs: list[str]) -> dict:
    """`--set key=value` pairs to a dict; values parsed as JSON where they parse."""
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ObliviateError(f"--set {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _cmd_erase(args: argparse.Namespace) -> None:
    from .erase import erase
    from .ledger import Ledger
    from .methods.base import get_method, set_common
    from .pipeline import load_pipeline, resolve_model
    from .request import Request

    check_output_folder(args.out, "--out", overwrite=args.overwrite)
    check_at_least("--checkpoint-every", args.checkpoint_every, 0)
    check_seed(args.seed)
    check_device(args.device)
    import torch

    dtype = getattr(torch, args.dtype)
    if dtype is torch.float16 and not str(args.device).startswith("cuda"):
        raise ObliviateError("--dtype float16 needs a GPU (--device cuda); on a CPU use bfloat16 or float32")
    options = parse_options(args.set)
    method = get_method(args.method, **options)
    set_common(method, steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    robust = False
    if args.robust_set and not args.robust:
        raise ObliviateError("--robust-set needs --robust")
    if args.robust:
        from .engine.robust import Robust

        robust = parse_options(args.robust_set) or True
        Robust.checked(robust if isinstance(robust, dict) else {})
        if method.closed_form and not hasattr(method, "apply_robust"):
            raise ObliviateError(f"--robust: {args.method!r} is closed-form and has no robust variant")
    request = Request(tuple(args.concept or ()), args.anchor, tuple(args.preserve or ()))
    source = resolve_model(args.model)
    if isinstance(source, Path) and source.is_dir() and not args.new_lineage:
        Ledger.load(source)  # a broken ledger is refused before the model is loaded
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype)
    result = erase(pipe, request, method=args.method, out=args.out, steps=args.steps, lr=args.lr,
                   batch_size=args.batch_size, seed=args.seed, options=options,
                   save=args.save, overwrite=args.overwrite, new_lineage=args.new_lineage,
                   checkpoint_every=args.checkpoint_every, resume=args.resume, refresh=args.refresh,
                   robust=robust, gradient_checkpointing=args.gradient_checkpointing)
    e = result.entry
    pairs = ", ".join(f"{t['name']} -> {a or '(empty)'}" for t, a in zip(e.request["targets"], e.request["anchors"]))
    print(f"step {e.step}: {args.method} removed {pairs} in {e.seconds:.1f} s; "
          f"{e.bytes_stored / 1e6:.2f} MB stored ({e.storage}); wrote {args.out}")


def _cmd_ledger(args: argparse.Namespace) -> None:
    from .ledger import Ledger

    if not Path(args.folder).is_dir():
        raise ObliviateError(f"{args.folder} is not a folder; give a folder written by obliviate erase")
    ledger = Ledger.load(Path(args.folder))
    if ledger is None:
        raise ObliviateError(f"{args.folder} has no ledger.json (not written by obliviate erase)")
    print(json.dumps(ledger.to_json(), indent=1) if args.json else ledger.describe())


def _cmd_rollback(args: argparse.Namespace) -> None:
    from .erase import rollback

    check_output_folder(args.out, "--out", overwrite=args.overwrite)
    ledger = rollback(args.folder, args.to, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: the model after step {args.to} (sha256 {ledger.head_sha256[:12]})")


def _cmd_export(args: argparse.Namespace) -> None:
    fmt = args.format
    if fmt not in ("full", "lora", "kohya"):
        raise ObliviateError(f"--format must be full, lora or kohya, not {fmt!r}")
    if args.base and fmt != "full":
        raise ObliviateError("--base applies to --format full (re-pointing a delta folder's base)")
    if fmt != "full":
        from .export_lora import export_lora

        report = export_lora(args.folder, args.out, fmt=fmt, energy=args.energy, overwrite=args.overwrite,
                             dtype=args.dtype,
                             rank=args.rank if args.rank is not None else (None if args.energy else 16))
        print(f"wrote {args.out} ({fmt}, {report.bytes / 1e6:.2f} MB): {report.line()}")
        return
    if args.rank is not None or args.energy is not None or args.dtype != "float32":
        raise ObliviateError("--rank, --energy and --dtype apply to --format lora or kohya, not full")
    from .erase import save_model
    from .ledger import Ledger
    from .pipeline import load_pipeline

    check_output_folder(args.out, "--out", overwrite=args.overwrite)
    if not Path(args.folder).is_dir():
        raise ObliviateError(f"{args.folder} is not a folder; give a folder written by obliviate erase")
    ledger = Ledger.load(Path(args.folder))
    if ledger is None:
        raise ObliviateError(f"{args.folder} has no ledger.json (not written by obliviate erase)")
    if args.base and not (Path(args.folder) / "delta.safetensors").exists():
        raise ObliviateError(f"--base is for delta folders; {args.folder} is a full folder")
    pipe = load_pipeline(args.folder, delta_base=args.base)
    ledger.verify(pipe, args.folder)
    save_model(pipe, Path(args.out), ledger, storage="full", overwrite=args.overwrite)
    print(f"wrote {args.out} (full diffusers folder)")


def _training_data(pipe, folder: str | None, concepts: list[str] | None, n: int, seed: int):
    """Captioned data from a folder, or rendered for shapes-world concepts."""
    from .finetune import read_captioned_folder, shapes_data
    from .pipeline import model_world

    if folder:
        size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return read_captioned_folder(folder, size)
    if concepts and model_world(pipe) == "shapes":
        return shapes_data(concepts, n, seed)
    raise ObliviateError("give training data with --data DIR (or --concepts NAME for the shapes world)")


def _cmd_guard(args: argparse.Namespace) -> None:
    from .checkpoint import atomic_folder
    from .families import family_of
    from .ledger import Ledger, weights_sha256
    from .methods.freeze_guard import FreezeAsGuard
    from .model_card import write_card
    from .pipeline import load_pipeline, save_pipeline

    check_output_folder(args.out, "--out", overwrite=args.overwrite)
    pipe = load_pipeline(args.model)
    illegal = _training_data(pipe, args.illegal_data, args.concept, args.images, args.seed)
    legal = _training_data(pipe, args.legal_data, args.legal, args.images, args.seed + 1)
    guard = FreezeAsGuard(rho=args.rho, rounds=args.rounds, seed=args.seed)
    mask = guard.learn(pipe, illegal, legal)
    denoiser = family_of(pipe).denoiser
    with atomic_folder(Path(args.out), overwrite=args.overwrite) as tmp:
        save_pipeline(pipe, tmp)
        info = Path(pipe.obliviate_source) / "obliviate.json"
        if info.exists():
            (tmp / "obliviate.json").write_text(info.read_text())
        ledger = Ledger.load(Path(pipe.obliviate_source))
        if ledger:
            ledger.save(tmp)
        mask.save(tmp)
        write_card(tmp, ledger, kind="guarded", weights_sha256=weights_sha256(pipe),
                   extra={"Base model": str(args.model), "Guard": f"{len(mask.frozen)} {denoiser} tensors frozen "
                          f"({mask.frozen_fraction:.0%} of its parameters), rho {args.rho}"})
    print(f"wrote {args.out}: {len(mask.frozen)} tensors frozen ({mask.frozen_fraction:.0%} of {denoiser} parameters)")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .checkpoint import atomic_folder
    from .families import family_of
    from .finetune import finetune
    from .ledger import weights_sha256
    from .model_card import write_card
    from .methods.freeze_guard import GuardMask
    from .pipeline import load_pipeline, save_pipeline

    check_output_folder(args.out, "--out", overwrite=args.overwrite)
    check_device(args.device)
    pipe = load_pipeline(args.model, device=args.device)
    data = _training_data(pipe, args.data, args.concepts, args.images, args.seed)
    mask = None if args.no_mask else GuardMask.load(Path(pipe.obliviate_source))
    stats = finetune(pipe, data, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                     freeze=set(mask.frozen) if mask else set(), seed=args.seed)
    with atomic_folder(Path(args.out), overwrite=args.overwrite) as tmp:
        save_pipeline(pipe, tmp)
        info = {**getattr(pipe, "obliviate_info", {}), "finetuned_from": str(args.model),
                "guard_mask_honoured": mask is not None}
        info.pop("lineage", None)
        (tmp / "obliviate.json").write_text(json.dumps(info, indent=1))
        write_card(tmp, None, kind="finetuned", weights_sha256=weights_sha256(pipe),
                   extra={"Base model": str(args.model),
                          "Fine-tuning": f"{stats['trained_tensors']} {family_of(pipe).denoiser} tensors, "
                                         f"{args.steps} steps at lr "
                                         f"{args.lr}, guard mask {'honoured' if mask else 'not used'}; it leaves "
                                         "the lineage, so there is no ledger"})
    print(f"wrote {args.out}: loss {stats['loss_first']:.4f} -> {stats['loss_last']:.4f}, "
          f"{stats['trained_tensors']} tensors trained{' (guard mask honoured)' if mask else ''}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .bench import check_seeds, run_bench, table, to_json
    from .report import write_report

    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.report is not None:
        check_output_folder(args.report, "--report", overwrite=True)
    options = {}
    for pair in args.set or []:
        method, _, rest = pair.partition(":")
        if not rest:
            raise ObliviateError(f"--set {pair!r} must look like method:key=value")
        options.setdefault(method, {}).update(parse_options([rest]))
    seeds = [int(x) if x.strip().isdigit() else x for x in args.seeds.split(",")]
    result = run_bench(args.methods.split(","), args.sequence, model=args.model, seeds=check_seeds(seeds),
                       images_per_combo=args.images_per_combo,
                       attacks=args.attacks.split(",") if args.attacks else [],
                       work=Path(args.work) if args.work else None, options=options,
                       attack_targets=args.attack_targets, attack_when=args.attack_when,
                       attack_budget=args.attack_budget, judge=args.judge,
                       concepts=[c.strip() for c in (args.concepts or "").split(",") if c.strip()],
                       images_per_concept=args.images_per_concept,
                       robust_settings=parse_options(args.robust_set))
    print(table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(to_json(result))
    if args.report:
        index = write_report(result, args.report, command="obliviate " + " ".join(sys.argv[1:]))
        print(f"wrote {index}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors as the one line `obliviate: error: ...` (exit 2)."""

    def error(self, message: str):
        """Print the problem and where to read the usage, on one line; exit 2."""
        self.exit(2, f"obliviate: error: {message} (see `{self.prog} --help`)\n")


_MODEL_HELP = ("model to load: `shapes` or `shapes-sd3` (shipped), a diffusers folder (any obliviate output), a "
               "single .safetensors checkpoint, or a hub id (with OBLIVIATE_ONLINE=1)")


def _vocabulary() -> str:
    """The shapes world's concept names, by kind, for help texts."""
    from .shapes.vocab import BY_KIND

    return "; ".join(f"{kind}s: {', '.join(c.name for c in concepts)}" for kind, concepts in BY_KIND.items())


def _sub(sub, name: str, help: str, example: str, description: str | None = None):
    """A sub-command parser whose epilog shows `example`."""
    text = description or help[0].upper() + help[1:] + "."
    return sub.add_parser(name, help=help, description=textwrap.fill(text, 88),
                          epilog="example:\n  " + example.replace("\n", "\n  "),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _robust_defaults(method: str) -> str:
    """The hardening settings `--robust` runs `method` with (Robust's defaults under the
    method's own `robust_settings`), for the help text: read from the code, not restated."""
    from .engine.robust import Robust
    from .methods.base import REGISTRY, method_names

    method_names()  # registers the methods
    settings = Robust.checked(REGISTRY[method].robust_settings).settings()
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={str(v).lower()}"
                     for k, v in settings.items() if k.startswith("harden") or k == "mining")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `obliviate` command (one sub-command per job)."""
    from .engine.robust import Robust
    from .evaluate.attacks import ATTACKS
    from .methods.base import method_names

    methods = ", ".join(method_names())
    attacks = ",".join(ATTACKS)
    vocabulary = _vocabulary()
    parser = OneLineParser(
        prog="obliviate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("Remove concepts from text-to-image diffusion models, one request after "
                                  "another, and measure what each removal cost the rest of the model.", 88),
        epilog=f"methods: {methods}\n" + textwrap.fill(f"concepts of the shipped `shapes` model: {vocabulary}", 88)
               + "\n\n"
               "example:\n  obliviate erase --model shapes --method duge --concept star --out runs/1\n"
               "  obliviate eval --model runs/1\n\n`obliviate COMMAND --help` explains each command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = _sub(sub, "generate", "write a grid of images for one prompt",
             'obliviate generate --model shapes --prompt "a blue dotted diamond" -n 8 --out grid.png')
    g.add_argument("--model", default="shapes", help=_MODEL_HELP + " (default: shapes)")
    g.add_argument("--prompt", required=True, help="text prompt to draw (required)")
    g.add_argument("-n", type=int, default=8, help="number of images (default: 8)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the first image (default: 0)")
    g.add_argument("--out", required=True, help="grid picture to write, .png or .jpg (required)")
    g.add_argument("--steps", type=int, help="sampler steps (default: the model's; 20 for shapes)")
    g.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (default: the model's; 5.0 for shapes)")
    g.add_argument("--columns", type=int, default=8, help="images per grid row (default: 8)")
    g.add_argument("--scale", type=int, help="integer upscale factor for small images (default: up to 128 px)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    g.set_defaults(func=_cmd_generate)

    e = _sub(sub, "eval", "generate the evaluation prompt set and judge it",
             "obliviate eval --model runs/1 --images-per-combo 1 --json runs/1-eval.json")
    e.add_argument("--model", default="shapes", help=_MODEL_HELP + " (default: shapes)")
    e.add_argument("--json", help="also write the metrics to this JSON file (default: print only)")
    e.add_argument("--images-per-combo", type=int, default=4,
                   help="images per object x colour x style prompt, 144 prompts (default: 4)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    e.add_argument("--batch-size", type=int, default=64, help="images generated per batch (default: 64)")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    e.add_argument("--attacks", help=f"comma list of attacks on the model's removed concepts: {attacks} "
                                     "(default: none)")
    e.add_argument("--judge", help="for real models: clip:FOLDER or classifier:FOLDER (default: the "
                                   "shipped judge, shapes world only)")
    e.add_argument("--concepts", help="for real models: comma list of concepts to judge (default: none)")
    e.add_argument("--images-per-concept", type=int, default=8,
                   help="for real models: images per concept (default: 8)")
    e.add_argument("--attack-budget", default="quick", choices=("quick", "full"),
                   help="soft-prompt ladder: quick (3 rungs: 2 tokens, 300 steps, word/neutral/random start) "
                        "or full (1/2/4 tokens x 300/1000 steps x word/neutral/random start x rendered/"
                        "original-model images, 36 rungs) (default: quick)")
    e.set_defaults(func=_cmd_eval)

    t = _sub(sub, "train-base", "train the shapes model and its judge from scratch",
             "obliviate train-base --out runs/shapes-base --time-budget 60")
    t.add_argument("--out", default="runs/shapes-base", help="pipeline folder to write (default: runs/shapes-base)")
    t.add_argument("--work", help="checkpoint folder (default: OUT.work)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work (default: off)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    t.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    t.add_argument("--family", choices=("sd", "sd3"), default="sd",
                   help="the denoiser's layout: sd (a UNet, Stable Diffusion 1.x's layout: the shipped `shapes`) or "
                        "sd3 (an MMDiT transformer, rectified flow, two CLIP encoders: `shapes-sd3`) (default: sd)")
    t.add_argument("--unet-steps", type=int, help="denoiser training steps (default: the recipe's, 5000)")
    t.add_argument("--schedule-steps", type=int,
                   help="length of the cosine learning-rate schedule in steps (default: --unet-steps); a "
                        "longer schedule on --resume continues a finished run at a higher rate")
    t.add_argument("--time-budget", type=float, help="stop denoiser training after this many minutes (default: none)")
    t.add_argument("--init-from", help="continue from a shapes model (e.g. `shapes`) instead of from scratch: its "
                                       "judge and VAE, and its text encoders and denoiser when it has --family's "
                                       "layout (default: from scratch)")
    t.set_defaults(func=_cmd_train_base)

    r = _sub(sub, "erase", "remove concepts from a model; continues its lineage",
             "obliviate erase --model shapes --method duge --concept star --out runs/1\n"
             "obliviate erase --model runs/1 --method uce --concept red --anchor blue --out runs/2 --save delta",
             description="Remove concepts from a model; continues its lineage (ledger.json). "
                         f"Concepts of the shipped `shapes` model: {vocabulary}.")
    r.add_argument("--model", default="shapes", help=_MODEL_HELP + " (default: shapes)")
    r.add_argument("--method", default="duge", help=f"erasure method, one of: {methods} (default: duge)")
    r.add_argument("--concept", action="append",
                   help="concept to remove; repeat to remove several together (required)")
    r.add_argument("--anchor", help="what the concept should become (default: one of its kind)")
    r.add_argument("--preserve", action="append",
                   help="concept that must survive, repeatable (default: the other concepts of its kind)")
    r.add_argument("--out", required=True, help="output folder: diffusers pipeline + ledger + model card (required)")
    r.add_argument("--steps", type=int, help="optimisation steps (default: the method's, e.g. duge 60)")
    r.add_argument("--lr", type=float, help="learning rate (default: the method's, e.g. duge 2e-3)")
    r.add_argument("--batch-size", type=int, help="images per step (default: the method's, e.g. duge 8)")
    r.add_argument("--seed", type=int, default=0, help="erase seed: prompts, images, noise, timesteps (default: 0)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method option, value parsed as JSON where it parses; repeatable "
                        "(e.g. --set variant=x for esd; default: the method's)")
    r.add_argument("--save", default="full", choices=["full", "delta"],
                   help="full: a complete diffusers folder; delta: only the tensors that differ from the "
                        "lineage's base (default: full)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off)")
    r.add_argument("--new-lineage", action="store_true",
                   help="ignore the model's ledger and start a new lineage at it (default: off)")
    r.add_argument("--checkpoint-every", type=int, default=0,
                   help="save a resumable checkpoint every N steps, 0 = never (default: 0)")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out (default: off)")
    r.add_argument("--refresh", action="store_true",
                   help="wrap a gradient method in refresh learning (default: off)")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    r.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights' type: bfloat16 or float16 (GPU) halve the memory; the trained tensors "
                        "stay float32 during the request, under autocast (default: float32)")
    r.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass instead of storing them: less memory, "
                        "more time (default: off)")
    r.add_argument("--robust", action="store_true",
                   help="erasure meant to hold against learned prompts: duge first hardens the UNet body "
                        "(ESD-u, held on what stays); other gradient methods mine soft prompts that bring the "
                        "target back and erase them too; uce solves RECE rounds (default: off)")
    r.add_argument("--robust-set", action="append", metavar="KEY=VALUE",
                   help=f"a --robust setting, repeatable: {', '.join(Robust.settings_keys())} "
                        f"(default: the method's; duge: {_robust_defaults('duge')}; harden_image=0 turns "
                        "the paired-image term off (a colour's is harden_image x "
                        "harden_image_attribute_factor), a style gets harden_style_factor x the "
                        "steps and harden_keep_prompts_style keep prompts; harden_replay=32 "
                        "replays earlier targets under soft prompts mined for them, SD 1.x/2.x only)")
    r.set_defaults(func=_cmd_erase)

    lg = _sub(sub, "ledger", "print a model's lineage", "obliviate ledger runs/2 --json")
    lg.add_argument("folder", help="model folder written by obliviate")
    lg.add_argument("--json", action="store_true", help="print the ledger as JSON instead of a table (default: off)")
    lg.set_defaults(func=_cmd_ledger)

    rb = _sub(sub, "rollback", "restore the model of an earlier lineage step",
              "obliviate rollback runs/2 --to 1 --out runs/1b")
    rb.add_argument("folder", help="model folder written by obliviate")
    rb.add_argument("--to", type=int, required=True, help="lineage step to restore, 0 = the base (required)")
    rb.add_argument("--out", required=True, help="output folder (required)")
    rb.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off)")
    rb.set_defaults(func=_cmd_rollback)

    ex = _sub(sub, "export", "write a lineage as a full diffusers folder or as a LoRA",
              "obliviate export runs/2 --out runs/2-full\n"
              "obliviate export runs/2 --format lora --rank 16 --out runs/2-lora\n"
              "obliviate export runs/2 --format kohya --energy 0.99 --out runs/2-erase.safetensors",
              description="Write a model folder written by obliviate as a full diffusers folder (full), or the "
                          "lineage's change to its base as a LoRA: a diffusers/peft folder for "
                          "pipe.load_lora_weights (lora) or one kohya-named .safetensors file for "
                          "A1111/ComfyUI (kohya). Each changed tensor is factored by truncated SVD.")
    ex.add_argument("folder", help="model folder written by obliviate (full or delta)")
    ex.add_argument("--out", required=True,
                    help="output folder (full, lora) or .safetensors file (kohya) (required)")
    ex.add_argument("--format", default="full",
                    help="full, lora (diffusers/peft folder) or kohya (one .safetensors file) (default: full)")
    ex.add_argument("--rank", type=int,
                    help="LoRA rank per tensor, at most (default: 16; with --energy: no cap)")
    ex.add_argument("--energy", type=float,
                    help="instead of a fixed rank: the smallest rank per tensor that keeps this share of the "
                         "change's energy (Frobenius norm squared), in (0, 1] (default: off)")
    ex.add_argument("--dtype", default="float32",
                    help="precision of the LoRA factors: float32, or float16 for half the file (default: float32)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off)")
    ex.add_argument("--base", help="for a delta folder whose base has moved: the base's new place; its hash "
                                   "is checked (default: the base recorded in the delta)")
    ex.set_defaults(func=_cmd_export)

    gd = _sub(sub, "guard", "FreezeAsGuard: learn which denoiser tensors to freeze",
              "obliviate guard --model runs/1 --concept star --legal circle --out runs/1-guarded")
    gd.add_argument("--model", required=True, help=_MODEL_HELP + " (required)")
    gd.add_argument("--concept", action="append", help="illegal concept, shapes world, repeatable (default: none)")
    gd.add_argument("--legal", action="append",
                    help="legal concept to keep trainable, shapes world, repeatable (default: none)")
    gd.add_argument("--illegal-data", help="folder of captioned images of the illegal domain (default: none)")
    gd.add_argument("--legal-data", help="folder of captioned images of the legal domain (default: none)")
    gd.add_argument("--rho", type=float, default=0.5, help="fraction of the denoiser's parameters to freeze (default: 0.5)")
    gd.add_argument("--rounds", type=int, default=8, help="mask-learning rounds (default: 8)")
    gd.add_argument("--images", type=int, default=64, help="rendered images per domain, shapes world (default: 64)")
    gd.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    gd.add_argument("--out", required=True, help="output folder: the model with its guard mask (required)")
    gd.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off)")
    gd.set_defaults(func=_cmd_guard)

    ft = _sub(sub, "finetune", "fine-tune a model's denoiser, honouring its guard mask",
              "obliviate finetune --model runs/1-guarded --concepts star --steps 100 --out runs/attacked")
    ft.add_argument("--model", required=True, help=_MODEL_HELP + " (required)")
    ft.add_argument("--data", help="folder of images with captions.json or .txt captions (default: none)")
    ft.add_argument("--concepts", action="append", help="render images of these, shapes world, repeatable "
                                                          "(default: none)")
    ft.add_argument("--images", type=int, default=64, help="rendered images, shapes world (default: 64)")
    ft.add_argument("--steps", type=int, default=100, help="fine-tuning steps (default: 100)")
    ft.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    ft.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    ft.add_argument("--no-mask", action="store_true", help="ignore the guard mask, for comparison (default: off)")
    ft.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    ft.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    ft.add_argument("--out", required=True, help="output folder (required)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off)")
    ft.set_defaults(func=_cmd_finetune)

    b = _sub(sub, "bench", "sequential requests, several methods, with attacks and a report",
             "obliviate bench --methods duge,uce --sequence star,striped --images-per-combo 1 --report runs/report")
    b.add_argument("--model", default="shapes", help=_MODEL_HELP + " (default: shapes)")
    b.add_argument("--methods", default="duge,esd,uce",
                   help=f"comma list of methods from: {methods}; METHOD+refresh adds refresh learning, "
                        "METHOD+robust the adversarial plug-in (default: duge,esd,uce)")
    b.add_argument("--sequence", default="friendly",
                   help="a preset: friendly (star,striped,square,red,triangle,dotted), neighbours (each "
                        "target the declared relative of a concept that stays: star,red,square,striped,blue,"
                        "solid) or long (twelve requests); or a comma list of concepts, one request each, "
                        "in order (default: friendly)")
    b.add_argument("--seeds", default="0",
                   help="comma list of erase seeds; the sequence runs once per seed and the erosion "
                        "summary gives the worst and the mean (default: 0)")
    b.add_argument("--images-per-combo", type=int, default=2,
                   help="images per object x colour x style prompt after each request (default: 2)")
    b.add_argument("--attacks", default="", help=f"comma list of {attacks} (default: none)")
    b.add_argument("--attack-budget", default="quick", choices=("quick", "full"),
                   help="soft-prompt ladder, as in `eval --attack-budget` (default: quick)")
    b.add_argument("--attack-targets", default="all",
                   help="removed concepts to attack: all, first, or a comma list (default: all)")
    b.add_argument("--attack-when", default="removal", choices=("removal", "final"),
                   help="attack each target right after the request that removed it (removal, default) "
                        "or on the model after the last request (final)")
    b.add_argument("--judge", help="for real models (any family): clip:FOLDER or classifier:FOLDER; --sequence is "
                                   "then free text, e.g. 'van gogh,picasso' (default: the shipped judge, shapes "
                                   "world only)")
    b.add_argument("--concepts", help="with --judge: comma list of concepts that must stay (default: none)")
    b.add_argument("--images-per-concept", type=int, default=8,
                   help="with --judge: images per concept after each request (default: 8)")
    b.add_argument("--set", action="append", metavar="METHOD:KEY=VALUE",
                   help="method option for one method, repeatable (default: the method's)")
    b.add_argument("--robust-set", action="append", metavar="KEY=VALUE",
                   help="a --robust setting for every +robust method, repeatable (default: each method's; "
                        "see obliviate erase --help)")
    b.add_argument("--json", help="write the results to this JSON file (default: print only)")
    b.add_argument("--report", help="folder for index.html and figures (default: none)")
    b.add_argument("--work", help="folder for the models of each step (default: a temporary folder)")
    b.set_defaults(func=_cmd_bench)

    d = _sub(sub, "demo", "a tour of a model: sample grids, metrics, an HTML page",
             "obliviate demo --out runs/demo")
    d.add_argument("--model", default="shapes", help=_MODEL_HELP + " (default: shapes)")
    d.add_argument("--out", default="runs/demo", help="folder for index.html and figures (default: runs/demo)")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `obliviate` console script; returns the exit code."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (exit 2) and --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        args.func(args)
    except ObliviateError as exc:
        print(f"obliviate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("obliviate: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
