#!/usr/bin/env python3
"""Start a program under the hardening settings of a systemd unit's ``[Service]`` section, as
far as that can be done without systemd.

The test machine has no systemd as PID 1, so ``systemd-run --property=...`` cannot start the
proxy. Instead this launcher applies each setting of the unit the way systemd implements it,
with the same kernel mechanisms:

* stage 1, as root: new mount and UTS namespaces; the file system settings as mounts
  (``ProtectSystem=strict``: every mount read-only; ``PrivateTmp``, ``PrivateDevices``,
  ``ProtectHome``, ``ProtectProc``/``ProcSubset`` (a procfs mounted with ``hidepid=invisible,
  subset=pid``), ``ProtectKernelTunables``/``ProtectControlGroups`` (``/sys`` read-only),
  ``ProtectKernelModules``, ``ReadOnlyPaths``, ``LogsDirectory``); the syscall sets expanded
  by ``systemd-analyze syscall-filter`` itself; then ``setpriv`` for ``User``/``Group``,
  ``AmbientCapabilities``, ``CapabilityBoundingSet`` and ``NoNewPrivileges``;
* stage 2, as the service user: ``UMask``, ``LimitNOFILE``, and seccomp filters built with
  libseccomp for ``SystemCallFilter`` (with ``SystemCallErrorNumber`` and
  ``SystemCallArchitectures``), ``RestrictAddressFamilies``, ``MemoryDenyWriteExecute``,
  ``LockPersonality``, ``RestrictRealtime``, ``RestrictNamespaces``, ``RestrictSUIDSGID``, and
  the syscalls ``ProtectClock``, ``ProtectKernelModules``, ``ProtectKernelLogs``,
  ``ProtectHostname`` and ``PrivateDevices`` deny; then ``execv`` of the program.

What is not reproduced is listed in ``NOT_EMULATED`` with the reason; a setting this module
does not know makes it refuse to run, so a new setting in the unit cannot go untested.

Usage: ``sandbox.py UNIT SPEC_JSON -- PROGRAM ARGS...`` (stage 1, as root). SPEC_JSON:
``{"uid": N, "gid": N, "binds": {"/etc/persistproxy": "/host/dir", ...}, "expose":
["/root/.pyenv/versions/3.11.7", ...], "env": {...}}``. ``binds`` put the test's files where
the unit expects them; ``expose`` keeps a directory under a hidden home visible, read-only
(this machine's Python lives under /root; a deployment's lives in /usr).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

#: Every [Service] setting the launcher reproduces (as the module docstring says how).
EMULATED = {
    "User", "Group", "AmbientCapabilities", "CapabilityBoundingSet", "NoNewPrivileges",
    "ProtectSystem", "ReadOnlyPaths", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset",
    "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
    "LockPersonality", "MemoryDenyWriteExecute", "SystemCallArchitectures",
    "SystemCallFilter", "SystemCallErrorNumber", "UMask", "LimitNOFILE", "LogsDirectory",
    "PrivateMounts",
}

#: Settings that are not reproduced, and why that leaves start-up untested by nothing.
NOT_EMULATED = {
    "Type": "the notify protocol is tested with a socket standing in for systemd's",
    "NotifyAccess": "only the main process sends; nothing to apply at start-up",
    "ExecStartPre": "the test runs this command line itself, in the sandbox",
    "ExecStart": "the test runs this command line itself, in the sandbox",
    "ExecReload": "the test sends SIGHUP, as kill -HUP $MAINPID does",
    "KillSignal": "the test sends SIGTERM",
    "TimeoutStopSec": "systemd's timer; the drain's own timeout is tested elsewhere",
    "Restart": "systemd's policy after an exit",
    "RestartSec": "systemd's policy after an exit",
    "DevicePolicy": "a cgroup BPF device filter; PrivateDevices leaves no device to filter",
    "RemoveIPC": "cleans up after the service stops; nothing at start-up",
    "KeyringMode": "a session keyring of its own; the proxy uses no keyring",
}

# -- the unit ---------------------------------------------------------------------------------


def service_settings(unit: Path) -> list[tuple[str, str]]:
    """The ``[Service]`` section as (key, value) pairs, repeated keys kept in order."""
    out = []
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def unknown_settings(settings: list[tuple[str, str]]) -> list[str]:
    return sorted({k for k, _ in settings} - EMULATED - set(NOT_EMULATED))


def _values(settings: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in settings if k == key]


def _last(settings: list[tuple[str, str]], key: str, default: str = "") -> str:
    values = _values(settings, key)
    return values[-1] if values else default


def _yes(settings: list[tuple[str, str]], key: str) -> bool:
    return _last(settings, key, "no").lower() in ("yes", "true", "1", "on", "strict", "full")


# -- syscall sets, as systemd defines them ----------------------------------------------------


def syscall_sets() -> dict[str, list[str]]:
    """Every @set of this systemd, from ``systemd-analyze syscall-filter``."""
    text = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                          text=True, check=True).stdout
    sets: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = sets.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return sets


def expand(names: list[str], sets: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            out |= expand(sets[name], sets)
        else:
            out.add(name)
    return out


def filter_plan(settings: list[tuple[str, str]]) -> dict[str, Any]:
    """What stage 2 loads into seccomp, worked out while systemd-analyze is still reachable."""
    sets = syscall_sets()
    allowed: set[str] | None = None
    for value in _values(settings, "SystemCallFilter"):
        deny = value.startswith("~")
        names = value.lstrip("~").split()
        if allowed is None:
            if deny:
                raise SystemExit("sandbox: a deny-list SystemCallFilter is not supported")
            allowed = expand(["@default"], sets)  # systemd adds @default to an allow-list
        if deny:
            allowed -= expand(names, sets)
        else:
            allowed |= expand(names, sets)
    denied: set[str] = set()
    if _yes(settings, "ProtectClock"):
        denied |= expand(["@clock"], sets)
    if _yes(settings, "ProtectKernelModules"):
        denied |= expand(["@module"], sets)
    if _yes(settings, "PrivateDevices"):
        denied |= expand(["@raw-io"], sets)
    if _yes(settings, "ProtectKernelLogs"):
        denied.add("syslog")
    if _yes(settings, "ProtectHostname"):
        denied |= {"sethostname", "setdomainname"}
    families = _last(settings, "RestrictAddressFamilies").split()
    errno_name = _last(settings, "SystemCallErrorNumber", "")
    return {
        "allowed": sorted(allowed) if allowed is not None else None,
        "errno": getattr(errno, errno_name) if errno_name else None,
        "denied": sorted(denied),
        "families": [getattr(socket, f) for f in families],
        "mdwe": _yes(settings, "MemoryDenyWriteExecute"),
        "personality": _yes(settings, "LockPersonality"),
        "realtime": _yes(settings, "RestrictRealtime"),
        "namespaces": _yes(settings, "RestrictNamespaces"),
        "suid": _yes(settings, "RestrictSUIDSGID"),
        "umask": int(_last(settings, "UMask", "0022"), 8),
        "nofile": int(_last(settings, "LimitNOFILE", "0") or 0),
    }


# -- stage 1: mounts, as root -----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                   ctypes.c_ulong(flags), data.encode() if data else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {source} on {target} ({fstype}, {flags:#x}, {data!r}): "
                         f"{os.strerror(e)}")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, per-mount flags) of every mount, in mount order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")
        flags = 0
        for option in fields[5].split(","):
            flags |= _FLAGS.get(option, 0)
        out.append((point, flags))
    return out


def _read_only(point: str, flags: int) -> None:
    _mount("none", point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class Stage1:
    def __init__(self, settings: list[tuple[str, str]], spec: dict[str, Any]) -> None:
        self.settings = settings
        self.spec = spec
        self.scratch = ""

    def ensure_dir(self, path: str) -> None:
        """Make a mount point, without writing to the host: an overlay over its nearest
        existing ancestor, in this namespace only."""
        if os.path.isdir(path):
            return
        ancestor = os.path.dirname(path)
        while not os.path.isdir(ancestor):
            ancestor = os.path.dirname(ancestor)
        n = len(os.listdir(self.scratch))
        upper, work = f"{self.scratch}/{n}/upper", f"{self.scratch}/{n}/work"
        os.makedirs(upper)
        os.makedirs(work)
        _mount("overlay", ancestor, "overlay", 0,
               f"lowerdir={ancestor},upperdir={upper},workdir={work}")
        os.makedirs(path, exist_ok=True)

    def run(self) -> None:
        s = self.settings
        flags = CLONE_NEWNS | (CLONE_NEWUTS if _yes(s, "ProtectHostname") else 0)
        if _libc.unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        # Everything the mounts below hide, opened first and mounted from the descriptor.
        binds = {t: os.open(src, os.O_PATH) for t, src in self.spec["binds"].items()}
        exposed = {path: os.open(path, os.O_PATH) for path in self.spec.get("expose", [])}
        if not _yes(s, "PrivateTmp"):
            raise SystemExit("sandbox: needs PrivateTmp=yes (its /tmp holds the scratch space)")
        for tmp in ("/tmp", "/var/tmp"):
            _mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        writable = ["/tmp", "/var/tmp"]
        self.scratch = "/tmp/.sandbox"
        os.mkdir(self.scratch, 0o700)
        # The deployment: the test's files where the unit expects them.
        for target, fd in binds.items():
            self.ensure_dir(target)
            _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
            os.close(fd)
        for name in _values(s, "LogsDirectory"):
            writable.append(f"/var/log/{name}")
            if f"/var/log/{name}" not in self.spec["binds"]:
                raise SystemExit(f"sandbox: give a bind for LogsDirectory /var/log/{name}")
        if _last(s, "ProtectHome") == "yes":
            for home in ("/home", "/root", "/run/user"):
                if os.path.isdir(home):
                    _mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        # What must stay visible under a hidden home (this machine's Python), read-only.
        for path, fd in exposed.items():
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
        if _yes(s, "PrivateDevices"):
            self.private_dev()
        if _yes(s, "ProtectKernelModules"):
            for modules in ("/usr/lib/modules", "/lib/modules"):
                if os.path.isdir(modules) and not os.path.islink(modules):
                    _mount("tmpfs", modules, "tmpfs", MS_RDONLY, "mode=0000")
        proc = []
        if _last(s, "ProtectProc") not in ("", "default"):
            proc.append(f"hidepid={_last(s, 'ProtectProc')}")
        if _last(s, "ProcSubset") == "pid":
            proc.append("subset=pid")
        if proc:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(proc))
        self.read_only(writable)
        os.chdir("/")

    def private_dev(self) -> None:
        nodes = ["null", "zero", "full", "random", "urandom", "tty"]
        keep = {}
        for node in nodes:
            fd = os.open(f"/dev/{node}", os.O_PATH)
            keep[node] = fd
        _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
        for node, fd in keep.items():
            Path(f"/dev/{node}").touch()
            _mount(f"/proc/self/fd/{fd}", f"/dev/{node}", None, MS_BIND)
            os.close(fd)
        os.mkdir("/dev/shm", 0o1777)
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"/dev/{name}")

    def read_only(self, writable: list[str]) -> None:
        s = self.settings
        strict = _last(s, "ProtectSystem") == "strict"
        tunables = _yes(s, "ProtectKernelTunables") or _yes(s, "ProtectControlGroups")
        for point, flags in _mounts():
            if _under(point, writable) or _under(point, ["/dev", "/proc", self.scratch]):
                continue
            if _under(point, ["/sys"]):
                if tunables:
                    _read_only(point, flags)
                continue
            if strict or _under(point, _values(s, "ReadOnlyPaths")):
                _read_only(point, flags)


def stage1(unit: Path, spec: dict[str, Any], argv: list[str]) -> None:
    settings = service_settings(unit)
    unknown = unknown_settings(settings)
    if unknown:
        raise SystemExit(f"sandbox: settings it cannot apply or rule out: {unknown}")
    plan = filter_plan(settings)
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    Stage1(settings, spec).run()
    if plan["nofile"]:  # as root: the service user may not raise its hard limit
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan["nofile"], plan["nofile"]))
        except (ValueError, OSError):
            # No CAP_SYS_RESOURCE on this machine: the most it can have.
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            print(f"sandbox: LimitNOFILE={plan['nofile']} not applied: the hard limit here is "
                  f"{hard} and cannot be raised; {hard} set", file=sys.stderr)
    def capabilities(key: str) -> list[str]:
        return [c.lower().removeprefix("cap_") for c in _last(settings, key).split()]

    caps = capabilities("CapabilityBoundingSet")
    ambient = capabilities("AmbientCapabilities")
    command = [setpriv, f"--reuid={spec['uid']}", f"--regid={spec['gid']}", "--clear-groups",
               "--bounding-set=-all" + "".join(f",+{c}" for c in caps)]
    if ambient:
        command += ["--inh-caps=-all" + "".join(f",+{c}" for c in ambient),
                    "--ambient-caps=-all" + "".join(f",+{c}" for c in ambient)]
    if _yes(settings, "NoNewPrivileges"):
        command.append("--no-new-privs")
    command += [sys.executable, str(HERE), "--stage2", json.dumps(plan), "--", *argv]
    os.execve(setpriv, command, spec.get("env", {}))


# -- stage 2: seccomp, as the service user ----------------------------------------------------


class _Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


SCMP_ACT_ALLOW = 0x7FFF0000
CMP_NE, CMP_EQ, CMP_GE, CMP_MASKED_EQ = 1, 4, 5, 7


def _errno_action(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class Filter:
    """One seccomp filter; systemd loads one per feature too (the kernel applies the most
    restrictive answer of all of them)."""

    def __init__(self, default: int) -> None:
        self.lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2",
                               use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.ctx = self.lib.seccomp_init(ctypes.c_uint32(default))
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def number(self, name: str) -> int:
        nr: int = self.lib.seccomp_syscall_resolve_name(name.encode())
        return nr

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.number(name)
        if nr < 0:
            return  # not a syscall of this architecture (mmap2, _llseek, ...)
        array = (_Cmp * max(1, len(cmps)))(*[_Cmp(*c) for c in cmps])
        rc = self.lib.seccomp_rule_add_array(ctypes.c_void_p(self.ctx), ctypes.c_uint32(action),
                                             nr, len(cmps), array)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add {name} {cmps}: {os.strerror(-rc)}")

    def load(self) -> None:
        rc = self.lib.seccomp_load(ctypes.c_void_p(self.ctx))
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def stage2(plan: dict[str, Any], argv: list[str]) -> None:
    os.umask(plan["umask"])
    eperm = _errno_action(errno.EPERM)
    if plan["denied"]:
        f = Filter(SCMP_ACT_ALLOW)
        for name in plan["denied"]:
            f.rule(eperm, name)
        f.load()
    if plan["families"]:
        f = Filter(SCMP_ACT_ALLOW)
        allowed = set(plan["families"])
        for family in range(64):
            if family not in allowed:
                f.rule(_errno_action(errno.EAFNOSUPPORT), "socket", (0, CMP_EQ, family, 0))
        f.rule(_errno_action(errno.EAFNOSUPPORT), "socket", (0, CMP_GE, 64, 0))
        f.load()
    if plan["mdwe"]:
        import mmap
        f = Filter(SCMP_ACT_ALLOW)
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        f.rule(eperm, "mmap", (2, CMP_MASKED_EQ, wx, wx))
        f.rule(eperm, "mprotect", (2, CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        f.rule(eperm, "pkey_mprotect", (2, CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        f.rule(eperm, "shmat", (2, CMP_MASKED_EQ, 0o100000, 0o100000))  # SHM_EXEC
        f.load()
    if plan["personality"]:
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(eperm, "personality", (0, CMP_NE, 0, 0))  # PER_LINUX
        f.load()
    if plan["realtime"]:
        f = Filter(SCMP_ACT_ALLOW)
        for policy in (1, 2, 6):  # SCHED_FIFO, SCHED_RR, SCHED_DEADLINE
            f.rule(eperm, "sched_setscheduler", (1, CMP_EQ, policy, 0))
        f.load()
    if plan["namespaces"]:
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(eperm, "unshare")
        f.rule(eperm, "setns")
        for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                     0x40000000, 0x00000080):  # CLONE_NEWNS ... CLONE_NEWNET, NEWTIME
            f.rule(eperm, "clone", (0, CMP_MASKED_EQ, flag, flag))
        f.rule(_errno_action(errno.ENOSYS), "clone3")  # systemd's answer: use clone()
        f.load()
    if plan["suid"]:
        f = Filter(SCMP_ACT_ALLOW)
        for name, arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("mkdir", 1),
                          ("mkdirat", 2), ("mknod", 1), ("mknodat", 2), ("creat", 1)):
            for bit in (0o4000, 0o2000):
                f.rule(eperm, name, (arg, CMP_MASKED_EQ, bit, bit))
        f.load()
    if plan["allowed"] is not None:
        # Last, as systemd does: it may well deny seccomp() itself.
        f = Filter(_errno_action(plan["errno"]) if plan["errno"] else 0x80000000)
        for name in plan["allowed"]:
            f.rule(SCMP_ACT_ALLOW, name)
        f.load()
    os.execv(argv[0], argv)


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    head, argv = args[:split], args[split + 1:]
    if head[0] == "--stage2":
        stage2(json.loads(head[1]), argv)
    else:
        stage1(Path(head[0]), json.loads(head[1]), argv)


if __name__ == "__main__":
    main()
