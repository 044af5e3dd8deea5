"""The SSH transport: `SSHTransport`, the only module in fleet that imports paramiko.

It owns everything between "run this command on that host" and bytes coming back over SSH:

* resolving a `Host` through an OpenSSH client config (parsed once per transport by paramiko's
  SSHConfig; what an entry means is `fleet.transport.config`);
* strict host-key checking against known_hosts files (`fleet.transport.known_hosts`), parsed
  once per transport and shared by every connection; unknown keys are refused unless
  `accept_new` was asked for explicitly, changed or revoked keys are always refused;
* public-key authentication with configured identity files, ssh-agent and the default
  ~/.ssh/id_* files, private keys loaded once per transport;
* one lazily opened connection per host, reused by later calls; one channel per command,
  stdout and stderr read concurrently in the calling thread, output capped, time bounded (a
  watchdog thread closes a channel whose server never answers);
  calls for one host from several threads share its connection, each on its own channel, at
  most `max_sessions` at once (under OpenSSH's default MaxSessions of 10);
* ProxyJump (a direct-tcpip channel through the jump host's own checked connection) and
  ProxyCommand.

`run_many` is the shared one of `fleet.transport.protocol`.  Import this module only where a
connection is really opened: importing it loads paramiko (~90 ms of CPU).

Why paramiko directly and not `fabric.Connection`: fabric hard-codes paramiko's AutoAddPolicy
(silent acceptance of any host key), re-reads private key files on every connection, and runs
each command through invoke's Runner with extra threads.  docs/TRANSPORT.md has the details and
the measurements.

Every value that reaches a remote shell must go through `quote`.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fleet.errors import TransportError
from fleet.model import Host
from fleet.transport import config
from fleet.transport.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDENTITY_FILES, MAX_PROXY_JUMPS, SSHTarget
from fleet.transport.known_hosts import (
    KnownHosts,
    KnownKey,
    blob_key_type,
    check_host_key,
    fingerprint,
    hostkey_error,
    hostkey_name,
)
from fleet.transport.protocol import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_SESSIONS,
    MIB,
    CommandFor,
    OnDone,
    Outcome,
    RunResult,
    run_many,
    sudo_command,
    sudo_refusal,
)

# paramiko.config imports invoke (only for `Match exec` in ssh configs), which pulls in asyncio
# and unittest.mock: ~45 ms of CPU on every fleet invocation.  Import paramiko without it and
# bring invoke in only when a config actually uses `Match exec` (see _load_ssh_config).
if "invoke" in sys.modules or "paramiko" in sys.modules:
    import paramiko
else:
    sys.modules["invoke"] = None  # type: ignore[assignment]  # makes `import invoke` fail
    try:
        import paramiko
    finally:
        del sys.modules["invoke"]

log = logging.getLogger(__name__)
# paramiko's transport thread logs failures (with tracebacks) that fleet reports as
# TransportErrors anyway; without a handler Python would print them on stderr.  An app that
# configures logging (e.g. --debug) still gets them through propagation.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

DEFAULT_MAX_CONNECTIONS = 64  # idle connections kept open at most

_CHUNK = 64 * 1024
_STDIN_POLL = 0.02  # poll interval while stdin is waiting for window space (seconds)


# --------------------------------------------------------------------------- ssh_config


def _load_ssh_config(path: str) -> paramiko.SSHConfig:
    text = config.read_config(path)
    if config.uses_match_exec(text) and getattr(paramiko.config, "invoke", True) is None:
        import invoke  # `Match exec` runs its command through invoke

        setattr(paramiko.config, "invoke", invoke)  # noqa: B010 - not in paramiko's stubs
    return paramiko.SSHConfig.from_text(text)


# --------------------------------------------------------------------------- transport


@dataclass
class _Slot:
    """One host's connection and counters.  `lock` serializes opening (and closing) the
    connection; commands run on it concurrently, `sessions` bounding how many at once, `busy`
    counting those in flight (guarded by the transport's lock) so that a busy connection is never
    evicted as idle."""

    sessions: threading.BoundedSemaphore
    lock: threading.Lock = field(default_factory=threading.Lock)
    transport: paramiko.Transport | None = None
    busy: int = 0
    last_used: float = 0.0
    pinned: bool = False  # a ProxyJump host: other connections tunnel through it
    connections: int = 0
    channels: int = 0


class _Deadlines:
    """One watchdog thread per SSHTransport that runs an action once a deadline passes.

    paramiko's `Channel.exec_command` waits for the server's reply without a timeout; the
    watchdog closes the channel so that a server that never answers cannot hang a run.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._items: dict[int, tuple[float, Callable[[], None]]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, deadline: float, action: Callable[[], None]) -> int:
        with self._cv:
            self._next += 1
            self._items[self._next] = (deadline, action)
            self._stopped = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fleet-ssh-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()
            return self._next

    def disarm(self, token: int) -> bool:
        """False when the action already ran."""
        with self._cv:
            return self._items.pop(token, None) is not None

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            due: list[Callable[[], None]] = []
            with self._cv:
                if self._stopped:
                    self._thread = None
                    return
                now = time.monotonic()
                for token, (deadline, action) in list(self._items.items()):
                    if deadline <= now:
                        due.append(action)
                        del self._items[token]
                if not due:
                    nearest = min((d for d, _ in self._items.values()), default=None)
                    self._cv.wait(None if nearest is None else max(0.0, nearest - now))
                    continue
            for action in due:
                try:
                    action()
                except Exception:  # a failing close must not kill the watchdog
                    log.debug("deadline action failed", exc_info=True)


class SSHTransport:
    """Runs commands on hosts over SSH; see the module docstring and docs/TRANSPORT.md.

    Thread-safe: calls for different hosts run concurrently; calls for the same host share that
    host's one connection and run concurrently too, each on its own channel, at most
    `max_sessions` at once.  Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        *,
        ssh_config: str | None = None,
        known_hosts: Sequence[str] | None = None,
        accept_new: bool = False,
        connect_timeout: float | None = None,
        command_timeout: float = 60.0,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        allow_agent: bool = True,
        look_for_keys: bool = True,
    ) -> None:
        """
        ssh_config: an OpenSSH client config; None means ~/.ssh/config when it exists.
        known_hosts: the files host keys are checked against; None means ~/.ssh/known_hosts and
            /etc/ssh/ssh_known_hosts.  A host whose config entry names UserKnownHostsFile uses
            those files (plus GlobalKnownHostsFile or /etc/ssh/ssh_known_hosts) instead.
        accept_new: record unknown host keys in the first (user) known_hosts file, like
            StrictHostKeyChecking=accept-new.  Changed keys are refused regardless.
        connect_timeout: seconds for TCP connect + SSH handshake + authentication.  Given, it wins
            over a host's ConnectTimeout in the ssh config (like `ssh -o` over the config file);
            None means that ConnectTimeout, else 10 s.
        command_timeout: seconds a command may run when `run` is not given a timeout.
        max_output: bytes of stdout (and, separately, of stderr) read before the command is
            aborted with kind "output-too-large".
        max_connections: idle connections beyond this many are closed, least recently used
            first (each open connection costs a paramiko thread and a socket).
        max_sessions: commands run at once on one host's connection; more wait their turn.
        allow_agent / look_for_keys: use ssh-agent keys / the default ~/.ssh/id_* files.
        """
        if ssh_config is None:
            ssh_config = config.default_config_path()
        self.ssh_config_path = ssh_config
        self._config = _load_ssh_config(ssh_config) if ssh_config else None
        self.known_hosts, self._record_to = config.known_hosts_files(known_hosts)
        self.accept_new = accept_new
        self._connect_timeout_given = connect_timeout is not None
        self.connect_timeout = float(connect_timeout) if connect_timeout is not None else DEFAULT_CONNECT_TIMEOUT
        self.command_timeout = float(command_timeout)
        self.max_output = int(max_output)
        self.max_connections = max(1, int(max_connections))
        self.max_sessions = max(1, int(max_sessions))
        self.allow_agent = allow_agent
        self.look_for_keys = look_for_keys
        self._lock = threading.Lock()  # guards _slots (never held while doing network I/O)
        self._slots: dict[str, _Slot] = {}
        self._files_lock = threading.Lock()
        self._known: dict[str, KnownHosts] = {}
        self._keys: dict[str, tuple[paramiko.PKey | None, str]] = {}
        self._deadlines = _Deadlines()

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> SSHTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open connection (a later `run` opens a new one)."""
        with self._lock:
            slots = list(self._slots.values())
        # Tunnelled connections first, the ProxyJump hosts they run through last.
        for slot in sorted(slots, key=lambda s: s.pinned):
            with slot.lock:
                if slot.transport is not None:
                    slot.transport.close()
                    slot.transport = None
        self._deadlines.stop()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per host: how many connections (attempts) and channels (commands, tunnels) this
        transport has opened, e.g. {"fritz": {"connections": 1, "channels": 1}}."""
        with self._lock:
            return {name: {"connections": s.connections, "channels": s.channels} for name, s in self._slots.items()}

    def resolve(self, host: Host) -> SSHTarget:
        """Where and how `host` is reached: its ssh config entry (looked up by the host's
        NAME) wins for HostName/Port/User, the inventory's address/port/user fill the rest."""
        entry: dict[str, Any] = dict(self._config.lookup(host.name)) if self._config else {}
        return config.resolve(host, entry, known_hosts=self.known_hosts, record_to=self._record_to,
                              connect_timeout=self.connect_timeout, connect_timeout_given=self._connect_timeout_given)

    def run(
        self,
        host: Host,
        command: str,
        *,
        sudo: bool | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> RunResult:
        """Run `command` (a shell command line) on `host` and return what it did.

        A non-zero exit code is a RunResult, not an error.  Raises TransportError when the
        command could not be run or finished: unreachable, auth, hostkey, timeout, protocol,
        sudo (sudo wanted a password or refused), output-too-large.  With `sudo` (default:
        `host.sudo`) the command runs as `sudo -n -- sh -c <command>`.  `stdin` is sent to the
        command, then end-of-file.  `timeout` (default: command_timeout) bounds the command,
        not the connection setup (connect_timeout).
        """
        use_sudo = host.sudo if sudo is None else sudo
        wire = _eof_safe(command, stdin, use_sudo)
        limit = self.command_timeout if timeout is None else float(timeout)
        slot = self._slot(host.name)
        try:
            with slot.sessions:
                with slot.lock:
                    transport = self._ensure_connected(host.name, slot, lambda: self.resolve(host), ())
                    with self._lock:
                        slot.busy += 1
                try:
                    result = self._exec(host.name, slot, transport, command, wire, stdin, limit)
                finally:
                    with self._lock:
                        slot.busy -= 1
        except TransportError:
            raise
        except Exception as exc:  # e.g. a malformed Port in the ssh config: still this host's failure
            raise TransportError(
                host.name, "protocol", f"{host.name}: {type(exc).__name__}: {exc}", hint="see the debug log"
            ) from exc
        if use_sudo:
            refusal = sudo_refusal(result.exit_code, result.stderr)
            if refusal is not None:
                raise TransportError(
                    host.name,
                    "sudo",
                    f"sudo on {host.name} refused to run the command non-interactively: {refusal}",
                    hint=f"give {self.resolve(host).user} passwordless sudo (NOPASSWD in "
                    "/etc/sudoers.d/) for the commands fleet runs, or connect as root "
                    "(sudo = false in the host's inventory file)",
                )
        return result

    def run_many(
        self,
        hosts: Sequence[Host],
        command_for: CommandFor,
        *,
        forks: int | None = None,
        sudo: bool | None = None,
        timeout: float | None = None,
        on_done: OnDone | None = None,
    ) -> dict[str, Outcome]:
        """Run a command on every host in parallel; every host gets a value
        (`fleet.transport.protocol.run_many`)."""
        return run_many(self, hosts, command_for, forks=forks, sudo=sudo, timeout=timeout, on_done=on_done,
                        thread_name_prefix="fleet-ssh")

    # ------------------------------------------------------------------ connections

    def _slot(self, name: str) -> _Slot:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = _Slot(sessions=threading.BoundedSemaphore(self.max_sessions))
            return slot

    def _ensure_connected(
        self,
        name: str,
        slot: _Slot,
        resolve: Callable[[], SSHTarget],
        via: tuple[str, ...],
    ) -> paramiko.Transport:
        """The host's open transport, opening it if needed.  Caller holds `slot.lock`."""
        slot.last_used = time.monotonic()
        current = slot.transport
        if current is not None:
            if current.is_active():
                return current
            log.debug("connection to %s found closed (%r); reconnecting", name, current.get_exception())
            self._drop(slot, current)
        target = resolve()
        self._evict_idle(keep=slot)
        with self._lock:
            slot.connections += 1  # attempts: a refused connection still cost one
        transport = self._connect(target, via)
        with self._lock:  # _drop compares and clears under this lock
            slot.transport = transport
        return transport

    def _evict_idle(self, keep: _Slot) -> None:
        """Close least-recently-used idle connections so at most max_connections stay open."""
        with self._lock:
            candidates = [s for s in self._slots.values()
                          if s is not keep and s.transport is not None and not s.pinned and not s.busy]
            open_now = sum(1 for s in self._slots.values() if s.transport is not None)
        excess = open_now + 1 - self.max_connections
        for slot in sorted(candidates, key=lambda s: s.last_used):
            if excess <= 0:
                break
            if slot.lock.acquire(blocking=False):  # a slot being connected is not idle either
                try:
                    with self._lock:  # busy only grows under slot.lock, which we hold
                        idle, current = not slot.busy, slot.transport
                    if idle and current is not None:
                        self._drop(slot, current)
                        excess -= 1
                finally:
                    slot.lock.release()

    def _connect(self, target: SSHTarget, via: tuple[str, ...]) -> paramiko.Transport:
        """TCP (or tunnel) + handshake + host-key check + authentication, all within the
        target's connect timeout."""
        started = time.monotonic()
        deadline = started + target.connect_timeout
        transport: paramiko.Transport | None = None
        sock: socket.socket | paramiko.Channel | paramiko.ProxyCommand | None = None
        phase = "TCP connect"
        try:
            sock = self._open_socket(target, deadline, via)
            phase = "SSH handshake"
            transport = paramiko.Transport(sock)
            remaining = _remaining(deadline)
            transport.banner_timeout = remaining
            transport.handshake_timeout = remaining
            self._prefer_known_key_types(transport, target)
            transport.start_client(timeout=remaining)
            self._verify_host_key(transport, target)
            phase = "authentication"
            transport.auth_timeout = _remaining(deadline)
            self._authenticate(transport, target, deadline)
            log.debug(
                "connected to %s (%s:%d) in %.3fs: hostkey=%s cipher=%s mac=%s",
                target.name,
                target.address,
                target.port,
                time.monotonic() - started,
                transport.host_key_type,
                transport.local_cipher,
                transport.local_mac,
            )
            return transport
        except BaseException as exc:
            if transport is not None:
                transport.close()
            elif sock is not None:
                sock.close()
            if isinstance(exc, TransportError) or not isinstance(exc, Exception):
                raise
            raise _connect_error(exc, target, phase, deadline) from exc

    def _open_socket(
        self, target: SSHTarget, deadline: float, via: tuple[str, ...]
    ) -> socket.socket | paramiko.Channel | paramiko.ProxyCommand:
        if target.proxy_jump:
            return self._tunnel(target, deadline, via)
        if target.proxy_command:
            return paramiko.ProxyCommand(target.proxy_command)
        raw = socket.create_connection((target.address, target.port), timeout=_remaining(deadline))
        sock: socket.socket = _QuickAckSocket(fileno=raw.detach()) if _QUICKACK is not None else raw
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _tunnel(self, target: SSHTarget, deadline: float, via: tuple[str, ...]) -> paramiko.Channel:
        """A direct-tcpip channel to the target through its ProxyJump host(s)."""
        assert target.proxy_jump is not None
        hops = [h.strip() for h in target.proxy_jump.split(",") if h.strip()]
        last, before = hops[-1], ",".join(hops[:-1]) or None
        if last in via or len(via) >= MAX_PROXY_JUMPS:
            raise TransportError(
                target.name,
                "protocol",
                f"ProxyJump for {target.name} loops or is too long: {' -> '.join((*via, last))}",
                hint="check the ProxyJump settings in the ssh config",
            )
        user, jump_host, port = config.parse_jump(last)

        def resolve_jump() -> SSHTarget:
            base = Host(name=jump_host, address=jump_host, user=getpass.getuser())
            jt = self.resolve(base)
            return replace(
                jt,
                name=last,
                user=user or jt.user,
                port=port or jt.port,
                hostkey_name=jt.hostkey_name if port in (None, jt.port) else hostkey_name(jt.address, port),
                proxy_jump=before if before is not None else jt.proxy_jump,
            )

        slot = self._slot(last)
        slot.pinned = True
        try:
            with slot.lock:
                jump = self._ensure_connected(last, slot, resolve_jump, (*via, target.name))
            channel = jump.open_channel(
                "direct-tcpip",
                (target.address, target.port),
                ("127.0.0.1", 0),
                timeout=_remaining(deadline),
            )
        except TransportError as exc:
            raise TransportError(target.name, exc.kind, f"via ProxyJump {last}: {exc.message}", hint=exc.hint) from exc
        except paramiko.ChannelException as exc:
            raise TransportError(
                target.name,
                "unreachable",
                f"ProxyJump host {last} could not connect to {target.address}:{target.port}: {exc.text}",
                hint=f"check that {last} can reach {target.address}:{target.port} and allows TCP forwarding",
            ) from exc
        with self._lock:
            slot.channels += 1
        return channel

    # ------------------------------------------------------------------ host keys

    def _known_hosts_file(self, path: str) -> KnownHosts:
        with self._files_lock:
            known = self._known.get(path)
            if known is None:
                known = self._known[path] = KnownHosts.load(path)
            return known

    def _known_entries(self, target: SSHTarget) -> list[KnownKey]:
        entries: list[KnownKey] = []
        for path in target.known_hosts:
            entries += self._known_hosts_file(path).lookup(target.hostkey_name)
        return entries

    def _prefer_known_key_types(self, transport: paramiko.Transport, target: SSHTarget) -> None:
        """Ask for the key types known_hosts has for this host first, as OpenSSH does, so a
        host with a known RSA key is not judged by its (unknown) ed25519 key."""
        known_types: list[str] = []
        for entry in self._known_entries(target):
            if entry.marker:
                continue
            key_type = blob_key_type(entry.blob)
            names = ["rsa-sha2-512", "rsa-sha2-256"] if key_type == "ssh-rsa" else [key_type]
            known_types += [n for n in names if n not in known_types]
        if not known_types:
            return
        options = transport.get_security_options()
        available = list(options.key_types)
        first = [t for t in known_types if t in available]
        if first:
            options.key_types = first + [t for t in available if t not in first]

    def _verify_host_key(self, transport: paramiko.Transport, target: SSHTarget) -> None:
        blob = transport.get_remote_server_key().asbytes()
        check = check_host_key(self._known_entries(target), blob)
        if check.trusted:
            return
        if check.verdict == "unknown" and self.accept_new and target.record_to:
            key = self._known_hosts_file(target.record_to).append(
                target.hostkey_name, blob_key_type(blob), blob, hashed=target.hash_known_hosts
            )
            log.warning(
                "recorded new host key of %s (%s:%d): %s %s in %s",
                target.name,
                target.address,
                target.port,
                blob_key_type(blob),
                fingerprint(blob),
                key.where,
            )
            return
        raise hostkey_error(target.name, target.address, target.port, blob, check, target.record_to)

    # ------------------------------------------------------------------ authentication

    def _load_key(self, path: str) -> tuple[paramiko.PKey | None, str]:
        """The private key at `path`, parsed once per transport; (None, why) if unusable."""
        with self._files_lock:
            cached = self._keys.get(path)
        if cached is not None:
            return cached
        loaded: tuple[paramiko.PKey | None, str]
        try:
            loaded = (paramiko.PKey.from_path(path), "")
        except FileNotFoundError:
            loaded = (None, "missing")
        except (paramiko.PasswordRequiredException, TypeError):
            loaded = (None, "encrypted; add it to ssh-agent")
        except Exception as exc:  # unreadable, unknown type, bad format: skip the key
            loaded = (None, f"unusable: {type(exc).__name__}: {exc}")
        with self._files_lock:
            return self._keys.setdefault(path, loaded)

    def _candidate_keys(self, target: SSHTarget) -> Generator[tuple[str, paramiko.PKey | None, str], None, None]:
        """(label, key or None, why not) in the order they are offered."""
        for path in target.identity_files:
            key, why = self._load_key(path)
            yield path, key, why
        if self.allow_agent and not target.identities_only and os.environ.get("SSH_AUTH_SOCK"):
            agent = paramiko.Agent()
            try:
                for agent_key in agent.get_keys():
                    comment = getattr(agent_key, "comment", "") or ""
                    label = f"agent:{comment or fingerprint(agent_key.asbytes())}"
                    yield label, agent_key, ""
            finally:
                agent.close()
        if self.look_for_keys and not target.identity_files:
            for path in DEFAULT_IDENTITY_FILES:
                full = os.path.expanduser(path)
                if os.path.isfile(full):
                    key, why = self._load_key(full)
                    yield full, key, why

    def _authenticate(self, transport: paramiko.Transport, target: SSHTarget, deadline: float) -> None:
        with contextlib.closing(self._candidate_keys(target)) as candidates:  # closes the agent
            self._offer_keys(transport, target, candidates, deadline)

    def _offer_keys(
        self,
        transport: paramiko.Transport,
        target: SSHTarget,
        candidates: Iterator[tuple[str, paramiko.PKey | None, str]],
        deadline: float,
    ) -> None:
        tried: list[str] = []
        allowed: list[str] | None = None
        who = f"{target.user}@{target.name} ({target.address}:{target.port})"
        for label, key, why in candidates:
            if key is None:
                tried.append(f"{label} ({why})")
                continue
            if time.monotonic() > deadline:
                raise TimeoutError("authentication timed out")
            try:
                remaining = transport.auth_publickey(target.user, key)
            except paramiko.BadAuthenticationType as exc:
                allowed = list(exc.allowed_types)
                tried.append(f"{label} (not offered)")
                break
            except paramiko.AuthenticationException:
                tried.append(label)
                continue
            if not remaining:
                return
            raise TransportError(
                target.name,
                "auth",
                f"{who} needs further authentication ({', '.join(remaining)}) after the key "
                f"{label}; fleet only does public-key authentication",
                hint="use a key that is sufficient on its own for this user",
            )
        message = f"authentication as {who} failed; "
        message += f"keys tried: {', '.join(tried)}" if tried else "no keys to offer"
        if allowed is not None:
            message += f"; the server allows only: {', '.join(allowed)}"
        raise TransportError(
            target.name,
            "auth",
            message,
            hint=f"put one of these public keys in ~{target.user}/.ssh/authorized_keys on the "
            "host, or name the right key with IdentityFile in the ssh config, or load it into "
            "ssh-agent",
        )

    # ------------------------------------------------------------------ commands

    def _exec(
        self,
        name: str,
        slot: _Slot,
        transport: paramiko.Transport,
        command: str,
        wire: str,
        stdin: bytes | None,
        limit: float,
    ) -> RunResult:
        """One channel, one command; stdout/stderr read in this thread until EOF and exit
        status, stdin fed as the window allows, all bounded by `limit` seconds."""
        started = time.monotonic()
        deadline = started + limit
        with self._lock:
            slot.channels += 1
            busy = slot.busy
        log.debug("%s: opening a channel (%d command(s) on this connection) for `%s`", name, busy, _short(command))
        try:
            channel = transport.open_session(timeout=max(limit, 0.001))
        except paramiko.ChannelException as exc:
            raise TransportError(
                name,
                "protocol",
                f"{name} refused to open a session channel: {exc.text}",
                hint="check sshd's MaxSessions and the user's login restrictions on the host",
            ) from exc
        except Exception as exc:
            log.debug("%s: opening a channel failed: %r (connection active: %s, its error: %r)", name, exc,
                      transport.is_active(), transport.get_exception())
            self._drop(slot, transport)  # a connection that cannot open a channel in time is not reused
            if time.monotonic() >= deadline:
                raise TransportError(
                    name,
                    "timeout",
                    f"{name} did not open a session channel within {limit:g}s",
                    hint="the host may be overloaded or cut off; retry, or raise the timeout",
                ) from exc
            raise _lost(name, command, exc) from exc
        try:
            result = self._exec_channel(name, transport, channel, command, wire, stdin, deadline, started, limit)
            log.debug("%s: channel %d: exit %d after %.3fs, %d+%d bytes out", name, channel.get_id(),
                      result.exit_code, result.duration, len(result.stdout), len(result.stderr))
            return result
        except TransportError as exc:
            log.debug("%s: channel %d: %s: %s (connection active: %s, its error: %r)", name, channel.get_id(),
                      exc.kind, exc.message, transport.is_active(), transport.get_exception())
            if exc.kind == "timeout":
                # The host may be gone (network cut) rather than the command slow: the next
                # command reconnects, bounded by the connect timeout, instead of waiting out its
                # own timeout on a dead connection.  Commands running beside it on the same
                # connection end as "connection lost": on a dead connection they would anyway.
                self._drop(slot, transport)
            raise
        except Exception as exc:
            if not transport.is_active():  # (dropped in `finally`)
                raise _lost(name, command, exc) from exc
            raise TransportError(
                name,
                "protocol",
                f"running `{_short(command)}` on {name} failed: {type(exc).__name__}: {exc}",
                hint=f"the server refused or broke off the command; check sshd's log on {name}",
            ) from exc
        finally:
            channel.close()
            if not transport.is_active():
                self._drop(slot, transport)

    def _drop(self, slot: _Slot, transport: paramiko.Transport) -> None:
        """Forget and close a broken connection, unless another thread already replaced it."""
        log.debug("dropping a connection (active=%s, last error %r)", transport.is_active(), transport.get_exception())
        with self._lock:
            if slot.transport is transport:
                slot.transport = None
        transport.close()

    def _exec_channel(
        self,
        name: str,
        transport: paramiko.Transport,
        channel: paramiko.Channel,
        command: str,
        wire: str,
        stdin: bytes | None,
        deadline: float,
        started: float,
        limit: float,
    ) -> RunResult:
        def timed_out() -> TransportError:
            _signal(channel, "TERM")
            return TransportError(
                name,
                "timeout",
                f"`{_short(command)}` on {name} did not finish within {limit:g}s; it was sent SIGTERM "
                "and its channel closed",
                hint="raise the timeout, or look on the host for what hangs",
            )

        token = self._deadlines.arm(deadline, channel.close)
        try:
            channel.exec_command(wire)
        except paramiko.SSHException as exc:
            if time.monotonic() >= deadline:
                raise timed_out() from exc
            raise
        finally:
            if not self._deadlines.disarm(token):
                raise timed_out()
        channel.settimeout(0.0)
        # No EOF for a command without stdin: it reads /dev/null on the host (see _eof_safe).
        pending = memoryview(stdin) if stdin else None
        stdout, stderr = bytearray(), bytearray()
        poller = select.poll()
        poller.register(channel.fileno(), select.POLLIN)
        while True:
            if pending is not None:
                pending = _feed(channel, pending)
            _drain(channel.recv_ready, channel.recv, stdout, self.max_output, name, command, "stdout")
            _drain(channel.recv_stderr_ready, channel.recv_stderr, stderr, self.max_output, name, command, "stderr")
            if (channel.eof_received or channel.closed) and not (channel.recv_ready() or channel.recv_stderr_ready()):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out()
            wait = min(remaining, _STDIN_POLL) if pending is not None else remaining
            poller.poll(max(1, int(wait * 1000)))
        if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise timed_out()
        exit_code = channel.recv_exit_status()
        if exit_code == -1 and not transport.is_active():
            raise _lost(name, command, EOFError("connection closed before the exit status"))
        return RunResult(
            host=name,
            command=command,
            exit_code=exit_code,
            stdout=bytes(stdout),
            stderr=bytes(stderr),
            duration=time.monotonic() - started,
        )


# --------------------------------------------------------------------------- helpers

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges every segment at once instead of after Linux's 40 ms
    delayed-ACK timer.

    sshd does not set TCP_NODELAY on non-interactive sessions, so when it writes two small
    packets in a row (e.g. a debug message, then the channel-open confirmation) Nagle holds
    the second until the first is ACKed, and the client delays that ACK by 40 ms.  That
    stall happened twice per connection on the loopback sshd (68 ms -> 20 ms wall per
    connect+command, see docs/TRANSPORT.md).  TCP_QUICKACK is not sticky, hence per recv.
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if _QUICKACK is not None:
            try:
                self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass
        return super().recv(bufsize, flags)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _short(command: str, limit: int = 80) -> str:
    one_line = " ".join(command.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def _signal(channel: paramiko.Channel, name: str) -> None:
    """Best effort: ask sshd to signal the command's process group (RFC 4254 "signal" request).

    Otherwise a command that writes nothing outlives its closed channel.  OpenSSH >= 7.9
    honours it for exec sessions of non-root users only: root sessions run without a
    privilege-separated child and sshd logs "session signalling requires privilege
    separation".  paramiko has no public call for it, hence the private send."""
    if channel.closed:
        return
    try:
        message = paramiko.Message()
        message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
        message.add_int(channel.remote_chanid)
        message.add_string("signal")
        message.add_boolean(False)
        message.add_string(name)
        channel.get_transport()._send_user_message(message)  # type: ignore[attr-defined]
    except Exception:  # closing the channel is the fallback anyway
        log.debug("could not send signal %s", name, exc_info=True)


def _eof_safe(command: str, stdin: bytes | None, use_sudo: bool) -> str:
    """The command line sent for `command`, shaped so that fleet never sends a channel EOF that
    can reach sshd after the channel's CLOSE.

    paramiko builds an EOF under the channel's lock and sends it after releasing it, while its
    transport thread may answer the server's CLOSE of that channel (the command already ended)
    with a CLOSE of its own; sent in that order, OpenSSH has freed the channel number and
    disconnects: "ieof packet referred to nonexistent channel" — every command on the
    connection is lost (paramiko/paramiko#1115 and #1705, open; seen on the lab in 1 bare apply of
    30, tests/unit/test_transport_channel_eof.py forces it).  So:
    * without stdin, the command reads /dev/null on the host and fleet sends no EOF at all (the
      server's CLOSE is answered by paramiko's own thread, EOF and CLOSE in order);
    * with stdin, the command runs in a subshell and its stdin is read to the end before the
      shell exits, whatever the command did (e.g. `set -e` stopped it early): the server cannot
      close the channel before fleet's EOF has arrived.  The exit status is the command's."""
    if not stdin:
        return "exec </dev/null\n" + (sudo_command(command) if use_sudo else command)
    drained = f"(\n{command}\n)\nfleet_rc=$?\ncat >/dev/null\nexit $fleet_rc\n"
    return sudo_command(drained) if use_sudo else drained


def _feed(channel: paramiko.Channel, pending: memoryview) -> memoryview | None:
    """Send as much of `pending` as the channel window takes now; EOF once all is sent."""
    try:
        while pending and channel.send_ready():
            sent = channel.send(bytes(pending[:_CHUNK]))
            if sent <= 0:
                break
            pending = pending[sent:]
    except (TimeoutError, OSError):
        return None  # the command stopped reading (exited or closed stdin): drop the rest
    if pending:
        return pending
    channel.shutdown_write()
    return None


def _drain(
    ready: Callable[[], bool],
    recv: Callable[[int], bytes],
    into: bytearray,
    cap: int,
    name: str,
    command: str,
    stream: str,
) -> None:
    while ready():
        chunk = recv(_CHUNK)
        if not chunk:
            return
        if len(into) + len(chunk) > cap:
            raise TransportError(
                name,
                "output-too-large",
                f"{stream} of `{_short(command)}` on {name} exceeded {_size(cap)}; the command was aborted",
                hint="narrow the command's output, or raise max_output if this much is expected",
            )
        into += chunk


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n} bytes"


def _lost(name: str, command: str, exc: BaseException) -> TransportError:
    return TransportError(
        name,
        "unreachable",
        f"connection to {name} was lost while running `{_short(command)}`: {type(exc).__name__}: {exc}",
        hint="the host or the network went away; check the host and retry",
    )


def _connect_error(exc: Exception, target: SSHTarget, phase: str, deadline: float) -> TransportError:
    """Map what socket/paramiko raised while connecting to one of the documented kinds."""
    where = f"{target.name} ({target.address}:{target.port})"
    ssh = f"ssh -p {target.port} {target.user}@{target.address} true"
    if isinstance(exc, socket.gaierror):
        return TransportError(
            target.name,
            "unreachable",
            f"cannot resolve {target.address} (host {target.name}): {exc.strerror or exc}",
            hint=f"check the address in the inventory file or HostName for {target.name} in the ssh config",
        )
    timed_out = isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)
    timed_out = timed_out or time.monotonic() >= deadline
    if not timed_out and isinstance(exc, paramiko.SSHException):
        timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
    if timed_out:
        return TransportError(
            target.name,
            "timeout",
            f"connecting to {where} timed out after {target.connect_timeout:g}s (during {phase})",
            hint=f"is the host up and port {target.port} reachable? try `{ssh}`; raise "
            "ConnectTimeout in the ssh config for slow links",
        )
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(
            target.name,
            "unreachable",
            f"cannot reach {where}: connection refused",
            hint=f"is sshd running and listening on port {target.port}? try `{ssh}`",
        )
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError | OSError):
        code = getattr(exc, "errno", None)
        reason = os.strerror(code) if isinstance(code, int) and code else str(exc)
        if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            reason = f"no route ({reason})"
        return TransportError(
            target.name,
            "unreachable",
            f"cannot reach {where}: {reason}",
            hint=f"check the network path to {target.address}; try `{ssh}`",
        )
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, EOFError | ConnectionError) or isinstance(cause, EOFError | ConnectionError):
        return TransportError(
            target.name,
            "unreachable",
            f"{where} closed the connection during the {phase}",
            hint=f"sshd may be refusing connections (MaxStartups, firewall, fail2ban); try `{ssh}`",
        )
    return TransportError(
        target.name,
        "protocol",
        f"{phase} with {where} failed: {type(exc).__name__}: {exc}",
        hint=f"try `ssh -v -p {target.port} {target.user}@{target.address} true` to see where it fails",
    )
