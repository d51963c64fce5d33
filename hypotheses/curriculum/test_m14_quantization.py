"""Curriculum 14: quantization — post-training int8 / int4 / int3 / 2-bit weights of a
trained lab model (round-to-nearest per channel, and bitsandbytes LLM.int8, NF4 and FP4),
what each costs in validation loss and saves in weight bytes, and quantization-aware
training that fine-tunes through fake int4 weights."""

import copy

import pytest

from lab.finetune import hf_loss
from lab.models import export_hf
from lab.models.hf import load_hf_causal_lm
from lab.paths import cache_dir
from lab.quantize import BNB_METHODS, hf_weight_bytes, load_bnb, qat_finetune, quantize_rtn
from lab.report import at_least, at_most, greater_than, less_than, prediction
from lab.session import weights_hash
from lab.train import evaluate

pytestmark = [pytest.mark.curriculum, pytest.mark.m14_quantization]

RTN_BITS = (8, 4, 3, 2)  # round-to-nearest widths compared
QAT_BITS = 4  # the width quantization-aware training targets
BNB_LABELS = {"int8": "bitsandbytes LLM.int8", "nf4": "bitsandbytes NF4", "fp4": "bitsandbytes FP4"}


class QuantBench:
    """The trained model per seed and its losses on fixed validation batches, computed
    once and shared by the module's hypotheses."""

    def __init__(self, lab, char_data, llama_runs):
        self.lab, self.data, self.runs = lab, char_data, llama_runs
        self.kv = lab.profile.inference.kv_heads[1]  # the GQA model (2 KV heads on every profile)
        self.s = lab.profile.quantization
        self._models, self._losses, self._reports, self._exports = {}, {}, {}, {}

    def model(self, seed):
        """A private copy (the shared run's model stays on the CPU for other hypotheses)."""
        if seed not in self._models:
            self._models[seed] = copy.deepcopy(self.runs(self.kv, seed).model).to(self.lab.device).eval()
        return self._models[seed]

    @property
    def block_size(self) -> int:
        return self.model(self.lab.seeds[0]).config.block_size

    def loss(self, model) -> float:
        """Mean val loss (nats/char) over the profile's fixed batches (generator seed 1234)."""
        return evaluate(
            model,
            self.data.val,
            block_size=model.config.block_size,
            batch_size=self.s.eval_batch_size,
            n_batches=self.s.eval_batches,
            device=self.lab.device,
        )

    def hf_loss(self, hf_model) -> float:
        """The same batches through a Hugging Face model."""
        return hf_loss(
            hf_model,
            self.data.val,
            block_size=self.block_size,
            batch_size=self.s.eval_batch_size,
            n_batches=self.s.eval_batches,
        )

    def rtn(self, seed, bits):
        """(val loss, QuantReport or None) of the seed's model, bits=None for float32."""
        key = (seed, bits)
        if key not in self._losses:
            if bits is None:
                self._losses[key] = self.loss(self.model(seed))
            else:
                q, report = quantize_rtn(self.model(seed), bits)
                self._losses[key], self._reports[key] = self.loss(q), report
        return self._losses[key], self._reports.get(key)

    def export(self, seed):
        """The seed's model as a LlamaForCausalLM directory, written once per weights hash."""
        if seed not in self._exports:
            m = self.runs(self.kv, seed).model
            path = cache_dir("hf-exports", "m14-" + weights_hash(m))
            if not (path / "config.json").exists():
                export_hf(m, path)
            self._exports[seed] = path
        return self._exports[seed]


@pytest.fixture(scope="module")
def bench(lab, char_data, llama_runs):
    return QuantBench(lab, char_data, llama_runs)


