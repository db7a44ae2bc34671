"""Train the shipped `shapes` model from scratch: judge, VAE, text encoder, UNet.

Stages run in order and each one is checkpointed under a work folder, so an interrupted run
resumes where it stopped (`obliviate train-base --resume`). The recipe is chosen for a
2-core CPU (under 2 hours there, all stages):
- the VAE is trained with an L1 loss on image gradients beside the pixel losses, and sees
  dotted shapes twice as often: with pixel losses alone it blurred the dotted mesh (a
  period of 4 pixels, 2 latent pixels) into stripes, and 40% of dotted renders came back
  judged striped, which capped the model's dotted accuracy near 0.7;
- the UNet has no attention at its 16x16 level (cross-attention at 8x8, 4x4 and the mid
  block), which halves a training step on CPU;
- images are encoded to latents once (posterior mean and std kept; a fresh sample each step);
- the text encoder is first pretrained alone with classification heads on its pooled output
  (which concept of each kind does the caption name?), so synonyms land together before the
  UNet needs them; the heads stay on as an auxiliary loss during joint training;
- the UNet and text encoder train jointly with caption dropout (for classifier-free
  guidance), Min-SNR-5 loss weighting, learning-rate warm-up and cosine decay, and EMA
  weights, which are what ships.
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
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from ..checkpoint import atomic_folder, load_training_state, save_training_state
from ..ledger import weights_sha256
from ..model_card import write_card
from ..evaluate.judge import Judge, augment, to_tensor
from ..finetune import prompt_ids
from ..generate import generate_images
from . import vocab, world
from .tokenizer import MAX_LENGTH, build_tokenizer

SAMPLER_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 5.0}


@dataclass
class TrainConfig:
    """Every knob of the recipe; the defaults are what the shipped model was trained with."""

    seed: int = 0
    device: str = "cpu"
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
    init_from: str | None = None  # a shapes model folder to continue from (its VAE, judge, weights)


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


def build_unet(cross_attention_dim: int, latent_channels: int = 4) -> UNet2DConditionModel:
    """A 16x16 UNet with cross-attention at 8x8 and 4x4 (and the 4x4 mid block); 4.1 M parameters.

    The 16x16 level has no attention: on 2 CPU cores its 256-token self-attention cost more
    than half of every training step (1.62 s against 0.74 s at batch 64), and at this size
    the convolutions already see the whole object.
    """
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_text_encoder(vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    """A 3-layer, 64-wide CLIP text transformer over the world's tokenizer."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=64,
    )
    return CLIPTextModel(config)


def build_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training noise schedule (scaled-linear betas, epsilon target)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
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


