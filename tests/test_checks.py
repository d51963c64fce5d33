"""lab.checks: argument checks with one wording, the config rule tables built on them,
and from_dict."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lab.checks import (
    BOOL,
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    bounded_int,
    check_choice,
    check_fields,
    check_int,
    check_number,
    check_relations,
    describe,
    from_dict,
    integer,
    is_int,
    is_number,
    number,
    one_of,
    optional,
)
from lab.finetune import FinetuneConfig
from lab.models import GPTConfig
from lab.train import TrainConfig

# ---------------------------------------------------------------- predicates


def test_is_int_refuses_bools_and_floats_and_takes_numpy_ints_on_request():
    assert is_int(3) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert not is_int(np.int64(3)) and is_int(np.int64(3), numpy=True) and not is_int(np.bool_(True), numpy=True)


def test_is_number_refuses_bools_and_non_finite_values():
    assert is_number(1) and is_number(0.5) and not is_number(False)
    assert not any(is_number(x) for x in (math.nan, math.inf, -math.inf, "1", None))
    assert not is_number(np.float32(1.0)) and is_number(np.float32(1.0), numpy=True)


def test_describe_names_dtype_and_shape_of_arrays_and_tensors():
    assert describe(torch.zeros(2, 3)) == "torch.float32 tensor of shape (2, 3)"
    assert describe(np.zeros(4, dtype=np.int32)) == "int32 array of shape (4,)"
    assert describe([1, 2]) == "list"


# ---------------------------------------------------------------- one wording


@pytest.mark.parametrize(
    "rule, good, bad, what",
    [
        (POSITIVE_INT, [1, 7], [0, -1, 1.0, True, None], "an int >= 1"),
        (NON_NEGATIVE_INT, [0, 3], [-1, 0.5], "an int >= 0"),
        (integer(2, 5), [2, 5], [1, 6], "an int in [2, 5]"),
        (bounded_int(1, 4, "n_expert"), [1, 4], [0, 5], "an int in [1, n_expert=4]"),
        (POSITIVE, [1e-9, 3], [0, -1, math.inf, math.nan, True], "a finite number > 0"),
        (FRACTION, [0, 1, 0.5], [-0.1, 1.1], "a number in [0, 1]"),
        (PROBABILITY, [0.5], [0, 1], "a number in (0, 1)"),
        (number(0, 1, high_open=True), [0, 0.99], [1], "a number in [0, 1)"),
        (BOOL, [True, False], [1, "yes"], "a bool"),
        (one_of(("pre", "post")), ["pre"], ["both", None], "one of ('pre', 'post')"),
        (optional(POSITIVE_INT), [None, 2], [0], "None or an int >= 1"),
    ],
)
def test_every_rule_accepts_and_refuses_in_one_wording(rule, good, bad, what):
    assert rule.what == what
    for value in good:
        assert rule.check("x", value) is value
    for value in bad:
        with pytest.raises(ValueError) as info:
            rule.check("Config.x", value)
        assert str(info.value) == f"Config.x must be {what}, got {value!r}"


def test_check_functions_return_the_value_or_raise_the_same_wording():
    assert check_int("steps", 3, 1) == 3
    assert check_number("lr", 0.1, 0, low_open=True) == 0.1
    assert check_choice("unit", "char", ("char", "word")) == "char"
    with pytest.raises(ValueError, match=r"^steps must be an int >= 1, got 0$"):
        check_int("steps", 0, 1)
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got nan$"):
        check_number("lr", math.nan, 0, low_open=True)
    with pytest.raises(ValueError, match=r"^unit must be one of \('char', 'word'\), got 'byte'$"):
        check_choice("unit", "byte", ("char", "word"))


# ---------------------------------------------------------------- rule tables


@dataclass
class Toy:
    steps: int
    warmup: int = 0
    lr: float = 1e-3

    def __post_init__(self):
        check_fields(self, {"steps": POSITIVE_INT, "warmup": bounded_int(0, self.steps, "steps"), "lr": POSITIVE})
        check_relations(self, [(self.warmup != self.steps, "warmup", "below steps", self.warmup)])


def test_rule_table_checks_fields_in_order_and_names_the_config():
    Toy(10, 2)
    with pytest.raises(ValueError, match=r"^Toy.steps must be an int >= 1, got 0$"):
        Toy(0, 5, lr=-1)  # the first failing rule in table order
    with pytest.raises(ValueError, match=r"^Toy.warmup must be an int in \[0, steps=10\], got 11$"):
        Toy(10, 11)
    with pytest.raises(ValueError, match=r"^Toy.warmup must be below steps, got 10$"):
        Toy(10, 10)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GPTConfig(vocab_size=0, block_size=8, n_layer=1, n_head=1, n_embd=8), "GPTConfig.vocab_size must be"),
        (lambda: TrainConfig(max_steps=10, batch_size=2, lr=1e-3, warmup_steps=11), "TrainConfig.warmup_steps must be"),
        (lambda: FinetuneConfig(rank=0), "FinetuneConfig.rank must be"),
    ],
)
def test_every_config_speaks_the_same_wording(make, message):
    with pytest.raises(ValueError, match=rf"^{message} .+, got "):
        make()


# ---------------------------------------------------------------- from_dict


def test_from_dict_names_unknown_and_missing_keys_and_converts():
    assert from_dict(Toy, {"steps": 3}) == Toy(3)
    assert from_dict(Toy, {"steps": "4"}, convert={"steps": int}) == Toy(4)
    with pytest.raises(ValueError, match=r"unknown Toy key\(s\) \['step'\]"):
        from_dict(Toy, {"step": 3})
    with pytest.raises(ValueError, match=r"Toy.from_dict is missing required key\(s\) \['steps'\]"):
        from_dict(Toy, {"lr": 0.1})
    with pytest.raises(ValueError, match="Toy.from_dict expects a dict, got list"):
        from_dict(Toy, [3])


def test_configs_round_trip_through_their_dicts():
    gpt = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8, pos="rope", n_expert=2)
    assert GPTConfig.from_dict(gpt.to_dict()) == gpt
    tc = TrainConfig(max_steps=10, batch_size=2, lr=1e-3)
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    ft = FinetuneConfig(rank=4, target_modules=("q_proj", "v_proj"))
    assert FinetuneConfig.from_dict(ft.to_dict()) == ft  # the JSON list comes back as a tuple
