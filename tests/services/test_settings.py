"""Each process's settings: a flag wins over its PALM_RLHF_* variable, which wins over the
default; bad values stop with a message naming the flag and the variable; secrets come from a
file as well; ``serve`` refuses to expose admin RPCs beyond loopback without a token."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from services.common.config import add_serve_arguments, given_flags
from services.common.settings import (
    ClientSettings,
    OnlineLoopSettings,
    PolicySettings,
    SettingsError,
    UpSettings,
    serve_settings,
)
from services.supervisor import add_up_arguments

from .conftest import REPO


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("PALM_RLHF_"):
            monkeypatch.delenv(k)


def serve(*argv: str):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return serve_settings(p.parse_args(list(argv)))


def test_flag_beats_environment_beats_default(monkeypatch):
    s = serve("policy")
    assert (s.port, s.metrics_port, s.max_batch, s.host) == (50051, 9101, 64, "127.0.0.1")
    assert not s.follow_trainer and s.trainer_addr == "127.0.0.1:50054"
    assert s.database_url == f"sqlite:///{(s.data_dir.resolve() / 'feedback.db')}"

    monkeypatch.setenv("PALM_RLHF_PORT", "6001")
    monkeypatch.setenv("PALM_RLHF_MAX_BATCH", "9")
    monkeypatch.setenv("PALM_RLHF_TRAINER_ADDR", "trainer:7")
    monkeypatch.setenv("PALM_RLHF_QUANTIZE", "int8")
    s = serve("policy")
    assert (s.port, s.max_batch, s.quantize, s.trainer_addr, s.follow_trainer) == (6001, 9, "int8", "trainer:7", True)

    # a flag wins, even when it repeats the default value
    s = serve("policy", "--port", "6002", "--max-batch", "64")
    assert (s.port, s.max_batch) == (6002, 64)
    # an empty variable counts as unset
    monkeypatch.setenv("PALM_RLHF_PORT", "")
    assert serve("policy").port == 50051


def test_each_role_gets_its_own_settings_and_defaults(monkeypatch):
    monkeypatch.setenv("PALM_RLHF_ROUND_AFTER_FEEDBACK", "7")
    monkeypatch.setenv("PALM_RLHF_RL_ALGORITHM", "grpo")
    monkeypatch.setenv("PALM_RLHF_KL_COEF", "0.2")
    t = serve("trainer", "--round-poll", "1.5")
    assert (t.port, t.metrics_port, t.round_after_feedback, t.round_poll) == (50054, 9104, 7, 1.5)
    assert (t.online.algorithm, t.online.kl_coef, t.online.reward_refit) == ("grpo", 0.2, True)
    r = serve("reward", "--scorer", "sentiment")
    assert (r.port, r.scorer) == (50053, "sentiment") and not hasattr(r, "quantize")
    g = serve("gateway", "--rate-limit", "30")
    assert (g.port, g.rate_limit) == (8000, "30/min")


def test_loop_knobs_read_only_their_own_variable_names(monkeypatch):
    for bare, value in (("SEED", "5"), ("ALGORITHM", "ppo"), ("LR", "9"), ("RL_ALGORITHM", "kto"),
                        ("PALM_RLHF_ALGORITHM", "dpo"), ("PALM_RLHF_SEED", "4")):
        monkeypatch.setenv(bare, value)
    s = OnlineLoopSettings.load()
    assert (s.seed, s.algorithm, s.lr) == (0, "rloo", 2e-3)
    monkeypatch.setenv("PALM_RLHF_ONLINE_SEED", "7")
    monkeypatch.setenv("PALM_RLHF_RL_ALGORITHM", "grpo")
    s = OnlineLoopSettings.load()
    assert (s.seed, s.algorithm) == (7, "grpo")
    assert OnlineLoopSettings.load({"algorithm": "dpo"}).algorithm == "dpo"  # a keyword beats the variable


def test_bad_values_name_the_flag_and_the_variable(monkeypatch):
    monkeypatch.setenv("PALM_RLHF_MAX_BATCH", "lots")
    with pytest.raises(SystemExit, match=r"PALM_RLHF_MAX_BATCH \(or --max-batch\) = 'lots'"):
        serve("policy")
    monkeypatch.delenv("PALM_RLHF_MAX_BATCH")
    monkeypatch.setenv("PALM_RLHF_DEVICE", "tpu")
    with pytest.raises(SystemExit, match="PALM_RLHF_DEVICE"):
        serve("reference")
    monkeypatch.delenv("PALM_RLHF_DEVICE")
    with pytest.raises(SystemExit, match="flag --grace"):
        serve("reward", "--grace", "-1")
    monkeypatch.setenv("PALM_RLHF_KL_BUDGET", "wide")
    with pytest.raises(SettingsError, match="PALM_RLHF_KL_BUDGET"):
        OnlineLoopSettings.load()
    with pytest.raises(SystemExit, match="PALM_RLHF_KL_BUDGET"):
        serve("trainer")
    monkeypatch.setenv("PALM_RLHF_FREE_PORTS", "perhaps")
    with pytest.raises(SettingsError, match="PALM_RLHF_FREE_PORTS"):
        UpSettings.load()


def test_only_flags_on_the_command_line_count_as_given():
    p = argparse.ArgumentParser()
    add_up_arguments(p)
    args = p.parse_args(["--port", "8000", "--free-ports"])
    assert given_flags(args) == {"port": 8000, "free_ports": True}
    assert args.grace == 10.0  # the parser still shows the defaults


def test_admin_token_from_a_file_and_never_in_repr(monkeypatch, tmp_path):
    f = tmp_path / "token"
    f.write_text("file-token\n")
    monkeypatch.setenv("PALM_RLHF_ADMIN_TOKEN_FILE", str(f))
    s = serve("policy")
    assert s.admin_token == "file-token"
    assert "file-token" not in repr(s)
    # the variable wins over the file, the flag over both
    monkeypatch.setenv("PALM_RLHF_ADMIN_TOKEN", "env-token")
    assert serve("policy").admin_token == "env-token"
    assert serve("policy", "--admin-token", "flag-token").admin_token == "flag-token"
    monkeypatch.delenv("PALM_RLHF_ADMIN_TOKEN")
    with pytest.raises(SystemExit, match="cannot read the admin token file"):
        serve("policy", "--admin-token-file", str(tmp_path / "missing"))


def test_cli_clients_find_the_token_that_up_wrote(tmp_path, monkeypatch):
    (tmp_path / "admin-token").write_text("ups-token\n")
    assert ClientSettings.load({"data_dir": tmp_path}).admin_token == "ups-token"
    monkeypatch.setenv("PALM_RLHF_DATA_DIR", str(tmp_path))
    assert ClientSettings.load().admin_token == "ups-token"
    monkeypatch.setenv("PALM_RLHF_ADMIN_TOKEN", "explicit")
    assert ClientSettings.load().admin_token == "explicit"
    assert ClientSettings.load({"data_dir": tmp_path / "elsewhere"}).admin_token == "explicit"
    monkeypatch.delenv("PALM_RLHF_ADMIN_TOKEN")
    assert ClientSettings.load({"data_dir": tmp_path / "elsewhere"}).admin_token is None


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_serve_refuses_beyond_loopback_without_an_admin_token(host, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALM_RLHF_")}
    r = subprocess.run([sys.executable, "-m", "palm_rlhf.cli", "serve", "reference", "--host", host,
                        "--data-dir", str(tmp_path)], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert f"refusing to serve reference on {host} without an admin token" in r.stderr
    assert "listening" not in r.stdout


def test_loopback_without_a_token_is_allowed():
    assert PolicySettings.load({"host": "::1"}).loopback
    assert PolicySettings.load({"host": "localhost"}).loopback
    assert not PolicySettings.load({"host": "0.0.0.0"}).loopback
