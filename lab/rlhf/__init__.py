"""Post-training a small GPT (curriculum 12): supervised fine-tuning, preferences, a reward model
and DPO, one module per stage.

The pieces of the RLHF recipe at a scale a CPU runs in minutes, written out in plain
torch loops (the trainer in `lab.train` pretrains; these loops post-train a copy):

- an instruction-like task the char-level Shakespeare tokenizer can spell
  (`WordTask`: "name th: " -> "thee\\n", name a word that starts with the prompt's
  two letters) and supervised fine-tuning (`sft`) of a pretrained model on
  prompt + completion with the loss on completion tokens only;
- an exactly scorable property (`vowel_fraction` of the completion) and preference pairs
  (`preference_pairs`: two samples per prompt from the SFT model, the higher-scoring one
  chosen, ties dropped), kept in a JSONL file (`write_preferences` / `read_preferences`,
  which names the line of a malformed pair);
- a reward model (`RewardModel`: the GPT trunk plus a scalar head on the last token)
  trained with the Bradley-Terry loss, and its held-out `pairwise_accuracy`;
- DPO (`dpo`, `dpo_loss`: Rafailov et al. 2023) against a frozen reference, and a
  Monte-Carlo estimate of the sequence-level KL(pi || ref) from samples of pi
  (`kl_estimate`).

    task.py         WordTask and vowel_fraction
    sequences.py    padded prompt + completion batches, log-probs, sampling
    sft.py          supervised fine-tuning
    preferences.py  PreferencePair, sampling pairs, the JSONL file
    reward.py       RewardModel, the Bradley-Terry loss, pairwise accuracy
    dpo.py          DPO and the KL estimate

Everything is deterministic for a seed: batches and samples come from seeded
torch.Generators, new heads start at zero.
"""

from lab.rlhf.dpo import KLEstimate, dpo, dpo_loss, kl_estimate
from lab.rlhf.preferences import (
    OPTIONAL_PAIR_KEYS,
    PAIR_KEYS,
    PreferencePair,
    parse_preference_line,
    preference_pairs,
    read_preferences,
    write_preferences,
)
from lab.rlhf.reward import RewardModel, bradley_terry_loss, pairwise_accuracy, train_reward_model
from lab.rlhf.sequences import encode_batch, sample_completions, sequence_logprobs, token_logprobs
from lab.rlhf.sft import sft
from lab.rlhf.task import PROMPT_TEMPLATE, STOP, VOWELS, WordTask, vowel_fraction

__all__ = [
    "OPTIONAL_PAIR_KEYS",
    "PAIR_KEYS",
    "PROMPT_TEMPLATE",
    "STOP",
    "VOWELS",
    "KLEstimate",
    "PreferencePair",
    "RewardModel",
    "WordTask",
    "bradley_terry_loss",
    "dpo",
    "dpo_loss",
    "encode_batch",
    "kl_estimate",
    "pairwise_accuracy",
    "parse_preference_line",
    "preference_pairs",
    "read_preferences",
    "sample_completions",
    "sequence_logprobs",
    "sft",
    "token_logprobs",
    "train_reward_model",
    "vowel_fraction",
    "write_preferences",
]
