"""`--robust`: adversarial erasure as an engine plug-in any gradient method can take.

During a request, an inner attack mines soft prompts that bring each target back on the
weights being edited (textual inversion, `evaluate.softprompt.invert`, on images the
lineage's original model draws for prompts naming the target), and the method's own forget
term is applied to them too: in each step a share `share` of the forget prompts (the
sub-batch fields a method declares in `forget_prompts`) has the target's word replaced by
one of the mined soft prompts, while the preservation terms are left as they are. Every
`every` steps the attack is run again, `mine_steps` steps from the newest soft prompt of
the target (so it follows the weights), and every third time `first_steps` steps from a
fresh start (the word, a neutral word, random in turn; with `vary_tokens`, 1, 2 and 4
tokens in turn) so the pool stays diverse; the newest `pool` soft prompts per target are
kept.

Continual: the pool is written beside the model (`robust_prompts.safetensors`) and read
back by the next request of the lineage; soft prompts of earlier targets are substituted in
the method's replay of earlier targets (DUGE's rebound term), so they stay defended. The
hardening stage's replay of earlier targets (`harden_replay`, engine.harden) mines with a
second Robust whose pools are these: they are kept in the lineage the same way.
Stages a gradient method's request runs under `--robust`: the hardening stage
(`harden_steps`, engine.harden) or, on a request naming only objects with
`object_stage="body"`, the closed-form body edit (engine.body_edit: `body_pairs`, `body_keep`,
`body_timesteps`, `body_lambda`; read before the method's stage, applied after), the
method's own stage (mining here when `mining`), the closed-form hold of the coarse levels
after a hardened request (`body_hold`: "style" for a request naming a style, "all", "off";
engine.body_hold: `hold_pairs`, `hold_memory`, `hold_lambda`), and the repair stage
(`repair_steps`, engine.repair), which holds what must stay to the lineage's original model
with nothing to forget (`repair_hold`: and holds the removed targets' images to the model
before it).
Choices and what they cost are in docs/experiments.md.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ObliviateError

PROMPTS_FILE = "robust_prompts.safetensors"
# characters the defence uses as soft-token slots (single tokens no caption uses; the
# attack's own placeholders, evaluate.softprompt.PLACEHOLDERS, are left out)
SLOTS = tuple("$%&*@!?+=<>{}[]()/:;_`")
INITS = ("concept", "neutral", "random")


def _slots(tokenizer) -> list[tuple[str, int]]:
    """(character, token id) of every slot character the tokenizer reads as one token."""
    found = []
    for ch in SLOTS:
        got = tokenizer(ch, add_special_tokens=False).input_ids
        if len(got) == 1:
            found.append((ch, got[0]))
    return found


def trains_soft_prompts(method, robust: "Robust") -> bool:
    """Whether a `--robust` run of `method` learns soft prompts (mining, the hardening
    stage's replay of earlier targets, or UCE's mined rounds): those go through one CLIP text
    encoder's token embeddings, built for Stable Diffusion 1.x/2.x only. The hardening stage
    without the replay and UCE's closed-form rounds work on any family."""
    if method.closed_form:
        return getattr(method, "robust_mode", None) == "mined"
    return robust.mining or bool(robust.harden_steps and robust.harden_replay)


