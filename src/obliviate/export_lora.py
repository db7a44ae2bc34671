"""A lineage's change to its base as a LoRA: diffusers/peft folder or one kohya file.

For every changed weight W of a Linear or Conv2d layer, the change ΔW = W − W_base (a conv
kernel reshaped to out × (in·k·k)) is factored by truncated SVD,
    ΔW = U·S·Vᵀ ≈ B·A,   B = U_r·S_r (out × r),   A = V_rᵀ (r × in·k·k),
which is the best rank-r approximation in Frobenius norm (Eckart–Young). The share of the
change the rank keeps is its energy, kept(r) = Σ_{i≤r} s_i² / Σ_i s_i². The scale is baked
into B, so alpha = r (runtime scale 1): `pipe.load_lora_weights` reproduces W_base + B·A.
Changed tensors a LoRA does not carry (biases, normalisation layers, embeddings) are left
out and reported with their share of the energy. Choice: biases are left out although peft
has `lora_bias`, because a model with it cannot be fused (`pipe.fuse_lora`) where a targeted
layer has no bias, and kohya files have no bias key; their energy is reported.

Formats: `lora` writes `pytorch_lora_weights.safetensors` through the family pipeline's own
`save_lora_weights` (SD, SDXL, SD3, Flux: the denoiser and the CLIP encoders its loader
takes; a T5 encoder's change is reported as left out): denoiser keys in peft naming
(`unet.<module>.lora_A.weight`, `.lora_B.weight`; `transformer.` for SD3 and Flux),
text-encoder keys in diffusers' text-encoder naming
(`text_encoder.text_model.<module>.lora_linear_layer.down.weight`, `.up.weight`), which
diffusers 0.42 converts for every layer, where its peft-named path knows only the attention
projections and refuses an MLP-only (fewshot-te) text-encoder LoRA. `kohya` writes one file
in the naming A1111 and ComfyUI load (diffusers loads it too):
`lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`
(`lora_te_text_model_...` for the text encoder), Stable Diffusion 1.x/2.x only. diffusers
0.42 misread a kohya file's self-attention alphas when ranks differed between layers (seen on
the tiny test pipeline), so a file meant for diffusers should use a fixed `--rank`; A1111 and
ComfyUI read each alpha.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ObliviateError

LORA_FILE = "pytorch_lora_weights.safetensors"
FORMATS = ("lora", "kohya")
_KOHYA = {"unet": "lora_unet", "text_encoder": "lora_te"}  # kohya prefixes (Stable Diffusion 1.x/2.x)
# the CLIP text encoders each family's diffusers LoRA loader takes (not T5: SD3's text_encoder_3, Flux's _2)
LORA_TEXT_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
                      "sd3": ("text_encoder", "text_encoder_2"), "flux": ("text_encoder",)}


@dataclass(frozen=True)
class Factor:
    """One layer's change as a LoRA: weight ≈ base + up·down, and what it keeps."""

    component: str  # the denoiser ("unet", "transformer") or a CLIP text encoder ("text_encoder", "_2")
    module: str  # module path inside the component, e.g. "down_blocks.0.attentions.0...to_k"
    down: torch.Tensor  # A: r × in (Linear) or r × in × k × k (Conv2d)
    up: torch.Tensor  # B: out × r (Linear) or out × r × 1 × 1 (Conv2d)
    rank: int
    energy_kept: float  # Σ_{i≤r} s_i² / Σ s_i² of the weight's change (1.0 if it has none)
    energy: float  # ‖ΔW‖_F²


@dataclass(frozen=True)
class LoraReport:
    """What an export kept: per-layer ranks and energies, and what no LoRA could carry."""

    layers: int
    ranks: tuple[int, int]  # smallest and largest rank used
    energy_kept: float  # Σ kept energy / Σ energy of every changed tensor, left-out ones included
    worst_layer: tuple[str, float]  # the layer keeping the smallest share of its change
    left_out: tuple[str, ...]  # changed tensors that no LoRA layer can carry
    left_out_energy: float  # their share of the total energy
    bytes: int

    def line(self) -> str:
        """A one-line summary for the command line."""
        rmin, rmax = self.ranks
        rank = f"rank {rmax}" if rmin == rmax else f"ranks {rmin}-{rmax}"
        out = (f"{self.layers} layers, {rank}, keeps {self.energy_kept:.2%} of the change's energy "
               f"(worst layer {self.worst_layer[1]:.2%}: {self.worst_layer[0]})")
        if self.left_out:
            out += (f"; {len(self.left_out)} changed tensors no LoRA carries left out "
                    f"({self.left_out_energy:.2%} of the energy)")
        return out


