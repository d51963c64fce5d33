"""Curriculum 16: synthetic data — train a model on text sampled from a lab model, for
several generations, and watch what happens to its loss on real text and to the diversity
of what it writes (model collapse, Shumailov et al. 2024); then keep half of every
generation's training text real and see whether that halts the drift."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from lab.data import prepare
from lab.inspect.texts import windows
from lab.report import at_least, at_most, greater_than, less_than, prediction
from lab.synthetic import collapse_chain, diversity, inject_noise, noisy_text, repeated_corpus, units
from lab.train import evaluate

pytestmark = [pytest.mark.curriculum, pytest.mark.m16_synthetic_data]

TEMPERATURE = 1.0  # plain sampling: any collapse comes from finite samples and fitting error, not a sharpened sampler
REAL_FRACTION = 0.5  # the mixed condition: half of every generation's training text is real
CONDITIONS = {"synthetic": 0.0, "mixed": REAL_FRACTION}
LABELS = {"synthetic": "synthetic only", "mixed": f"{REAL_FRACTION:.0%} real + sampled"}
DIVERSITY = {  # metric: axis label
    "distinct4": "character distinct-4",
    "char_entropy_bits": "character unigram entropy (bits)",
    "word_coverage": "share of a real text's word types present",
    "real_word_fraction": "share of words that are real Shakespeare words",
}


def scale(lab):
    return lab.profile.synthetic


class CollapseBench:
    """Both chains for every seed, run once and shared by the module's hypotheses.
    chains[seed][condition] is a list of lab.synthetic.Generation (gen 0 shared)."""

    def __init__(self, lab, char_data):
        self.lab, self.s = lab, scale(lab)
        s, tok = self.s, char_data.tokenizer
        self.config = lab.model_config(char_data, s.model)
        self.real_text = tok.decode(char_data.train.tolist())
        self.real_words = set(units(self.real_text, "word"))
        # diversity references: unseen real text of the sample's length
        self.val_ref = tok.decode(char_data.val[: s.sample_chars].tolist())
        real_slice = self.real_text[s.n_chars : s.n_chars + s.sample_chars]
        self.real_metrics = self.measure(real_slice)
        self.real_sample = real_slice

        def evaluate_real(model):
            model = model.to(lab.device)
            return evaluate(
                model,
                char_data.val,
                block_size=s.model.block_size,
                batch_size=s.eval_batch_size,
                n_batches=s.eval_batches,
                device=lab.device,
            )

        self.chains = {}
        for seed in lab.seeds:

            def train(data, generation, seed=seed):
                return lab.pretrain(
                    data,
                    self.config,
                    seed=seed,
                    max_steps=s.steps,
                    batch_size=s.batch_size,
                    lr=s.lr,
                    warmup_steps=s.warmup_steps,
                    eval_interval=s.steps,
                    eval_batches=s.train_eval_batches,
                ).model

            kw = dict(
                real_text=self.real_text,
                tokenizer=tok,
                train=train,
                evaluate=evaluate_real,
                generations=s.generations,
                n_chars=s.n_chars,
                temperature=TEMPERATURE,
                seed=seed,
                sample_chars=s.sample_chars,
                val_fraction=s.val_fraction,
                n_streams=s.n_streams,
            )
            syn = collapse_chain(real_fraction=0.0, **kw)
            mixed = collapse_chain(real_fraction=REAL_FRACTION, first=syn[0], **kw)
            self.chains[seed] = {"synthetic": syn, "mixed": mixed}
        self._div = {}

    def measure(self, text: str) -> dict:
        return diversity(text[: self.s.sample_chars], reference=self.val_ref, vocabulary=self.real_words)

    def losses(self, seed, cond) -> list[float]:
        return [g.real_val_loss for g in self.chains[seed][cond]]

    def div(self, seed, cond) -> list[dict]:
        if (seed, cond) not in self._div:
            self._div[(seed, cond)] = [self.measure(g.sample) for g in self.chains[seed][cond]]
        return self._div[(seed, cond)]

    def mean_over_seeds(self, fn) -> list[float]:
        per_seed = [fn(seed) for seed in self.lab.seeds]
        return [sum(col) / len(col) for col in zip(*per_seed)]


@pytest.fixture(scope="module")
def bench(lab, char_data):
    return CollapseBench(lab, char_data)


def _loss_plot(outcome, bench, name, title):
    gens = list(range(bench.s.generations))
    lines = {
        f"{LABELS[c]} (mean over seeds)": (gens, bench.mean_over_seeds(lambda seed, c=c: bench.losses(seed, c)))
        for c in CONDITIONS
    }
    outcome.plot_lines(
        name,
        lines,
        xlabel="generation (0 = trained on real text)",
        ylabel="val loss on real tiny Shakespeare (nats/char)",
        title=title,
    )


@prediction(
    "Real-text val loss rises with every synthetic-only generation: the smallest generation-to-generation "
    "rise is above 0",
    metric="synthetic_min_rise",
    expect=greater_than(0.0),
)
@prediction(
    "It degrades quickly: at least 0.03 nats/char per synthetic generation on average",
    metric="synthetic_rise_per_generation",
    expect=at_least(0.03),
)
def test_real_loss_rises_over_synthetic_generations(lab, bench, outcome, require_trained):
    """Does real-text loss rise over generations each trained on the previous model's text?

    Model collapse (Shumailov et al. 2024). Generation 0 is a small GPT (profile sizes)
    trained from scratch on the first n_chars characters of tiny Shakespeare's training
    split. Generation k trains a fresh
    model of the same size, steps and seed on n_chars characters sampled (temperature 1,
    no top-k: the model's own distribution) from generation k-1 in n_streams parallel streams,
    each extended window by window through the KV cache so every character is predicted
    with as much context as in training. Each model's training text becomes TokenData
    through lab.data.prepare with the char tokenizer of the real corpus; every generation
    is scored on the same fixed batches of the REAL validation split. Statistics, per seed:
    the smallest rise between consecutive generations, and (L_last - L_0) / (G - 1).
    Valid only if every generation-0 model trained.
    """
    s = bench.s
    rows = []
    for seed in lab.seeds:
        losses = bench.losses(seed, "synthetic")
        for k, loss in enumerate(losses):
            outcome.record(f"synthetic_gen{k}_val_loss", loss, seed=seed, unit="nats/char")
        rises = [b - a for a, b in zip(losses, losses[1:])]
        outcome.record("synthetic_min_rise", min(rises), seed=seed, unit="nats/char")
        outcome.record(
            "synthetic_rise_per_generation",
            (losses[-1] - losses[0]) / (len(losses) - 1),
            seed=seed,
            unit="nats/char per generation",
        )
        rows.append({"seed": seed, **{f"gen {k}": round(v, 4) for k, v in enumerate(losses)}})
    _loss_plot(outcome, bench, "real_val_loss_vs_generation", "Real-text val loss over generations")
    outcome.table(
        "synthetic_losses",
        rows,
        caption=f"Synthetic-only chain: val loss on real text (nats/char); {s.n_chars:,} training "
        f"characters and {s.steps} steps per generation",
    )
    outcome.note(
        "Sources: " + "; ".join(f"gen {g.generation}: {g.source}" for g in bench.chains[lab.seeds[0]]["synthetic"])
    )
    require_trained({s: bench.losses(s, "synthetic")[0] for s in lab.seeds}, "each seed's generation 0")


@prediction(
    "At temperature 1 an underfit model's samples are noisier than its training text, and the noise compounds: "
    "character distinct-4 of the last synthetic generation's sample is higher than gen 0's",
    metric="synthetic_distinct4_change",
    expect=greater_than(0.0),
)
@prediction(
    "The tails go: the last synthetic generation's sample contains fewer of a real text's word types than gen 0's",
    metric="synthetic_word_coverage_change",
    expect=less_than(0.0),
)
@prediction(
    "Fewer of the sampled words are real Shakespeare words at the last synthetic generation than at gen 0",
    metric="synthetic_real_word_fraction_change",
    expect=less_than(0.0),
)
def test_diversity_over_synthetic_generations(lab, bench, outcome, require_trained):
    """How does the diversity of what each generation writes change over synthetic generations?

    From each generation's model (the chains of the loss hypothesis), sample_chars
    characters sampled at temperature 1 are measured: character distinct-4 (unique 4-grams
    / all 4-grams), character unigram entropy (bits), word-type coverage (the share of the
    word types of an equal-length stretch of the real validation text that the sample
    contains) and the share of the sample's words that occur in the real training split.
    All texts have the same length, since distinct-n falls with length. An unseen stretch
    of real training text of that length is the reference. Statistics, per seed: last
    synthetic generation minus generation 0. Valid only if every generation-0 model trained.
    """
    s = bench.s
    for metric, value in bench.real_metrics.items():
        outcome.record(f"real_{metric}", value, deterministic=True)  # a fixed stretch of real text
    for seed in lab.seeds:
        for cond in CONDITIONS:
            for k, m in enumerate(bench.div(seed, cond)):
                if k == 0 and cond == "mixed":
                    continue  # gen 0 is shared
                for metric in DIVERSITY:
                    outcome.record(f"{cond}_gen{k}_{metric}", m[metric], seed=seed)
        first, last = bench.div(seed, "synthetic")[0], bench.div(seed, "synthetic")[-1]
        for metric in DIVERSITY:
            outcome.record(f"synthetic_{metric}_change", last[metric] - first[metric], seed=seed)

    gens = list(range(s.generations))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (metric, label) in zip(axes.flat, DIVERSITY.items()):
        for cond in CONDITIONS:
            ax.plot(
                gens,
                bench.mean_over_seeds(lambda seed, c=cond, metric=metric: [m[metric] for m in bench.div(seed, c)]),
                marker="o",
                label=LABELS[cond],
            )
        ax.axhline(bench.real_metrics[metric], color="gray", linestyle="--", label="real text")
        ax.set_xlabel("generation")
        ax.set_ylabel(label)
        ax.set_xticks(gens)
    axes.flat[0].legend()
    fig.suptitle(f"Diversity of {s.sample_chars:,}-character samples (mean over seeds), temperature {TEMPERATURE}")
    outcome.plot("diversity_vs_generation", fig)

    seed = lab.seeds[0]
    rows = [
        {
            "generation": "real",
            "condition": "real text",
            "val loss": "",
            "distinct-4": round(bench.real_metrics["distinct4"], 3),
            "real words": round(bench.real_metrics["real_word_fraction"], 3),
            "text": bench.real_sample[:160].replace("\n", " / "),
        }
    ]
    for cond in CONDITIONS:
        for g, m in zip(bench.chains[seed][cond], bench.div(seed, cond)):
            if g.generation == 0 and cond == "mixed":
                continue
            rows.append(
                {
                    "generation": g.generation,
                    "condition": LABELS[cond] if g.generation else "real text (gen 0)",
                    "val loss": round(g.real_val_loss, 4),
                    "distinct-4": round(m["distinct4"], 3),
                    "real words": round(m["real_word_fraction"], 3),
                    "text": g.sample[:160].replace("\n", " / "),
                }
            )
    outcome.table(
        "samples", rows, caption=f"The first 160 characters each generation wrote (seed {seed}; ' / ' marks a newline)"
    )
    require_trained({s: bench.losses(s, "synthetic")[0] for s in lab.seeds}, "each seed's generation 0")


@prediction(
    "The mixed chain ends with lower real-text val loss than the synthetic-only chain",
    metric="mixed_last_val_loss",
    expect=less_than("synthetic_last_val_loss"),
)
@prediction(
    "Mixing halts the drift: the mixed chain's last generation-to-generation rise in real-text val loss is at most "
    "{bound} nats/char (no rise beyond run-to-run noise)",
    metric="mixed_last_step_rise",
    expect=at_most(0.005),
)
@prediction(
    "The mixed chain levels off: its last generation-to-generation rise is smaller than the synthetic chain's",
    metric="mixed_last_step_rise",
    expect=less_than("synthetic_last_step_rise"),
)
@prediction(
    "More of the mixed chain's last sample is real words than of the synthetic chain's last sample",
    metric="mixed_last_real_word_fraction",
    expect=greater_than("synthetic_last_real_word_fraction"),
)
def test_mixing_real_data_halts_collapse(lab, bench, outcome, require_trained):
    """Does keeping half of every generation's training text real halt the drift?

    The mixed chain starts from the same generation 0 as the synthetic-only chain; its
    generation k trains on n_chars characters of which half are the first real characters
    gen 0 trained on (the same real text every generation) and half are sampled from mixed
    generation k-1, interleaved in 2,000-character chunks so the trainer's tail
    validation split holds both. Everything else (model, steps, seed, sampling) is as in
    the synthetic-only chain, and every generation is scored on the same fixed batches of
    the real validation split. Statistics, per seed: the last generations' losses, paired;
    the mixed chain's last loss minus gen 0's; each chain's last generation-to-generation
    rise; each chain's last sample's share of real words. "Halts" is judged on the mixed
    chain's last rise, which a halted chain keeps within run-to-run noise (0.005
    nats/char, about the spread of one generation's loss over seeds); a chain whose loss
    still rises every generation has not halted, however close to gen 0 it still is.
    Valid only if every generation-0 model trained.
    """
    rows = []
    for seed in lab.seeds:
        syn, mixed = bench.losses(seed, "synthetic"), bench.losses(seed, "mixed")
        outcome.record("gen0_val_loss", syn[0], seed=seed, unit="nats/char")
        for k, loss in enumerate(mixed[1:], start=1):
            outcome.record(f"mixed_gen{k}_val_loss", loss, seed=seed, unit="nats/char")
        for cond, losses in (("synthetic", syn), ("mixed", mixed)):
            outcome.record(f"{cond}_last_val_loss", losses[-1], seed=seed, unit="nats/char")
            outcome.record(f"{cond}_last_minus_gen0", losses[-1] - losses[0], seed=seed, unit="nats/char")
            outcome.record(f"{cond}_last_step_rise", losses[-1] - losses[-2], seed=seed, unit="nats/char")
            outcome.record(
                f"{cond}_last_real_word_fraction", bench.div(seed, cond)[-1]["real_word_fraction"], seed=seed
            )
        for cond, losses in (("synthetic", syn), ("mixed", mixed)):
            rows.append(
                {"seed": seed, "condition": LABELS[cond], **{f"gen {k}": round(v, 4) for k, v in enumerate(losses)}}
            )
    _loss_plot(outcome, bench, "real_val_loss_mixed_vs_synthetic", "Mixing real data into every generation")
    outcome.table("losses", rows, caption="Val loss on real text (nats/char) per generation")
    outcome.note(
        "Mixed sources: " + "; ".join(f"gen {g.generation}: {g.source}" for g in bench.chains[lab.seeds[0]]["mixed"])
    )
    require_trained({s: bench.losses(s, "synthetic")[0] for s in lab.seeds}, "each seed's generation 0")


# ---------------------------------------------------------------- noise injection and deduplication


class QualityBench:
    """Models of the collapse study's size and budget (profile.synthetic) trained from
    scratch on a given training text, once per (text, seed); a real-text model trained
    on the first n_chars characters is the collapse chains' generation 0 (the same run)."""

    def __init__(self, lab, char_data):
        self.lab, self.s, self.data = lab, scale(lab), char_data
        self.q = lab.profile.data_quality
        self.config = lab.model_config(char_data, self.s.model)
        self.real_text = char_data.tokenizer.decode(char_data.train.tolist())
        self._models = {}

    def train(self, text: str, seed: int):
        key = (hash(text), seed)
        if key not in self._models:
            s = self.s
            data = prepare(text=text, tokenizer=self.data.tokenizer, val_fraction=s.val_fraction)
            self._models[key] = self.lab.pretrain(
                data,
                self.config,
                seed=seed,
                max_steps=s.steps,
                batch_size=s.batch_size,
                lr=s.lr,
                warmup_steps=s.warmup_steps,
                eval_interval=s.steps,
                eval_batches=s.train_eval_batches,
            )
        return self._models[key]

    def loss_on(self, run, tokens) -> float:
        """Mean loss of the run's model on fixed random batches of `tokens` (real text: the validation split)."""
        s = self.s
        return evaluate(
            run.model.to(self.lab.device),
            np.asarray(tokens),
            block_size=s.model.block_size,
            batch_size=s.eval_batch_size,
            n_batches=s.eval_batches,
            device=self.lab.device,
        )

    @torch.no_grad()
    def noisy_context_loss(self, run) -> float:
        """Loss on the clean next character of fixed validation windows whose inputs carry
        the profile's noise rate (the same noise for every model)."""
        s, model = self.s, run.model.to(self.lab.device).eval()
        x, y = windows(self.data.val, s.eval_batches * s.eval_batch_size, s.model.block_size)
        x = inject_noise(x, self.q.noise_rate, self.data.vocab_size, generator=torch.Generator().manual_seed(4321))
        return float(model(x.to(self.lab.device), y.to(self.lab.device))[1])


@pytest.fixture(scope="module")
def quality(lab, char_data):
    return QualityBench(lab, char_data)


@prediction(
    "A model trained on text with 5% of its characters replaced by random ones predicts the clean next character "
    "after a noisy context better than a model trained on clean text",
    metric="noisy_context_loss_noise_trained",
    expect=less_than("noisy_context_loss_clean_trained"),
)
@prediction(
    "Noise injection has a price on clean text: the noise-trained model's clean validation loss is higher",
    metric="val_loss_noise_trained",
    expect=greater_than("val_loss_clean_trained"),
)
def test_noise_injection_buys_robustness(lab, char_data, quality, outcome, require_trained):
    """Does training on noisy text make a model robust to noise, and at what cost?

    Train the collapse study's small GPT (same budget, from scratch) on the first n_chars
    characters of the real training text, clean, and with a share of its characters (5%
    on the cpu profile) replaced by characters drawn uniformly from the vocabulary. Score
    both on the clean validation text, and on fixed validation windows whose inputs carry
    the same rate of noise while the targets are the clean next characters (the same
    noise for both models). Paired by seed. Valid only if both models trained (their
    clean validation loss below the unigram entropy by a margin).
    """
    q, s = quality.q, quality.s
    clean_text = quality.real_text[: s.n_chars]
    runs = {"clean_trained": {}, "noise_trained": {}}
    for seed in lab.seeds:
        noisy = noisy_text(clean_text, char_data.tokenizer, q.noise_rate, seed=seed)
        for label, text in (("clean_trained", clean_text), ("noise_trained", noisy)):
            run = quality.train(text, seed)
            runs[label][seed] = quality.loss_on(run, char_data.val)
            outcome.record(f"val_loss_{label}", runs[label][seed], seed=seed, unit="nats/char")
            outcome.record(f"noisy_context_loss_{label}", quality.noisy_context_loss(run), seed=seed, unit="nats/char")
    outcome.note(f"noise rate {q.noise_rate:.0%} of characters, in training and in the noisy evaluation")
    require_trained(runs, "both models (clean validation loss)")


@prediction(
    "At the same steps, the deduplicated text trains a model with lower validation loss than the same text with "
    "its repeated passage left in",
    metric="val_loss_deduplicated",
    expect=less_than("val_loss_with_repeats"),
)
@prediction(
    "Repeats are memorised: the repeated passage's loss falls further below the validation loss with the repeats "
    "left in than after deduplication",
    metric="memorisation_gap_with_repeats",
    expect=greater_than("memorisation_gap_deduplicated"),
)
def test_deduplication_against_overfitting(lab, char_data, quality, outcome, require_trained):
    """Does deduplicating the training text prevent overfitting to what it repeats?

    Build a training text of n_chars characters in which a share (50% on the cpu
    profile) is one passage of real text repeated many times (50), its copies spread
    evenly between slices of unique real text, and its exact deduplication (the
    repeated copies dropped, the passage kept once: the same unique content). Train the
    collapse study's small GPT on each for the same steps, from scratch. Score each on
    the real validation text and on the repeated passage; the memorisation gap is
    validation loss minus passage loss. Paired by seed. Valid only if both models
    trained (validation loss below the unigram entropy by a margin).
    """
    q, s = quality.q, quality.s
    corpus = repeated_corpus(
        quality.real_text, n_chars=s.n_chars, repeated_fraction=q.repeated_fraction, repeats=q.repeats
    )
    passage = char_data.tokenizer.encode(corpus.passage)
    runs = {"with_repeats": {}, "deduplicated": {}}
    for seed in lab.seeds:
        for label, text in (("with_repeats", corpus.with_repeats), ("deduplicated", corpus.deduplicated)):
            run = quality.train(text, seed)
            val = quality.loss_on(run, char_data.val)
            runs[label][seed] = val
            outcome.record(f"val_loss_{label}", val, seed=seed, unit="nats/char")
            outcome.record(f"memorisation_gap_{label}", val - quality.loss_on(run, passage), seed=seed, unit="nats")
    outcome.note(
        f"{len(corpus.with_repeats):,} characters with a {len(corpus.passage):,}-character passage repeated "
        f"{q.repeats} times; {len(corpus.deduplicated):,} after deduplication"
    )
    require_trained(runs, "both models (validation loss)")
