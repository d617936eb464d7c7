"""The demo assets' one setting, read from the environment once per call of the code that
needs it: whether a missing demo checkpoint is rebuilt (``PALM_RLHF_DEMO_AUTOBUILD``, default on)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class DemoAssetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALM_RLHF_", env_ignore_empty=True, extra="ignore")

    demo_autobuild: bool = True  # PALM_RLHF_DEMO_AUTOBUILD=0: a missing checkpoint is an error
