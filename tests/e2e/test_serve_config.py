"""`peftserve serve` configuration: flags over TOML over defaults, validated, documented."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from peftserve.config import EngineConfig
from peftserve.serve_config import ServeConfig, build


def test_defaults_serve_smollm2_on_loopback():
    c = build({}, environ={})
    assert (c.host, c.port, c.metrics_host, c.metrics_port) == ("127.0.0.1", 50051,
                                                                 "127.0.0.1", 9464)
    assert c.engine.model == "default" and c.admin_token is None and not c.tls


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    toml = tmp_path / "serve.toml"
    toml.write_text('port = 6000\nmax_concurrent_streams = 7\nmodel = "/m"\n'
                    '[engine]\nmax_num_seqs = 3\n')
    c = build({"port": 7000, "max_num_seqs": None}, toml, environ={})
    assert (c.port, c.max_concurrent_streams, c.engine.model, c.engine.max_num_seqs) == (
        7000, 7, "/m", 3)


def test_admin_token_from_file_or_environment(tmp_path):
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert build({"admin_token_file": f}, environ={"PEFTSERVE_ADMIN_TOKEN": "env"}
                 ).admin_token == "from-file"
    assert build({}, environ={"PEFTSERVE_ADMIN_TOKEN": "env"}).admin_token == "env"
    assert "env" not in repr(build({}, environ={"PEFTSERVE_ADMIN_TOKEN": "env"}))


@pytest.mark.parametrize("values, message", [
    ({"port": 70000}, "port"),
    ({"tls_cert": "/nonexistent.pem"}, "both tls_cert and tls_key"),
    ({"adapter_root": "/nonexistent-root"}, "not a directory"),
    ({"max_concurrent_streams": 0}, "max_concurrent_streams"),
    ({"default_max_new_tokens": 10, "max_new_tokens_limit": 5}, "exceeds"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"no_such_key": 1}, "unknown configuration key"),
])
def test_bad_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        build(values, environ={})


def test_unknown_toml_keys_are_refused(tmp_path):
    toml = tmp_path / "serve.toml"
    toml.write_text("[engine]\nmax_num_seq = 3\n")
    with pytest.raises(ValueError, match="max_num_seq"):
        build({}, toml, environ={})


def serve_help() -> str:
    proc = subprocess.run([sys.executable, "-m", "peftserve.cli", "serve", "--help"],
                          capture_output=True, text=True, timeout=60, check=True)
    return " ".join(proc.stdout.split())


def test_every_field_has_a_documented_flag():
    text = serve_help()
    flags = set(re.findall(r"(--[a-z0-9-]+) [A-Z_]+ [a-zA-Z']", text))  # flags with help text
    flags |= set(re.findall(r"(--no-[a-z0-9-]+) [a-z]", text))  # switches off, with help text
    fields = {f.name for f in dataclasses.fields(EngineConfig)} | {
        f.name for f in dataclasses.fields(ServeConfig)} - {"engine", "admin_token"}
    missing = {name for name in fields
               if not {"--" + name.replace("_", "-"), "--no-" + name.replace("_", "-")} & flags}
    assert not missing, f"serve flags without help for {sorted(missing)}"
    assert "--admin-token-file" in flags
    assert "(default: 50051)" in text and "(default: 127.0.0.1)" in text


def test_bad_flag_value_exits_2_with_a_message():
    proc = subprocess.run([sys.executable, "-m", "peftserve.cli", "serve", "--port", "-5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "port must be in" in proc.stderr
