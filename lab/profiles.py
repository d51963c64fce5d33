"""Profiles: one code path, three scales.

A hypothesis reads its sizes from the active profile and never branches on the
profile's name. `smoke` runs in seconds (CI), `cpu` gives real results on a laptop
CPU, `gpu` runs larger models with more seeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ModelScale:
    """Size of a small from-scratch GPT."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int


@dataclass(frozen=True)
class PretrainingScale:
    """Sizes for the pretraining hypotheses."""

    # nanoGPT's "baby" shakespeare-char config (README: CPU run) at the cpu scale.
    baby: ModelScale
    batch_size: int
    steps: int  # optimizer steps of the headline run
    warmup_steps: int
    eval_interval: int
    eval_batches: int
    lr: float
    # shorter runs for sweeps and comparisons
    sweep_steps: int
    sweep_lrs: tuple[float, ...]
    bpe_vocab_size: int
    small_split_fraction: float = 0.1
    throughput_steps: int = 50  # steps timed per round in the throughput comparison
    throughput_rounds: int = 5  # rounds of the throughput comparison with nanoGPT (one sample each)


@dataclass(frozen=True)
class InferenceScale:
    """Sizes for the inference hypotheses (sampling, KV cache, GQA, sliding window)."""

    # Llama-style model (RoPE, RMSNorm, SwiGLU) whose K/V heads vary; trained for quality
    # comparisons, random-init for speed (speed does not depend on the weights).
    llama: ModelScale
    kv_heads: tuple[int, ...]  # MHA, GQA, MQA: (n_head, groups, 1)
    train_steps: int
    uptrain_steps: int  # MHA -> GQA conversion, then this much more training
    window: int  # sliding-window size
    decode_lengths: tuple[int, ...]  # new tokens decoded in the KV-cache benchmarks
    prompt_len: int
    timing_rounds: int  # repeats of each timed decode (samples for intervals)
    n_prompts: int  # prompts for the sampling hypotheses
    sample_len: int
    temperatures: tuple[float, ...]
    # GQA where decode is memory-bound: a wider random-init Llama-style model decoding after
    # random contexts of these lengths (its block_size must hold the longest + the new tokens)
    memory_bound: ModelScale
    context_lengths: tuple[int, ...]
    context_new_tokens: int  # tokens decoded (and timed) after each context


@dataclass(frozen=True)
class ArchitectureScale:
    """Sizes for the architecture ablations (curriculum 02, 03, 04, 08, 10, 11): one small
    GPT whose components are swapped one at a time, all trained on the same budget."""

    model: ModelScale  # n_embd divisible by 3 so GELU (4d) and SwiGLU (8d/3) match exactly
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    eval_interval: int
    eval_batches: int
    eval_contexts: tuple[int, ...]  # 02: per-position loss at these lengths (first = trained)
    head_counts: tuple[int, ...]  # 03: heads at fixed width
    head_dims: tuple[int, ...]  # 03: d_k values for attention entropy at init
    depths: tuple[int, ...]  # 04: layers for pre/post-norm and residual ablations
    depth_width: int  # 04: n_embd of the deep stacks
    depth_steps: int
    depth_lrs: tuple[float, ...]  # 04: learning rates crossed with depths
    n_expert: int  # 08
    moe_top_k: int
    probe_positions: int  # 11: token positions per probe split


@dataclass(frozen=True)
class FinetuneScale:
    """Sizes for Track A (fine-tuning through transformers + peft + bitsandbytes): a
    Llama-style GQA base pretrained on Shakespeare, fine-tuned on Milton."""

    base: ModelScale
    base_kv_heads: int
    base_steps: int
    steps: int
    batch_size: int
    eval_interval: int
    eval_batches: int
    lr: float  # the comparisons' learning rate (rank, QLoRA, forgetting)
    lrs: tuple[float, ...]  # the learning-rate sweep
    ranks: tuple[int, ...]
    replay_fraction: float
    bench_rounds: int