@prediction(
    "int8 round-to-nearest per-channel weights cost at most 0.01 nats/char of val loss",
    metric="rtn_int8_delta",
    expect=at_most(0.01),
)
@prediction(
    "int4 round-to-nearest per-channel weights cost a measurable amount: at least 0.01 nats/char",
    metric="rtn_int4_delta",
    expect=at_least(0.01),
)
@prediction(
    "int3 costs more than int4 (the loss rises as bits fall)",
    metric="rtn_int3_delta",
    expect=greater_than("rtn_int4_delta"),
)
@prediction(
    "2-bit (ternary) round-to-nearest weights are catastrophic: val loss rises by at least 0.5 nats/char",
    metric="rtn_int2_delta",
    expect=at_least(0.5),
)
def test_rtn_loss_vs_bits(lab, bench, outcome, require_trained):
    """How much validation loss does round-to-nearest weight quantization cost at 8, 4, 3 and 2 bits?

    Take the trained Llama-style GQA model (the inference hypotheses' model, profile
    sizes and steps) of each seed and quantize every Linear weight of its blocks to 8, 4,
    3 and 2 bits: symmetric, one scale per output channel (s = max|w_row| / (2^(b-1) - 1)),
    round to nearest, map back to floats. Embeddings, norms and the output head (tied to
    the embedding) stay float32. The statistic is the val-loss increase over the float32
    model, on the same fixed validation batches, paired by seed. Weight bytes are those
    of the quantized matrices stored as packed b-bit codes plus one fp16 scale per row.
    Valid only if every float32 model trained.
    """
    by_bits, bytes_by_bits = {}, {}
    for seed in lab.seeds:
        base, _ = bench.rtn(seed, None)
        outcome.record("val_loss_fp32", base, seed=seed, unit="nats/char")
        for bits in RTN_BITS:
            loss, report = bench.rtn(seed, bits)
            outcome.record(f"rtn_int{bits}_delta", loss - base, seed=seed, unit="nats/char")
            by_bits.setdefault(seed, {})[bits] = loss
            bytes_by_bits[bits] = report.weight_bytes
            float_bytes = report.float_weight_bytes
    for bits in RTN_BITS:
        outcome.record(f"rtn_int{bits}_weight_bytes", bytes_by_bits[bits], unit="bytes", deterministic=True)
    outcome.record("fp32_weight_bytes", float_bytes, unit="bytes", deterministic=True)
    require_trained({sd: bench.rtn(sd, None)[0] for sd in lab.seeds}, "each seed's float32 model")

    bits_axis = [32, *RTN_BITS]
    curves = {f"seed {s}": (bits_axis, [bench.rtn(s, None)[0]] + [by_bits[s][b] for b in RTN_BITS]) for s in lab.seeds}
    outcome.plot_lines(
        "loss_vs_bits",
        curves,
        xlabel="bits per weight (32 = float32)",
        ylabel="val loss (nats/char)",
        title="Round-to-nearest per-channel quantization",
        logx=True,
        logy=True,
    )
    byte_axis = [float_bytes] + [bytes_by_bits[b] for b in RTN_BITS]
    curves = {f"seed {s}": (byte_axis, [bench.rtn(s, None)[0]] + [by_bits[s][b] for b in RTN_BITS]) for s in lab.seeds}
    outcome.plot_lines(
        "loss_vs_bytes",
        curves,
        xlabel="bytes of the block weight matrices",
        ylabel="val loss (nats/char)",
        title="Loss vs weight bytes: float32, int8, int4, int3, 2-bit",
        logx=True,
        logy=True,
    )
    outcome.table(
        "rtn",
        [
            {
                "bits": b,
                "weight bytes": bytes_by_bits[b],
                "compression vs fp32": round(float_bytes / bytes_by_bits[b], 2),
                **{f"Δ loss seed {s}": round(by_bits[s][b] - bench.rtn(s, None)[0], 4) for s in lab.seeds},
            }
            for b in RTN_BITS
        ],
        caption="Round-to-nearest per-channel: bytes of the quantized matrices and val-loss increase (nats/char)",
    )