# Allowed range of each numeric setting: (lowest, highest or None, whether lowest is excluded).
_RANGES = {
    "tokens": (1, 4, False), "every": (1, None, False), "mine_steps": (0, None, False),
    "first_steps": (0, None, False), "harden_steps": (0, None, False), "share": (0, 1, True),
    "pool": (1, None, False), "prompts": (1, None, False), "batch_size": (1, None, False),
    "lr": (0, None, True), "harden_lr": (0, None, True), "harden_keep": (0, None, False),
    "harden_keep_attribute": (0, None, False), "harden_keep_style": (0, None, False),
    "harden_keep_prompts": (1, None, False), "harden_keep_prompts_style": (1, None, False),
    "harden_style_factor": (0, None, True),
    "harden_image": (0, None, False), "harden_image_attribute_factor": (0, None, False),
    "harden_image_pairs": (1, None, False), "harden_image_memory": (0, None, False),
    "harden_replay": (0, None, False), "harden_replay_every": (1, None, False),
    "t_low": (0, 1000, False), "t_high": (0, 1000, False), "harden_image_t_high": (201, 1000, False),
    "body_pairs": (0, None, False), "body_keep": (0, None, False),
    "body_timesteps": (1, None, False),
    "body_lambda": (0, None, True),
    "hold_pairs": (1, None, False), "hold_memory": (0, None, False),
    "hold_lambda": (0, None, True),
    "repair_steps": (0, None, False), "repair_prompts": (1, None, False), "repair_hold": (0, None, False),
}
# Allowed values of each text setting.
_CHOICES = {"object_stage": ("harden", "body"), "body_hold": ("off", "style", "all"),
            "harden_reference": ("empty", "anchor"),
            "harden_reference_style": ("empty", "anchor"),
            "harden_group_object": ("non-attn2", "non-attn2-deep"), "repair_group": ("non-attn2", "stage")}