@dataclass(frozen=True)
class TokenizationScale:
    """Sizes for curriculum 01 (tokenization and embeddings)."""

    vocab_sizes: tuple[int, ...]  # BPE vocabularies of the compression curve (256 = bytes only)
    split_vocab: int  # the lab BPE compared with cl100k on rare words and numbers
    n_group: int  # rarest / most frequent characters compared in the embedding
    n_table: int  # frequent characters whose nearest neighbours are tabled
    k_neighbours: int


@dataclass(frozen=True)
class QuantizationScale:
    """Sizes for curriculum 14 (quantization of the inference hypotheses' trained
    Llama-style GQA model)."""

    eval_batches: int  # fixed validation batches every loss averages over
    eval_batch_size: int
    qat_steps: int  # fine-tuning updates, QAT and its plain control alike
    qat_lr: float  # peak AdamW lr (the base trained at profile.pretraining.lr, decayed to 10%)
    qat_warmup_steps: int
    qat_batch_size: int


@dataclass(frozen=True)
class SyntheticScale:
    """Sizes for curriculum 16 (synthetic data, model collapse)."""

    model: ModelScale  # every generation's GPT, trained from scratch
    batch_size: int
    steps: int  # optimizer steps per generation
    lr: float
    warmup_steps: int
    generations: int  # gen 0 (real text) plus generations - 1 trained on samples
    n_chars: int  # training text per generation (gen 0: that much real text)
    sample_chars: int  # characters of each generation's sample measured for diversity
    n_streams: int  # parallel sampling streams
    val_fraction: float  # tail of each training text the trainer validates on
    train_eval_batches: int  # the trainer's own evaluation (on the generation's text)
    eval_batches: int  # fixed batches of the real validation split every generation is scored on
    eval_batch_size: int


@dataclass(frozen=True)
class ScalingScale:
    """Sizes for curriculum 13 (scaling laws): a family of small GPTs (GPT-2 layout) on
    char-level tiny Shakespeare, every size trained at every data budget for every seed,
    each run with its own warmup + cosine schedule ending at its budget."""

    sizes: tuple[ModelScale, ...]  # >= 5 sizes, smallest first, one block_size for all
    budgets: tuple[int, ...]  # optimizer steps per run, ascending; tokens D = steps * batch_size * block_size
    batch_size: int
    lr: float  # peak AdamW lr, the same for every size (10% warmup, cosine to 10%)
    eval_batches: int  # fixed validation batches the final loss averages over
    n_boot: int  # bootstrap resamples behind each fit's intervals


@dataclass(frozen=True)
class InferenceStacksScale:
    """Sizes for curriculum 15. The speed model is the inference hypotheses' random-init
    Llama-style decode model (profile.inference.llama, n_head KV heads); the greedy-token
    check uses the trained Llama-style models (one per seed)."""

    prompt_lens: tuple[int, ...]  # first-token latency at these prompt lengths (ascending)
    new_tokens: int  # decode throughput: greedy tokens after the shortest prompt
    rounds: int  # benchmark rounds and timing rounds per hypothesis (one sample each)
    agreement_prompts: int  # validation prompts per seed for the greedy-token check
    compile_backend: str  # torch.compile backend of the torch-compile stack


@dataclass(frozen=True)
class PosttrainScale:
    """Sizes for curriculum 12 (post-training the profile's baby GPT, one per seed)."""

    sft_examples: int  # (prompt, word) pairs drawn from the training prefixes' words
    sft_steps: int
    sft_batch_size: int
    sft_lr: float  # constant AdamW lr (the base was pretrained at profile.pretraining.lr)
    max_new_tokens: int  # sampled characters per answer (the longest word + newline fits)
    pair_prompts: int  # training prompts per round of pair sampling (2 samples each, ties dropped)
    rm_eval_prompts: int  # held-out prompts whose pairs test the reward model
    rm_sizes: tuple[int, ...]  # training pairs per reward model, ascending; the largest set also trains DPO
    rm_steps: int  # the same optimizer steps for every size
    rm_batch_size: int
    rm_lr: float
    dpo_betas: tuple[float, ...]  # descending
    dpo_beta: float  # the score hypothesis' beta (one of dpo_betas; its prediction says 0.1)
    dpo_steps: int
    dpo_batch_size: int
    dpo_lr: float
    eval_prompts: int  # held-out prompts (one sample each) behind every score, format and KL number
    example_rows: int  # rows of the example-completions table


