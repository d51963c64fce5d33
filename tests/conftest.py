from hypothesis import settings

# pytester is enabled in the root conftest.py: pytest_plugins is only allowed there

# Property tests check behaviour, not speed: hypothesis' default 200 ms per-example
# deadline is a timed assert, and on shared 2-core CI machines it fails at random.
settings.register_profile("lab", deadline=None)
settings.load_profile("lab")
