# The LLM Lab pytest plugin: profiles, the `lab` and `outcome` fixtures, verdicts, the
# results store and the terminal summary. Code in lab/report/.
pytest_plugins = ["lab.report.plugin"]