@dataclass(frozen=True)
class InspectScale:
    """Sizes for Tracks B and C (attention and residual-stream inspection). They look inside
    models other hypotheses train (the baby GPT, Track A's base and fine-tuned models) and
    the pretrained MiniLM, so they train nothing themselves."""

    n_windows: int  # validation windows (the model's context long) each statistic averages over
    probe_windows: int  # windows per probe split (train, test); one sample per position
    induction_period: int  # length of the random token sequence that then repeats
    induction_batches: int  # random repeated sequences per model
    minilm_sentences: int  # lines of real text run through MiniLM


@dataclass(frozen=True)
class BayesScale:
    """Sizes for Track D (Bayesian wind tunnels, arXiv 2512.22471). The paper: bijection
    V=20 with 19 keys, 6 layers x 6 heads x d192 (2.67M parameters), 50k-150k steps;
    HMM 5 states x 5 symbols, 20 observations, 9 layers x 8 heads x d256. The gpu
    profile is the paper's scale; cpu keeps the paper's vocabulary with a smaller model."""

    n_values: int  # bijection V (keys per sequence: V - 1)
    hmm_states: int
    hmm_symbols: int
    hmm_length: int  # observations per sequence
    n_layer: int  # the bijection transformer
    n_head: int
    n_embd: int
    hmm_n_layer: int  # the HMM transformer
    hmm_n_head: int
    hmm_n_embd: int
    batch_size: int
    lr: float  # bijection
    warmup_steps: int
    bijection_steps: int
    weight_decay: float  # AdamW's decoupled decay on matrices, bijection
    decay_fraction: float  # bijection lr: constant, then cosine to 10% over this last fraction (1.0: all cosine)
    hmm_lr: float
    hmm_warmup_steps: int
    hmm_steps: int
    hmm_weight_decay: float
    mlp_depth: int  # residual blocks of the information-matched prefix MLP
    mlp_embd: int  # its per-position embedding (the prefix is these, concatenated)
    paper_mlp_depths: tuple[int, ...]  # depths the paper-shaped MLP may take (paper: 18-20 layers)
    eval_sequences: int  # held-out sequences each metric averages over
    kept_steps: tuple[int, ...]  # transformer weights kept for the curves over training
    checkpoint_every: int  # steps between resumable checkpoints of a run in progress


@dataclass(frozen=True)
class SamplingScale:
    """Sizes for curriculum 05's truncation hypotheses (top-k, top-p, their entropy and
    support), read off each seed's baby GPT at every position of validation windows."""

    n_windows: int  # validation windows, each the baby GPT's context long
    top_ks: tuple[int, ...]  # the curve of entropy and support against k
    top_ps: tuple[float, ...]  # and against p


@dataclass(frozen=True)
class MoECostScale:
    """Sizes for curriculum 08's cost comparison: forward passes of the architecture
    ablations' dense and MoE models (random init), timed interleaved."""

    batch_size: int  # sequences of the model's context per forward pass
    rounds: int  # timing rounds (one sample each)
    iterations: int  # forward passes per round


@dataclass(frozen=True)
class BatchingScale:
    """Sizes for curriculum 15's throughput by batch size: batched greedy decoding of the
    inference hypotheses' random-init Llama-style decode model, lab and Hugging Face."""

    batch_sizes: tuple[int, ...]  # ascending, the first 1
    prompt_len: int  # every row's prompt (random tokens), so no padding
    new_tokens: int  # greedy tokens per row; prompt_len + new_tokens fits the decode model
    rounds: int  # timing rounds (one sample each)


@dataclass(frozen=True)
class MaskingScale:
    """Sizes for curriculum 11's masking-rate sweep: the shared small GPT trained as a
    masked LM (profile.architecture's budget) at each rate, all scored at one rate."""

    rates: tuple[float, ...]  # training mask rates, ascending; 0.05, 0.15 and 0.25 are predicted on
    eval_rate: float  # the fixed masking every model is scored with