@prediction(
    "bitsandbytes LLM.int8 costs at most 0.01 nats/char of val loss",
    metric="bnb_int8_delta",
    expect=at_most(0.01),
)
@prediction(
    "NF4 (4-bit NormalFloat, a scale per 64 weights) loses less than round-to-nearest int4 per channel",
    metric="bnb_nf4_delta",
    expect=less_than("rtn_int4_delta"),
)
@prediction(
    "NF4 loses less than FP4 at the same 4 bits and block size (QLoRA's finding)",
    metric="bnb_nf4_delta",
    expect=less_than("bnb_fp4_delta"),
)
def test_bitsandbytes_vs_rtn(lab, bench, outcome, require_trained):
    """Do bitsandbytes int8, NF4 and FP4 lose less than round-to-nearest at the same bits?

    Export each seed's trained model (as in the RTN hypothesis) to Hugging Face's
    LlamaForCausalLM and load it four ways through transformers: float32, LLM.int8
    (per-row absmax int8 weights, int8 activations with float16 outlier columns above
    6.0), NF4 and FP4 (4-bit codes with a scale per block of 64 weights, the scales
    themselves 8-bit double-quantized, float32 compute). transformers leaves the output
    head unquantized, as the RTN hypothesis does. The statistic is each method's val-loss
    increase over the float32 export (the same fixed batches), paired by seed with the
    lab model's RTN int4 / int8 increase. Weight bytes count the stored codes plus their
    scales (bitsandbytes' quant state), as measured from the loaded tensors. Valid only
    if every float32 model trained and its Hugging Face export scores the same loss as
    the lab model (within 1e-4 nats/char), so that the two baselines are one.
    """
    rows, bytes_of, deltas, export_gap = [], {}, {}, {}
    for seed in lab.seeds:
        path = bench.export(seed)
        hf32 = load_hf_causal_lm(path, device=lab.device)[0]
        base = bench.hf_loss(hf32)
        bytes_of["float32"] = hf_weight_bytes(hf32)
        lab_base = bench.rtn(seed, None)[0]
        export_gap[seed] = abs(base - lab_base)
        row = {"seed": seed, "float32 (HF)": round(base, 4), "float32 (lab)": round(lab_base, 4)}
        for method in BNB_METHODS:
            q = load_bnb(path, method, device=lab.device)
            loss = bench.hf_loss(q)
            bytes_of[method] = hf_weight_bytes(q)
            outcome.record(f"bnb_{method}_delta", loss - base, seed=seed, unit="nats/char")
            deltas.setdefault(method, []).append(loss - base)
            row[BNB_LABELS[method]] = round(loss, 4)
            del q
        for bits in (8, 4):
            loss, report = bench.rtn(seed, bits)
            outcome.record(f"rtn_int{bits}_delta", loss - lab_base, seed=seed, unit="nats/char")
            deltas.setdefault(f"rtn{bits}", []).append(loss - lab_base)
            bytes_of[f"rtn{bits}"] = report
            row[f"RTN int{bits}"] = round(loss, 4)
        rows.append(row)
    n = bytes_of["float32"].float_weight_bytes / 4  # weights in the quantized matrices
    bpw = {m: 8 * bytes_of[m].weight_bytes / n for m in ("float32", *BNB_METHODS, "rtn8", "rtn4")}
    for m, v in bpw.items():
        outcome.record(f"{m}_bits_per_weight", v, unit="bits", deterministic=True)
    require_trained({sd: bench.rtn(sd, None)[0] for sd in lab.seeds}, "each seed's float32 model")
    outcome.require(
        "the Hugging Face export scores the lab model's loss",
        all(g < 1e-4 for g in export_gap.values()),
        "|float32 loss (HF) - float32 loss (lab)| per seed: " + ", ".join(f"{g:.2e}" for g in export_gap.values()),
    )
    outcome.table("losses", rows, caption="Val loss (nats/char) on the same fixed batches")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    points = {
        "RTN per channel (int8, int4)": ([bpw["rtn8"], bpw["rtn4"]], [mean(deltas["rtn8"]), mean(deltas["rtn4"])]),
        **{BNB_LABELS[m]: ([bpw[m]], [mean(deltas[m])]) for m in BNB_METHODS},
    }
    outcome.plot_lines(
        "delta_vs_bits_per_weight",
        points,
        xlabel="stored bits per weight (codes + scales)",
        ylabel="val-loss increase (nats/char), mean over seeds",
        title="bitsandbytes vs round-to-nearest",
        hlines={"float32": 0.0},
    )


