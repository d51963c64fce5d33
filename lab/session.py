"""The `Lab`: one object that hands hypotheses (or a notebook) corpora, tokenizers and
trained models at the active profile's scale, caching training runs on disk.

    from lab.session import Lab
    lab = Lab("cpu")
    data = lab.data("tinyshakespeare", "char")
    run = lab.pretrain(data, lab.model_config(data, lab.profile.pretraining.baby), seed=0)
    run.final_val_loss
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import lab as lab_package
from lab.data import TokenData, load_corpus, prepare
from lab.models import GPTConfig
from lab.paths import cache_dir, cache_lock
from lab.profiles import ModelScale, Profile, get_profile
from lab.tokenizers import get_tokenizer
from lab.train import TrainConfig, TrainingDivergedError, TrainResult, train
from lab.train.checkpoint import CheckpointError


def normalised_source(source: str) -> str:
    """A module's syntax tree without docstrings or positions: reformatting, comments and
    docstring edits never change it; any change to what the code does (decorators
    included) does."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the model and trainer code (their normalised source, see normalised_source):
    a cached run is reused only by the same code, and formatting alone never invalidates it."""
    root = Path(lab_package.__file__).parent
    files = [f for sub in ("models", "train", "data", "tokenizers") for f in sorted((root / sub).rglob("*.py"))]
    h = hashlib.sha256()
    for f in [*files, root / "checks.py"]:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(normalised_source(f.read_text(encoding="utf-8")).encode())
    return h.hexdigest()[:16]


def _schedule(scale) -> dict:
    """The TrainConfig fields a profile's scale sets: steps, batch, lr, warmup, evaluation."""
    return dict(
        max_steps=scale.steps,
        batch_size=scale.batch_size,
        lr=scale.lr,
        warmup_steps=scale.warmup_steps,
        eval_interval=scale.eval_interval,
        eval_batches=scale.eval_batches,
    )


