"""The Python tool under attack: each case asserts containment, that nothing is left running,
and that the next call works. Real bubblewrap sandboxes, no mocks.

    python -m pytest tests/unit/test_python_sandbox.py -v

Without `bwrap` these tests skip, except under CI (TOOLRL_REQUIRE_BWRAP=1), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.unit.sandbox_procs import UID_BASE, sandbox_pids
from toolrl.tools.calculator import Calculator
from toolrl.tools.python_exec import PythonTool
from toolrl.tools.sandbox import SandboxConfig, check_host, probe

if shutil.which("bwrap") is None:
    if os.environ.get("TOOLRL_REQUIRE_BWRAP"):
        raise RuntimeError("bwrap is required here: apt-get install bubblewrap")
    pytest.skip("bubblewrap is not installed", allow_module_level=True)

TIMEOUT = 2.0
SECRET = "toolrl-test-secret-4242"


def run(script: Callable[[PythonTool], Awaitable[None]], **kwargs: object) -> None:
    """Run `script` against a fresh tool, then check no sandbox process outlives the tool."""
    before = sandbox_pids()
    os.environ["TOOLRL_SECRET"] = SECRET  # a host secret that must never be readable inside

    async def main() -> None:
        sandbox = {"uid_base": UID_BASE, **kwargs.pop("sandbox", {})}  # type: ignore[dict-item]
        tool = PythonTool(**{"timeout_s": TIMEOUT, "pool_size": 2, "sandbox": sandbox, **kwargs})
        try:
            await script(tool)
        finally:
            for key in list(tool._sessions):
                await tool.close(key)
            await tool.pool.close()

    try:
        asyncio.run(main())
    finally:
        del os.environ["TOOLRL_SECRET"]
    deadline = time.time() + 5
    while sandbox_pids() - before and time.time() < deadline:
        time.sleep(0.05)
    left = {p: open(f"/proc/{p}/status").read()[:300] for p in sandbox_pids() - before}
    assert not left, f"sandbox processes outlived the tool: {left}"


async def call(tool: PythonTool, code: str, key: str = "t") -> tuple[str, bool]:
    if key not in tool._sessions:
        await tool.open(key)
    return await tool.call(key, {"code": code})


async def still_works(tool: PythonTool, key: str = "t") -> None:
    text, ok = await call(tool, "print(6 * 7)", key)
    assert ok and text.endswith("42"), text


# --- ordinary use --------------------------------------------------------------------------


def test_state_persists_and_expressions_show() -> None:
    async def script(tool: PythonTool) -> None:
        assert await call(tool, "x = 41\ndef f(v):\n    return v + 1") == ("(no output)", True)
        assert await call(tool, "f(x)") == ("42", True)
        text, ok = await call(tool, "undefined_name")
        assert not ok and "NameError" in text and "sandbox_worker" not in text

    run(script)


def test_exposed_tool_is_a_function_inside() -> None:
    async def script(tool: PythonTool) -> None:
        assert await call(tool, "print(calculator(expression='37 * 58'))") == ("2146", True)
        text, _ = await call(tool, "calculator(expression='1/0')")
        assert "division by zero" in text

    run(script, expose={"calculator": Calculator()})


def test_parallel_calls_of_one_turn_run_in_order_on_one_interpreter() -> None:
    async def script(tool: PythonTool) -> None:
        await tool.open("t")
        cells = ["import time\nlog = []\ntime.sleep(0.2)\nlog.append(1)"]
        cells += [f"log.append({i})\nlen(log)" for i in (2, 3)]
        results = await asyncio.gather(*(tool.call("t", {"code": c}) for c in cells))
        assert results == [("(no output)", True), ("2", True), ("3", True)]
        assert await call(tool, "log") == ("[1, 2, 3]", True)

    run(script)


def test_syntax_error_is_reported() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "def (:")
        assert not ok and "SyntaxError" in text
        await still_works(tool)

    run(script)


# --- the adversarial suite -----------------------------------------------------------------


def test_fork_bomb_is_capped() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "import os\nwhile True:\n    os.fork()")
        assert not ok and ("BlockingIOError" in text or "timed out" in text), text
        await still_works(tool)

    run(script, sandbox={"max_processes": 8})


def test_memory_bomb_raises_memory_error() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "x = bytearray(8 << 30)")
        assert not ok and "MemoryError" in text, text
        await still_works(tool)

    run(script, sandbox={"memory_mb": 512})


def test_infinite_loop_times_out_and_resets() -> None:
    async def script(tool: PythonTool) -> None:
        await call(tool, "keep = 1")
        start = time.time()
        text, ok = await call(tool, "while True:\n    pass")
        assert not ok and "timed out" in text and time.time() - start < TIMEOUT + 1.5
        text, ok = await call(tool, "print(6 * 7)")
        assert ok and text.startswith("[the Python state was reset") and text.endswith("42")
        assert "NameError" in (await call(tool, "keep"))[0]

    run(script)


def test_sleep_forever_times_out() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "import time\ntime.sleep(10**6)")
        assert not ok and "timed out" in text
        await still_works(tool)

    run(script)


def test_cell_that_ignores_signals_is_still_killed() -> None:
    async def script(tool: PythonTool) -> None:
        code = (
            "import signal\n"
            "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
            "    signal.signal(s, signal.SIG_IGN)\n"
            "while True:\n    pass"
        )
        text, ok = await call(tool, code)
        assert not ok and "timed out" in text
        await still_works(tool)

    run(script)


def test_reading_stdin_gets_end_of_file() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "input()")
        assert not ok and "EOFError" in text
        assert await call(tool, "import sys\nprint(repr(sys.stdin.read()))") == ("''", True)

    run(script)


def test_endless_stdout_is_cut_with_a_marker() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "while True:\n    print('spam' * 100)")
        assert not ok and "[output cut at 4096 bytes]" in text and "No space left" in text
        assert len(text) < 4096 + 2000
        await still_works(tool)

    run(script, sandbox={"max_output_bytes": 4096})


def test_binary_output_comes_back_as_text() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "import sys\nsys.stdout.buffer.write(bytes(range(256)))")
        assert ok and isinstance(text, str) and "\ufffd" in text and "ABC" in text
        await still_works(tool)

    run(script)


def test_no_network() -> None:
    async def script(tool: PythonTool) -> None:
        code = "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)"
        text, ok = await call(tool, code)
        assert not ok and "Network is unreachable" in text, text
        await still_works(tool)

    run(script)


def test_no_dns() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "import socket\nsocket.getaddrinfo('pypi.org', 443)")
        assert not ok and "gaierror" in text, text
        await still_works(tool)

    run(script)


def test_host_files_are_not_there() -> None:
    here = os.path.abspath(__file__)

    async def script(tool: PythonTool) -> None:
        for path in (here, "/etc/shadow", "/etc/passwd", "/root/.bashrc", "/home"):
            text, ok = await call(tool, f"open({path!r}).read()")
            assert not ok and "No such file or directory" in text, (path, text)
        listing, _ = await call(tool, "import os\nsorted(os.listdir('/'))")
        assert "work" not in listing and "root" not in listing and "home" not in listing

    run(script)


def test_no_host_environment_anywhere() -> None:
    async def script(tool: PythonTool) -> None:
        code = (
            "import os\n"
            "found = [open(f'/proc/{p}/environ', 'rb').read() for p in os.listdir('/proc')"
            " if p.isdigit()]\n"
            "print(sorted(os.environ), b'SECRET' in b''.join(found))"
        )
        text, ok = await call(tool, code)
        assert ok and text == "['HOME', 'LC_CTYPE', 'PATH', 'PWD', 'TMPDIR'] False", text
        assert SECRET not in text

    run(script)


def test_writing_outside_scratch_fails() -> None:
    async def script(tool: PythonTool) -> None:
        for path in ("/usr/evil", "/evil", "/dev/evil", "/proc/evil", "/run/evil", "/tmp/evil"):
            text, ok = await call(tool, f"open({path!r}, 'w').write('x')")
            assert not ok and ("Read-only" in text or "No such file" in text), (path, text)
        assert await call(tool, "open('/scratch/ok', 'w').write('ok')") == ("2", True)

    run(script)


def test_filling_the_disk_stops_at_the_cap() -> None:
    async def script(tool: PythonTool) -> None:
        for path in ("/scratch/big", "/dev/shm/big"):
            code = f"f = open({path!r}, 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))"
            text, ok = await call(tool, code)
            assert not ok and ("No space left" in text or "File too large" in text), text
            size, _ = await call(tool, f"import os\nos.path.getsize({path!r}) >> 20")
            assert int(size) <= 8
        await still_works(tool)

    run(script, sandbox={"scratch_mb": 8})


def test_killing_the_parent_and_everyone_is_contained() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        assert ok, text  # the sandbox's pid 1 shrugs it off
        await still_works(tool)
        await call(tool, "import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(0, 9)")
        await still_works(tool)  # whatever died, the next call works

    run(script)
    assert os.getppid() > 1  # and this test process and its parent are alive


def test_background_process_does_not_outlive_its_call() -> None:
    async def script(tool: PythonTool) -> None:
        code = (
            "import posix, time\n"
            "if posix.fork() == 0:\n"
            "    time.sleep(0.5)\n"
            "    open('/scratch/late', 'w').write('escaped')\n"
            "    posix._exit(0)\n"
        )
        assert (await call(tool, code))[1]
        await asyncio.sleep(1.0)
        assert await call(tool, "import os\nos.path.exists('/scratch/late')") == ("False", True)

    run(script)


def test_subclasses_escape_reaches_nothing_more() -> None:
    async def script(tool: PythonTool) -> None:
        code = (
            "w = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close']\n"
            "sys_ = w[0].__init__.__globals__['system']\n"
            f"print(sys_('cat {os.path.abspath(__file__)} > /scratch/leak 2>&1'))\n"
            "print(open('/scratch/leak').read())"
        )
        text, _ = await call(tool, code)
        assert "No such file" in text and "assert" not in text, text

    run(script)


def test_segfault_resets_state_and_says_so() -> None:
    async def script(tool: PythonTool) -> None:
        await call(tool, "kept = 1")
        text, ok = await call(tool, "import ctypes\nctypes.string_at(0)")
        assert not ok and "SIGSEGV" in text and "reset" in text, text
        text, ok = await call(tool, "kept")
        assert text.startswith("[the Python state was reset") and "NameError" in text
        await still_works(tool)

    run(script)


def test_deep_recursion() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "def f(n):\n    return f(n + 1)\nf(0)")
        assert not ok and "RecursionError" in text
        code = "import sys\nsys.setrecursionlimit(10**8)\ndef g(n):\n    return g(n + 1)\ng(0)"
        text, ok = await call(tool, code)
        assert not ok and ("SIGSEGV" in text or "RecursionError" in text or "timed out" in text)
        await still_works(tool)

    run(script)


def test_state_is_isolated_between_trajectories() -> None:
    async def script(tool: PythonTool) -> None:
        await call(tool, "secret = 'a'\nopen('/scratch/mine', 'w').write('a')", key="a")
        text, ok = await call(tool, "secret", key="b")
        assert not ok and "NameError" in text
        assert (await call(tool, "import os\nos.listdir('/scratch')", key="b")) == ("[]", True)
        assert (await call(tool, "secret", key="a")) == ("'a'", True)
        await tool.close("a")
        text, _ = await call(tool, "secret", key="a")  # a new trajectory with the same key
        assert "NameError" in text

    run(script)


def test_malformed_arguments_are_errors_the_model_reads() -> None:
    async def script(tool: PythonTool) -> None:
        await tool.open("t")
        for args in ({}, {"code": 5}, {"code": "1", "extra": 2}, {"source": "1"}):
            text, ok = await tool.call("t", args)
            assert not ok and "python takes one argument, code" in text, args
        await still_works(tool)

    run(script)


def test_oversized_arguments_are_refused_without_running() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "x = 1\n" + "#" * 30_000)
        assert not ok and "limit is 20000" in text
        assert "NameError" in (await call(tool, "x"))[0]

    run(script)


def test_cancelled_call_kills_the_sandbox_and_the_next_call_resets() -> None:
    """The rollout loop's own timeout cancels the call: the process must not keep running."""

    async def script(tool: PythonTool) -> None:
        await call(tool, "kept = 1")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call(tool, "while True:\n    pass"), 0.5)
        text, ok = await call(tool, "print(6 * 7)")
        assert ok and text.startswith("[the Python state was reset") and text.endswith("42")

    run(script, timeout_s=30.0)