@dataclass(frozen=True)
class ObjectivesScale:
    """11: the budget of the objective comparison (causal, prefix and masked LM) and of the
    masking-rate sweep. Longer than the architecture budget, at which the masked LMs do
    not beat the unigram entropy."""

    steps: int


@dataclass(frozen=True)
class MaskingStrategyScale:
    """11: all-[MASK] vs BERT's 80/10/10 at 15% masking. It trains longer than the rate
    sweep: at the architecture budget the masked LMs do not beat the unigram entropy."""

    steps: int


@dataclass(frozen=True)
class DataQualityScale:
    """Sizes for curriculum 16's noise-injection and deduplication hypotheses; the model,
    training budget and evaluation batches are profile.synthetic's."""

    noise_rate: float  # share of characters replaced by random ones, in training and in the noisy evaluation
    repeated_fraction: float  # share of the training text that is one repeated passage
    repeats: int  # copies of that passage


@dataclass(frozen=True)
class BatchSizeScale:
    """Sizes for the pretraining batch-size comparison: the baby GPT at each batch size for
    the same tokens as the learning-rate sweep's runs (profile.pretraining.sweep_steps x
    batch_size sequences), so smaller batches take more steps."""

    batch_sizes: tuple[int, ...]  # ascending; each divides sweep_steps x pretraining.batch_size


@dataclass(frozen=True)
class Profile:
    name: str
    seeds: tuple[int, ...]
    device: str
    pretraining: PretrainingScale
    inference: InferenceScale
    architecture: ArchitectureScale
    finetune: FinetuneScale
    inspect: InspectScale
    bayes: BayesScale
    tokenization: TokenizationScale
    quantization: QuantizationScale
    synthetic: SyntheticScale
    posttrain: PosttrainScale
    inference_stacks: InferenceStacksScale
    scaling: ScalingScale
    sampling: SamplingScale
    moe_cost: MoECostScale
    batching: BatchingScale
    masking: MaskingScale
    masking_strategy: MaskingStrategyScale
    objectives: ObjectivesScale
    data_quality: DataQualityScale
    batch_size: BatchSizeScale
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


def _sizes(block_size: int, *shapes: tuple[int, int, int]) -> tuple[ModelScale, ...]:
    """GPTs of one context length, given as (n_layer, n_head, n_embd) triples."""
    return tuple(ModelScale(n_layer=nl, n_head=nh, n_embd=d, block_size=block_size) for nl, nh, d in shapes)


