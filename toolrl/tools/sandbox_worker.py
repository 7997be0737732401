"""The program that runs inside the sandbox: a stateful Python cell runner.

It is not imported by toolrl. `toolrl/tools/sandbox.py` reads this file and starts it with
`python -I -B -c <this source> <limits json>` inside bubblewrap, so nothing of the host's
package tree needs to be visible in the sandbox. It speaks length-prefixed JSON with the
host over its original stdin/stdout, then points the user-visible fds elsewhere:

    fd 0  /dev/null                    (a cell that reads stdin gets end-of-file)
    fd 1, 2  one append-only file on a size-capped tmpfs (print past the cap fails with ENOSPC)

Per request {"code": ...} it runs the cell in one persistent globals dict (variables and
functions survive between calls), shows the value of a trailing expression as a notebook
would, and answers {"type": "done", "output": ..., "error": ..., "output_full": bool}.
A predefined function for each exposed host tool sends {"type": "tool", ...} and waits for
the host's answer. After each cell every other process in the sandbox is killed, so no
background job outlives the call that started it.

Limits are set here as rlimits with soft == hard, so a cell can lower them but never raise
them. Process isolation, the read-only file system and the network are bubblewrap's job.
"""

import ast
import json
import os
import resource
import signal
import struct
import sys
import traceback

_LIMITS = {
    "cpu_seconds": resource.RLIMIT_CPU,
    "memory_bytes": resource.RLIMIT_AS,
    "max_processes": resource.RLIMIT_NPROC,
    "max_file_bytes": resource.RLIMIT_FSIZE,
    "stack_bytes": resource.RLIMIT_STACK,
}


def _send(out, msg):
    data = json.dumps(msg).encode()
    out.write(struct.pack(">I", len(data)) + data)
    out.flush()


def _recv(inp):
    head = inp.read(4)
    if len(head) < 4:
        sys.exit(0)  # the host closed the channel: the session is over
    (n,) = struct.unpack(">I", head)
    data = b""
    while len(data) < n:
        chunk = inp.read(n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return json.loads(data)


def _exposed(name, inp, out):
    def call(**arguments):
        if os.getpid() != _WORKER_PID:
            raise RuntimeError(f"{name}() can only be called from the main process")
        _send(out, {"type": "tool", "name": name, "arguments": arguments})
        reply = _recv(inp)
        return reply["text"]

    call.__name__ = name
    call.__doc__ = f"Call the {name} tool; returns its answer as text."
    return call


def _run_cell(code, env):
    tree = ast.parse(code, "<cell>", "exec")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<cell>", "exec"), env)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), env)
        if value is not None:
            print(repr(value))


def _format_error(e):
    if isinstance(e, SyntaxError):
        return "".join(traceback.format_exception_only(type(e), e))
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
        tb = tb.tb_next  # drop this runner's own frames: the model only needs its cell's
    return "".join(traceback.format_exception(type(e), e, tb))


def _collect_output(path, cap):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass  # the output file is full: what did fit is read below
    for stream in ("stdout", "stderr"):  # a failed flush leaves its buffer full; start afresh
        setattr(sys, stream, open(1 if stream == "stdout" else 2, "w", closefd=False))
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    os.truncate(path, 0)
    return data[:cap].decode("utf-8", "replace"), len(data) > cap


def _kill_strays():
    """Kill every other process in this pid namespace (bwrap, as pid 1, is exempt) and reap."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass  # there were none
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break


_WORKER_PID = os.getpid()


def main():
    cfg = json.loads(sys.argv[1])
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    sink = os.open(cfg["output_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    for fd in (null, sink):
        os.close(fd)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file cap fails, not kills
    for key, which in _LIMITS.items():
        if cfg.get(key):
            resource.setrlimit(which, (cfg[key], cfg[key]))
    env = {"__name__": "__main__", "__builtins__": __builtins__}
    for name in cfg.get("exposed", []):
        env[name] = _exposed(name, inp, out)
    _send(out, {"type": "ready"})
    while True:
        request = _recv(inp)
        error = None
        try:
            _run_cell(request["code"], env)
        except BaseException as e:  # SystemExit and KeyboardInterrupt included: the cell ends
            error = _format_error(e)
        if os.getpid() != _WORKER_PID:
            os._exit(0)  # a process the cell forked fell out of it: it must not answer the host
        output, full = _collect_output(cfg["output_path"], cfg["max_output_bytes"])
        if cfg.get("kill_strays"):
            _kill_strays()
        _send(out, {"type": "done", "output": output, "error": error, "output_full": full})


main()
