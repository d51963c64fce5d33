"""The written-out pieces against the libraries people use: the lab's DPO and Bradley-Terry
losses against trl's trainers on the same fixed batch, the three post-training loops against
trl's SFTTrainer / RewardTrainer / DPOTrainer step by step, exported tokenizers against
the lab's, an export through `transformers.pipeline` against the lab's greedy generate, and
the lab's data as `datasets.Dataset` objects."""

import copy

import pytest
import torch

from lab.data import load_corpus
from lab.models import GPT, GPTConfig, export_hf, load_lab_from_hf
from lab.rlhf import PreferencePair, RewardModel, bradley_terry_loss, dpo, dpo_loss, sft, train_reward_model
from lab.rlhf.preferences import pair_tensors, stack_padded
from lab.rlhf.sequences import token_logprobs
from lab.tokenizers.bpe import train_bpe
from lab.tokenizers.char import CharTokenizer

pytest.importorskip("trl")

# every comparison is float32 on the CPU; the two paths differ only in the order of
# floating-point operations (fused vs unfused kernels, Conv1D vs Linear)
LOSS_ATOL = 1e-6
LOGP_ATOL = 1e-4  # a sum of ~10 log-probs of ~-3 each
STEP_ATOL = 1e-5  # per-step training losses after a few optimizer steps

PAIRS = [
    PreferencePair("name th: ", "thee\n", "thy\n"),
    PreferencePair("name wh: ", "whoa\n", "whistle\n"),
    PreferencePair("name ab: ", "abate\n", "abbot\n"),
    PreferencePair("name qu: ", "queue\n", "quick\n"),
]


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer.from_text(load_corpus("tinyshakespeare"))


def _gpt(char_tok, seed, **kw):
    torch.manual_seed(seed)
    config = dict(vocab_size=char_tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**config, **kw})).eval()


LAYOUTS = {"gpt2": {}, "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def exported(request, char_tok, tmp_path_factory):
    """(lab policy, lab reference, export dir of each) in the GPT-2 or Llama layout."""
    d = tmp_path_factory.mktemp(f"side-{request.param}")
    pol, ref = _gpt(char_tok, 0, **LAYOUTS[request.param]), _gpt(char_tok, 1, **LAYOUTS[request.param])
    return pol, ref, export_hf(pol, d / "pol", tokenizer=char_tok), export_hf(ref, d / "ref", tokenizer=char_tok)


def _trl_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, save_strategy="no", **kw)


def test_dpo_loss_equals_trls_on_a_fixed_batch(exported, char_tok, tmp_path):
    """lab.rlhf.dpo_loss on the lab models' sequence log-probs == trl's DPOTrainer.compute_loss
    on the exported models, for the same four pairs and beta."""
    from trl import DPOConfig, DPOTrainer

    from lab.data.hf_datasets import preference_dataset
    from lab.rlhf.trl_side import trl_tokenizer

    pol, ref, pol_dir, ref_dir = exported
    (ci, cm, _), (ri, rm_, _) = pair_tensors(char_tok, PAIRS, 64)
    idx, mask = stack_padded(ci, ri), stack_padded(cm, rm_)
    n = len(PAIRS)
    for beta in (0.1, 0.5):
        with torch.no_grad():
            lp, lr = token_logprobs(pol, idx, mask), token_logprobs(ref, idx, mask)
        lab_loss = dpo_loss(lp[:n], lp[n:], lr[:n], lr[n:], beta)
        hf_pol = load_hf(pol_dir)
        trainer = DPOTrainer(
            model=hf_pol,
            ref_model=load_hf(ref_dir),
            args=_trl_args(DPOConfig, tmp_path, beta=beta),
            train_dataset=preference_dataset(PAIRS),
            processing_class=trl_tokenizer(pol_dir),
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
        assert torch.equal(batch["input_ids"][:, : idx.size(1)], idx[:, : batch["input_ids"].size(1)])
        trainer.model.eval()
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch)
        assert abs(float(lab_loss) - float(trl_loss)) <= LOSS_ATOL, (float(lab_loss), float(trl_loss))
    assert abs(float(dpo_loss(lr[:n], lr[n:], lr[:n], lr[n:], 0.1)) - 0.6931471805599453) < 1e-6  # pi == ref


