"""LLM Lab: claims about language models as pre-registered, measured predictions.

The library (`lab.data`, `lab.tokenizers`, `lab.models`, `lab.train`) works without
pytest; `lab.report` is the pytest plugin, the results store and the site writer.
"""

__version__ = "0.1.0"
