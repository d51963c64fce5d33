"""The training cache key hashes the training code's syntax, not its bytes: formatting,
comments and docstrings never invalidate a cached run; a change to the code does."""

from lab.session import code_version, normalised_source

CODE = '''"""A module."""
import torch


@torch.no_grad()
def f(x):
    """Doc."""
    return x + 1  # a comment
'''


def test_formatting_comments_and_docstrings_do_not_change_the_normalised_source():
    reformatted = "import torch\n@torch.no_grad()\ndef f(x):\n    return (x +\n            1)\n"
    assert normalised_source(CODE) == normalised_source(reformatted)


def test_code_changes_do_change_it():
    assert normalised_source(CODE) != normalised_source(CODE.replace("x + 1", "x + 2"))
    assert normalised_source(CODE) != normalised_source(CODE.replace("@torch.no_grad()\n", ""))
    assert normalised_source(CODE) != normalised_source(CODE.replace('"""Doc."""', 'print("Doc.")'))


def test_code_version_is_a_short_stable_hex_digest():
    assert code_version() == code_version()
    assert len(code_version()) == 16 and int(code_version(), 16) >= 0
