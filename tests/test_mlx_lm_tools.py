"""`zmlx generate | chat | server` run mlx-lm's own commands on a patched model: the same
output as the stock commands (greedy), mlx-lm's flags reach mlx-lm, zmlx's flags are taken
out and checked, the patch report goes to stderr. Everything runs on the CPU on the tiny
synthetic GLM-4.7-Flash checkpoint, each command in a subprocess as a user runs it."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from zmlx import mlx_lm_tools, synth
from zmlx.config import ConfigError, PatchConfig

TIMEOUT = 120  # seconds for one command; a tiny model answers in a few


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The tiny GLM-4.7-Flash, affine 4-bit, written as a checkpoint directory."""
    out = tmp_path_factory.mktemp("tools") / "glm47-tiny"
    return str(synth.write("synth:glm4_moe_lite/tiny/affine4", out))


def command(prog: str, tool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m <prog> <tool> args` (prog: zmlx or mlx_lm), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", prog, tool, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


_STOCK: dict[tuple, subprocess.CompletedProcess] = {}


def stock(tool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m mlx_lm <tool> args`, run once per session for the same arguments."""
    key = (tool, args, stdin)
    if key not in _STOCK:
        _STOCK[key] = command("mlx_lm", tool, *args, stdin=stdin)
        assert _STOCK[key].returncode == 0, _STOCK[key].stderr
    return _STOCK[key]


def report_in(stderr: str) -> bool:
    return "zmlx: patched" in stderr and "zmlx:   moe_router (exact) patched" in stderr


def _timings_masked(text: str) -> str:
    return re.sub(r"[\d.]+ (tokens-per-sec|GB|tok/s)", r"N \1", text)


# ---------------------------------------------------------------- generate


QUIET = ("--verbose", "False")  # only the text: stdout without timings must match byte for byte
GREEDY = ("--prompt", "hello world", "--max-tokens", "8", *QUIET)

GENERATE_ARGS = {
    "greedy": GREEDY,
    "sampled": ("--prompt", "hello world", "--max-tokens", "8", "--temp", "0.9", "--seed", "7", *QUIET),
    "max-kv-size": (
        "--prompt",
        "a prompt longer than four",
        "--max-tokens",
        "6",
        "--max-kv-size",
        "4",
        *QUIET,
    ),
}


@pytest.mark.parametrize("case", sorted(GENERATE_ARGS))
def test_generate_stdout_is_stock(checkpoint, case):
    args = ("--model", checkpoint, *GENERATE_ARGS[case])
    want = stock("generate", *args)
    patched = command("zmlx", "generate", *args)
    assert patched.returncode == 0, patched.stderr
    assert want.stdout.strip(), "mlx-lm printed no text: the comparison would prove nothing"
    assert patched.stdout == want.stdout
    assert report_in(patched.stderr) and not report_in(want.stderr)
    assert "zmlx" not in patched.stdout  # the report stays off stdout


def test_generate_verbose_and_flags_reach_mlx_lm(checkpoint):
    """Default (verbose) output equals stock's but for the timings; --max-tokens and
    --temp/--seed change what mlx-lm generates, so they reached it."""
    args = ("--model", checkpoint, "--prompt", "hello world")
    verbose = command("zmlx", "generate", *args, "--max-tokens", "8")
    assert verbose.returncode == 0, verbose.stderr
    assert _timings_masked(verbose.stdout) == _timings_masked(
        stock("generate", *args, "--max-tokens", "8").stdout
    )
    assert "Generation: 8 tokens" in verbose.stdout
    assert "Generation: 3 tokens" in command("zmlx", "generate", *args, "--max-tokens", "3").stdout
    hot = command("zmlx", "generate", "--model", checkpoint, *GREEDY, "--temp", "5", "--seed", "1")
    assert hot.returncode == 0 and hot.stdout != stock("generate", "--model", checkpoint, *GREEDY).stdout


def test_no_patch_is_stock_and_reports_nothing(checkpoint):
    plain = command("zmlx", "generate", "--model", checkpoint, *GREEDY, "--no-patch")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == stock("generate", "--model", checkpoint, *GREEDY).stdout
    assert "zmlx" not in plain.stderr


def test_zmlx_flags_choose_the_patterns(checkpoint):
    """--patterns / --exclude / --preset reach zmlx.patch (the report says what it applied)
    and are not passed to mlx-lm (its parser would refuse them)."""
    want = stock("generate", "--model", checkpoint, *GREEDY).stdout
    only = command("zmlx", "generate", "--model", checkpoint, *GREEDY, "--patterns", "moe_combine")
    assert only.returncode == 0, only.stderr
    assert only.stdout == want
    assert "moe_combine (exact) patched" in only.stderr and "moe_router (exact) patched" not in only.stderr
    excluded = command(
        "zmlx", "generate", "--exclude=moe_router", "--model", checkpoint, "--preset", "default", *GREEDY
    )
    assert excluded.returncode == 0, excluded.stderr
    assert excluded.stdout == want
    assert "moe_router (exact) patched" not in excluded.stderr
    assert "not applied (excluded): moe_router" in excluded.stderr
    assert "preset default" in excluded.stderr


def test_speculative_decoding_matches_stock(checkpoint):
    """--draft-model: the draft model is loaded by the same loader, so it is patched too;
    greedy speculative decoding gives stock's text."""
    args = ("--model", checkpoint, "--draft-model", checkpoint, "--num-draft-tokens", "3", *GREEDY)
    patched = command("zmlx", "generate", *args)
    assert patched.returncode == 0, patched.stderr
    assert patched.stdout == stock("generate", *args).stdout
    assert patched.stderr.count("zmlx: patched") == 2  # the model and its draft


def test_prompt_cache_file_matches_stock(checkpoint, tmp_path):
    """--prompt-cache-file (a prefix cached by mlx-lm's cache_prompt) reaches mlx-lm, which
    takes the model's path from the file: the patched model continues it as stock does."""
    cache = str(tmp_path / "prefix.safetensors")
    made = command(
        "mlx_lm",
        "cache_prompt",
        "--model",
        checkpoint,
        "--prompt",
        "a shared prefix",
        "--prompt-cache-file",
        cache,
    )
    assert made.returncode == 0, made.stderr
    args = ("--prompt-cache-file", cache, "--prompt", "more", "--max-tokens", "6", *QUIET)
    patched = command("zmlx", "generate", *args)
    assert patched.returncode == 0, patched.stderr
    assert report_in(patched.stderr)
    assert patched.stdout == stock("generate", *args).stdout


def _one_line_error(code: int, stderr: str, words: str) -> None:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert words in lines[0]
    assert "Traceback" not in stderr


def test_bad_pattern_is_one_line_from_the_command(checkpoint):
    out = command("zmlx", "generate", "--model", checkpoint, "--prompt", "hi", "--patterns", "nonsense")
    _one_line_error(out.returncode, out.stderr, "unknown pattern(s) in --patterns: nonsense")
    assert out.stdout == ""


def test_kv_bits_on_an_mla_model_runs_the_quantized_latent_cache(checkpoint):
    """mlx-lm's own attention fails on its quantized cache's tuples (a traceback); zmlx adds
    mla_kv_quant, which reads the quantized latent, and mlx-lm's generate runs."""
    args = ("--model", checkpoint, "--prompt", "hi", "--max-tokens", "4", "--kv-bits", "8")
    args += ("--quantized-kv-start", "0")
    out = command("mlx_lm", "generate", *args)
    assert out.returncode != 0 and "swapaxes" in out.stderr
    out = command("zmlx", "generate", *args)
    assert out.returncode == 0, out.stderr
    assert "zmlx:   mla_kv_quant (close) patched 4, skipped 0" in out.stderr
    assert "Generation: 4 tokens" in out.stdout


def test_kv_bits_the_latent_cache_does_not_read_is_one_line(checkpoint):
    out = command(
        "zmlx", "generate", "--model", checkpoint, "--prompt", "hi", "--max-tokens", "2", "--kv-bits", "3"
    )
    _one_line_error(out.returncode, out.stderr, "--kv-bits 3 is not supported for an MLA latent cache")
    assert out.stdout == ""


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--kv-bits", "8", "--kv-group-size=128"], "--kv-group-size 128 is not supported"),
        (["--kv-bits", "4", "--no-patch"], "zmlx's mla_kv_quant can: drop --no-patch"),
        (["--kv-bits", "4", "--exclude", "mla_kv_quant"], "mla_kv_quant can: do not exclude it"),
        (["--kv-bits", "4", "--patterns", "moe_router"], "add mla_kv_quant to --patterns"),
        (["--kv-bits=4", "--patterns", "mla_kv_quant,glm47_rope"], "leave glm47_rope out of --patterns"),
    ],
)
def test_kv_bits_selection_on_an_mla_model_refuses_in_one_line(checkpoint, argv, words):
    module = mlx_lm_tools.tool_module("generate")
    options, _ = mlx_lm_tools.split_args(argv)
    with mlx_lm_tools.patched_loaders(module, options, PatchConfig()):
        with pytest.raises(ConfigError, match=re.escape(words)):
            module.load(checkpoint)