def test_cpu_limit_kills_a_spinning_session() -> None:
    async def script(tool: PythonTool) -> None:
        text, ok = await call(tool, "while True:\n    pass")
        assert not ok and ("SIGKILL" in text or "SIGXCPU" in text), text
        await still_works(tool)

    run(script, timeout_s=10.0, sandbox={"cpu_seconds": 1})


def test_works_under_uvloop_as_in_a_ray_actor() -> None:
    """Ray runs async actors on uvloop, whose subprocess support differs from asyncio's."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[str, bool]:
        tool = PythonTool(timeout_s=TIMEOUT, pool_size=1)
        try:
            await tool.open("t")
            await tool.call("t", {"code": "x = 6"})
            return await tool.call("t", {"code": "x * 7"})
        finally:
            await tool.close("t")
            await tool.pool.close()

    assert uvloop.run(main()) == ("42", True)


def test_bad_config_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="isolation is 'docker'"):
        PythonTool(sandbox={"isolation": "docker"})
    with pytest.raises(ValueError, match="not an executable interpreter"):
        PythonTool.preflight(sandbox={"python": "/nonexistent/python"})
    with pytest.raises(TypeError):
        SandboxConfig(**{"memory": 1})


def test_probe_from_inside_finds_no_gap_in_bwrap_and_the_gaps_without_it() -> None:
    assert asyncio.run(probe(SandboxConfig(uid_base=UID_BASE))) == []
    gaps = asyncio.run(probe(SandboxConfig(isolation="none")))
    assert "processes: not in a pid namespace of its own" in gaps
    assert any(g.startswith("file system: host path") for g in gaps)


def test_host_report_names_what_is_not_enforced() -> None:
    report = check_host(SandboxConfig(isolation="none"))
    assert any("isolation=none" in gap for gap in report.unenforced)
    assert report.nproc_cap >= SandboxConfig().max_processes
