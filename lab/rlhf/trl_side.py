"""Curriculum 12 a second way: trl's trainers (SFTTrainer, RewardTrainer, DPOTrainer) on the
lab GPT exported to Hugging Face format, with the same data, budget and seeds as the
written-out loops in `lab.rlhf` (sft, train_reward_model, dpo).

What "the same" means here, setting by setting:

- data and order: the lab's loops draw every batch as `torch.randint(n, (batch_size,))` from a
  generator seeded with the run's seed; `lab_batch_rows` replays those draws and the trl
  dataset holds the rows in that order (repeats included), read sequentially
  (`train_sampling_strategy="sequential"`), so step k of both paths sees the same examples;
- optimizer: AdamW, betas (0.9, 0.95), eps 1e-8, no weight decay, a constant learning rate,
  no warm-up, no gradient clipping (`max_grad_norm=0`; trl's default clips at 1.0);
- numerics: float32 throughout (`bf16=False`: trl's configs default to bfloat16 autocast,
  which moves a log-probability by ~1e-3);
- the task's end of sequence is its newline (`STOP`), so trl's "append EOS" is a no-op; the
  reward model pads with a token that occurs in no pair (`unused_token`), because Hugging
  Face's sequence classifier reads the last token that is not padding, and the lab's reward
  model reads the newline;
- the reward model's head is a bias-free linear layer started at zero (the lab's head has a
  bias, which cancels in the Bradley-Terry loss and gets no gradient).

The results come back as lab GPTs (`load_lab_from_hf`), so one evaluation serves both paths.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.checks import POSITIVE, POSITIVE_INT
from lab.data.hf_datasets import preference_dataset, sft_dataset
from lab.rlhf.preferences import PreferencePair
from lab.rlhf.sequences import generator
from lab.rlhf.task import STOP

__all__ = [
    "TrlRun",
    "hf_pairwise_accuracy",
    "hf_rewards",
    "lab_batch_rows",
    "reward_classifier",
    "trl_dpo",
    "trl_reward_model",
    "trl_sft",
    "trl_tokenizer",
    "unused_token",
]


@dataclass
class TrlRun:
    """A trl training run: the trained Hugging Face model, its directory and the per-step
    training loss ({step, loss} rows, like the lab loops' history)."""

    model: object
    path: Path
    history: list[dict]
    tokenizer: object = None


def lab_batch_rows(n: int, *, steps: int, batch_size: int, seed: int) -> list[int]:
    """The row indices the lab's post-training loops read, in order: `steps` draws of
    `torch.randint(n, (batch_size,))` from `generator(seed)`, concatenated."""
    POSITIVE_INT.check("n", n)
    g = generator(seed)
    return [
        i
        for _ in range(POSITIVE_INT.check("steps", steps))
        for i in torch.randint(n, (POSITIVE_INT.check("batch_size", batch_size),), generator=g).tolist()
    ]


def trl_tokenizer(path, *, eos: str = STOP, pad: str | None = None):
    """The export's tokenizer (AutoTokenizer) with the task's end of sequence, and `pad`
    (default: the end of sequence) as padding. Both must be tokens of the vocabulary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    vocab = tok.get_vocab()
    for name, value in (("eos", eos), ("pad", pad)):
        if value is not None and value not in vocab:
            raise ValueError(f"{name} {value!r} is not a token of the tokenizer at {path}")
    tok.eos_token = eos
    tok.pad_token = pad if pad is not None else eos
    return tok


def unused_token(tokenizer, texts: Sequence[str]) -> str:
    """The lowest-id single-character token that occurs in none of `texts`: a padding token
    that can never be mistaken for the last real token of a sequence."""
    seen = set("".join(texts))
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if len(token) == 1 and token not in seen:
            return token
    raise ValueError("every single-character token of the vocabulary occurs in the texts: no free padding token")


def _args(cls, out_dir: Path, *, steps, batch_size, lr, seed, device: str, **extra):
    return cls(
        output_dir=str(out_dir),
        max_steps=POSITIVE_INT.check("steps", steps),
        per_device_train_batch_size=POSITIVE_INT.check("batch_size", batch_size),
        gradient_accumulation_steps=1,
        learning_rate=float(POSITIVE.check("lr", lr)),
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_grad_norm=0.0,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="sequential",
        dataloader_drop_last=False,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=False,
        fp16=False,
        use_cpu=not str(device).startswith("cuda"),
        **extra,
    )


def _quiet(trainer):
    """No per-step log dicts on stdout (transformers prints them when tqdm is off)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _history(trainer) -> list[dict]:
    return [{"step": int(h["step"]), "loss": float(h["loss"])} for h in trainer.state.log_history if "loss" in h]


def _finish(trainer, src: Path, out: Path) -> TrlRun:
    """Save the trained model beside its source's lab_config.json (so load_lab_from_hf reads it
    back exactly) and return the run."""
    final = out / "model"
    trainer.save_model(str(final))
    if (src / "lab_config.json").is_file():
        shutil.copy(src / "lab_config.json", final / "lab_config.json")
    return TrlRun(trainer.model.eval(), final, _history(trainer), trainer.processing_class)


def _load_causal_lm(path: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).to(device)


def trl_sft(
    export_dir,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    out_dir,
    device: str = "cpu",
) -> TrlRun:
    """trl's SFTTrainer on the exported model: the lab's `sft` (prompt + completion, loss on
    the completion tokens only) with the same batches, optimizer and steps."""
    from trl import SFTConfig, SFTTrainer

    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need equally many (>= 1) prompts and completions, got {len(prompts)} and {len(completions)}")
    src, out = Path(export_dir), Path(out_dir)
    rows = lab_batch_rows(len(prompts), steps=steps, batch_size=batch_size, seed=seed)
    ds = sft_dataset([prompts[i] for i in rows], [completions[i] for i in rows])
    tok = trl_tokenizer(src)
    args = _args(
        SFTConfig,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        completion_only_loss=True,
        shuffle_dataset=False,
        packing=False,
        max_length=None,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=_load_causal_lm(src, device), args=args, train_dataset=ds, processing_class=tok)
    _quiet(trainer).train()
    return _finish(trainer, src, out)


def _pairs_dataset(pairs: Sequence[PreferencePair], rows: Sequence[int]):
    return preference_dataset([pairs[i] for i in rows])


def trl_dpo(
    export_dir,
    pairs: Sequence[PreferencePair],
    *,
    beta: float,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    out_dir,
    device: str = "cpu",
) -> TrlRun:
    """trl's DPOTrainer (loss "sigmoid", Rafailov et al.) from the exported model against a
    frozen copy of it as the reference: the lab's `dpo` with the same batches and steps."""
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("trl_dpo needs at least one preference pair, got none")
    src, out = Path(export_dir), Path(out_dir)
    rows = lab_batch_rows(len(pairs), steps=steps, batch_size=batch_size, seed=seed)
    args = _args(
        DPOConfig,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        beta=float(POSITIVE.check("beta", beta)),
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        max_length=None,
        dataset_num_proc=None,
    )
    ref = _load_causal_lm(src, device).eval()
    trainer = DPOTrainer(
        model=_load_causal_lm(src, device),
        ref_model=ref,
        args=args,
        train_dataset=_pairs_dataset(pairs, rows),
        processing_class=trl_tokenizer(src),
    )
    _quiet(trainer).train()
    return _finish(trainer, src, out)


def reward_classifier(export_dir, *, pad_token_id: int, device: str = "cpu"):
    """The exported trunk as a Hugging Face sequence classifier with one output: the score
    head (bias-free) starts at zero, as the lab's RewardModel head does."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(export_dir), local_files_only=True, num_labels=1, dtype=torch.float32, pad_token_id=pad_token_id
    ).to(device)
    head = model.score if hasattr(model, "score") else model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return model


def trl_reward_model(
    export_dir,
    pairs: Sequence[PreferencePair],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    out_dir,
    pad: str | None = None,
    device: str = "cpu",
) -> TrlRun:
    """trl's RewardTrainer (Bradley-Terry loss) on the exported trunk with a zero score head:
    the lab's `train_reward_model` with the same batches and steps. `pad` defaults to a token
    that occurs in no pair; the run's `model` is the sequence classifier."""
    from trl import RewardConfig, RewardTrainer

    if not pairs:
        raise ValueError("trl_reward_model needs at least one preference pair, got none")
    src, out = Path(export_dir), Path(out_dir)
    tok = trl_tokenizer(src)
    pad = pad if pad is not None else unused_token(tok, [p.prompt + p.chosen + p.rejected for p in pairs])
    tok.pad_token = pad
    rows = lab_batch_rows(len(pairs), steps=steps, batch_size=batch_size, seed=seed)
    args = _args(
        RewardConfig,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        max_length=None,
        center_rewards_coefficient=None,
        dataset_num_proc=None,
    )
    trainer = RewardTrainer(
        model=reward_classifier(src, pad_token_id=tok.pad_token_id, device=device),
        args=args,
        train_dataset=_pairs_dataset(pairs, rows),
        processing_class=tok,
    )
    _quiet(trainer).train()
    final = out / "model"
    trainer.save_model(str(final))
    return TrlRun(trainer.model.eval(), final, _history(trainer), tok)


@torch.no_grad()
def hf_rewards(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], *, batch_size: int = 256):
    """(N,) rewards of a Hugging Face sequence classifier for prompt + completion, right-padded
    with the tokenizer's pad token (the classifier reads the last token that is not padding)."""
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        out = []
        for s in range(0, len(prompts), batch_size):
            texts = [p + c for p, c in zip(prompts[s : s + batch_size], completions[s : s + batch_size])]
            enc = tokenizer(texts, padding=True, return_tensors="pt")
            out.append(model(**{k: v.to(dev) for k, v in enc.items()}).logits.squeeze(-1).float().cpu())
        return torch.cat(out)
    finally:
        model.train(was)


def hf_pairwise_accuracy(model, tokenizer, pairs: Sequence[PreferencePair]) -> float:
    """Share of pairs whose chosen completion gets the higher reward (a tie counts half), as
    the lab's `pairwise_accuracy`."""
    if not pairs:
        raise ValueError("hf_pairwise_accuracy needs at least one pair, got none")
    prompts = [p.prompt for p in pairs]
    rc = hf_rewards(model, tokenizer, prompts, [p.chosen for p in pairs])
    rr = hf_rewards(model, tokenizer, prompts, [p.rejected for p in pairs])
    return float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean())
