"""Each process's settings: one object, built once from command-line flags and the environment.

Every field ``name`` is read from the environment variable ``PALM_RLHF_<NAME>`` (the table in
docs/services.md); a flag given on the command line wins over the environment, which wins over
the default. :func:`build_settings` turns a parsed command line into the settings object of its
role; bad values stop the process with one message naming the flag and the variable.

This module is the only place where services, clients and the trainer read the environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.config import (
    ADDRESSES_FILE_NAME,
    ADMIN_TOKEN_FILE_NAME,
    DEFAULT_ADDRS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    DEFAULT_RATE_LIMIT,
    given_flags,
    rate_limit_spec,
)

ENV_PREFIX = "PALM_RLHF_"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class SettingsError(ValueError):
    """A setting has a bad value; the message names the flag and the environment variable."""


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def read_secret_file(path: str | Path, what: str = "admin token") -> str:
    """The first line of ``path``, stripped (a trailing newline is not part of a secret)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    value = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not value:
        raise ValueError(f"the {what} file {path} is empty")
    return value


class Settings(BaseSettings):
    """Base of every settings class: the ``PALM_RLHF_`` prefix, empty variables mean unset, and
    unknown names (other flags on the same command line) are ignored."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", validate_assignment=False,
    )

    #: whether each field also has a command-line flag (named after it), for error messages
    has_flags: ClassVar[bool] = True

    @classmethod
    def env_name(cls, field: str) -> str:
        info = cls.model_fields[field]
        alias = info.validation_alias
        if isinstance(alias, str) and alias.startswith(ENV_PREFIX):
            return alias
        return f"{ENV_PREFIX}{field.upper()}"

    @classmethod
    def load(cls, flags: dict[str, Any] | None = None, **overrides: Any):
        """Build from ``flags`` (values given on the command line) over the environment over the
        defaults; raises :class:`SettingsError` with a readable message on bad values."""
        kw = {}
        for k, v in {**(flags or {}), **overrides}.items():
            info = cls.model_fields.get(k)
            if info is not None:  # a field with an alias is given by its alias
                kw[info.validation_alias if isinstance(info.validation_alias, str) else k] = v
        try:
            return cls(**kw)
        except ValidationError as e:
            raise SettingsError(cls._explain(e, set(kw))) from None

    @classmethod
    def _explain(cls, e: ValidationError, given: set[str]) -> str:
        lines = []
        for err in e.errors():
            loc = err.get("loc") or ()
            name = str(loc[0]) if loc else ""
            field = name if name in cls.model_fields else next(
                (f for f in cls.model_fields if cls.env_name(f).lower() == name.lower()), name)
            msg = err.get("msg", "invalid value")
            if field in cls.model_fields:
                flag = "--" + field.replace("_", "-")
                if field in given:
                    source = f"flag {flag}"
                elif cls.has_flags:
                    source = f"{cls.env_name(field)} (or {flag})"
                else:
                    source = cls.env_name(field)
                value = err.get("input")
                shown = "" if field in ("admin_token",) or isinstance(value, dict) else f" = {value!r}"
                lines.append(f"invalid setting {source}{shown}: {msg}")
            else:
                lines.append(f"invalid settings: {msg}")
        return "error: " + "; ".join(lines)


# --- what every service process shares ---------------------------------------------------------


class CommonSettings(Settings):
    """Addresses, data directory, admin token, TLS, message size: every process."""

    host: str = "127.0.0.1"
    data_dir: Path = Path("./data")
    checkpoint: str | None = None
    policy_addr: str = DEFAULT_ADDRS["policy"]
    reference_addr: str = DEFAULT_ADDRS["reference"]
    reward_addr: str = DEFAULT_ADDRS["reward"]
    # None means "not given": the policy follows a trainer only when told where it is
    trainer_addr: str | None = None
    database_url: str | None = Field(default=None, repr=False)
    admin_token: str | None = Field(default=None, repr=False)
    admin_token_file: Path | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    torch_threads: int = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # client side of TLS between the services (services/common/client.py)
    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    log_level: str = "INFO"
    # set by `palm-rlhf up` for its children: a child whose parent is gone stops itself, so a
    # supervisor killed with SIGKILL leaves nothing running (PALM_RLHF_PARENT_PID)
    parent_pid: int | None = None

    @model_validator(mode="after")
    def _read_admin_token_file(self):
        if not self.admin_token and self.admin_token_file is not None:
            self.admin_token = read_secret_file(self.admin_token_file)
        return self

    def __repr_args__(self):  # never show secrets in logs or tracebacks
        for k, v in super().__repr_args__():
            if k not in ("admin_token", "database_url"):
                yield k, v


class ServeSettings(CommonSettings):
    """``palm-rlhf serve ROLE``: the bound ports and the drain timing of one service."""

    role: str = ""
    port: int | None = None
    metrics_port: int | None = None
    grace: float = Field(default=10.0, ge=0)
    drain_delay: float = Field(default=0.0, ge=0)
    _follow_trainer: bool = PrivateAttr(default=False)

    default_port: ClassVar[int] = 0
    default_metrics_port: ClassVar[int] = -1

    @model_validator(mode="after")
    def _role_defaults(self):
        if self.port is None:
            self.port = self.default_port
        if self.metrics_port is None:
            self.metrics_port = self.default_metrics_port
        self._follow_trainer = self.trainer_addr is not None
        if self.trainer_addr is None:
            self.trainer_addr = DEFAULT_ADDRS["trainer"]
        if self.database_url is None:
            self.database_url = f"sqlite:///{Path(self.data_dir).resolve() / 'feedback.db'}"
        return self

    @property
    def follow_trainer(self) -> bool:
        """Whether a trainer address was given (the policy then follows its announcements)."""
        return self._follow_trainer

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


class ModelServeSettings(ServeSettings):
    """Limits every model service enforces."""

    max_batch: int = Field(default=64, gt=0)


class PolicySettings(ModelServeSettings):
    role: str = "policy"
    default_port: ClassVar[int] = DEFAULT_PORTS["policy"]
    default_metrics_port: ClassVar[int] = DEFAULT_METRICS_PORTS["policy"]

    max_prompt_tokens: int = Field(default=1024, gt=0)
    max_new_tokens: int = Field(default=512, gt=0)
    default_max_new_tokens: int = Field(default=64, gt=0)
    max_n: int = Field(default=16, gt=0)
    max_batch_rows: int = Field(default=128, gt=0)
    max_queue_rows: int = Field(default=512, ge=0)
    batch_window_ms: float = Field(default=0.0, ge=0)
    batch_threads: int = Field(default_factory=_cpu_count, ge=0)
    batch_threads_min_rows: int = Field(default=16, gt=0)
    quantize: Literal["none", "int8"] = "none"
    follow_store: float = Field(default=0.0, ge=0)


class ReferenceSettings(ModelServeSettings):
    role: str = "reference"
    default_port: ClassVar[int] = DEFAULT_PORTS["reference"]
    default_metrics_port: ClassVar[int] = DEFAULT_METRICS_PORTS["reference"]


class RewardSettings(ModelServeSettings):
    role: str = "reward"
    default_port: ClassVar[int] = DEFAULT_PORTS["reward"]
    default_metrics_port: ClassVar[int] = DEFAULT_METRICS_PORTS["reward"]

    scorer: Literal["learned", "sentiment"] = "learned"


class OnlineLoopSettings(Settings):
    """The knobs of the trainer's online loop (services/trainer/loop.py, docs/online.md): the
    field name is the keyword, the alias the one variable read (``algorithm`` <- PALM_RLHF_RL_ALGORITHM)."""

    reward_scorer: str = Field("learned", validation_alias="PALM_RLHF_REWARD_SCORER")
    algorithm: str = Field("rloo", validation_alias="PALM_RLHF_RL_ALGORITHM")
    actor_finetune: str = Field("lora", validation_alias="PALM_RLHF_ACTOR_FINETUNE")
    lora_r: int = Field(8, validation_alias="PALM_RLHF_ACTOR_LORA_R")
    last_n_layers: int = Field(1, validation_alias="PALM_RLHF_ACTOR_LAST_N")
    iterations: int = Field(8, validation_alias="PALM_RLHF_RL_ITERATIONS")
    prompts_per_iteration: int = Field(8, validation_alias="PALM_RLHF_RL_PROMPTS")
    group_size: int = Field(4, validation_alias="PALM_RLHF_RL_GROUP_SIZE")
    max_new_tokens: int = Field(48, validation_alias="PALM_RLHF_RL_MAX_NEW_TOKENS")
    temperature: float = Field(1.0, validation_alias="PALM_RLHF_RL_TEMPERATURE")
    lr: float = Field(2e-3, validation_alias="PALM_RLHF_RL_LR")
    epochs: int = Field(2, validation_alias="PALM_RLHF_RL_EPOCHS")
    minibatch_size: int = Field(16, validation_alias="PALM_RLHF_RL_MINIBATCH")
    kl_coef: float = Field(0.05, validation_alias="PALM_RLHF_KL_COEF")
    pref_beta: float = Field(0.5, validation_alias="PALM_RLHF_PREF_BETA")
    kl_target: float = Field(0.0, validation_alias="PALM_RLHF_KL_TARGET")
    min_new_feedback: int = Field(1, validation_alias="PALM_RLHF_MIN_NEW_FEEDBACK")
    max_train_prompts: int = Field(512, validation_alias="PALM_RLHF_MAX_TRAIN_PROMPTS")
    heldout_fraction: float = Field(0.2, validation_alias="PALM_RLHF_HELDOUT_FRACTION")
    eval_prompts: int = Field(32, validation_alias="PALM_RLHF_EVAL_PROMPTS")
    eval_samples: int = Field(2, validation_alias="PALM_RLHF_EVAL_SAMPLES")
    eval_prompts_file: str = Field("", validation_alias="PALM_RLHF_EVAL_PROMPTS_FILE")
    eval_pairs: int = Field(64, validation_alias="PALM_RLHF_EVAL_PAIRS")
    reward_refit: bool = Field(True, validation_alias="PALM_RLHF_REWARD_REFIT")
    reward_refit_mode: str = Field("head", validation_alias="PALM_RLHF_REWARD_REFIT_MODE")
    reward_steps: int = Field(300, validation_alias="PALM_RLHF_REWARD_STEPS")
    reward_lr: float = Field(1e-2, validation_alias="PALM_RLHF_REWARD_LR")
    reward_min_heldout: int = Field(8, validation_alias="PALM_RLHF_REWARD_MIN_HELDOUT")
    reward_alpha: float = Field(0.05, validation_alias="PALM_RLHF_REWARD_ALPHA")
    gate_reward_confidence: float = Field(1.645, validation_alias="PALM_RLHF_GATE_REWARD_CONFIDENCE")
    gate_rank_alpha: float = Field(0.05, ge=0.0, le=1.0, validation_alias="PALM_RLHF_GATE_RANK_ALPHA")
    gate_min_reward_gain: float = Field(0.0, validation_alias="PALM_RLHF_GATE_MIN_REWARD_GAIN")
    kl_budget: float = Field(12.0, validation_alias="PALM_RLHF_KL_BUDGET")
    gate_max_repetition: float = Field(0.25, validation_alias="PALM_RLHF_GATE_MAX_REPETITION")
    gate_min_length_ratio: float = Field(0.5, validation_alias="PALM_RLHF_GATE_MIN_LENGTH_RATIO")
    gate_max_length_ratio: float = Field(2.0, validation_alias="PALM_RLHF_GATE_MAX_LENGTH_RATIO")
    gate_pair_tolerance: float = Field(0.05, validation_alias="PALM_RLHF_GATE_PAIR_TOLERANCE")
    gate_min_pairs: int = Field(16, validation_alias="PALM_RLHF_GATE_MIN_PAIRS")
    seed: int = Field(0, validation_alias="PALM_RLHF_ONLINE_SEED")
    threads: int = Field(0, validation_alias="PALM_RLHF_TRAINER_THREADS")

    model_config = SettingsConfigDict(
        # only the aliases (the PALM_RLHF_* names) are read: never a bare SEED or LR
        env_prefix="", env_ignore_empty=True, extra="ignore", case_sensitive=False,
    )
    has_flags: ClassVar[bool] = False

    def knobs(self) -> dict[str, Any]:
        """Keyword arguments of services.trainer.loop.OnlineSettings."""
        return self.model_dump()


class TrainerSettings(ModelServeSettings):
    role: str = "trainer"
    default_port: ClassVar[int] = DEFAULT_PORTS["trainer"]
    default_metrics_port: ClassVar[int] = DEFAULT_METRICS_PORTS["trainer"]

    update_fn: str | None = None
    update_interval: float = Field(default=0.0, ge=0)
    round_after_feedback: int = Field(default=64, ge=0)
    round_after_seconds: float = Field(default=90.0, ge=0)
    round_poll: float = Field(default=5.0, gt=0)
    store_poll: float = Field(default=2.0, gt=0)
    online: OnlineLoopSettings = Field(default_factory=OnlineLoopSettings)


class GatewayServeSettings(ServeSettings):
    """What ``palm-rlhf serve gateway`` hands to the gateway (which reads the rest itself)."""

    role: str = "gateway"
    default_port: ClassVar[int] = DEFAULT_PORTS["gateway"]
    default_metrics_port: ClassVar[int] = -1

    api_keys_file: str | None = None
    rate_limit: str = DEFAULT_RATE_LIMIT
    keep_alive: float = Field(default=75.0, gt=0)
    max_inflight: int = Field(default=32, ge=0)
    body_timeout: float = Field(default=30.0, ge=0)
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    min_answer_tokens: int = Field(default=32, ge=1)
    header_timeout: float = Field(default=10.0, ge=0)
    max_connections: int = Field(default=1024, ge=0)
    allowed_hosts: str = ""
    insecure_no_auth: bool = False

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rate(cls, v):
        return rate_limit_spec(v)


SERVE_SETTINGS: dict[str, type[ServeSettings]] = {
    "policy": PolicySettings, "reference": ReferenceSettings, "reward": RewardSettings,
    "trainer": TrainerSettings, "gateway": GatewayServeSettings,
}


class UpSettings(CommonSettings):
    """``palm-rlhf up``: the supervisor."""

    port: int = 8000
    free_ports: bool = False
    no_gateway: bool = False
    grace: float = Field(default=10.0, ge=0)
    ready_timeout: float = Field(default=600.0, gt=0)
    api_keys_file: str | None = None
    rate_limit: str = DEFAULT_RATE_LIMIT
    scorer: Literal["learned", "sentiment"] = "learned"
    restart_limit: int = Field(default=5, ge=0)
    restart_window: float = Field(default=300.0, gt=0)
    restart_backoff: float = Field(default=1.0, ge=0)
    restart_backoff_max: float = Field(default=30.0, ge=0)

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rate(cls, v):
        return rate_limit_spec(v)

    @property
    def admin_token_path(self) -> Path:
        return Path(self.data_dir) / ADMIN_TOKEN_FILE_NAME


# --- command-line clients ------------------------------------------------------------------------


def _pid_runs(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_up_addresses(data_dir: str | Path) -> dict[str, Any] | None:
    """The addresses a running ``palm-rlhf up`` wrote to ``DATA_DIR/addresses.json``, or None:
    no such file, an unreadable one, or one left behind by an ``up`` that is gone (killed with
    SIGKILL: its pid no longer runs on this host)."""
    import json
    import socket

    path = Path(data_dir) / ADDRESSES_FILE_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    pid = doc.get("pid")
    if isinstance(pid, int) and doc.get("hostname") == socket.gethostname() and not _pid_runs(pid):
        return None
    return doc


def _grpc_addr(role: str):
    def pick(doc: dict[str, Any]) -> str | None:
        grpc = doc.get("grpc")
        value = grpc.get(role) if isinstance(grpc, dict) else None
        return value if isinstance(value, str) and value else None

    return pick


def _gateway_url(doc: dict[str, Any]) -> str | None:
    value = doc.get("gateway_url")
    return value if isinstance(value, str) and value else None


# client setting -> how to find it in DATA_DIR/addresses.json
UP_ADDRESSES = {"trainer_addr": _grpc_addr("trainer"), "reward_addr": _grpc_addr("reward"),
                "gateway_url": _gateway_url}


class ClientSettings(Settings):
    """The CLI clients (``palm-rlhf trainer ...``, ``palm-rlhf score``, ``palm-rlhf chat-client``).

    Each address (trainer, reward, gateway URL) comes from its flag, else its variable
    (``PALM_RLHF_TRAINER_ADDR``, ...), else ``DATA_DIR/addresses.json`` as written by a running
    ``palm-rlhf up`` (so ``up --free-ports`` is found), else the default port on 127.0.0.1.
    The admin token comes from ``--admin-token``, ``PALM_RLHF_ADMIN_TOKEN``, a file
    (``--admin-token-file`` / ``PALM_RLHF_ADMIN_TOKEN_FILE``), or else ``DATA_DIR/admin-token``
    as written by ``palm-rlhf up`` (DATA_DIR: ``--data-dir`` / ``PALM_RLHF_DATA_DIR``, ./data)."""

    trainer_addr: str = DEFAULT_ADDRS["trainer"]
    reward_addr: str = DEFAULT_ADDRS["reward"]
    gateway_url: str = "http://127.0.0.1:8000"
    api_key: str | None = Field(default=None, repr=False)
    admin_token: str | None = Field(default=None, repr=False)
    admin_token_file: Path | None = None
    data_dir: Path = Path("./data")
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    _from_up: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _find_addresses(self):
        wanted = [f for f in UP_ADDRESSES if f not in self.model_fields_set]
        found = read_up_addresses(self.data_dir) if wanted else None
        for f in wanted if found else ():
            value = UP_ADDRESSES[f](found)
            if value:
                setattr(self, f, value)
                self._from_up.add(f)
        return self

    def where(self, field: str) -> str:
        """Where the address in ``field`` came from, for messages: '' or ' (from FILE)'."""
        if field in self._from_up:
            return f" (from {Path(self.data_dir) / ADDRESSES_FILE_NAME})"
        return ""

    @model_validator(mode="after")
    def _find_admin_token(self):
        if self.admin_token:
            return self
        if self.admin_token_file is not None:
            self.admin_token = read_secret_file(self.admin_token_file)
            return self
        default = Path(self.data_dir) / ADMIN_TOKEN_FILE_NAME
        if default.is_file():
            try:
                self.admin_token = read_secret_file(default)
            except ValueError:
                pass
        return self


class LogSettings(Settings):
    """``palm-rlhf --log-level`` (PALM_RLHF_LOG_LEVEL), read by every command."""

    log_level: str = "INFO"


class TLSClientSettings(Settings):
    """Just the client TLS files (services/common/client.py's default credentials)."""

    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None


class DemoSettings(Settings):
    """``palm-rlhf chat`` and ``palm-rlhf demo-loop``."""

    checkpoint: str | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    admin_token: str | None = Field(default=None, repr=False)
    admin_token_file: Path | None = None
    reward_scorer: str = "sentiment"
    rl_algorithm: str = "rloo"
    demo_verbose: bool = False

    @model_validator(mode="after")
    def _read_admin_token_file(self):
        if not self.admin_token and self.admin_token_file is not None:
            self.admin_token = read_secret_file(self.admin_token_file)
        return self


def build_settings(cls: type[Settings], args: argparse.Namespace, **overrides: Any) -> Settings:
    """The settings of ``cls`` from a parsed command line: only the flags actually given count
    as flags (the parser's defaults are the fields' defaults), so the environment fills the rest.
    Bad values stop the command with a message naming the flag and the variable."""
    flags = given_flags(args)
    if getattr(args, "log_level", None):  # the top-level `palm-rlhf --log-level`
        flags.setdefault("log_level", args.log_level)
    try:
        return cls.load(flags, **overrides)
    except (SettingsError, ValueError) as e:
        raise SystemExit(str(e) if str(e).startswith("error:") else f"error: {e}") from None


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The settings of ``palm-rlhf serve ROLE`` (the class of ROLE), from its parsed flags."""
    cls = SERVE_SETTINGS[args.role]
    overrides: dict[str, Any] = {"role": args.role}
    if cls is TrainerSettings:
        try:
            overrides["online"] = OnlineLoopSettings.load()
        except SettingsError as e:
            raise SystemExit(str(e)) from None
    return build_settings(cls, args, **overrides)


def env_for_child(**values: Any) -> dict[str, str]:
    """``PALM_RLHF_<NAME>`` -> value for the fields given (None values are left out): how a
    parent passes settings such as secrets to a child without putting them on its argv."""
    return {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in values.items() if v is not None}