@dataclass
class Robust:
    """Settings and the pool of mined soft prompts ({target: [tensor (tokens, width)]})."""

    mining: bool = True
    object_stage: str = "harden"
    body_pairs: int = 16
    body_keep: int = 24
    body_timesteps: int = 3
    body_lambda: float = 0.01
    body_hold: str = "off"
    hold_pairs: int = 32
    hold_memory: int = 96
    hold_lambda: float = 0.01
    harden_steps: int = 0
    harden_lr: float = 1e-4
    harden_reference: str = "empty"
    harden_group_object: str = "non-attn2"
    harden_keep: float = 5.0
    harden_keep_attribute: float = 10.0
    harden_keep_style: float = 10.0
    harden_keep_prompts: int = 32
    harden_keep_prompts_style: int = 32
    harden_style_factor: float = 1.0
    harden_reference_style: str = "empty"
    harden_image: float = 0.0
    harden_image_attribute_factor: float = 1.0
    harden_image_pairs: int = 64
    harden_image_memory: int = 0
    harden_replay: int = 0
    harden_replay_every: int = 50
    harden_image_t_high: int = 1000
    harden_stratify: bool = False
    repair_steps: int = 0
    repair_prompts: int = 96
    repair_group: str = "non-attn2"
    repair_hold: float = 0.0
    every: int = 10
    mine_steps: int = 20
    first_steps: int = 60
    tokens: int = 2
    vary_tokens: bool = False
    pool: int = 4
    share: float = 0.5
    lr: float = 0.1
    batch_size: int = 16
    prompts: int = 32
    t_low: int = 100
    t_high: int = 900
    vectors: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _data: dict = field(default_factory=dict, repr=False)
    _round: int = 0

    def settings(self) -> dict:
        """The plug-in's settings, recorded in the ledger."""
        return {k: getattr(self, k) for k in self.settings_keys()}

    # -- set-up ------------------------------------------------------------------------------
    @classmethod
    def checked(cls, settings: dict | None = None, vectors: dict | None = None) -> "Robust":
        """A Robust from user settings, each checked by name, type and range (one-line errors)."""
        settings = dict(settings or {})
        known = cls.settings_keys()
        for key, value in settings.items():
            if key not in known:
                raise ObliviateError(f"--robust has no setting {key!r}; it has: {', '.join(known)}")
            if key in _CHOICES:
                if value not in _CHOICES[key]:
                    raise ObliviateError(f"--robust setting {key}={value!r} must be one of: "
                                         f"{', '.join(_CHOICES[key])}")
                continue
            want = type(getattr(cls, key))
            ok = isinstance(value, bool) if want is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and (want is float or float(value).is_integer()))
            if not ok:
                kind = {"int": "a whole number", "float": "a number", "bool": "true or false"}[want.__name__]
                raise ObliviateError(f"--robust setting {key}={value!r} must be {kind}")
            settings[key] = want(value)
        robust = cls(vectors=vectors or {}, **settings)
        for key, (low, high, open_low) in _RANGES.items():
            value = getattr(robust, key)
            if not ((value > low if open_low else value >= low) and (high is None or value <= high)):
                bound = f"> {low}" if open_low else f">= {low}"
                raise ObliviateError(f"--robust setting {key}={value!r} must be {bound}"
                                     + (f" and <= {high}" if high is not None else ""))
        if not robust.t_low < robust.t_high:
            raise ObliviateError(f"--robust settings t_low={robust.t_low} and t_high={robust.t_high}: "
                                 "t_low must be below t_high")
        return robust

    @classmethod
    def settings_keys(cls) -> tuple[str, ...]:
        """The user's settings: every field but the pool and the working state."""
        return tuple(f.name for f in fields(cls) if f.name != "vectors" and not f.name.startswith("_"))

    @property
    def slots(self) -> list[tuple[str, int]]:
        """(character, token id) of the soft-token slots, once `prepare` has run."""
        return list(self._slots)

    def check(self, method) -> None:
        """Refuse a method that does not say where its forget prompts are."""
        if not getattr(method, "forget_prompts", ()):
            raise ObliviateError(f"--robust needs a method that declares its forget prompts; "
                                 f"{method.name!r} does not (use duge, esd, doco, rgd or fewshot-te)")

    def prepare(self, ctx, mine_for: list[str] | None = None) -> None:
        """Training data of every target `mine` attacks (`mine_for`, default this request's):
        what the original model draws for prompts naming it, the captions with the word as a
        slot. Only those: no other target's images are drawn, and the prompts follow the
        targets' order, not a set's."""
        rng = np.random.default_rng(ctx.seed + 17)
        self._slots = _slots(ctx.tokenizer)
        self._current = list(ctx.request.names) if mine_for is None else list(mine_for)
        for name in self._current:
            prompts = ctx.world.prompts_naming(name, self.prompts, rng)
            pattern = _word(name)
            captions = [put(pattern, "{}", p) for p in prompts]
            self._data[name] = {"latents": ctx.base_latents(prompts), "captions": captions}

    # -- mining ------------------------------------------------------------------------------
    def mine(self, ctx, step: int) -> None:
        """Run the inner attack against the current weights for every target of this request."""
        if step % self.every:
            return
        from ..evaluate.softprompt import initial_vectors, invert

        unet, text = ctx.pipe.unet, ctx.pipe.text_encoder
        generator = torch.Generator().manual_seed(ctx.seed * 7919 + step)
        for name in self._current:
            pool = self.vectors.setdefault(name, [])
            fresh = not pool or self._round % 3 == 0
            if fresh:
                fresh_round = self._round // 3
                init = INITS[fresh_round % len(INITS)]
                n = (1, 2, 4)[fresh_round % 3] if self.vary_tokens else self.tokens
                start = initial_vectors(text, ctx.tokenizer, init, name.split()[-1], n, generator)
            else:
                start = pool[-1].to(ctx.device)
            ids = [i for _, i in self._slots[: len(start)]]
            slot = " ".join(ch for ch, _ in self._slots[: len(start)])
            data = self._data[name]
            caption_ids = ctx.token_ids([c.format(slot) for c in data["captions"]])
            vec, _, _ = invert(unet, text, ctx.noise_scheduler, data["latents"].to(ctx.device), caption_ids,
                               ids, start, self.first_steps if fresh else self.mine_steps, generator,
                               lr=self.lr, batch_size=self.batch_size, t_range=(self.t_low, self.t_high))
            pool.append(vec.detach().cpu())
            del pool[: -self.pool]
        self._round += 1

    # -- the adversarial batch ---------------------------------------------------------------
    def adversarial(self, method, batch: dict, generator: torch.Generator) -> tuple[dict, list[int], torch.Tensor]:
        """`batch` with a share of its forget prompts naming a target through a mined soft
        prompt; returns it, the slot token ids used and their vectors (for `soft_tokens`)."""
        words = {name: _word(name) for name in self.vectors if self.vectors[name]}
        used_ids, used_vectors, next_slot = [], [], 0
        batch = dict(batch)
        for key, fld in method.forget_prompts:
            if key is not None and key not in batch:
                continue
            sub = dict(batch[key]) if key is not None else batch
            prompts = list(sub[fld])
            draws = torch.rand(len(prompts), generator=generator).tolist()
            picks = torch.randint(0, 1 << 30, (len(prompts),), generator=generator).tolist()
            for i, prompt in enumerate(prompts):
                name = next((n for n, w in words.items() if w.search(prompt)), None)
                if name is None or draws[i] >= self.share:
                    continue
                pool = self.vectors[name]
                vec = pool[picks[i] % len(pool)]
                if next_slot + len(vec) > len(self._slots):
                    break
                slots = self._slots[next_slot: next_slot + len(vec)]
                next_slot += len(vec)
                used_ids += [tid for _, tid in slots]
                used_vectors.append(vec)
                prompts[i] = put(words[name], " ".join(ch for ch, _ in slots), prompt)
            sub.setdefault(f"_plain_{fld}", sub[fld])
            sub[fld] = prompts
            if key is not None:
                batch[key] = sub
            else:
                batch = sub
        vectors = torch.cat(used_vectors) if used_vectors else torch.zeros(0)
        return batch, used_ids, vectors

    @contextmanager
    def active(self, ctx, ids: list[int], vectors: torch.Tensor):
        """Within the block, θ's text encoder reads the slot tokens as the mined vectors."""
        if not ids:
            yield
            return
        from ..evaluate.softprompt import soft_tokens

        with soft_tokens(ctx.pipe.text_encoder, ids, vectors.to(ctx.device)):
            yield

    # -- checkpoint --------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The pool and the mining round, for a training checkpoint (`--resume` goes on
        defending the soft prompts mined before the interruption)."""
        return {**{f"pool.{k}": v for k, v in _flat(self.vectors).items()}, "round": torch.tensor(self._round)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state`."""
        if "round" not in tensors:
            return
        self._round = int(tensors["round"])
        self.vectors = _pools({k[len("pool."):]: v for k, v in tensors.items() if k.startswith("pool.")})

    # -- lineage -----------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """The pool, per target, beside the model."""
        tensors = _flat(self.vectors)
        if tensors:
            save_file(tensors, Path(folder) / PROMPTS_FILE, metadata={"targets": json.dumps(sorted(self.vectors))})

    @classmethod
    def from_folder(cls, folder: Path | None, **settings) -> "Robust":
        """A Robust carrying the soft prompts earlier requests of the lineage mined, if any."""
        path = Path(folder) / PROMPTS_FILE if folder else None
        vectors = _pools(load_file(path)) if path and path.exists() else {}
        return cls.checked(settings, vectors)


def _flat(vectors: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A pool as flat tensors keyed `TARGET.INDEX` (safetensors takes no nesting)."""
    return {f"{name}.{i}": v.contiguous() for name, pool in vectors.items() for i, v in enumerate(pool)}


def _pools(tensors: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Inverse of `_flat`: each target's soft prompts in index order."""
    indexed = {(k.rpartition(".")[0], int(k.rpartition(".")[2])): v for k, v in tensors.items()}
    pools: dict[str, list[torch.Tensor]] = {}
    for (name, _), value in sorted(indexed.items()):
        pools.setdefault(name, []).append(value)
    return pools


def _word(name: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(name)}\b")


def put(word: re.Pattern, slot: str, prompt: str) -> str:
    """`prompt` with its first `word` replaced by `slot`, kept apart from any punctuation
    after it (the tokenizer would merge "$," into one token that is not the slot)."""
    return re.sub(r" {2,}", " ", word.sub(slot + " ", prompt, count=1)).strip()