# The cpu profile states every size; gpu and smoke state only what differs from it.
CPU = Profile(
    name="cpu",
    seeds=(0, 1, 2),
    device="cpu",
    description="Real results on a 2-core CPU in minutes per hypothesis; three seeds.",
    pretraining=PretrainingScale(
        baby=ModelScale(n_layer=4, n_head=4, n_embd=128, block_size=64),
        batch_size=12,
        steps=2000,
        warmup_steps=100,
        eval_interval=250,
        eval_batches=50,
        lr=1e-3,
        sweep_steps=400,
        sweep_lrs=(1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 1e-1),
        bpe_vocab_size=512,
        throughput_steps=100,
    ),
    inference=InferenceScale(
        llama=ModelScale(n_layer=4, n_head=8, n_embd=128, block_size=64),
        kv_heads=(8, 2, 1),
        train_steps=1000,
        uptrain_steps=100,
        window=16,
        decode_lengths=(100, 500, 1000, 2000),
        prompt_len=16,
        timing_rounds=5,
        n_prompts=8,
        sample_len=200,
        temperatures=(0.5, 0.8, 1.0, 1.2, 1.5),
        memory_bound=ModelScale(n_layer=2, n_head=8, n_embd=512, block_size=16400),
        context_lengths=(256, 1024, 2048, 4096, 8192, 16384),
        context_new_tokens=16,
    ),
    architecture=ArchitectureScale(
        model=ModelScale(n_layer=3, n_head=4, n_embd=96, block_size=64),
        batch_size=16,
        steps=500,
        lr=2e-3,
        warmup_steps=50,
        eval_interval=50,
        eval_batches=10,
        eval_contexts=(64, 128, 256),
        head_counts=(1, 4, 8),
        head_dims=(8, 16, 32, 64, 128, 256),
        depths=(2, 6, 12),
        depth_width=64,
        depth_steps=200,
        depth_lrs=(1e-3, 1e-2),
        n_expert=8,
        moe_top_k=2,
        probe_positions=2000,
    ),
    finetune=FinetuneScale(
        base=ModelScale(n_layer=4, n_head=8, n_embd=128, block_size=64),
        base_kv_heads=2,
        base_steps=1000,
        steps=300,
        batch_size=16,
        eval_interval=25,
        eval_batches=10,
        lr=1e-3,
        lrs=(1e-5, 2e-4, 1e-3, 5e-3),
        ranks=(8, 16, 32, 64),
        replay_fraction=0.25,
        bench_rounds=20,
    ),
    inspect=InspectScale(
        n_windows=64,
        probe_windows=48,
        induction_period=24,
        induction_batches=32,
        minilm_sentences=32,
    ),
    bayes=BayesScale(
        n_values=20,
        hmm_states=5,
        hmm_symbols=5,
        hmm_length=10,
        n_layer=2,
        n_head=4,
        n_embd=64,
        hmm_n_layer=2,
        hmm_n_head=4,
        hmm_n_embd=64,
        batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        bijection_steps=10_000,
        weight_decay=0.0,
        decay_fraction=0.5,
        hmm_lr=2e-3,
        hmm_warmup_steps=100,
        hmm_steps=1500,
        hmm_weight_decay=0.1,
        mlp_depth=4,
        mlp_embd=8,
        paper_mlp_depths=(18, 19, 20),
        eval_sequences=1000,
        kept_steps=(0, 25, 50, 100, 200, 400, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7000, 8500, 10_000),
        checkpoint_every=1000,
    ),
    tokenization=TokenizationScale(
        vocab_sizes=(256, 512, 1024, 2048, 4096, 8192, 16384),
        split_vocab=1024,
        n_group=10,
        n_table=12,
        k_neighbours=3,
    ),
    quantization=QuantizationScale(
        eval_batches=40,
        eval_batch_size=32,
        qat_steps=200,
        qat_lr=3e-4,
        qat_warmup_steps=20,
        qat_batch_size=16,
    ),
    synthetic=SyntheticScale(
        model=ModelScale(n_layer=2, n_head=4, n_embd=64, block_size=64),
        batch_size=32,
        steps=250,
        lr=3e-3,
        warmup_steps=25,
        generations=4,
        n_chars=150_000,
        sample_chars=40_000,
        n_streams=256,
        val_fraction=0.05,
        train_eval_batches=4,
        eval_batches=40,
        eval_batch_size=32,
    ),
    posttrain=PosttrainScale(
        sft_examples=4096,
        sft_steps=300,
        sft_batch_size=32,
        sft_lr=1e-3,
        max_new_tokens=12,
        pair_prompts=1024,
        rm_eval_prompts=512,
        rm_sizes=(16, 64, 256, 768),
        rm_steps=100,
        rm_batch_size=16,
        rm_lr=3e-4,
        dpo_betas=(0.5, 0.1, 0.02),
        dpo_beta=0.1,
        dpo_steps=100,
        dpo_batch_size=16,
        dpo_lr=1e-4,
        eval_prompts=512,
        example_rows=8,
    ),
    inference_stacks=InferenceStacksScale(
        prompt_lens=(16, 128, 512),
        new_tokens=128,
        rounds=5,
        agreement_prompts=4,
        compile_backend="inductor",
    ),
    scaling=ScalingScale(
        sizes=_sizes(64, (2, 2, 16), (2, 2, 32), (3, 3, 48), (3, 4, 64), (4, 4, 96)),
        budgets=(100, 250, 600),
        batch_size=12,
        lr=2e-3,
        eval_batches=20,
        n_boot=500,
    ),
    sampling=SamplingScale(
        n_windows=64,
        top_ks=(1, 2, 3, 5, 10, 20, 40, 65),
        top_ps=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
    ),
    moe_cost=MoECostScale(batch_size=16, rounds=10, iterations=5),
    batching=BatchingScale(batch_sizes=(1, 2, 4, 8, 16, 32), prompt_len=16, new_tokens=64, rounds=3),
    masking=MaskingScale(rates=(0.05, 0.15, 0.25, 0.4), eval_rate=0.15),
    masking_strategy=MaskingStrategyScale(steps=2000),
    objectives=ObjectivesScale(steps=2000),
    data_quality=DataQualityScale(noise_rate=0.05, repeated_fraction=0.5, repeats=50),
    batch_size=BatchSizeScale(batch_sizes=(4, 12, 48)),
)

