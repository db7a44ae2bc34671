"""Train the shipped `shapes` model from scratch: judge, VAE, text encoder, UNet (or, with
`--family sd3`, two text encoders and an MMDiT transformer: shapes.layouts).

Stages run in order and each one is checkpointed under a work folder, so an interrupted run
resumes where it stopped (`obliviate train-base --resume`). The recipe is chosen for a
2-core CPU (under 2 hours there, all stages):
- the VAE is trained with an L1 loss on image gradients beside the pixel losses, and sees
  dotted shapes twice as often: with pixel losses alone it blurred the dotted mesh (a
  period of 4 pixels, 2 latent pixels) into stripes, and 40% of dotted renders came back
  judged striped, which capped the model's dotted accuracy near 0.7;
- the UNet has no attention at its 16x16 level (cross-attention at 8x8, 4x4 and the mid
  block), which halves a training step on CPU (shapes.layouts);
- images are encoded to latents once (posterior mean and std kept; a fresh sample each step);
- the text encoder is first pretrained alone with classification heads on its pooled output
  (which concept of each kind does the caption name?), so synonyms land together before the
  UNet needs them; the heads stay on as an auxiliary loss during joint training;
- the denoiser and text encoders train jointly with caption dropout (for classifier-free
  guidance), the layout's loss weighting (Min-SNR-5 for the UNet's ε), learning-rate
  warm-up and cosine decay, and EMA weights, which are what ships.
`--init-from shapes --family sd3` reuses the shipped judge and VAE, so that the two
layouts are judged by the same classifier on the same latents.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import atomic_folder, load_training_state, save_training_state
from ..ledger import weights_sha256
from ..model_card import write_card
from ..evaluate.judge import Judge, augment, to_tensor
from ..finetune import prompt_ids
from ..generate import generate_images
from ..families import FAMILIES
from . import vocab, world
from ..errors import ObliviateError
from ..pipeline import resolve_model, save_pipeline
from .layouts import layout
from .tokenizer import build_tokenizer


@dataclass
class TrainConfig:
    """Every knob of the recipe; the defaults are what the shipped model was trained with."""

    seed: int = 0
    device: str = "cpu"
    family: str = "sd"  # the denoiser layout (shapes.layouts): sd (UNet, shipped) or sd3 (MMDiT)
    images: int = 432 * 24
    judge_steps: int = 1200
    judge_batch_size: int = 128
    judge_holdout: int = 2000
    latent_channels: int = 4
    vae_steps: int = 1200
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_edge_weight: float = 1.0  # L1 on image gradients: keeps the dotted mesh from blurring into stripes
    vae_oversample: dict[str, float] = field(default_factory=lambda: {"dotted": 2.0})  # style -> weight
    text_steps: int = 400
    unet_steps: int = 5000  # steps run
    schedule_steps: int | None = None  # length of the cosine learning-rate schedule (default: unet_steps)
    batch_size: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    aux_weight: float = 0.1
    checkpoint_every: int = 250
    probe_every: int = 500  # 0: no probe generations
    time_budget_minutes: float | None = None
    init_from: str | None = None  # a shapes model (shipped name or folder) to continue from: its VAE, judge, weights


def build_vae(latent_channels: int = 4) -> AutoencoderKL:
    """A 32x32 -> 16x16 x `latent_channels` AutoencoderKL (0.6 M parameters)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        mid_block_add_attention=False,
        sample_size=world.IMAGE_SIZE,
    )


class ConceptHeads(nn.Module):
    """Auxiliary classifiers on the text encoder's pooled output: which concept per kind."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(vocab.BY_KIND[k])) for k in vocab.KINDS})

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over kinds; label -100 marks a kind the caption does not name."""
        losses = [
            F.cross_entropy(head(pooled), labels[:, i], ignore_index=-100)
            for i, head in enumerate(self.heads.values())
            if (labels[:, i] != -100).any()
        ]
        return torch.stack(losses).mean() if losses else pooled.sum() * 0