def test_kv_bits_leaves_out_the_patterns_that_cannot_read_a_quantized_latent():
    options, _ = mlx_lm_tools.split_args(["--kv-bits", "8", "--kv-group-size", "32", "--exclude", "moe_mlp"])
    assert options.kv_quant == (8, 32)
    chosen, config = mlx_lm_tools.kv_quant_selection(options, PatchConfig())
    assert chosen.patterns is None and chosen.exclude == ("moe_mlp", *mlx_lm_tools.KV_QUANT_CONFLICTS)
    assert config.flag("mla_kv_quant") is True


def test_kv_bits_on_a_dsa_model_is_one_line():
    """DeepSeek-V3.2 / GLM-5 keep a CacheList mlx-lm never quantizes: refused with the reason."""
    import zmlx

    model = synth.build("synth:deepseek_v32/tiny/bf16")[0]
    options, _ = mlx_lm_tools.split_args(["--kv-bits", "4"])
    chosen, config = mlx_lm_tools.kv_quant_selection(options, PatchConfig())
    result = zmlx.patch(model, chosen.patterns, chosen.exclude, config=config)
    with pytest.raises(ConfigError, match="mla_kv_quant does not apply \\(DSA indexer"):
        mlx_lm_tools.check_kv_quant(result)


@pytest.mark.parametrize(
    "bad, words",
    [
        (("--exclude", "moe_routr"), "unknown pattern(s) in --exclude: moe_routr"),
        (("--preset", "exact"), "unknown preset 'exact' in --preset; valid: default, fast"),
        (("--preset",), "--preset needs a value"),
        (("--no-patch", "--patterns", "moe_router"), "--no-patch cannot be combined with --patterns"),
    ],
)
@pytest.mark.parametrize("tool", ["generate", "chat", "server"])
def test_bad_zmlx_flags_are_one_line(tool, bad, words):
    """Checked before mlx-lm runs (nothing is loaded: the model does not exist)."""
    from typer.testing import CliRunner

    from zmlx.cli import app

    result = CliRunner().invoke(app, [tool, "--model", "/nonexistent", *bad])
    _one_line_error(result.exit_code, result.stderr, words)


