"""`bench compare --peer vllm` without vLLM: bad input is one line and exit code 2, vLLM's options follow
serve.py's flags, its environment is the CPU backend's, and a vLLM that exits while starting is an
error that shows what it printed. No server starts here."""

import os
import stat

import pytest

from helpers import run_script
from moejax.bench.vllm_peer import LAUNCHER, VllmServer, vllm_env
from moejax.cli.bench import compare
from moejax.errors import UserError


@pytest.mark.parametrize("args, message", [
    ([], "--peer vllm needs --vllm-python"),
    (["--vllm-python", "/bin/true", "--vllm-kvcache-gib", "0"], "--vllm-kvcache-gib 0"),
])
def test_vllm_peer_bad_input_is_one_line_and_exit_code_2(args, message):
    r = run_script("bench_compare.py", "--peer", "vllm", "--ckpt", "runs/none", *args, timeout=60)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_vllm_settings_follow_serve_flags():
    args = compare.parse_args(["--peer", "vllm", "--ckpt", "x", "--vllm-python", "p", "--vllm-cpu-bind", "all"])
    s = compare.vllm_settings(args, ["--ckpt", "x", "--slots", "16", "--dtype", "float32"], 80)
    assert (s["max_model_len"], s["max_num_seqs"], s["dtype"], s["prefix_caching"]) == (80, 16, "float32", False)
    assert s["cpu_bind"] == ",".join(map(str, sorted(os.sched_getaffinity(0))))
    args = compare.parse_args(["--peer", "vllm", "--ckpt", "x", "--vllm-python", "p", "--vllm-prefix-caching",
                               "--vllm-cpu-bind", "auto"])
    s = compare.vllm_settings(args, ["--ckpt", "x", "--slots=4"], 80)  # serve.py's dtype default: the checkpoint's
    assert (s["max_num_seqs"], s["dtype"], s["prefix_caching"], s["cpu_bind"]) == (4, "auto", True, "auto")


def test_vllm_env_is_the_cpu_backend_and_preloads_the_environments_iomp(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "lib").mkdir()
    python = str(tmp_path / "bin" / "python")
    env = vllm_env(python, kvcache_gib=3, cpu_bind="0-1")
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_CPU_OMP_THREADS_BIND"]) == ("3", "0-1")
    assert "LD_PRELOAD" not in env
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    assert vllm_env(python)["LD_PRELOAD"].split(os.pathsep)[0] == str(tmp_path / "lib" / "libiomp5.so")
    assert "LD_PRELOAD" not in vllm_env(python, preload_iomp=False)
    compile(LAUNCHER, "<launcher>", "exec")


def test_vllm_that_exits_while_starting_is_an_error_with_its_output(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named vllm' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(UserError, match="exited with 3 while starting: ModuleNotFoundError: No module named vllm"):
        VllmServer(str(fake), str(tmp_path), max_model_len=80, startup_s=30)
    with pytest.raises(UserError, match="not an executable file"):
        VllmServer(str(tmp_path / "missing"), str(tmp_path), max_model_len=80)