def truncated_factor(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple:
    """Truncated SVD of a weight change: (down A, up B, r, kept share of ‖ΔW‖_F²).

    r = `rank` (capped at the matrix's rank), or with `energy` the smallest r with
    Σ_{i≤r} s_i² ≥ energy·Σ s_i², capped at `rank` when both are given.
    """
    shape = delta.shape
    matrix = delta.reshape(shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    power = s.square()
    total = float(power.sum())
    if total == 0.0:
        r = 1
    elif energy is not None:
        cumulative = torch.cumsum(power, 0) / total
        r = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype))) + 1
        r = min(r, rank) if rank else r
    else:
        r = rank
    r = max(1, min(r, s.numel()))
    kept = float(power[:r].sum()) / total if total else 1.0
    up = (u[:, :r] * s[:r]).float().contiguous()
    down = vh[:r].float().contiguous()
    if delta.dim() == 4:
        up = up.reshape(shape[0], r, 1, 1)
        down = down.reshape(r, *shape[1:])
    return down, up, r, kept


def lineage_factors(base, edited, rank: int | None = 16, energy: float | None = None
                    ) -> tuple[list[Factor], list[tuple[str, float]]]:
    """Factor every changed Linear/Conv2d layer of `edited` relative to `base` (pipelines):
    the denoiser's and those of the text encoders the family's LoRA loader takes.

    Returns the factors and the changed tensors no LoRA layer carries (a T5 encoder's among
    them), with their energy. Raises ObliviateError if the VAE changed (no LoRA format carries it).
    """
    from .families import family_of

    family = family_of(edited)
    carried = (family.denoiser, *LORA_TEXT_ENCODERS[family.name])
    if any(not torch.equal(a, b) for a, b in zip(base.vae.state_dict().values(),
                                                   edited.vae.state_dict().values())):
        raise ObliviateError("the lineage changed the VAE, which no LoRA format carries; use --format full")
    factors, left_out = [], []
    for component in (c for c in family.components(edited) if c != "vae"):
        base_params = dict(getattr(base, component).named_parameters())
        covered = set()  # weights a LoRA layer carries (none where no loader takes the component)
        for name, module in getattr(edited, component).named_modules() if component in carried else ():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if isinstance(module, torch.nn.Conv2d) and (module.groups != 1 or module.dilation != (1, 1)):
                continue
            w_delta = (module.weight.detach() - base_params[f"{name}.weight"].detach()).float()
            covered.add(f"{name}.weight")
            if not w_delta.any():
                continue
            down, up, r, kept = truncated_factor(w_delta, rank, energy)
            if component.startswith("text_encoder") and not name.startswith("text_model."):
                name = f"text_model.{name}"  # the naming of every transformers version
            factors.append(Factor(component, name, down, up, r, kept, float(w_delta.double().square().sum())))
        for name, param in getattr(edited, component).named_parameters():
            if name not in covered and not torch.equal(param.detach(), base_params[name].detach()):
                left_out.append((f"{component}.{name}",
                                 float((param.detach() - base_params[name].detach()).double().square().sum())))
    if not factors:
        raise ObliviateError("the lineage did not change any layer a LoRA carries; nothing to export")
    return factors, left_out


def _report(factors: list[Factor], left_out: list[tuple[str, float]], nbytes: int) -> LoraReport:
    """Sum up what the factors keep: Σ kept·‖ΔW‖² over the energy of every changed tensor."""
    total = sum(f.energy for f in factors) + sum(e for _, e in left_out)
    kept = sum(f.energy_kept * f.energy for f in factors)
    worst = min(factors, key=lambda f: f.energy_kept)
    return LoraReport(layers=len(factors), ranks=(min(f.rank for f in factors), max(f.rank for f in factors)),
                      energy_kept=kept / total if total else 1.0,
                      worst_layer=(f"{worst.component}.{worst.module}", worst.energy_kept),
                      left_out=tuple(n for n, _ in left_out),
                      left_out_energy=sum(e for _, e in left_out) / total if total else 0.0,
                      bytes=nbytes)