def test_help_is_mlx_lm_s_plus_zmlx_s():
    out = command("zmlx", "generate", "--help")
    assert out.returncode == 0, out.stderr
    assert "--max-tokens" in out.stdout and "--draft-model" in out.stdout  # mlx-lm's
    assert "--patterns" in out.stdout and "--no-patch" in out.stdout  # zmlx's


# ---------------------------------------------------------------- chat


def test_chat_through_stdin_matches_stock(checkpoint):
    """Two turns, a reset (r) between them, then q: mlx-lm's chat loop ends on q."""
    turns = "hello there\nr\nwhat now\nq\n"
    args = ("--model", checkpoint, "--max-tokens", "6")
    want = stock("chat", *args, stdin=turns)
    patched = command("zmlx", "chat", *args, stdin=turns)
    assert patched.returncode == 0, patched.stderr
    assert "bye" in want.stdout and want.stdout.count("6 tokens") == 2
    assert _timings_masked(patched.stdout) == _timings_masked(want.stdout)
    assert report_in(patched.stderr)


# ---------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(prog: str, checkpoint: str, log):
    """`python -m <prog> server` on a free loopback port, ready; its stderr goes to the file
    `log` (a pipe could fill up and block it); stopped by its PID after."""
    port = _free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", prog, "server", "--model", checkpoint]
            + ["--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, f"{prog} server exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{prog} server did not answer"
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _post(url: str, body: dict) -> str:
    """The generated text of a completions or chat request, streamed or not."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        if not body.get("stream"):
            choice = json.load(response)["choices"][0]
            return choice["text"] if "text" in choice else choice["message"]["content"]
        text = []
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line.removeprefix("data:"))["choices"]
            if choice:
                text.append(choice[0].get("text") or (choice[0].get("delta") or {}).get("content") or "")
        return "".join(text)


def _requests(prompt: str) -> list[tuple[str, dict]]:
    greedy = {"max_tokens": 8, "temperature": 0}
    chat = {"messages": [{"role": "user", "content": prompt}], **greedy}
    return [
        ("/v1/completions", {"prompt": prompt, **greedy}),
        ("/v1/completions", {"prompt": prompt, "stream": True, **greedy}),
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
    ]


def _answers(url: str, prompts) -> list[str]:
    return [_post(url + path, body) for p in prompts for path, body in _requests(p)]


@pytest.mark.slow
def test_server_matches_stock_and_survives_load(checkpoint, tmp_path):
    """Completions and chat, streamed and not, give stock's text (the same prompt twice:
    the second reuses the prompt cache); 4 concurrent clients x 5 requests lose none and
    give the same greedy text as serial requests."""
    prompts = ["hello world", "tell me more", "hello world"]
    with server("mlx_lm", checkpoint, tmp_path / "stock.log") as (url, _):
        stock = _answers(url, prompts)
    assert all(stock), "a stock answer is empty: the comparison would prove nothing"
    with server("zmlx", checkpoint, tmp_path / "zmlx.log") as (url, proc):
        patched = _answers(url, prompts)
        assert patched == stock
        load = [(path, body) for p in ("one", "two", "three", "four", "five") for path, body in _requests(p)]
        serial = [_post(url + path, body) for path, body in load]
        jobs = [load[i::4] for i in range(4)]  # 4 clients, 5 requests each

        def client(requests):
            return [_post(url + path, body) for path, body in requests]

        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(client, jobs))
        assert [len(answers) for answers in concurrent] == [len(j) for j in jobs] == [5] * 4
        assert concurrent == [serial[i::4] for i in range(4)]
        assert proc.poll() is None
    assert report_in((tmp_path / "zmlx.log").read_text())
    assert not report_in((tmp_path / "stock.log").read_text())


# ---------------------------------------------------------------- Python API


def test_batch_generate_on_a_patched_model(checkpoint):
    import mlx_lm

    import zmlx

    model, tok = mlx_lm.load(checkpoint)
    prompts = [tok.encode(p) for p in ("hello world", "a", "tell me a long story please")]
    stock = mlx_lm.batch_generate(model, tok, prompts, max_tokens=8).texts
    result = zmlx.patch(model)
    assert result.patched_modules > 0
    assert mlx_lm.batch_generate(model, tok, prompts, max_tokens=8).texts == stock
    assert all(stock)


# ---------------------------------------------------------------- the shim itself


def test_mlx_lm_has_the_loader_names_the_shim_wraps():
    """If this fails, mlx-lm changed the internals the shim relies on (the loader names each
    command module imports from mlx_lm.utils and calls in main()): update zmlx.mlx_lm_tools."""
    import mlx_lm.utils

    for tool in mlx_lm_tools.TOOLS:
        module = mlx_lm_tools.tool_module(tool)
        mlx_lm_tools.check_hooks(tool, module)
        assert module.load is mlx_lm.utils.load, f"{module.__name__}.load is not mlx_lm.utils.load"


def test_check_hooks_names_what_is_missing():
    fake = types.SimpleNamespace(__name__="mlx_lm.generate", main=lambda: None)
    with pytest.raises(mlx_lm_tools.MlxLmHookError, match=r"mlx_lm.generate of mlx-lm .* has no load"):
        mlx_lm_tools.check_hooks("generate", fake)


def test_patched_loaders_patch_then_restore(checkpoint, capsys):
    import zmlx

    module = mlx_lm_tools.tool_module("generate")  # mlx_lm.generate is also a function's name
    original = module.load
    with mlx_lm_tools.patched_loaders(module, mlx_lm_tools.ToolOptions()):
        model, _ = module.load(checkpoint)
    assert zmlx.is_patched(model)
    assert module.load is original
    assert "zmlx: patched" in capsys.readouterr().err
    with mlx_lm_tools.patched_loaders(module, mlx_lm_tools.ToolOptions(patch=False)):
        model, _ = module.load(checkpoint)
    assert not zmlx.is_patched(model)


def test_under_a_launcher_only_rank_0_reports(checkpoint, capsys, monkeypatch):
    import zmlx
    from zmlx import distributed

    class Rank1:  # what mx.distributed.init() gives rank 1 of two
        def rank(self):
            return 1

    monkeypatch.setattr(distributed, "world", lambda: Rank1())
    module = mlx_lm_tools.tool_module("generate")
    with mlx_lm_tools.patched_loaders(module, mlx_lm_tools.ToolOptions()):
        model, _ = module.load(checkpoint)
    assert zmlx.is_patched(model)  # every rank patches its model
    assert "zmlx:" not in capsys.readouterr().err  # rank 1 says nothing


def test_split_args_takes_out_only_zmlx_flags():
    argv = ["--model", "m", "--patterns=moe_router", "--prompt=--x", "--exclude", "moe_combine", "-n"]
    options, rest = mlx_lm_tools.split_args(argv)
    assert options == mlx_lm_tools.ToolOptions(patterns=("moe_router",), exclude=("moe_combine",))
    assert rest == ["--model", "m", "--prompt=--x", "-n"]
    assert mlx_lm_tools.split_args(["--no-patch", "-h"]) == (mlx_lm_tools.ToolOptions(patch=False), ["-h"])
    assert mlx_lm_tools.split_args(["--preset", "fast"])[0].preset == "fast"
    with pytest.raises(ConfigError, match="unknown preset"):
        mlx_lm_tools.split_args(["--preset", "exact"])


def test_untested_mlx_lm_version_warns(monkeypatch):
    import mlx_lm

    assert mlx_lm_tools.version_warning() is None  # the pinned version
    monkeypatch.setattr(mlx_lm, "__version__", "9.9.9")
    assert "tested with mlx-lm 0.32.2; this is 9.9.9" in mlx_lm_tools.version_warning()


def test_run_restores_argv_and_appends_zmlx_help(capsys):
    saved = list(sys.argv)
    with pytest.raises(SystemExit) as exit_:
        mlx_lm_tools.run("generate", ["--help"])
    assert exit_.value.code == 0
    assert sys.argv == saved
    out = capsys.readouterr().out
    assert out.startswith("usage: zmlx generate") and "--patterns" in out