class Lab:
    def __init__(self, profile: Profile | str | None = None, *, progress: bool = True):
        self.profile = profile if isinstance(profile, Profile) else get_profile(profile)
        self.progress = progress

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.profile.seeds

    @property
    def device(self) -> str:
        return self.profile.device

    # -- data -----------------------------------------------------------------------

    def corpus(self, name: str) -> str:
        return load_corpus(name)

    def tokenizer(self, name: str, corpus: str = "tinyshakespeare", *, vocab_size: int | None = None):
        """A tokenizer; char and bpe are built from the training split of `corpus`
        (never from validation text)."""
        if name == "char":
            # like nanoGPT, the alphabet covers the whole corpus: val never meets an unknown char
            return get_tokenizer("char", text=load_corpus(corpus))
        if name == "bpe":
            from lab.data import split_text

            train_text, _ = split_text(load_corpus(corpus))
            size = vocab_size or self.profile.pretraining.bpe_vocab_size
            return get_tokenizer("bpe", text=train_text, vocab_size=size)
        return get_tokenizer(name)

    def data(self, corpus: str = "tinyshakespeare", tokenizer="char", *, train_fraction: float = 1.0) -> TokenData:
        tok = self.tokenizer(tokenizer, corpus) if isinstance(tokenizer, str) else tokenizer
        return prepare(corpus, tok, train_fraction=train_fraction)

    def dataset(self, corpus: str = "tinyshakespeare", tokenizer="char", *, block_size: int | None = None):
        """`self.data(corpus, tokenizer)` as a Hugging Face DatasetDict {"train", "validation"}:
        its token arrays in consecutive rows of `block_size` ids (default: the profile's baby
        context). See lab.hf_splits.token_splits."""
        from lab.hf_splits import token_splits

        return token_splits(self.data(corpus, tokenizer), block_size or self.profile.pretraining.baby.block_size)

    # -- models ---------------------------------------------------------------------

    def model_config(self, data: TokenData, scale: ModelScale | None = None, **overrides) -> GPTConfig:
        scale = scale or self.profile.pretraining.baby
        sizes = dict(
            vocab_size=data.tokenizer.vocab_size,
            block_size=scale.block_size,
            n_layer=scale.n_layer,
            n_head=scale.n_head,
            n_embd=scale.n_embd,
        )
        return GPTConfig(**{**sizes, **overrides})

    def arch_config(self, data: TokenData, **overrides) -> GPTConfig:
        """The architecture ablations' shared small GPT (profile.architecture.model) with
        one component changed by `overrides`, e.g. arch_config(data, pos="alibi")."""
        return self.model_config(data, self.profile.architecture.model, **overrides)

    def arch_pretrain(self, data: TokenData, model_config: GPTConfig, *, seed: int, **train_overrides) -> TrainResult:
        """pretrain() with the architecture ablations' shared budget (steps, batch, lr)."""
        budget = _schedule(self.profile.architecture)
        return self.pretrain(data, model_config, seed=seed, **{**budget, **train_overrides})

    def llama_config(self, data: TokenData, scale: ModelScale | None = None, **overrides) -> GPTConfig:
        """A Llama-style model (RoPE, RMSNorm, SwiGLU, no biases): exports to Hugging Face's
        LlamaForCausalLM exactly, and takes n_kv_head (GQA/MQA) and sliding_window."""
        llama = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
        return self.model_config(data, scale or self.profile.inference.llama, **{**llama, **overrides})

    def train_config(self, *, seed: int, **overrides) -> TrainConfig:
        settings = {**_schedule(self.profile.pretraining), "seed": seed, "device": self.device}
        steps = overrides.get("max_steps")
        # a shorter run scales the profile's warm-up and evaluation interval down with it, before
        # TrainConfig checks them (the profile's 100 warm-up steps do not fit in max_steps=5)
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
            if "warmup_steps" not in overrides:
                settings["warmup_steps"] = min(settings["warmup_steps"], steps // 10)
            if "eval_interval" not in overrides:
                settings["eval_interval"] = max(1, min(settings["eval_interval"], steps // 4))
        return TrainConfig(**{**settings, **overrides})

    def pretrain(
        self, data: TokenData, model_config: GPTConfig, *, seed: int, init_from=None, **train_overrides
    ) -> TrainResult:
        """Train (or load the cached run of) `model_config` on `data` with this seed.

        Runs are cached under $LAB_CACHE/runs/<key>, the key hashing the model and train
        configs, the data identity and the source of the lab's model/trainer/data code,
        so a change to any of them trains afresh. `init_from` continues from a model's
        weights (their hash joins the key). A run that diverges raises
        TrainingDivergedError (also on a cache hit: the divergence is cached)."""
        tc = self.train_config(seed=seed, **train_overrides)
        run_dir = self.run_dir(data, model_config, seed=seed, init_from=init_from, **train_overrides)
        # one process trains a given run; another (an xdist worker) waits and reuses it
        with cache_lock(run_dir, what="training run"):
            return self._train_or_load(run_dir, model_config, tc, data, init_from)

    def run_dir(
        self, data: TokenData, model_config: GPTConfig, *, seed: int, init_from=None, **train_overrides
    ) -> Path:
        """The cache folder pretrain() trains this run into (or loads it from):
        $LAB_CACHE/runs/<key>, with its checkpoints, TensorBoard events and about.json."""
        tc = self.train_config(seed=seed, **train_overrides)
        spec = {"model": model_config.to_dict(), "train": tc.to_dict(), "data": data.identity, "code": code_version()}
        if init_from is not None:
            spec["init"] = weights_hash(init_from)
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        return cache_dir("runs", key)

    def _train_or_load(self, run_dir: Path, model_config: GPTConfig, tc, data: TokenData, init_from) -> TrainResult:
        diverged = run_dir / "diverged.json"
        if diverged.exists():
            info = json.loads(diverged.read_text())
            raise TrainingDivergedError(
                info["message"], step=info["step"], history=info["history"], evals=info["evals"]
            )
        if (run_dir / "done").exists():
            try:
                return TrainResult.load(run_dir / "last")
            except (CheckpointError, FileNotFoundError) as exc:
                raise CheckpointError(
                    f"the cached training run {run_dir} cannot be trusted ({exc}); delete that directory to retrain"
                ) from exc
        try:
            result = train(
                model_config,
                tc,
                data,
                out_dir=run_dir,
                resume=(run_dir / "last").exists(),
                progress=self.progress,
                init_from=init_from,
            )
        except TrainingDivergedError as exc:
            tmp = diverged.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"message": str(exc), "step": exc.step, "history": exc.history, "evals": exc.evals})
            )
            tmp.replace(diverged)
            raise
        (run_dir / "done").write_text(json.dumps(result.to_dict(), default=str))
        return result


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def uniform_loss(vocab_size: int) -> float:
    """Cross-entropy of a model that learned nothing: ln V nats per token."""
    return math.log(vocab_size)