def peft_state_dicts(factors: list[Factor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per component, the keys `save_lora_weights` prefixes with the component's name:
    `<module>.lora_A.weight` = A and `.lora_B.weight` = B (the denoiser), or
    `<module>.lora_linear_layer.down.weight` = A and `.up.weight` = B (a text encoder)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for f in factors:
        down, up = (("lora_linear_layer.down", "lora_linear_layer.up") if f.component.startswith("text_encoder")
                    else ("lora_A", "lora_B"))
        layers.setdefault(f.component, {})[f"{f.module}.{down}.weight"] = f.down
        layers[f.component][f"{f.module}.{up}.weight"] = f.up
    return layers


def write_peft_lora(factors: list[Factor], folder: Path, pipeline_class) -> int:
    """Write `folder/pytorch_lora_weights.safetensors` via the family pipeline's own
    `save_lora_weights` (`unet_lora_layers` / `transformer_lora_layers`,
    `text_encoder_lora_layers`, ...); returns the file's size in bytes."""
    layers = {f"{c}_lora_layers": v for c, v in peft_state_dicts(factors).items()}
    pipeline_class.save_lora_weights(folder, **layers, weight_name=LORA_FILE, safe_serialization=True)
    return (folder / LORA_FILE).stat().st_size


def kohya_state_dict(factors: list[Factor]) -> dict[str, torch.Tensor]:
    """The kohya/A1111 naming: `lora_unet_<module, dots as underscores>.lora_down.weight`,
    `.lora_up.weight` and `.alpha` (= r, so the runtime scale alpha/r is 1)."""
    state = {}
    for f in factors:
        key = f"{_KOHYA[f.component]}_{f.module.replace('.', '_')}"
        state[f"{key}.lora_down.weight"] = f.down.contiguous()
        state[f"{key}.lora_up.weight"] = f.up.contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(f.rank))
    return state


def export_lora(folder: str | Path, out: str | Path, fmt: str = "lora", rank: int | None = 16,
                energy: float | None = None, overwrite: bool = False, dtype: str = "float32") -> LoraReport:
    """Export the lineage of model folder `folder` (its change to the ledger's base) as a LoRA.

    `fmt="lora"`: a folder with `pytorch_lora_weights.safetensors` (diffusers/peft naming),
    `lora_report.json` and a model card; `fmt="kohya"`: one `.safetensors` file with the
    card's facts in its metadata. `dtype="float16"` halves the file (the factors are rounded to
    half precision, as LoRAs are usually shared). Nothing is written on error; `out` is
    replaced only with `overwrite`.
    """
    from .checkpoint import atomic_folder
    from .ledger import Ledger
    from .model_card import write_card
    from .pipeline import load_pipeline

    folder, out = Path(folder), Path(out)
    if fmt not in FORMATS:
        raise ObliviateError(f"--format must be full, lora or kohya, not {fmt!r}")
    if rank is not None and rank < 1:
        raise ObliviateError(f"--rank must be a positive integer, not {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ObliviateError(f"--energy must be in (0, 1], not {energy}")
    if dtype not in ("float32", "float16"):
        raise ObliviateError(f"--dtype must be float32 or float16, not {dtype!r}")
    if fmt == "kohya" and out.suffix != ".safetensors":
        raise ObliviateError(f"--format kohya writes one file; --out {out} must end in .safetensors")
    if out.exists() and not overwrite:
        raise ObliviateError(f"{out} exists; choose another --out or pass --overwrite")
    ledger = Ledger.load(folder)
    if ledger is None:
        raise ObliviateError(f"{folder} has no ledger.json (not written by obliviate erase)")
    edited = load_pipeline(folder)
    from .families import family_of

    family = family_of(edited)
    if fmt == "kohya" and family.name != "sd":
        raise ObliviateError(f"--format kohya is written for Stable Diffusion 1.x/2.x; {folder} is {family.name}: "
                             "export it with --format lora (diffusers' LoRA file, which its pipeline loads)")
    ledger.verify(edited, folder)
    base = load_pipeline(ledger.base)
    if getattr(base, family.denoiser).state_dict().keys() != getattr(edited, family.denoiser).state_dict().keys():
        raise ObliviateError(f"{folder} and its base {ledger.base} have different architectures")
    factors, left_out = lineage_factors(base, edited, rank=rank, energy=energy)
    if dtype == "float16":
        factors = [replace(f, down=f.down.half(), up=f.up.half()) for f in factors]
    settings = {"format": fmt, "rank": rank, "energy": energy, "dtype": dtype}
    if fmt == "kohya":
        state = kohya_state_dict(factors)
        meta = {"ss_network_module": "networks.lora", "ss_base_model": ledger.base,
                "obliviate_base_sha256": ledger.base_sha256,
                "obliviate_weights_sha256": ledger.head_sha256,
                "obliviate_removed": ",".join(ledger.removed()), "obliviate_export": json.dumps(settings)}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            save_file(state, tmp, metadata=meta)
            tmp.replace(out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _report(factors, left_out, out.stat().st_size)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        nbytes = write_peft_lora(factors, tmp, type(edited))
        report = _report(factors, left_out, nbytes)
        (tmp / "lora_report.json").write_text(json.dumps({
            **asdict(report), "settings": settings, "base": ledger.base,
            "per_layer": [{"layer": f"{f.component}.{f.module}", "rank": f.rank, "energy_kept": round(f.energy_kept, 6),
                        "energy": f.energy} for f in factors]}, indent=1))
        write_card(tmp, ledger, kind="lora", weights_sha256=ledger.head_sha256,
                   extra={"LoRA": f"{report.line()}; load with `pipe.load_lora_weights(folder)` on the base"})
    return report