def load_hf(path):
    from lab.models.hf import load_hf_causal_lm

    return load_hf_causal_lm(path)[0]


def test_bradley_terry_loss_equals_trls_on_a_fixed_batch(exported, char_tok, tmp_path):
    """The lab RewardModel's Bradley-Terry loss == trl's RewardTrainer.compute_loss on a
    sequence classifier with the same trunk and head weight; the rewards agree up to the lab
    head's bias, which the loss cancels."""
    from trl import RewardConfig, RewardTrainer

    from lab.data.hf_datasets import preference_dataset
    from lab.rlhf.trl_side import reward_classifier, trl_tokenizer, unused_token

    pol, _, pol_dir, _ = exported
    rm = RewardModel(pol).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        rm.head.weight.normal_(0, 0.5)
        rm.head.bias.fill_(0.25)
    (ci, _, cl), (ri, _, rl) = pair_tensors(char_tok, PAIRS, 64)
    n = len(PAIRS)
    with torch.no_grad():
        r = rm(stack_padded(ci, ri), torch.cat([cl, rl]))
    lab_loss = bradley_terry_loss(r[:n], r[n:])

    tok = trl_tokenizer(pol_dir)
    pad = unused_token(tok, [p.prompt + p.chosen + p.rejected for p in PAIRS])
    tok.pad_token = pad
    clf = reward_classifier(pol_dir, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        clf.score.weight.copy_(rm.head.weight)
    trainer = RewardTrainer(
        model=clf,
        args=_trl_args(RewardConfig, tmp_path),
        train_dataset=preference_dataset(PAIRS),
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss, out = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    assert abs(float(lab_loss) - float(trl_loss)) <= LOSS_ATOL, (float(lab_loss), float(trl_loss))
    torch.testing.assert_close(out.logits.squeeze(-1) + 0.25, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_trl_trainers_follow_the_lab_loops_step_by_step(stage, char_tok, tmp_path):
    """Same batches (replayed from the lab's generator), optimizer and steps: trl's per-step
    losses equal the lab loop's, and the trained weights agree."""
    from lab.rlhf import trl_side

    base = _gpt(char_tok, 0)
    src = export_hf(base, tmp_path / "base", tokenizer=char_tok)
    kw = dict(steps=4, batch_size=2, lr=1e-3, seed=3)
    lab_hist = []
    if stage == "sft":
        prompts, answers = [p.prompt for p in PAIRS], [p.chosen for p in PAIRS]
        lab_model = sft(base, char_tok, prompts, answers, history=lab_hist, **kw)
        run = trl_side.trl_sft(src, prompts, answers, out_dir=tmp_path / "trl", **kw)
    elif stage == "dpo":
        lab_model = dpo(base, base, char_tok, PAIRS, beta=0.1, history=lab_hist, **kw)
        run = trl_side.trl_dpo(src, PAIRS, beta=0.1, out_dir=tmp_path / "trl", **kw)
    else:
        rm = train_reward_model(base, char_tok, PAIRS, history=lab_hist, **kw)
        run = trl_side.trl_reward_model(src, PAIRS, out_dir=tmp_path / "trl", **kw)
        prompts = [p.prompt for p in PAIRS]
        for which in ("chosen", "rejected"):
            comps = [getattr(p, which) for p in PAIRS]
            a = rm.rewards(char_tok, prompts, comps) - rm.head.bias.detach()  # the bias cancels in the loss
            b = trl_side.hf_rewards(run.model, run.tokenizer, prompts, comps)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert [h["step"] for h in run.history] == [h["step"] for h in lab_hist]
    for a, b in zip(lab_hist, run.history):
        assert abs(a["loss"] - b["loss"]) <= STEP_ATOL, (lab_hist, run.history)
    if stage != "reward":
        back = load_lab_from_hf(run.path)
        for (name, a), b in zip(lab_model.state_dict().items(), back.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)


def test_lab_batch_rows_replay_the_loops_draws():
    from lab.rlhf.sequences import generator
    from lab.rlhf.trl_side import lab_batch_rows

    g = generator(7)
    expected = [i for _ in range(3) for i in torch.randint(10, (4,), generator=g).tolist()]
    assert lab_batch_rows(10, steps=3, batch_size=4, seed=7) == expected
    with pytest.raises(ValueError, match="steps"):
        lab_batch_rows(10, steps=0, batch_size=4, seed=7)


# ----------------------------------------------------------------- exported tokenizers


@pytest.fixture(scope="module")
def bpe_tok():
    return train_bpe(load_corpus("tinyshakespeare")[:50_000], 320)


TEXTS = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n\n  It is the east.  ",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
]


def test_exported_tokenizers_encode_and_decode_as_the_lab(char_tok, bpe_tok):
    from lab.tokenizers.fast import to_hf_tokenizer

    text = load_corpus("tinyshakespeare")[-30_000:]
    for tok in (char_tok, bpe_tok):
        hf = to_hf_tokenizer(tok)
        for t in [text, *TEXTS]:
            ids = tok.encode(t)
            assert hf(t)["input_ids"] == ids
            assert hf.decode(ids) == t
    unicode = "héllo wörld — 12345 ¿qué?\t\n"
    assert to_hf_tokenizer(bpe_tok)(unicode)["input_ids"] == bpe_tok.encode(unicode)
    with pytest.raises(Exception, match="UNK|unk|Missing"):
        to_hf_tokenizer(char_tok)("€")  # no unknown token, as the lab refuses unknown characters
    with pytest.raises(ValueError, match="CharTokenizer and BPETokenizer"):
        to_hf_tokenizer(object())


@pytest.mark.parametrize("layout,tok_name", [("gpt2", "char"), ("llama", "bpe")])
def test_pipeline_on_an_export_matches_the_labs_greedy_generate(layout, tok_name, char_tok, bpe_tok, tmp_path):
    """transformers.pipeline("text-generation", model=<export dir>) loads the directory as it
    is (AutoTokenizer included), and its greedy tokens are the lab's, token for token."""
    from transformers import AutoTokenizer, pipeline

    tok = char_tok if tok_name == "char" else bpe_tok
    model = _gpt(char_tok, 0, **{**LAYOUTS[layout], "vocab_size": tok.vocab_size})
    path = export_hf(model, tmp_path / "export", tokenizer=tok)
    assert (path / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(str(path))("ROMEO:")["input_ids"] == tok.encode("ROMEO:")
    pipe = pipeline("text-generation", model=str(path), device="cpu")
    for prompt in ("ROMEO:", "First Citizen:\nBefore"):
        ids = tok.encode(prompt)
        out = pipe(prompt, max_new_tokens=24, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        lab = model.generate(torch.tensor([ids]), 24, temperature=0)[0].tolist()
        assert list(out) == lab
        text = pipe(prompt, max_new_tokens=24, do_sample=False)[0]["generated_text"]
        assert text == tok.decode(lab)


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(char_tok, bpe_tok, tmp_path):
    model = _gpt(char_tok, 0)
    with pytest.raises(ValueError, match="320 ids but the model only 65"):
        export_hf(model, tmp_path / "x", tokenizer=bpe_tok)
    assert not (tmp_path / "x").exists()
    plain = export_hf(model, tmp_path / "plain")  # without a tokenizer, as before
    assert not (plain / "tokenizer.json").exists()


# ----------------------------------------------------------------- datasets


def test_corpora_and_post_training_rows_as_datasets(char_tok, tmp_path, monkeypatch):
    import datasets

    from lab.data.hf_datasets import corpus_dataset, lm_blocks, preference_dataset, sft_dataset, tokenized_dataset

    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    text = load_corpus("tinyshakespeare")
    ds = corpus_dataset("tinyshakespeare")
    assert isinstance(ds, datasets.Dataset) and "".join(ds["text"]) == text
    tok = tokenized_dataset(ds, char_tok)
    assert [i for row in tok["input_ids"] for i in row] == char_tok.encode(text)
    again = tokenized_dataset(corpus_dataset("tinyshakespeare"), char_tok)
    assert again.cache_files and again.cache_files == tok.cache_files  # read back from the Arrow cache
    blocks = lm_blocks(tok, 64)
    assert len(blocks) == len(text) // 64 and blocks[1]["input_ids"] == char_tok.encode(text[64:128])
    pairs = preference_dataset(PAIRS)
    assert pairs.column_names == ["prompt", "chosen", "rejected"] and pairs[1]["rejected"] == "whistle\n"
    assert sft_dataset(["a"], ["b"])[0] == {"prompt": "a", "completion": "b"}
    with pytest.raises(ValueError, match="no non-empty string 'chosen'"):
        preference_dataset([{"prompt": "x", "rejected": "y"}])
    with pytest.raises(ValueError, match="no column 'body'"):
        tokenized_dataset(ds, char_tok, column="body")
    with pytest.raises(ValueError, match="equally many"):
        sft_dataset(["a"], [])


def test_trl_side_checks_its_tokens(char_tok, tmp_path):
    from lab.rlhf.trl_side import trl_tokenizer, unused_token

    path = export_hf(_gpt(char_tok, 0), tmp_path / "e", tokenizer=char_tok)
    with pytest.raises(ValueError, match="not a token"):
        trl_tokenizer(path, pad="<pad>")
    tok = trl_tokenizer(path)
    assert tok.eos_token == "\n" and tok.pad_token == "\n"
    assert unused_token(tok, ["\n !"]) == "$"
    assert copy.copy(tok.eos_token_id) == char_tok.encode("\n")[0]


# ----------------------------------------------------------------- Track A through trl's SFTTrainer


def test_trl_sfttrainer_follows_the_finetune_loop(char_tok, tmp_path, monkeypatch):
    """lab.finetune's written-out LoRA loop and trl's SFTTrainer with the same peft config,
    batches and seed: the same first two losses (same adapter init, same batches, same first
    learning rate), then within the schedule's small difference; the same evaluations at
    step 0."""
    from lab.data import prepare
    from lab.finetune import FinetuneConfig, finetune
    from lab.finetune_trl import replayed_rows, trl_finetune

    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    text = load_corpus("tinyshakespeare")
    new = prepare(text=text[:40_000], tokenizer=char_tok)
    old = prepare(text=text[40_000:80_000], tokenizer=char_tok)
    base = export_hf(_gpt(char_tok, 0, **LAYOUTS["llama"]), tmp_path / "base")
    cfg = FinetuneConfig(
        method="lora", rank=4, lr=1e-2, steps=6, batch_size=4, block_size=16, eval_interval=3, eval_batches=2, seed=2
    )
    lab = finetune(base, new, old, cfg, progress=False)
    trl = trl_finetune(base, new, old, cfg, tokenizer=char_tok, out_dir=tmp_path / "trl")
    rows = replayed_rows(new, old, cfg)
    assert len(rows) == cfg.steps * cfg.batch_size and all(len(r) == cfg.block_size + 1 for r in rows)
    assert [h["step"] for h in trl.history] == [h["step"] for h in lab.history]
    for a, b in zip(lab.history[:2], trl.history[:2]):
        assert abs(a["loss"] - b["loss"]) <= STEP_ATOL, (lab.history, trl.history)
    for a, b in zip(lab.history, trl.history):
        assert abs(a["loss"] - b["loss"]) <= 1e-2
    assert [e["step"] for e in trl.evals] == [e["step"] for e in lab.evals] == [0, 3, 6]
    for key in ("train_loss", "new_val", "old_val"):
        assert abs(lab.evals[0][key] - trl.evals[0][key]) <= 1e-6
    with pytest.raises(ValueError, match="QLoRA"):
        trl_finetune(base, new, old, FinetuneConfig(method="qlora"), tokenizer=char_tok, out_dir=tmp_path / "q")