@prediction(
    "Fine-tuning through fake int4 weights (QAT) closes at least 30% of the int4 quantization gap "
    "left after the same amount of plain fine-tuning",
    metric="gap_closed",
    expect=at_least(0.3),
)
@prediction(
    "The QAT int4 model beats plain fine-tuning for the same steps followed by RTN int4",
    metric="qat_int4_loss",
    expect=less_than("control_int4_loss"),
)
def test_qat_recovers_int4_loss(lab, bench, char_data, outcome, require_trained):
    """Does quantization-aware training (fine-tuning through fake int4 weights) recover int4's loss?

    From each seed's trained model (as in the RTN hypothesis), fine-tune two copies on
    the training split for the profile's QAT steps with identical batches, AdamW,
    warmup and cosine schedule: (1) QAT — every block Linear computes with its weights
    rounded to int4 per channel in the forward pass, the rounding skipped in the
    backward pass (straight-through estimator); the result is deployed with those int4
    weights; (2) the control — the same fine-tuning in float32, then RTN int4. The
    control separates what QAT buys from what more training buys. With L the val loss
    on fixed batches: gap_closed = (L(control, int4) - L(QAT, int4)) /
    (L(control, int4) - L(control, float32)): 1 means QAT's int4 model is as good as the
    float32 model trained as long, 0 means no better than quantizing after training.
    Also recorded: the naive recovery (L(base, int4) - L(QAT, int4)) / (L(base, int4) -
    L(base, float32)), which credits the extra training to QAT. Valid only if every
    float32 model trained and the control's int4 gap, the denominator of gap_closed, is
    positive in every seed.
    """
    s = bench.s
    rows, curves, gaps = [], {}, {}
    for seed in lab.seeds:
        model = bench.model(seed)
        base, _ = bench.rtn(seed, None)
        base_q, _ = bench.rtn(seed, QAT_BITS)
        kw = dict(
            steps=s.qat_steps,
            lr=s.qat_lr,
            batch_size=s.qat_batch_size,
            block_size=bench.block_size,
            seed=seed,
            warmup_steps=s.qat_warmup_steps,
        )
        h_qat, h_ctl = [], []
        qat = qat_finetune(model, char_data.train, QAT_BITS, history=h_qat, **kw)
        control = qat_finetune(model, char_data.train, None, history=h_ctl, **kw)
        l_qat = bench.loss(qat)
        l_ctl = bench.loss(control)
        l_ctl_q = bench.loss(quantize_rtn(control, QAT_BITS)[0])
        outcome.record("qat_int4_loss", l_qat, seed=seed, unit="nats/char")
        outcome.record("control_int4_loss", l_ctl_q, seed=seed, unit="nats/char")
        outcome.record("control_fp32_loss", l_ctl, seed=seed, unit="nats/char")
        outcome.record("control_int4_gap", l_ctl_q - l_ctl, seed=seed, unit="nats/char")
        gaps[seed] = l_ctl_q - l_ctl
        outcome.record("gap_closed", (l_ctl_q - l_qat) / (l_ctl_q - l_ctl), seed=seed)
        outcome.record("naive_recovery", (base_q - l_qat) / (base_q - base), seed=seed)
        rows.append(
            {
                "seed": seed,
                "base fp32": round(base, 4),
                "base RTN int4": round(base_q, 4),
                "control fp32": round(l_ctl, 4),
                "control RTN int4": round(l_ctl_q, 4),
                "QAT int4": round(l_qat, 4),
            }
        )
        if seed == lab.seeds[0]:
            for label, h in (("QAT (fake int4)", h_qat), ("plain fine-tuning", h_ctl)):
                curves[label] = ([r["step"] for r in h], [r["loss"] for r in h])
        if l_ctl_q - l_ctl < 0.005:
            outcome.note(
                f"seed {seed}: the control's int4 gap is only {l_ctl_q - l_ctl:.4f} nats/char, "
                "so gap_closed divides by little more than evaluation noise."
            )
    outcome.table("losses", rows, caption=f"Val loss (nats/char) after {s.qat_steps} fine-tuning steps")
    require_trained({sd: bench.rtn(sd, None)[0] for sd in lab.seeds}, "each seed's float32 model")
    outcome.require(
        "int4 costs the control something to recover",
        all(g > 0 for g in gaps.values()),
        "control int4 loss - control float32 loss per seed: " + ", ".join(f"{g:.4f}" for g in gaps.values()),
    )
    outcome.plot_lines(
        "qat_curves",
        curves,
        xlabel="fine-tuning step",
        ylabel="training loss (nats/char)",
        title=f"QAT vs plain fine-tuning, first seed ({s.qat_steps} steps)",
    )