GPU = replace(
    CPU,
    name="gpu",
    seeds=(0, 1, 2, 3, 4),
    device="cuda",
    description="Larger models, longer runs, five seeds; needs CUDA.",
    pretraining=replace(
        CPU.pretraining,
        baby=ModelScale(n_layer=6, n_head=6, n_embd=384, block_size=256),
        batch_size=64,
        steps=5000,
        eval_batches=100,
        sweep_steps=1000,
        sweep_lrs=(1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 1e-1),
        bpe_vocab_size=2048,
    ),
    inference=replace(
        CPU.inference,
        llama=ModelScale(n_layer=6, n_head=8, n_embd=256, block_size=256),
        train_steps=3000,
        uptrain_steps=300,
        window=64,
        decode_lengths=(100, 500, 1000, 2000, 4000),
        timing_rounds=5,
        n_prompts=32,
        memory_bound=ModelScale(n_layer=4, n_head=16, n_embd=2048, block_size=131104),
        context_lengths=(1024, 4096, 16384, 32768, 65536, 131072),
        context_new_tokens=32,
    ),
    architecture=replace(
        CPU.architecture,
        model=ModelScale(n_layer=6, n_head=6, n_embd=384, block_size=256),
        batch_size=64,
        steps=2000,
        lr=1e-3,
        warmup_steps=100,
        eval_interval=100,
        eval_batches=20,
        eval_contexts=(256, 512, 1024),
        head_counts=(1, 6, 12),
        head_dims=(8, 16, 32, 64, 128, 256, 512),
        depths=(2, 6, 12, 24),
        depth_width=256,
        depth_steps=1000,
        probe_positions=10000,
    ),
    finetune=replace(
        CPU.finetune,
        base=ModelScale(n_layer=6, n_head=8, n_embd=256, block_size=256),
        base_steps=3000,
        steps=1000,
        batch_size=32,
        eval_interval=50,
        eval_batches=20,
        bench_rounds=50,
    ),
    inspect=replace(
        CPU.inspect,
        n_windows=256,
        probe_windows=128,
        induction_period=100,
        induction_batches=64,
        minilm_sentences=128,
    ),
    bayes=replace(
        CPU.bayes,
        n_values=20,
        hmm_length=20,
        n_layer=6,
        n_head=6,
        n_embd=192,
        hmm_n_layer=9,
        hmm_n_head=8,
        hmm_n_embd=256,
        batch_size=128,
        lr=3e-4,
        warmup_steps=2000,
        bijection_steps=20_000,
        weight_decay=0.0,
        decay_fraction=1.0,
        hmm_lr=3e-4,
        hmm_warmup_steps=2000,
        hmm_steps=10_000,
        hmm_weight_decay=0.1,
        mlp_depth=8,
        mlp_embd=16,
        paper_mlp_depths=(18, 19, 20),
        eval_sequences=5000,
        kept_steps=(0, 100, 200, 500, 1000, 2000, 3000, 5000, 7500, 10_000, 15_000, 20_000),
        checkpoint_every=2000,
    ),
    tokenization=replace(
        CPU.tokenization,
        split_vocab=2048,
    ),
    quantization=replace(
        CPU.quantization,
        eval_batches=100,
        eval_batch_size=64,
        qat_steps=600,
        qat_warmup_steps=60,
        qat_batch_size=32,
    ),
    synthetic=replace(
        CPU.synthetic,
        model=ModelScale(n_layer=4, n_head=4, n_embd=128, block_size=128),
        batch_size=64,
        steps=1000,
        lr=2e-3,
        warmup_steps=100,
        generations=6,
        n_chars=400_000,
        sample_chars=100_000,
        n_streams=512,
        train_eval_batches=10,
        eval_batches=50,
        eval_batch_size=64,
    ),
    posttrain=replace(
        CPU.posttrain,
        sft_examples=16384,
        sft_steps=1000,
        sft_batch_size=64,
        sft_lr=5e-4,
        pair_prompts=4096,
        rm_eval_prompts=2048,
        rm_sizes=(16, 64, 256, 1024, 3072),
        rm_steps=300,
        rm_batch_size=32,
        rm_lr=1e-4,
        dpo_betas=(0.5, 0.2, 0.1, 0.05, 0.02),
        dpo_steps=300,
        dpo_batch_size=32,
        dpo_lr=5e-5,
        eval_prompts=2048,
        example_rows=10,
    ),
    inference_stacks=replace(
        CPU.inference_stacks,
        prompt_lens=(16, 256, 1024, 2048),
        new_tokens=512,
    ),
    scaling=replace(
        CPU.scaling,
        sizes=_sizes(128, (2, 2, 32), (3, 3, 48), (3, 4, 64), (4, 4, 96), (4, 4, 128), (5, 6, 192), (6, 8, 256)),
        budgets=(125, 250, 500, 1000),
        batch_size=32,
        eval_batches=50,
        n_boot=1000,
    ),
    sampling=replace(CPU.sampling, n_windows=256),
    moe_cost=replace(CPU.moe_cost, batch_size=64, iterations=20),
    batching=replace(CPU.batching, batch_sizes=(1, 4, 16, 64, 256), new_tokens=128, rounds=5),
    masking_strategy=MaskingStrategyScale(steps=8000),
    objectives=ObjectivesScale(steps=8000),
    batch_size=BatchSizeScale(batch_sizes=(16, 64, 256)),
)

