"""The agent's config (being split into modules: see the next commit)."""

from kpod.config.assemble import *  # noqa: F403
from kpod.config.assemble import _leaf_paths, _Where  # noqa: F401