class BaseTrainer:
    """Runs the stages of the recipe with checkpoints in `work`; `run()` writes `out`."""

    def __init__(self, out: Path, work: Path, config: TrainConfig):
        self.out, self.work, self.cfg = Path(out), Path(work), config
        self.device = torch.device(config.device)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tokenizer = build_tokenizer()
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
        if not (folder / "judge.json").exists() and self.cfg.init_from:
            Judge.load(Path(self.cfg.init_from) / "judge").save(folder)
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
        if not (folder / "config.json").exists() and self.cfg.init_from:
            AutoencoderKL.from_pretrained(Path(self.cfg.init_from) / "vae").save_pretrained(folder)
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
    def pretrain_text(self) -> tuple[CLIPTextModel, ConceptHeads]:
        tok = self.tokenizer
        text = build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id)
        heads = ConceptHeads(text.config.hidden_size)
        folder = self.work / "text"
        if (folder / "state.json").exists():
            load_training_state(folder, {"text": text, "heads": heads})
            return text, heads
        torch.manual_seed(self.cfg.seed)
        rng = np.random.default_rng(self.cfg.seed)
        params = list(text.parameters()) + list(heads.parameters())
        if self.cfg.init_from:  # keep the trained encoder; fit only the auxiliary heads
            text = CLIPTextModel.from_pretrained(Path(self.cfg.init_from) / "text_encoder")
            params = list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=2e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, self.cfg.text_steps))
        for step in (bar := tqdm(range(self.cfg.text_steps), desc="text")):
            scenes = [world.random_scene(rng) for _ in range(256)]
            texts, labels = sample_captions(scenes, rng, dropout=0.0)
            ids = prompt_ids(tok, texts)
            loss = heads.loss(text(ids).pooler_output, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        self.log(stage="text", aux_loss=loss.item())
        save_training_state(folder, {"text": text, "heads": heads})
        return text, heads

    # -- stage 5: UNet + text encoder -------------------------------------------------------
    def train_unet(self, vae, text, heads, judge, latents) -> tuple[UNet2DConditionModel, CLIPTextModel]:
        cfg, dev, tok = self.cfg, self.device, self.tokenizer
        mean, std = latents
        scenes, _ = world.dataset_scenes(cfg.images, seed=cfg.seed)
        scaling = vae.config.scaling_factor
        unet = (UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet") if cfg.init_from
                else build_unet(text.config.hidden_size, vae.config.latent_channels)).to(dev)
        text, heads = text.to(dev), heads.to(dev)
        params = list(unet.parameters()) + list(text.parameters()) + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
        schedule = cfg.schedule_steps or cfg.unet_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, schedule))
        ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay)
        ema_text = EMAModel(text.parameters(), decay=cfg.ema_decay)
        noise_sched = build_scheduler()
        alphas = noise_sched.alphas_cumprod.to(dev)
        step, folder = 0, self.work / "unet"
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        if (folder / "state.json").exists():
            info, extra = load_training_state(folder, {"unet": unet, "text": text, "heads": heads}, opt)
            step = info["step"]
            for ema, prefix in ((ema_unet, "ema_unet"), (ema_text, "ema_text")):
                ema.shadow_params = [extra[f"{prefix}.{i}"] for i in range(len(ema.shadow_params))]
                ema.optimization_step = step
            rng = np.random.default_rng([cfg.seed, step])
            gen = torch.Generator().manual_seed(cfg.seed + step)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, _lr_lambda(cfg.warmup_steps, schedule), last_epoch=step - 1
            )
            self.log(stage="unet", resumed_at=step)

        def checkpoint():
            extra = {f"ema_unet.{i}": p for i, p in enumerate(ema_unet.shadow_params)}
            extra.update({f"ema_text.{i}": p for i, p in enumerate(ema_text.shadow_params)})
            save_training_state(folder, {"unet": unet, "text": text, "heads": heads}, opt,
                                extra, {"step": step, "config": asdict(cfg)})

        bar = tqdm(total=cfg.unet_steps, initial=step, desc="unet")
        losses: list[float] = []
        while step < cfg.unet_steps:
            idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen)
            z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
            texts, labels = sample_captions([scenes[i] for i in idx.tolist()], rng, cfg.caption_dropout)
            ids = prompt_ids(tok, texts).to(dev)
            enc = text(ids)
            z = z.to(dev)
            noise = torch.randn(z.shape, generator=gen).to(dev)
            t = torch.randint(0, 1000, (len(z),), generator=gen).to(dev)
            pred = unet(noise_sched.add_noise(z, noise, t), t, enc.last_hidden_state).sample
            snr = alphas[t] / (1 - alphas[t])
            weight = torch.clamp(snr, max=5.0) / snr
            diffusion = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            loss = diffusion + cfg.aux_weight * heads.loss(enc.pooler_output, labels.to(dev))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}; lower --unet-lr")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ema_unet.step(unet.parameters())
            ema_text.step(text.parameters())
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
                         lr=sched.get_last_lr()[0],
                         probe=self.probe(vae, unet, text, ema_unet, ema_text, judge))
            if out_of_time:
                self.log(stage="unet", stopped_for_time_at=step)
                break
        bar.close()
        ema_unet.copy_to(unet.parameters())
        ema_text.copy_to(text.parameters())
        return unet.eval(), text.eval()

    def probe(self, vae, unet, text, ema_unet, ema_text, judge, n_per_object: int = 8) -> dict:
        """Quick generation accuracy of the EMA weights on a few prompts (training monitor)."""
        import copy

        u, t = copy.deepcopy(unet), copy.deepcopy(text)
        ema_unet.copy_to(u.parameters())
        ema_text.copy_to(t.parameters())
        pipe = assemble_pipeline(vae, u.eval(), t.eval(), self.tokenizer)
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
        text, heads = self.pretrain_text()
        lap("latents_and_text")
        unet, text = self.train_unet(vae, text, heads, judge, latents)
        lap("unet")
        minutes["total"] = round(sum(minutes.values()), 1)
        pipe = assemble_pipeline(vae.cpu(), unet.cpu(), text.cpu(), self.tokenizer)
        # minutes of this sitting only: a stage finished in an earlier sitting counts ~0 here
        meta = {"train_config": asdict(self.cfg), "minutes_this_sitting": minutes,
                "torch_threads": torch.get_num_threads()}
        save_shapes_model(pipe, judge, self.out, meta)
        self.log(stage="done", out=str(self.out))
        return self.out


def assemble_pipeline(vae, unet, text, tokenizer) -> StableDiffusionPipeline:
    """A standard StableDiffusionPipeline around the parts, with a DPM-Solver++ sampler."""
    scheduler = DPMSolverMultistepScheduler.from_config(build_scheduler().config)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.obliviate_info = {"world": "shapes", "sampler": SAMPLER_DEFAULTS}
    return pipe


def save_shapes_model(pipe, judge: Judge, out: Path, meta: dict) -> None:
    """Write the pipeline (safetensors), the judge and `obliviate.json` to `out` atomically."""
    with atomic_folder(out, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        judge.save(tmp / "judge")
        info = {"world": "shapes", "sampler": SAMPLER_DEFAULTS, **meta}
        (tmp / "obliviate.json").write_text(json.dumps(info, indent=1))
        write_card(tmp, None, weights_sha256=weights_sha256(pipe),
                   extra={"Training": "the shapes world's Stable Diffusion and its judge, `obliviate train-base`"})


def judge_accuracy(judge: Judge, n: int, seed: int) -> dict[str, float]:
    """Judge accuracy per kind on `n` freshly rendered images (unseen poses)."""
    images, scenes = world.dataset(n, seed=seed)
    pred = judge.predict(images)
    return {k: float(np.mean([p == getattr(s, k) for p, s in zip(pred[k], scenes)])) for k in pred}