SMOKE = replace(
    CPU,
    name="smoke",
    seeds=(0,),
    description="Seconds per hypothesis; exercises every code path, proves nothing (one seed).",
    pretraining=replace(
        CPU.pretraining,
        baby=ModelScale(n_layer=1, n_head=2, n_embd=32, block_size=32),
        batch_size=8,
        steps=30,
        warmup_steps=5,
        eval_interval=15,
        eval_batches=4,
        lr=3e-3,
        sweep_steps=20,
        sweep_lrs=(1e-5, 1e-3, 1e-1),
        bpe_vocab_size=300,
        throughput_steps=10,
        throughput_rounds=1,
    ),
    inference=replace(
        CPU.inference,
        llama=ModelScale(n_layer=1, n_head=4, n_embd=32, block_size=32),
        kv_heads=(4, 2, 1),
        train_steps=20,
        uptrain_steps=5,
        window=8,
        decode_lengths=(8, 24),
        prompt_len=4,
        timing_rounds=1,
        n_prompts=2,
        sample_len=40,
        temperatures=(0.5, 1.0, 1.5),
        memory_bound=ModelScale(n_layer=1, n_head=4, n_embd=32, block_size=40),
        context_lengths=(8, 32),
        context_new_tokens=4,
    ),
    architecture=replace(
        CPU.architecture,
        model=ModelScale(n_layer=2, n_head=2, n_embd=24, block_size=16),
        batch_size=8,
        steps=20,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=10,
        eval_batches=2,
        eval_contexts=(16, 32),
        head_counts=(1, 2),
        head_dims=(8, 32),
        depths=(2, 3),
        depth_width=16,
        depth_steps=10,
        n_expert=4,
        probe_positions=256,
    ),
    finetune=replace(
        CPU.finetune,
        base=ModelScale(n_layer=2, n_head=4, n_embd=32, block_size=32),
        base_steps=20,
        steps=10,
        batch_size=4,
        eval_interval=5,
        eval_batches=2,
        lrs=(1e-5, 1e-3, 5e-3),
        ranks=(2, 4),
        bench_rounds=3,
    ),
    inspect=replace(
        CPU.inspect,
        n_windows=4,
        probe_windows=4,
        induction_period=8,
        induction_batches=4,
        minilm_sentences=4,
    ),
    bayes=replace(
        CPU.bayes,
        n_values=5,
        hmm_states=3,
        hmm_symbols=3,
        hmm_length=4,
        n_layer=2,
        n_head=2,
        n_embd=16,
        hmm_n_layer=2,
        hmm_n_head=2,
        hmm_n_embd=16,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        bijection_steps=30,
        weight_decay=0.0,
        decay_fraction=1.0,
        hmm_lr=3e-3,
        hmm_warmup_steps=5,
        hmm_steps=30,
        hmm_weight_decay=0.1,
        mlp_depth=2,
        mlp_embd=4,
        paper_mlp_depths=tuple(range(2, 21)),
        eval_sequences=64,
        kept_steps=(0, 5, 10, 20, 30),
        checkpoint_every=10,
    ),
    tokenization=replace(
        CPU.tokenization,
        vocab_sizes=(256, 300, 400),
        split_vocab=300,
        n_table=6,
    ),
    quantization=replace(
        CPU.quantization,
        eval_batches=2,
        eval_batch_size=8,
        qat_steps=6,
        qat_lr=1e-3,
        qat_warmup_steps=0,
        qat_batch_size=4,
    ),
    synthetic=replace(
        CPU.synthetic,
        model=ModelScale(n_layer=1, n_head=2, n_embd=32, block_size=32),
        batch_size=8,
        steps=20,
        warmup_steps=2,
        generations=3,
        n_chars=12_000,
        sample_chars=3_000,
        n_streams=32,
        train_eval_batches=1,
        eval_batches=3,
        eval_batch_size=8,
    ),
    posttrain=replace(
        CPU.posttrain,
        sft_examples=256,
        sft_steps=6,
        sft_batch_size=8,
        pair_prompts=48,
        rm_eval_prompts=24,
        rm_sizes=(8, 24),
        rm_steps=3,
        rm_batch_size=4,
        dpo_steps=3,
        dpo_batch_size=4,
        eval_prompts=24,
        example_rows=4,
    ),
    inference_stacks=replace(
        CPU.inference_stacks,
        prompt_lens=(4, 16),
        new_tokens=8,
        rounds=2,
        agreement_prompts=2,
        compile_backend="eager",
    ),
    scaling=replace(
        CPU.scaling,
        sizes=_sizes(16, (1, 2, 8), (1, 2, 12), (1, 2, 16), (1, 2, 24), (1, 2, 32)),
        budgets=(6, 12, 24),
        batch_size=4,
        lr=3e-3,
        eval_batches=2,
        n_boot=20,
    ),
    sampling=replace(CPU.sampling, n_windows=4, top_ks=(1, 10, 65), top_ps=(0.5, 0.9, 1.0)),
    moe_cost=replace(CPU.moe_cost, batch_size=2, rounds=2, iterations=1),
    batching=replace(CPU.batching, batch_sizes=(1, 4), prompt_len=4, new_tokens=8, rounds=2),
    masking=replace(CPU.masking, rates=(0.05, 0.15, 0.25)),
    masking_strategy=MaskingStrategyScale(steps=40),
    objectives=ObjectivesScale(steps=40),
    batch_size=BatchSizeScale(batch_sizes=(4, 16)),
)

PROFILES: dict[str, Profile] = {"smoke": SMOKE, "cpu": CPU, "gpu": GPU}


def default_profile_name() -> str:
    """`$LAB_PROFILE` if set, else `gpu` when CUDA is available, else `cpu`."""
    env = os.environ.get("LAB_PROFILE")
    if env:
        return env
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None, *, seeds: tuple[int, ...] | None = None) -> Profile:
    """The profile called `name` (default: `default_profile_name()`), optionally with other seeds."""
    name = name or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}")
    profile = PROFILES[name]
    if seeds is not None:
        if not seeds or any((not isinstance(s, int)) or s < 0 for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
        profile = replace(profile, seeds=tuple(seeds))
    return profile
