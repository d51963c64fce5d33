"""Curriculum 16: synthetic data — train a model on text sampled from a lab model, for
several generations, and watch what happens to its loss on real text and to the diversity
of what it writes (model collapse, Shumailov et al. 2024); then keep half of every
generation's training text real and see whether that halts the drift."""

import matplotlib.pyplot as plt
import pytest

from lab.report import at_least, at_most, greater_than, less_than, prediction
from lab.synthetic import collapse_chain, diversity, units
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
