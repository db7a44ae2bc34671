"""`obliviate bench`: the UnlearnCanvas-style sequential protocol, several methods side by side.

A method name may carry the refresh plug-in: `duge+refresh` is DUGE wrapped in refresh
learning (engine.refresh), so `--methods duge,duge+refresh` measures what refresh changes.

For each method, starting from the same model, requests T1..Tn are applied one after
another. After each request: UA of every target removed so far, in-domain retained
accuracy (other concepts of the kinds removed so far), cross-domain retained accuracy (the
other kinds), retained ratio (mean accuracy of never-removed concepts over the base's),
Fréchet distance, seconds, peak memory, bytes stored. The attacks run on the attacked
targets either right after the request that removed each one (`attack_when="removal"`, the
default: how robust that erasure is, as single-concept studies measure it) or on the model
after the last request (`"final"`: whether the lineage still holds it after later edits).
Every number comes from images generated in this run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .checks import check_at_least
from .engine.robust import Robust, trains_soft_prompts
from .erase import erase
from .evaluate.attacks import check_attacks, check_attacks_for, run_attacks
from .families import family_of
from .methods.base import get_method
from .errors import ObliviateError
from .evaluate.evaluation import evaluate_model, load_judge
from .pipeline import load_pipeline
from .request import Request
from .shapes import vocab

# Named sequences (`--sequence NAME`); any comma list of concepts works too.
SEQUENCES = {
    # no target's declared relative has to survive it
    "friendly": ("star", "striped", "square", "red", "triangle", "dotted"),
    # every target is the declared relative of a concept that stays (cross: star, magenta: red,
    # diamond: square, dotted: striped, cyan: blue, outlined: solid)
    "neighbours": ("star", "red", "square", "striped", "blue", "solid"),
    # twelve requests over objects, colours and styles; diamond, cross, cyan and solid stay
    "long": ("star", "red", "striped", "square", "green", "dotted", "triangle", "blue", "outlined",
             "circle", "yellow", "magenta"),
}
DEFAULT_SEQUENCE = SEQUENCES["friendly"]


def resolve_sequence(spec: str | list[str] | tuple[str, ...], free: bool = False) -> list[str]:
    """A preset name (friendly, neighbours, long) or a comma list of concepts, checked: known
    concepts of the shapes world (any text with `free`, a real model judged by --judge), each
    once. One-line error otherwise."""
    if isinstance(spec, str):
        spec = (None if free else SEQUENCES.get(spec.strip())) or [c.strip() for c in spec.split(",") if c.strip()]
    names = list(spec)
    if not names:
        raise ObliviateError(f"--sequence is empty; give {', '.join(SEQUENCES)} or a comma list of concepts")
    unknown = [c for c in names if c not in vocab.CONCEPTS]
    if unknown and not free:
        raise ObliviateError(f"--sequence: {unknown[0]!r} is neither a preset ({', '.join(SEQUENCES)}) nor a "
                             f"concept of the shapes world")
    if len(set(names)) != len(names):
        raise ObliviateError("--sequence names a concept twice; each request removes a new concept")
    return names


def check_seeds(seeds) -> list[int]:
    """Erase seeds, each a non-negative integer, at least one, no repeats."""
    seeds = list(seeds)
    if not seeds or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ObliviateError(f"--seeds must be distinct whole numbers >= 0 (e.g. 0,1,2), not {seeds!r}")
    return seeds


def _retained(metrics: dict, base: dict, removed: list[str], sequence: list[str]) -> dict:
    kinds_removed = {metrics["per_concept"][c]["kind"] for c in removed}
    kept = [c for c in metrics["per_concept"] if c not in sequence]
    in_domain = [c for c in kept if metrics["per_concept"][c]["kind"] in kinds_removed]
    cross = [c for c in kept if metrics["per_concept"][c]["kind"] not in kinds_removed]
    acc = lambda names, m: float(np.mean([m["per_concept"][c]["accuracy"] for c in names])) if names else float("nan")  # noqa: E731
    before = acc(kept, base)  # 0 where the base model never draws them (a real model's judge can say so)
    return {"ira": acc(in_domain, metrics), "cra": acc(cross, metrics), "retained": acc(kept, metrics),
            "retained_ratio": acc(kept, metrics) / before if before > 0 else float("nan")}


def run_bench(methods: list[str], sequence: list[str], model: str = "shapes", images_per_combo: int = 2,
              attacks: list[str] = (), work: Path | None = None, save: str = "delta",
              options: dict | None = None, grid_images: int = 8, progress: bool = True,
              attack_targets: str = "all", attack_when: str = "removal", attack_budget: str = "quick",
              seeds: tuple[int, ...] = (0,), judge: str | None = None, concepts: tuple[str, ...] = (),
              images_per_concept: int = 8, robust_settings: dict | None = None) -> dict:
    """Run the sequential protocol; returns a JSON-able dict (rows, base, attacks, grids).

    A real model (any family) is judged with `judge` (`clip:FOLDER` or `classifier:FOLDER`):
    the sequence is free text, and `concepts` are the concepts that must stay, each measured
    on `images_per_concept` images with the targets (external_judges.evaluate_concepts); the
    attacks and picture grids need the shapes world and are not run.

    With several `seeds`, every method runs the whole sequence once per erase seed: `rows`
    (what the table and the report's curves show) are the first seed's, `runs` holds every
    seed's rows, and `erosion(result)` the worst and mean over seeds. Grids and attacks come
    from the first seed. Every row keeps every concept's accuracy (`per_concept`), so the
    erosion of one never-removed concept is visible, not averaged away. `robust_settings`
    (`--robust-set`) go to every `+robust` method, over its own.
    """
    # bad arguments fail here, before any model is loaded or image generated
    sequence = resolve_sequence(sequence, free=judge is not None)
    seeds = check_seeds(seeds)
    kept_free = _check_free_judging(judge, concepts, images_per_concept, attacks, sequence)
    attacked = _attack_targets(attack_targets, list(sequence))
    if attack_when not in ("removal", "final"):
        raise ObliviateError(f"--attack-when {attack_when!r}: choose removal or final")
    check_attacks(list(attacks), attack_budget)
    for method in methods:
        if method.partition("+")[2] not in ("", "refresh", "robust"):
            raise ObliviateError(f"bench method {method!r}: the plug-ins are +refresh and +robust "
                                 "(e.g. duge+robust)")
    if robust_settings:
        if not any(m.endswith("+robust") for m in methods):
            raise ObliviateError("--robust-set needs a +robust method in --methods (e.g. duge+robust)")
        Robust.checked(robust_settings)
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="obliviate-bench-"))
    base_pipe = load_pipeline(model)
    check_attacks_for(base_pipe, list(attacks))
    for method in (m for m in methods if m.endswith("+robust")):
        name = method.partition("+")[0]
        m = get_method(name, **(_method_options(options, method) or {}))
        if trains_soft_prompts(m, Robust.checked({**m.robust_settings, **(robust_settings or {})})):
            family_of(base_pipe).check_text_attacks(f"--robust on {name} (it learns soft prompts)",
                                                    instead="bench it with duge+robust or uce+robust")
    if judge is None:
        shapes_judge = load_judge(base_pipe)

        def measure(p):
            return evaluate_model(p, images_per_combo=images_per_combo, progress=False, judge=shapes_judge,
                                  keep_images=True)
        related = {c: next((r for r in vocab.CONCEPTS[c].related if r not in sequence), None) for c in sequence}
    else:
        from .evaluate.external_judges import evaluate_concepts, load_external_judge

        external = load_external_judge(judge)

        def measure(p):
            return evaluate_concepts(p, external, [*sequence, *kept_free], images_per_concept=images_per_concept)
        related = {c: None for c in sequence}
    base = measure(base_pipe)

    def grid(metrics, concept):
        """Pictures for the report, taken from the evaluation's own images (no extra
        generation): `grid_images` of the prompts naming `concept`, spread over the set,
        and as many naming its related concept (none for a real model's free-text judging)."""
        if "generated" not in metrics:
            return {}
        images, labels = metrics.pop("generated"), metrics.pop("labels")

        def naming(c):
            idx = [i for i, lab in enumerate(labels) if c in lab.values()]
            return images[idx[:: max(1, len(idx) // grid_images)][:grid_images]]

        out = {concept: naming(concept)}
        if related[concept]:
            out[f"related:{concept}"] = naming(related[concept])
        return out

    before = {k: base.pop(k) for k in ("generated", "labels") if k in base}
    grids = {"before": {k: v for c in sequence for k, v in grid(dict(before), c).items()}}
    runs, attack_results = {seed: [] for seed in seeds}, {}
    bar = tqdm(total=len(methods) * len(sequence) * len(seeds), desc="bench", disable=not progress)
    for method, seed in ((m, s) for m in methods for s in seeds):
        first = seed == seeds[0]
        pipe = load_pipeline(model)
        grids.setdefault(method, {})
        for step, concept in enumerate(sequence, 1):
            bar.set_postfix(method=method, request=concept, seed=seed)
            out = work / method / (f"{step}-{concept}" if len(seeds) == 1 else f"seed{seed}" / Path(f"{step}-{concept}"))
            name, _, plugin = method.partition("+")
            result = erase(pipe, Request((concept,)), method=name, out=out, save=save, seed=seed,
                           options=_method_options(options, method),
                           refresh=plugin == "refresh", robust=plugin == "robust" and (robust_settings or True),
                           progress=False)
            metrics = measure(pipe)
            pictures = grid(metrics, concept)
            removed = list(sequence[:step])
            runs[seed].append({
                "method": method, "seed": seed, "step": step, "removed": concept,
                "ua": {c: 1 - metrics["per_concept"][c]["accuracy"] for c in removed},
                **_retained(metrics, base, removed, list(sequence)),
                "per_concept": {c: v["accuracy"] for c, v in metrics["per_concept"].items()},
                "accuracy": metrics["accuracy"],
                "fid": float("nan") if metrics["fid"] is None else metrics["fid"],  # none without the shapes judge
                "seconds": result.entry.seconds, "peak_memory_mb": result.entry.peak_memory_mb,
                "bytes_stored": result.entry.bytes_stored, "model": str(out),
            })
            if first:
                grids[method].update(pictures)
            if progress:
                tqdm.write(format_row(runs[seed][-1], list(sequence), method_width(methods)))
            if not first:
                bar.update(1)
                continue
            if attack_when == "removal":
                now = [concept] if concept in attacked else []
            else:
                now = attacked if step == len(sequence) else []
            if attacks and now:
                bar.set_postfix(method=method, request=f"attacks on {','.join(now)}")
                found = run_attacks(pipe, shapes_judge, now, list(attacks), removed=removed, budget=attack_budget,
                                    original=base_pipe if attack_budget == "full" else None)
                for c in found:
                    found[c]["after_request"] = step
                attack_results.setdefault(method, {}).update(found)
                if progress:
                    tqdm.write("\n".join(_attack_lines(method, found)))
            bar.update(1)
    bar.close()
    return {"model": model, "sequence": list(sequence), "methods": list(methods), "related": related,
            "images_per_combo": images_per_combo, "attack_targets": attacked, "attack_when": attack_when,
            "base": base, "seeds": seeds, "rows": runs[seeds[0]], "runs": runs,
            "attacks": attack_results, "grids": grids}


def _check_free_judging(judge, concepts, images_per_concept, attacks, sequence) -> list[str]:
    """With --judge: the judge folder, the concepts that must stay (not a target), the image
    count, and no attacks, checked before anything loads; returns the kept concepts."""
    if judge is None:
        if concepts:
            raise ObliviateError("--concepts is for real models judged with --judge clip:FOLDER or classifier:FOLDER")
        return []
    from .evaluate.external_judges import check_judge

    check_judge(judge)
    kept = [c for c in concepts if c not in sequence]
    if not kept:
        raise ObliviateError("bench --judge needs concepts that must stay, besides the sequence: --concepts a,b,c")
    check_at_least("--images-per-concept", images_per_concept, 1)
    if attacks:
        raise ObliviateError("bench --judge measures removal and what stays; the attacks need the shapes world's "
                             "judge: drop --attacks")
    return kept


def never_removed(result: dict) -> list[str]:
    """Concepts the evaluation measures that no request of the sequence removes."""
    return [c for c in result["base"]["per_concept"] if c not in result["sequence"]]


def erosion(result: dict) -> list[dict]:
    """Per method and seed, then worst and mean over seeds: every target's UA right after its
    own request and after the last one, each never-removed concept's accuracy over the
    base's (lowest over all requests, and after the last), and request k's seconds over
    request 1's."""
    base = result["base"]["per_concept"]
    kept = never_removed(result)
    out = []
    for method in result["methods"]:
        per_seed = []
        for seed, rows in result.get("runs", {result.get("seeds", [0])[0]: result["rows"]}).items():
            rows = [r for r in rows if r["method"] == method]
            if not rows or "per_concept" not in rows[0]:
                continue
            ratio = {c: [r["per_concept"][c] / max(base[c]["accuracy"], 1e-9) for r in rows] for c in kept}
            per_seed.append({
                "seed": int(seed),  # JSON turns the keys of `runs` into text
                "steps": [(r["step"], r["removed"]) for r in rows],
                "ua_at_removal": min(r["ua"][r["removed"]] for r in rows),
                "ua_last": min(rows[-1]["ua"].values()),
                "kept_lowest": min((min(v) for v in ratio.values()), default=float("nan")),
                "kept_lowest_last": min((v[-1] for v in ratio.values()), default=float("nan")),
                "kept_mean_last": float(np.mean([v[-1] for v in ratio.values()])) if ratio else float("nan"),
                "lowest_concept": min(ratio, key=lambda c: ratio[c][-1]) if ratio else "",
                "cost_growth": rows[-1]["seconds"] / rows[0]["seconds"],
                "ratios": ratio,
            })
        if not per_seed:
            continue
        worst = {k: min(p[k] for p in per_seed) for k in ("ua_at_removal", "ua_last", "kept_lowest",
                                                             "kept_lowest_last", "kept_mean_last")}
        worst["cost_growth"] = max(p["cost_growth"] for p in per_seed)
        mean = {k: float(np.mean([p[k] for p in per_seed])) for k in worst}
        out.append({"method": method, "seeds": per_seed, "worst": worst, "mean": mean})
    return out


def erosion_lines(result: dict) -> list[str]:
    """The never-removed concepts' accuracy over the base's after every request (first seed),
    then the per-seed, worst and mean summary."""
    kept = never_removed(result)
    lines = []
    for e in erosion(result):
        first = e["seeds"][0]
        lines.append(f"{e['method']} (seed {first['seed']}): never-removed accuracy / the base model's, after each request")
        lines.append(f"{'k':>3} {'removed':<9} | " + " ".join(f"{c[:7]:>7}" for c in kept))
        for i, (step, removed) in enumerate(first["steps"]):
            lines.append(f"{step:>3} {removed:<9} | " + " ".join(f"{first['ratios'][c][i]:7.2f}" for c in kept))
        lines.append(f"{e['method']}: seed | lowest UA at removal | lowest UA after last | lowest kept (any request) "
                     "| lowest kept after last (concept) | mean kept after last | seconds k=last / k=1")
        for p in e["seeds"]:
            lines.append(f"  {p['seed']:>4} | {p['ua_at_removal']:20.2f} | {p['ua_last']:20.2f} | "
                         f"{p['kept_lowest']:25.2f} | {p['kept_lowest_last']:20.2f} ({p['lowest_concept']}) | "
                         f"{p['kept_mean_last']:20.2f} | {p['cost_growth']:.2f}")
        for label in ("worst", "mean"):
            v = e[label]
            lines.append(f"  {label:>4} | {v['ua_at_removal']:20.2f} | {v['ua_last']:20.2f} | {v['kept_lowest']:25.2f} | "
                         f"{v['kept_lowest_last']:20.2f}{'':{len(e['seeds'][0]['lowest_concept']) + 3}} | "
                         f"{v['kept_mean_last']:20.2f} | {v['cost_growth']:.2f}")
    return lines


def _attack_targets(spec: str, sequence: list[str]) -> list[str]:
    """The removed concepts to attack: "all", "first", or a comma list of sequence members."""
    if spec == "all":
        return list(sequence)
    if spec == "first":
        return sequence[:1]
    names = [c.strip() for c in spec.split(",") if c.strip()]
    outside = [c for c in names if c not in sequence]
    if outside or not names:
        raise ObliviateError(f"--attack-targets {spec!r}: give all, first, or concepts of the sequence "
                             f"({', '.join(sequence)})")
    return names


def _attack_lines(method: str, per_concept: dict) -> list[str]:
    lines = []
    for concept, r in per_concept.items():
        parts = []
        if "paraphrase" in r:
            parts.append(f"paraphrase UA {r['paraphrase']['ua']:.2f}")
        if "softprompt" in r:
            worst = r["softprompt"]["worst"]
            parts.append(f"soft-prompt worst-case recovery {worst['accuracy']:.2f} ({worst['label']}; "
                         f"{len(r['softprompt']['rungs'])} rungs)")
        if "hardprompt" in r:
            parts.append(f"hard-prompt recovery {r['hardprompt']['accuracy']:.2f} "
                         f"({r['hardprompt']['prefix']!r})")
        if "conditioning" in r:
            parts.append(f"upper bound (conditioning) {r['conditioning']['accuracy']:.2f}")
        if "resurgence" in r:
            parts.append(f"resurgence acc {r['resurgence']['accuracy_before']:.2f} -> "
                         f"{r['resurgence']['accuracy_after']:.2f}")
        when = f" (after request {r['after_request']})" if "after_request" in r else ""
        lines.append(f"attack {method:<10} {concept:<9} " + "; ".join(parts) + when)
    return lines


def _num(x: float) -> str:
    """Three decimals, or "  -  " where there is nothing to average (e.g. no cross-domain
    concept left once every kind has had a removal)."""
    return "  -  " if x != x else f"{x:.3f}"


def _method_options(options: dict | None, method: str) -> dict | None:
    """The `--set` options of a bench method: given for `METHOD+plugin` itself, else for METHOD."""
    options = options or {}
    return options.get(method, options.get(method.partition("+")[0]))


def method_width(methods) -> int:
    """Width of the tables' method column: the longest name, at least 10."""
    return max([10, *(len(m) for m in methods)])


def format_row(row: dict, sequence: list[str], width: int = 10) -> str:
    """One table line: UA per target so far, retained accuracies, cost (`width`: of the
    method column)."""
    ua = " ".join(f"{row['ua'][c]:5.2f}" if c in row["ua"] else "    -" for c in sequence)
    return (f"{row['method']:<{width}} {row['step']:>2} {row['removed']:<9} | {ua} | "
            f"ira {_num(row['ira'])} cra {_num(row['cra'])} kept {row['retained_ratio']:.2f} | "
            f"fid {row['fid']:6.2f} | {row['seconds']:6.1f} s {row['peak_memory_mb']:6.0f} MB "
            f"{row['bytes_stored'] / 1e6:6.2f} MB")


def robustness_summary(result: dict) -> list[dict]:
    """Per method: lowest UA of the targets after the last request, the never-removed
    accuracy over the base's, and the worst-case recovery (the highest accuracy of any
    attacked target under the strongest soft-prompt rung, hard prompt or upper bound)."""
    out = []
    for method in result["methods"]:
        rows = [r for r in result["rows"] if r["method"] == method]
        if not rows:
            continue
        attacks = result.get("attacks", {}).get(method, {})
        soft = [r["softprompt"]["worst"]["accuracy"] for r in attacks.values() if "softprompt" in r]
        hard = [r["hardprompt"]["accuracy"] for r in attacks.values() if "hardprompt" in r]
        bound = [r["conditioning"]["accuracy"] for r in attacks.values() if "conditioning" in r]
        out.append({"method": method, "lowest_ua": min(rows[-1]["ua"].values()),
                    "kept": rows[-1]["retained_ratio"], "softprompt": max(soft, default=None),
                    "hardprompt": max(hard, default=None), "upper_bound": max(bound, default=None)})
    return out


def table(result: dict) -> str:
    """The headline table as text, then the attacks, then the robustness summary."""
    seq = result["sequence"]
    width = method_width(r["method"] for r in result["rows"])
    head = (f"{'method':<{width}} {'k':>2} {'removed':<9} | " + " ".join(f"{c[:5]:>5}" for c in seq)
            + " | in-domain, cross-domain, never-removed/base | Fréchet | cost")
    lines = [head] + [format_row(r, seq, width) for r in result["rows"]]
    lines += erosion_lines(result)
    for method, per_concept in result.get("attacks", {}).items():
        lines += _attack_lines(method, per_concept)
    if result.get("attacks"):
        show = lambda x: "  -  " if x is None else f"{x:5.2f}"  # noqa: E731
        lines.append(f"{'method':<{width + 4}} lowest UA | kept | worst-case recovery: soft-prompt  hard-prompt | "
                     "upper bound")
        for s in robustness_summary(result):
            lines.append(f"{s['method']:<{width + 4}} {s['lowest_ua']:9.2f} | {s['kept']:4.2f} | "
                         f"{show(s['softprompt']):>32}  {show(s['hardprompt']):>11} | {show(s['upper_bound'])}")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """The result without image arrays (those go to the report)."""
    return json.dumps({k: v for k, v in result.items() if k != "grids"}, indent=1)
