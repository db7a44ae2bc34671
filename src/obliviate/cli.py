"""The `obliviate` command. Thin: parses arguments, calls the Python API, prints results.

Every user error is an ObliviateError: printed as one line `obliviate: error: ...` with exit
code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checks import (check_at_least, check_device, check_finite, check_output_file, check_output_folder,
                     check_seed)
from .errors import ObliviateError


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
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or (args.attacks is not None and not attacks):
        raise ObliviateError(f"--attacks {args.attacks!r}: choose from {', '.join(ATTACKS)} (comma list)")
    concepts = [c.strip() for c in (args.concepts or "").split(",") if c.strip()]
    if args.judge:
        from .evaluate.external_judges import check_judge

        check_judge(args.judge)
        if not concepts:
            raise ObliviateError("--judge needs the concepts to evaluate: --concepts a,b,c")
    elif args.concepts:
        raise ObliviateError("--concepts is for real models judged with --judge clip:FOLDER or classifier:FOLDER")
    pipe = load_pipeline(args.model, device=args.device)
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
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    _print_eval(result, args.json)


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
    init = None
    if args.init_from:
        from .pipeline import resolve_model

        init = str(resolve_model(args.init_from))
    config = TrainConfig(seed=args.seed, device=args.device, time_budget_minutes=args.time_budget,
                         init_from=init)
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


ATTACKS = ("paraphrase", "softprompt", "hardprompt", "conditioning", "resurgence")  # evaluate.attacks.ATTACKS


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
    pipe = load_pipeline(args.model, device=args.device)
    result = erase(pipe, request, method=args.method, out=args.out, steps=args.steps, lr=args.lr,
                   batch_size=args.batch_size, seed=args.seed, options=options,
                   save=args.save, overwrite=args.overwrite, new_lineage=args.new_lineage,
                   checkpoint_every=args.checkpoint_every, resume=args.resume, refresh=args.refresh,
                   robust=robust)
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
    from .ledger import Ledger
    from .methods.freeze_guard import FreezeAsGuard
    from .pipeline import load_pipeline

    check_output_folder(args.out, "--out", overwrite=args.overwrite)
    pipe = load_pipeline(args.model)
    illegal = _training_data(pipe, args.illegal_data, args.concept, args.images, args.seed)
    legal = _training_data(pipe, args.legal_data, args.legal, args.images, args.seed + 1)
    guard = FreezeAsGuard(rho=args.rho, rounds=args.rounds, seed=args.seed)
    mask = guard.learn(pipe, illegal, legal)
    with atomic_folder(Path(args.out), overwrite=args.overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = Path(pipe.obliviate_source) / "obliviate.json"
        if info.exists():
            (tmp / "obliviate.json").write_text(info.read_text())
        ledger = Ledger.load(Path(pipe.obliviate_source))
        if ledger:
            ledger.save(tmp)
        mask.save(tmp)
    print(f"wrote {args.out}: {len(mask.frozen)} tensors frozen ({mask.frozen_fraction:.0%} of UNet parameters)")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .checkpoint import atomic_folder
    from .finetune import finetune
    from .methods.freeze_guard import GuardMask
    from .pipeline import load_pipeline

    check_output_folder(args.out, "--out", overwrite=args.overwrite)
    check_device(args.device)
    pipe = load_pipeline(args.model, device=args.device)
    data = _training_data(pipe, args.data, args.concepts, args.images, args.seed)
    mask = None if args.no_mask else GuardMask.load(Path(pipe.obliviate_source))
    stats = finetune(pipe, data, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                     freeze=set(mask.frozen) if mask else set(), seed=args.seed)
    with atomic_folder(Path(args.out), overwrite=args.overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = {**getattr(pipe, "obliviate_info", {}), "finetuned_from": str(args.model),
                "guard_mask_honoured": mask is not None}
        info.pop("lineage", None)
        (tmp / "obliviate.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {args.out}: loss {stats['loss_first']:.4f} -> {stats['loss_last']:.4f}, "
          f"{stats['trained_tensors']} tensors trained{' (guard mask honoured)' if mask else ''}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench, table, to_json
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
    result = run_bench(args.methods.split(","), args.sequence.split(","), model=args.model,
                       images_per_combo=args.images_per_combo,
                       attacks=args.attacks.split(",") if args.attacks else [],
                       work=Path(args.work) if args.work else None, options=options,
                       attack_targets=args.attack_targets, attack_when=args.attack_when,
                       attack_budget=args.attack_budget)
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `obliviate` command (one sub-command per job)."""
    parser = OneLineParser(
        prog="obliviate", description="Remove concepts from text-to-image diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a grid of images for one prompt")
    g.add_argument("--model", default="shapes", help="shipped name, diffusers folder, .safetensors or hub id")
    g.add_argument("--prompt", required=True)
    g.add_argument("-n", type=int, default=8, help="number of images")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="grid picture to write (.png)")
    g.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--columns", type=int, default=8)
    g.add_argument("--scale", type=int, help="upscale factor for small images (default: to 128 px)")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("eval", help="generate the evaluation prompt set and judge it")
    e.add_argument("--model", default="shapes")
    e.add_argument("--json", help="write the metrics here")
    e.add_argument("--images-per-combo", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="cpu")
    e.add_argument("--attacks", help="comma list of paraphrase,softprompt,hardprompt,conditioning,resurgence "
                                     "(on the removed concepts; conditioning is the white-box upper bound)")
    e.add_argument("--attack-budget", default="quick", choices=("quick", "full"),
                   help="soft-prompt ladder: quick (3 rungs, 2 tokens, 300 steps) or full (1/2/4 tokens x "
                        "300/1000 steps x word/neutral/random start x rendered/original-model images); "
                        "default quick")
    e.add_argument("--judge", help="for real models: clip:FOLDER or classifier:FOLDER")
    e.add_argument("--concepts", help="for real models: comma list of concepts to judge")
    e.add_argument("--images-per-concept", type=int, default=8)
    e.set_defaults(func=_cmd_eval)

    t = sub.add_parser("train-base", help="train the shapes model and its judge from scratch")
    t.add_argument("--out", default="runs/shapes-base")
    t.add_argument("--work", help="checkpoint folder (default: OUT.work)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--unet-steps", type=int, help="UNet training steps (default: the recipe's)")
    t.add_argument("--schedule-steps", type=int,
                   help="length of the cosine learning-rate schedule (default: --unet-steps); a longer "
                        "schedule on --resume continues a finished run at a higher rate")
    t.add_argument("--time-budget", type=float, help="stop UNet training after this many minutes")
    t.add_argument("--init-from", help="continue from a shapes model (e.g. `shapes`) instead of from scratch")
    t.set_defaults(func=_cmd_train_base)

    r = sub.add_parser("erase", help="remove concepts from a model; continues its lineage")
    r.add_argument("--model", default="shapes")
    r.add_argument("--method", default="duge")
    r.add_argument("--concept", action="append", help="concept to remove (repeat to remove several)")
    r.add_argument("--anchor", help="what the concept should become (default: one of its kind)")
    r.add_argument("--preserve", action="append", help="concept that must survive (repeatable)")
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--batch-size", type=int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    r.add_argument("--save", default="full", choices=["full", "delta"])
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--new-lineage", action="store_true", help="ignore/skip the model's ledger")
    r.add_argument("--checkpoint-every", type=int, default=0)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--refresh", action="store_true", help="wrap the method in refresh learning")
    r.add_argument("--robust", action="store_true",
                   help="adversarial erasure: mine soft prompts that bring the target back during the "
                        "request and erase them too (gradient methods; uce has a closed-form variant)")
    r.add_argument("--robust-set", action="append", metavar="KEY=VALUE",
                   help="a --robust setting (every, mine_steps, first_steps, tokens, pool, share), repeatable")
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=_cmd_erase)

    lg = sub.add_parser("ledger", help="print a model's lineage")
    lg.add_argument("folder")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=_cmd_ledger)

    rb = sub.add_parser("rollback", help="restore the model of an earlier lineage step")
    rb.add_argument("folder")
    rb.add_argument("--to", type=int, required=True)
    rb.add_argument("--out", required=True)
    rb.add_argument("--overwrite", action="store_true")
    rb.set_defaults(func=_cmd_rollback)

    ex = sub.add_parser("export", help="write a delta folder as a full diffusers folder")
    ex.add_argument("folder")
    ex.add_argument("--out", required=True)
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--base", help="for a delta whose base has moved: the base's new place (its hash is checked)")
    ex.set_defaults(func=_cmd_export)

    gd = sub.add_parser("guard", help="FreezeAsGuard: learn which UNet tensors to freeze")
    gd.add_argument("--model", required=True)
    gd.add_argument("--concept", action="append", help="illegal concept (shapes world)")
    gd.add_argument("--legal", action="append", help="legal concept to keep trainable (shapes world)")
    gd.add_argument("--illegal-data", help="folder of captioned images of the illegal domain")
    gd.add_argument("--legal-data", help="folder of captioned images of the legal domain")
    gd.add_argument("--rho", type=float, default=0.5, help="fraction of UNet parameters to freeze")
    gd.add_argument("--rounds", type=int, default=8)
    gd.add_argument("--images", type=int, default=64, help="rendered images per domain (shapes)")
    gd.add_argument("--seed", type=int, default=0)
    gd.add_argument("--out", required=True)
    gd.add_argument("--overwrite", action="store_true")
    gd.set_defaults(func=_cmd_guard)

    ft = sub.add_parser("finetune", help="fine-tune a model's UNet, honouring its guard mask")
    ft.add_argument("--model", required=True)
    ft.add_argument("--data", help="folder of images with captions.json or .txt captions")
    ft.add_argument("--concepts", action="append", help="render images of these (shapes world)")
    ft.add_argument("--images", type=int, default=64)
    ft.add_argument("--steps", type=int, default=100)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--no-mask", action="store_true", help="ignore the guard mask (for comparison)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default="cpu")
    ft.add_argument("--out", required=True)
    ft.add_argument("--overwrite", action="store_true")
    ft.set_defaults(func=_cmd_finetune)

    b = sub.add_parser("bench", help="sequential requests, several methods, with attacks and a report")
    b.add_argument("--model", default="shapes")
    b.add_argument("--methods", default="duge,esd,uce")
    b.add_argument("--sequence", default="star,striped,square,red,triangle,dotted")
    b.add_argument("--images-per-combo", type=int, default=2)
    b.add_argument("--attacks", default="",
                   help="comma list of paraphrase,softprompt,hardprompt,conditioning,resurgence")
    b.add_argument("--attack-budget", default="quick", choices=("quick", "full"),
                   help="soft-prompt ladder (see eval --help); default quick")
    b.add_argument("--attack-targets", default="all",
                   help="removed concepts to attack: all, first, or a comma list (default: all)")
    b.add_argument("--attack-when", default="removal", choices=("removal", "final"),
                   help="attack each target right after the request that removed it (removal, default) "
                        "or on the model after the last request (final)")
    b.add_argument("--set", action="append", metavar="METHOD:KEY=VALUE")
    b.add_argument("--json")
    b.add_argument("--report", help="folder for index.html and figures")
    b.add_argument("--work", help="folder for the models of each step (default: temp)")
    b.set_defaults(func=_cmd_bench)

    d = sub.add_parser("demo", help="a tour of a model: sample grids, metrics, an HTML page")
    d.add_argument("--model", default="shapes")
    d.add_argument("--out", default="runs/demo")
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
