"""The gateway's settings: built once, from command-line flags over ``PALM_RLHF_*`` variables
over defaults, and passed down; no other gateway module reads the environment.

Every setting has a variable named ``PALM_RLHF_<NAME>`` (``PALM_RLHF_DATABASE_URL``,
``PALM_RLHF_DATA_DIR``, ``PALM_RLHF_API_KEYS_FILE``, ``PALM_RLHF_ADMIN_TOKEN``, ...); a flag
given on the command line wins over its variable. The admin token may also come from a file
(``--admin-token-file`` / ``PALM_RLHF_ADMIN_TOKEN_FILE``), so that it need not sit in the
environment or on a command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.config import DEFAULT_RATE_LIMIT
from services.common.settings import read_secret_file

# flags (argparse destinations) that map onto settings of the same name
_FLAGS = (
    "host",
    "port",
    "data_dir",
    "database_url",
    "policy_addr",
    "reward_addr",
    "api_keys_file",
    "rate_limit",
    "admin_token",
    "admin_token_file",
    "max_body_bytes",
    "keep_alive",
    "log_level",
    "min_answer_tokens",
    "max_inflight",
    "body_timeout",
    "header_timeout",
    "max_connections",
    "allowed_hosts",
)


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PALM_RLHF_", env_ignore_empty=True, extra="ignore", case_sensitive=False
    )

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./data")
    database_url: str | None = Field(default=None, description="default sqlite:///DATA_DIR/feedback.db")
    policy_addr: str = "127.0.0.1:50051"
    reward_addr: str = "127.0.0.1:50053"
    api_keys_file: str | None = None
    api_keys: SecretStr = SecretStr("")  # comma-separated keys, added to the file's
    rate_limit: str = DEFAULT_RATE_LIMIT
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    insecure_no_auth: bool = False
    max_body_bytes: int = 1 << 20
    # seconds a request body may take to arrive (slow or stalled clients are cut off; 0: none)
    body_timeout: float = Field(default=30.0, ge=0)
    # chat completions in flight at once; more are shed with 503 + Retry-After (0: no cap)
    max_inflight: int = Field(default=32, ge=0)
    # seconds the headers of a request may take from its first byte (slowloris; 0: none)
    header_timeout: float = Field(default=10.0, ge=0)
    # open HTTP connections and requests at once; beyond it uvicorn answers 503 (0: no cap)
    max_connections: int = Field(default=1024, ge=0)
    # Host header values served (comma-separated, "*.example.com" allowed); empty: any host
    allowed_hosts: str = ""
    keep_alive: float = 75.0
    log_level: str = "info"
    generate_timeout: float = 120.0
    score_timeout: float = 30.0
    # the least room for an answer a conversation is shortened to leave, when the request does
    # not say max_tokens
    min_answer_tokens: int = Field(default=32, ge=1)

    @classmethod
    def from_args(cls, args: Any = None, **overrides: Any) -> GatewaySettings:
        """Settings from parsed flags (attributes that are None or "" count as not given; a
        ``--insecure-no-auth`` flag only ever turns it on), then the environment."""
        given: dict[str, Any] = {}
        for name in _FLAGS:
            v = getattr(args, name, None)
            if v is not None and v != "":
                given[name] = v
        if getattr(args, "insecure_no_auth", False):
            given["insecure_no_auth"] = True
        given.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**given)

    def resolved_database_url(self) -> str:
        from services.common.feedback_store import default_database_url

        return self.database_url or default_database_url(self.data_dir)

    def admin_token_value(self) -> str | None:
        """The admin token: ``admin_token``, else the first line of ``admin_token_file``."""
        if self.admin_token is not None and self.admin_token.get_secret_value():
            return self.admin_token.get_secret_value()
        if self.admin_token_file is not None:
            try:
                return read_secret_file(self.admin_token_file)
            except ValueError as e:
                raise SystemExit(str(e)) from None
        return None