def sample_captions(
    scenes: list[world.Scene], rng: np.random.Generator, dropout: float
) -> tuple[list[str], torch.Tensor]:
    """A random caption per scene and the per-kind labels it names (-100: not named)."""
    texts, labels = [], []
    for scene in scenes:
        if rng.random() < dropout:
            texts.append("")
            labels.append([-100] * len(vocab.KINDS))
            continue
        template = vocab.TEMPLATES[rng.integers(len(vocab.TEMPLATES))]
        texts.append(world.caption(scene, rng, template))
        lab = scene.labels()
        labels.append([lab[k] if vocab.names(template, k) else -100 for k in vocab.KINDS])
    return texts, torch.tensor(labels)


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 distance between the horizontal and vertical pixel differences of two image batches.

    |∂x a − ∂x b| + |∂y a − ∂y b|, averaged: a pixel loss alone lets a small VAE blur a fine
    pattern (the dotted mesh) into a smoother one that costs little in MSE.
    """
    dx = F.l1_loss(a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1])
    dy = F.l1_loss(a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :])
    return dx + dy


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def init_folder(model: str) -> Path:
    """The folder of the shapes model `--init-from` names (a shipped name or a folder that
    `train-base` wrote); one-line error for anything else (a hub id, a single file, a model
    without the shapes world's judge)."""
    path = resolve_model(model)
    if not isinstance(path, Path) or not (path / "judge" / "judge.json").exists():
        raise ObliviateError(f"--init-from {model}: not a shapes-world model folder with a judge; give "
                             "`shapes`, `shapes-sd3` or a folder `obliviate train-base` wrote")
    return path


class BaseTrainer:
    """Runs the stages of the recipe with checkpoints in `work`; `run()` writes `out`."""

    def __init__(self, out: Path, work: Path, config: TrainConfig):
        self.out, self.work, self.cfg = Path(out), Path(work), config
        # the model named by --init-from (a shipped name or a folder; the config keeps the name),
        # resolved before anything is written so that a wrong one is refused first
        self.init_path = init_folder(config.init_from) if config.init_from else None
        self.device = torch.device(config.device)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tokenizer = build_tokenizer()
        self.layout = layout(config.family)
        self.start = time.time()
        self.log_path = self.work / "log.jsonl"

    def log(self, **record) -> None:
        record["minutes"] = round((time.time() - self.start) / 60, 2)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(json.dumps(record))

    # -- data -------------------------------------------------------------------------------
    def data(self) -> tuple[np.ndarray, list[world.Scene]]:
        if not hasattr(self, "_data"):
            self._data = world.dataset(self.cfg.images, seed=self.cfg.seed)
        return self._data

    # -- stage 1: judge ---------------------------------------------------------------------
    def train_judge(self) -> Judge:
        folder = self.work / "judge"
        if not (folder / "judge.json").exists() and self.init_path is not None:
            Judge.load(self.init_path / "judge").save(folder)
        if (folder / "judge.json").exists():
            return Judge.load(folder)
        torch.manual_seed(self.cfg.seed)
        images, scenes = self.data()
        x = to_tensor(images)
        y = torch.tensor([[s.labels()[k] for k in vocab.KINDS] for s in scenes])
        judge = Judge({k: [c.name for c in vocab.BY_KIND[k]] for k in vocab.KINDS})
        opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, self.cfg.judge_steps))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for step in (bar := tqdm(range(self.cfg.judge_steps), desc="judge")):
            idx = torch.randint(0, len(x), (self.cfg.judge_batch_size,), generator=gen)
            logits = judge(augment(x[idx], gen))
            loss = sum(F.cross_entropy(logits[k], y[idx, i]) for i, k in enumerate(vocab.KINDS))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        judge.eval()
        held_out = judge_accuracy(judge, n=self.cfg.judge_holdout, seed=self.cfg.seed + 1000)
        self.log(stage="judge", held_out_accuracy=held_out)
        judge.save(folder, {"held_out_accuracy": held_out})
        return judge

    # -- stage 2: VAE -----------------------------------------------------------------------
    def train_vae(self, judge: Judge) -> AutoencoderKL:
        folder = self.work / "vae"
        if not (folder / "config.json").exists() and self.init_path is not None:
            AutoencoderKL.from_pretrained(self.init_path / "vae").save_pretrained(folder)
        if (folder / "config.json").exists():
            return AutoencoderKL.from_pretrained(folder)
        torch.manual_seed(self.cfg.seed)
        images, scenes = self.data()
        x = to_tensor(images)
        weights = torch.tensor([self.cfg.vae_oversample.get(s.style, 1.0) for s in scenes])
        vae = build_vae(self.cfg.latent_channels).to(self.device)
        opt = torch.optim.AdamW(vae.parameters(), lr=self.cfg.vae_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, self.cfg.vae_steps))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for step in (bar := tqdm(range(self.cfg.vae_steps), desc="vae")):
            idx = torch.multinomial(weights, self.cfg.vae_batch_size, replacement=True, generator=gen)
            batch = x[idx].to(self.device)
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(recon, batch) + F.l1_loss(recon, batch)
            loss = loss + self.cfg.vae_edge_weight * edge_l1(recon, batch)
            loss = loss + 1e-6 * posterior.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        vae.eval()
        with torch.no_grad():
            sample = x[:1024].to(self.device)
            latents = vae.encode(sample).latent_dist.mean
            vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
            recon = vae.decode(latents).sample.cpu()
        truth = judge.predict(sample.cpu())
        pred = judge.predict(recon)
        agree = {k: float(np.mean([a == b for a, b in zip(truth[k], pred[k])])) for k in truth}
        per_style = {
            style: float(np.mean([p == style for p, t in zip(pred["style"], truth["style"]) if t == style]))
            for style in sorted(set(truth["style"]))
        }
        self.log(stage="vae", reconstruction_judge_agreement=agree, style_kept=per_style,
                 mse=float(F.mse_loss(recon, sample.cpu())), scaling_factor=vae.config.scaling_factor)
        vae.save_pretrained(folder)
        return vae

    # -- stage 3: latents -------------------------------------------------------------------
    def encode_latents(self, vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.work / "latents.safetensors"
        if path.exists():
            t = load_file(path)
            return t["mean"], t["std"]
        images, _ = self.data()
        means, stds = [], []
        with torch.no_grad():
            for i in tqdm(range(0, len(images), 256), desc="encode"):
                dist = vae.encode(to_tensor(images[i : i + 256]).to(self.device)).latent_dist
                means.append(dist.mean.cpu())
                stds.append(dist.std.cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        mean, std = mean.contiguous(), std.contiguous()
        save_file({"mean": mean, "std": std}, path)
        return mean, std

    # -- stage 4: text encoder pretraining --------------------------------------------------
    def pretrain_text(self) -> tuple[list[nn.Module], ConceptHeads]:
        """The text encoders (one for `sd`, two for `sd3`) and the concept heads on their
        pooled output, trained alone so that synonyms land together before the denoiser needs
        them."""
        tok, lay = self.tokenizer, self.layout
        encoders = lay.build_encoders(tok)
        heads = ConceptHeads(lay.pooled_width(encoders))
        folder = self.work / "text"
        if (folder / "state.json").exists():
            load_training_state(folder, self._text_modules(encoders, heads))
            return encoders, heads
        torch.manual_seed(self.cfg.seed)
        rng = np.random.default_rng(self.cfg.seed)
        params = [p for m in (*encoders, heads) for p in m.parameters()]
        if self.init_same_family:  # keep the trained encoders; fit only the auxiliary heads
            encoders = lay.load_encoders(self.init_path)
            params = list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=2e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, self.cfg.text_steps))
        for step in (bar := tqdm(range(self.cfg.text_steps), desc="text")):
            scenes = [world.random_scene(rng) for _ in range(256)]
            texts, labels = sample_captions(scenes, rng, dropout=0.0)
            _, pooled = lay.condition(encoders, prompt_ids(tok, texts))
            loss = heads.loss(pooled, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        self.log(stage="text", aux_loss=loss.item())
        save_training_state(folder, self._text_modules(encoders, heads))
        return encoders, heads

    def _text_modules(self, encoders, heads) -> dict[str, nn.Module]:
        """Checkpoint names of the text encoders ("text", "text_2") and the heads."""
        return {**dict(zip(self.layout.encoders, encoders)), "heads": heads}

    @property
    def init_same_family(self) -> bool:
        """Whether --init-from names a model of this layout (then its text encoders and
        denoiser are continued; its judge and VAE are reused whatever its layout)."""
        if self.init_path is None:
            return False
        from ..families import family_for_class
        from ..pipeline import pipeline_class

        family = family_for_class(pipeline_class(self.init_path).__name__)
        return family.name == self.layout.family

    # -- stage 5: denoiser + text encoders --------------------------------------------------
    def train_unet(self, vae, encoders, heads, judge, latents) -> tuple[nn.Module, list[nn.Module]]:
        """The denoiser (UNet or MMDiT) and the text encoders, jointly: caption dropout,
        the layout's loss weighting, warm-up and cosine decay, EMA weights (what ships).
        The loss is taken through the model family, as the erasure methods take it:
            L = w_t·‖f_θ(x_t, c, t) − target‖² + aux·CE(heads(pooled(c)), labels)."""
        cfg, dev, tok, lay = self.cfg, self.device, self.tokenizer, self.layout
        family = FAMILIES[lay.family]
        mean, std = latents
        scenes, _ = world.dataset_scenes(cfg.images, seed=cfg.seed)
        scaling = vae.config.scaling_factor
        unet = (lay.load_denoiser(self.init_path) if self.init_same_family
                else lay.build_denoiser(encoders, vae.config.latent_channels)).to(dev)
        encoders, heads = [e.to(dev) for e in encoders], heads.to(dev)
        params = [p for m in (unet, *encoders, heads) for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
        schedule = cfg.schedule_steps or cfg.unet_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, schedule))
        emas = {"ema_unet": (unet, EMAModel(unet.parameters(), decay=cfg.ema_decay))}
        emas.update({f"ema_{name}": (e, EMAModel(e.parameters(), decay=cfg.ema_decay))
                     for name, e in zip(lay.encoders, encoders)})
        modules = {"unet": unet, **self._text_modules(encoders, heads)}
        noise_sched = lay.training_scheduler()
        step, folder = 0, self.work / "unet"
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        if (folder / "state.json").exists():
            info, extra = load_training_state(folder, modules, opt)
            step = info["step"]
            for prefix, (_, ema) in emas.items():
                ema.shadow_params = [extra[f"{prefix}.{i}"] for i in range(len(ema.shadow_params))]
                ema.optimization_step = step
            rng = np.random.default_rng([cfg.seed, step])
            gen = torch.Generator().manual_seed(cfg.seed + step)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, _lr_lambda(cfg.warmup_steps, schedule), last_epoch=step - 1
            )
            self.log(stage="unet", resumed_at=step)

        def checkpoint():
            extra = {f"{prefix}.{i}": p for prefix, (_, ema) in emas.items()
                     for i, p in enumerate(ema.shadow_params)}
            save_training_state(folder, modules, opt, extra, {"step": step, "config": asdict(cfg)})

        bar = tqdm(total=cfg.unet_steps, initial=step, desc=lay.family)
        losses: list[float] = []
        while step < cfg.unet_steps:
            idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen)
            z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
            texts, labels = sample_captions([scenes[i] for i in idx.tolist()], rng, cfg.caption_dropout)
            cond, pooled = lay.condition(encoders, prompt_ids(tok, texts).to(dev))
            z = z.to(dev)
            noise = torch.randn(z.shape, generator=gen).to(dev)
            t = torch.randint(0, 1000, (len(z),), generator=gen).to(dev)
            pred = family.predict(unet, family.add_noise(noise_sched, z, noise, t), t, cond)
            error = (pred - family.target(noise_sched, z, noise, t)).pow(2).mean(dim=(1, 2, 3))
            diffusion = (lay.loss_weight(noise_sched, t) * error).mean()
            loss = diffusion + cfg.aux_weight * heads.loss(pooled, labels.to(dev))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}; lower --unet-lr")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            for module, ema in emas.values():
                ema.step(module.parameters())
            step += 1
            losses.append(diffusion.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            out_of_time = (
                cfg.time_budget_minutes is not None
                and time.time() - self.start > cfg.time_budget_minutes * 60
            )
            if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps or out_of_time:
                checkpoint()
            if cfg.probe_every and (step % cfg.probe_every == 0 or step == cfg.unet_steps):
                self.log(stage="unet", step=step, loss=float(np.mean(losses[-200:])),
                         lr=sched.get_last_lr()[0], probe=self.probe(vae, emas, judge))
            if out_of_time:
                self.log(stage="unet", stopped_for_time_at=step)
                break
        bar.close()
        for module, ema in emas.values():
            ema.copy_to(module.parameters())
        return unet.eval(), [e.eval() for e in encoders]

    def probe(self, vae, emas, judge, n_per_object: int = 8) -> dict:
        """Quick generation accuracy of the EMA weights on a few prompts (training monitor)."""
        import copy

        ema_copies = []
        for module, ema in emas.values():
            m = copy.deepcopy(module)
            ema.copy_to(m.parameters())
            ema_copies.append(m.eval())
        pipe = assemble_pipeline(vae, ema_copies[0], ema_copies[1:], self.tokenizer, self.layout)
        rng = np.random.default_rng(0)
        scenes = [world.random_scene(rng) for _ in range(n_per_object * 6)]
        prompts = [vocab.EVAL_TEMPLATE.format(o=s.object, c=s.colour, s=s.style) for s in scenes]
        images = generate_images(pipe, prompts, seed=0)
        pred = judge.predict(images)
        return {
            k: round(float(np.mean([p == getattr(s, k) for p, s in zip(pred[k], scenes)])), 3)
            for k in ("object", "colour", "style")
        }

    def run(self) -> Path:
        """Run every stage (skipping finished ones) and write the pipeline folder to `out`."""
        self.log(stage="start", config=asdict(self.cfg))
        minutes, mark = {}, time.time()

        def lap(stage: str) -> None:
            nonlocal mark
            minutes[stage] = round((time.time() - mark) / 60, 1)
            mark = time.time()

        judge = self.train_judge()
        lap("judge")
        vae = self.train_vae(judge)
        lap("vae")
        latents = self.encode_latents(vae)
        encoders, heads = self.pretrain_text()
        lap("latents_and_text")
        unet, encoders = self.train_unet(vae, encoders, heads, judge, latents)
        lap("unet")
        minutes["total"] = round(sum(minutes.values()), 1)
        pipe = assemble_pipeline(vae.cpu(), unet.cpu(), [e.cpu() for e in encoders], self.tokenizer, self.layout)
        # minutes of this sitting only: a stage finished in an earlier sitting counts ~0 here
        meta = {"train_config": asdict(self.cfg), "minutes_this_sitting": minutes,
                "torch_threads": torch.get_num_threads()}
        save_shapes_model(pipe, judge, self.out, meta, self.layout.loading)
        self.log(stage="done", out=str(self.out))
        return self.out


def assemble_pipeline(vae, denoiser, encoders, tokenizer, lay=None):
    """The layout's standard diffusers pipeline around the parts (default: the shipped
    model's, Stable Diffusion), marked as a shapes-world model with its sampler settings."""
    lay = lay or layout("sd")
    pipe = lay.assemble(vae, denoiser, list(encoders), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    pipe.obliviate_info = {"world": "shapes", "sampler": dict(lay.sampler)}
    return pipe


def save_shapes_model(pipe, judge: Judge, out: Path, meta: dict, loading: str | None = None) -> None:
    """Write the pipeline (safetensors), the judge and `obliviate.json` to `out` atomically;
    `loading` tells the model card how plain diffusers loads and calls it."""
    with atomic_folder(out, overwrite=True) as tmp:
        save_pipeline(pipe, tmp)
        judge.save(tmp / "judge")
        info = {**pipe.obliviate_info, **meta}
        (tmp / "obliviate.json").write_text(json.dumps(info, indent=1))
        write_card(tmp, None, weights_sha256=weights_sha256(pipe),
                   extra={"Training": "the shapes world's diffusion model and its judge, `obliviate train-base`",
                          **({"Loading": loading} if loading else {})})


def judge_accuracy(judge: Judge, n: int, seed: int) -> dict[str, float]:
    """Judge accuracy per kind on `n` freshly rendered images (unseen poses)."""
    images, scenes = world.dataset(n, seed=seed)
    pred = judge.predict(images)
    return {k: float(np.mean([p == getattr(s, k) for p, s in zip(pred[k], scenes)])) for k in pred}
